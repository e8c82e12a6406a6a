"""Start `vllm-lora-ext serve` as a child process on loopback and wait until it is healthy."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from vllm_lora_ext.auth import bearer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    store: Path
    log: Path
    proc: subprocess.Popen
    base: str
    model_dir: Path | None = None
    api_key: str | None = None
    """The server's ``VLLM_API_KEY`` (from the environment it was started with)."""

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.api_key)

    def client(self, timeout: float = 120.0) -> httpx.Client:
        """A client that presents the server's key, if it has one."""
        return httpx.Client(base_url=self.url, timeout=timeout, headers=self.headers)

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def start_server(
    workdir: Path,
    base: str,
    serve_args: list[str],
    startup_timeout: float = 600.0,
    env: dict[str, str] | None = None,
    allowed_paths: Sequence[Path] = (),
) -> Server:
    """Run the CLI's serve command and wait until /health answers; raise with the log if not."""
    store = workdir / "store"
    log = workdir / "server.log"
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm_lora_ext.cli",
        "serve",
        "--port",
        str(port),
        "--store",
        str(store),
        *(a for p in allowed_paths for a in ("--allowed-adapter-path", str(p))),
        *serve_args,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    api_key = env.get("VLLM_API_KEY") or None
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = Server(f"http://127.0.0.1:{port}", store, log, proc, base, api_key=api_key)
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    server.stop()
    raise RuntimeError(f"server not healthy after {startup_timeout:.0f} s:\n{server.log_tail()}")
