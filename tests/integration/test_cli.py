"""The ``vllm-lora-ext`` console script against the real server: exit codes and messages."""

from __future__ import annotations

import json
import subprocess
import sys

from tiny_model import random_lora_tensors, write_adapter


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vllm_lora_ext.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_lists_commands():
    out = cli("--help")
    assert out.returncode == 0
    assert "serve" in out.stdout and "adapters" in out.stdout
    serve = cli("serve", "--help")
    assert serve.returncode == 0 and "--max-loras" in serve.stdout


def test_adapters_add_list_remove(server, tmp_path):
    d = write_adapter(tmp_path / "cli", random_lora_tensors(8), base=server.base)
    url = ("--url", server.url)
    added = cli("adapters", *url, "add", "from-cli", str(d))
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["name"] == "from-cli"

    listed = cli("adapters", *url, "list")
    assert listed.returncode == 0
    assert "from-cli" in {a["name"] for a in json.loads(listed.stdout)["adapters"]}

    again = cli("adapters", *url, "add", "from-cli", str(d))
    assert again.returncode == 1 and "already exists" in again.stderr

    assert cli("adapters", *url, "remove", "from-cli").returncode == 0
    gone = cli("adapters", *url, "remove", "from-cli")
    assert gone.returncode == 1 and "not found" in gone.stderr


def test_adapters_cli_errors(tmp_path):
    missing = cli("adapters", "add", "x", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "not a directory" in missing.stderr
    unreachable = cli("adapters", "--url", "http://127.0.0.1:9", "list")
    assert unreachable.returncode == 3 and "cannot reach" in unreachable.stderr
    bad_model = cli("serve", "--model", str(tmp_path))
    assert bad_model.returncode == 2 and "config.json" in bad_model.stderr
