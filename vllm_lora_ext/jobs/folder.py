"""The files of one job: spec, progress, result or error, the child's stderr.

Every file is written whole or not at all (:func:`~vllm_lora_ext.files.write_atomic`), so the
server may read progress while the job writes it, and a job killed mid-write leaves the last
complete file behind.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_lora_ext.files import write_atomic

SECRETS_ENV = "VLLM_LORA_EXT_JOB_SECRETS"
"""JSON object of named secrets (e.g. ``{"source_key": "..."}``): how keys reach a job."""


@dataclass(frozen=True)
class JobFolder:
    path: Path

    @property
    def spec_file(self) -> Path:
        return self.path / "job.json"

    @property
    def progress_file(self) -> Path:
        return self.path / "progress.json"

    @property
    def result_file(self) -> Path:
        return self.path / "result.json"

    @property
    def error_file(self) -> Path:
        return self.path / "error.json"

    @property
    def stderr_file(self) -> Path:
        return self.path / "stderr.log"

    def write_spec(self, kind: str, params: dict[str, Any]) -> JobFolder:
        """A fresh run: the spec, and no progress, result or error of an earlier one."""
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in (self.progress_file, self.result_file, self.error_file):
            stale.unlink(missing_ok=True)
        _write(self.spec_file, {"kind": kind, "params": params})
        return self

    def read_spec(self) -> tuple[str, dict[str, Any]]:
        spec = json.loads(self.spec_file.read_text())
        return spec["kind"], spec["params"]

    def write_progress(self, progress: dict[str, Any]) -> None:
        _write(self.progress_file, progress)

    def read_progress(self) -> dict[str, Any] | None:
        return _read(self.progress_file)

    def write_result(self, result: dict[str, Any]) -> None:
        _write(self.result_file, result)

    def read_result(self) -> dict[str, Any] | None:
        return _read(self.result_file)

    def write_error(self, kind: str, message: str) -> None:
        _write(self.error_file, {"kind": kind, "message": message})

    def read_error(self) -> dict[str, Any] | None:
        return _read(self.error_file)

    def stderr_tail(self, lines: int = 20) -> str:
        """The last lines the child wrote to stderr ('' if none): what a crash leaves."""
        try:
            text = self.stderr_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])


def job_secrets() -> dict[str, str]:
    """The secrets this job was given (none outside a job)."""
    raw = os.environ.get(SECRETS_ENV)
    return dict(json.loads(raw)) if raw else {}


def _write(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=1, allow_nan=True).encode())


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
