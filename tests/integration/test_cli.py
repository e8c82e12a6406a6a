"""The ``vllm-lora-ext`` console script against the real server: exit codes and messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tiny_model import random_lora_tensors, write_adapter


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vllm_lora_ext.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_every_subcommand_takes_the_key_and_never_prints_a_traceback(server, tmp_path):
    """The suite's server wants a key: without it each subcommand exits 5 with one line; with
    ``--api-key`` (or ``VLLM_API_KEY``, as every other test here) it works."""
    keyless = {k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"}
    url = ("--url", server.url)
    commands = [
        ("adapters", *url, "list"),
        ("adapters", *url, "remove", "nobody"),
        ("migrate", *url, "status", "nojob"),
        ("stats", "gather", "nobody", *url, "--out", str(tmp_path / "s.safetensors")),
    ]
    for command in commands:
        out = cli(*command, env=keyless)
        assert out.returncode == 5, (command, out.stderr)
        assert "401" in out.stderr and "Traceback" not in out.stderr, out.stderr
    keyed = cli("adapters", *url, "--api-key", server.api_key, "list", env=keyless)
    assert keyed.returncode == 0, keyed.stderr
    wrong = cli("adapters", *url, "--api-key", "wrong", "list", env=keyless)
    assert wrong.returncode == 5 and "--api-key" in wrong.stderr
    missing = cli("migrate", *url, "status", "nojob")
    assert missing.returncode == 4 and "not found" in missing.stderr


def test_help_lists_commands():
    out = cli("--help")
    assert out.returncode == 0
    assert "serve" in out.stdout and "adapters" in out.stdout
    serve = cli("serve", "--help")
    assert serve.returncode == 0 and "--max-loras" in serve.stdout


def test_adapters_add_list_remove(server, tmp_path):
    d = write_adapter(tmp_path / "cli", random_lora_tensors(8), base=server.base)
    (d / "notes.txt").write_text("not an adapter file: left here, so the server accepts the rest")
    url = ("--url", server.url)
    added = cli("adapters", "add", "from-cli", str(d), *url)  # options after the action
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["name"] == "from-cli"

    listed = cli("adapters", "list", *url, "--api-key", server.api_key)
    assert listed.returncode == 0
    assert "from-cli" in {a["name"] for a in json.loads(listed.stdout)["adapters"]}

    again = cli("adapters", *url, "add", "from-cli", str(d))
    assert again.returncode == 1 and "already exists" in again.stderr

    assert cli("adapters", *url, "remove", "from-cli").returncode == 0
    gone = cli("adapters", *url, "remove", "from-cli")
    assert gone.returncode == 4 and "not found" in gone.stderr  # Exit.MISSING


def test_adapters_cli_errors(tmp_path):
    missing = cli("adapters", "add", "x", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "not a directory" in missing.stderr
    not_an_adapter = cli("adapters", "add", "x", "/etc", "--url", "http://127.0.0.1:9")
    assert not_an_adapter.returncode == 2 and "nothing was sent" in not_an_adapter.stderr
    unreachable = cli("adapters", "--url", "http://127.0.0.1:9", "list")
    assert unreachable.returncode == 3 and "cannot reach" in unreachable.stderr
    bad_model = cli("serve", "--model", str(tmp_path))
    assert bad_model.returncode == 2 and "config.json" in bad_model.stderr


def test_offline_merge_writes_a_servable_adapter_with_recipe(tmp_path):
    from vllm_lora_ext.adapters.lora_weights import load_lora
    from vllm_lora_ext.merge.methods import merge_adapters

    a = write_adapter(tmp_path / "a", random_lora_tensors(91), base="tiny-llama")
    b = write_adapter(tmp_path / "b", random_lora_tensors(92), base="tiny-llama")
    out = cli(
        "merge",
        "--method",
        "ties",
        "--density",
        "0.4",
        "--adapter",
        f"{a}=0.7",
        "--adapter",
        f"{b}=0.3",
        "--out",
        str(tmp_path / "merged" / "ab"),
    )
    assert out.returncode == 0, out.stderr
    merged = tmp_path / "merged" / "ab"
    recipe = json.loads((merged / "recipe.json").read_text())
    assert recipe["method"] == "ties" and recipe["params"]["density"] == 0.4
    want = merge_adapters([load_lora(a), load_lora(b)], [0.7, 0.3], "ties", {"density": 0.4})
    got = load_lora(merged)
    for key, tensor in want.tensors.items():
        assert (got.tensors[key] - tensor).abs().max() < 1e-6, key

    again = cli(
        "merge", "--method", "ties", "--density", "0.4", "--adapter", f"{a}=1", "--out", str(merged)
    )
    assert again.returncode == 2 and "exists" in again.stderr
    bad = cli("merge", "--method", "ties", "--adapter", f"{a}=x", "--out", str(tmp_path / "c"))
    assert bad.returncode == 2 and "PATH=WEIGHT" in bad.stderr
    no_density = cli(
        "merge",
        "--method",
        "ties",
        "--adapter",
        f"{a}=1",
        "--adapter",
        f"{b}=1",
        "--out",
        str(tmp_path / "d"),
    )
    assert no_density.returncode == 2 and "density" in no_density.stderr
    other = write_adapter(tmp_path / "o", random_lora_tensors(93), base="another-model")
    mixed = cli(
        "merge",
        "--method",
        "linear",
        "--adapter",
        f"{a}=1",
        "--adapter",
        f"{other}=1",
        "--out",
        str(tmp_path / "e"),
    )
    assert mixed.returncode == 2 and "different base" in mixed.stderr
    assert not any((tmp_path / n).exists() for n in ("c", "d", "e"))
