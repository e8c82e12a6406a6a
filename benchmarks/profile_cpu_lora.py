"""Where the CPU LoRA time goes: py-spy over the --quick serving run, ours vs vLLM's wrapper.

    python benchmarks/profile_cpu_lora.py     # ~4 min on 2 cores; needs py-spy (bench extra)
    python benchmarks/profile_cpu_lora.py --quick     # the same on the tiny test Llama

Samples every process (the engine runs in a child), keeps the stacks under vLLM's
``execute_model`` and reports the share spent inside the LoRA layer ops, with the hottest lines.
The workload is 8 requests x 16 tokens of ``cpu_serving.py`` on SmolLM2-135M-Instruct
(``--quick``: ``cpu_serving.py --quick``, on the tiny test Llama of ``benchmarks/quick.py``).
Writes benchmarks/results/cpu_lora_profile.json; ``--quick`` writes to
``<tmp>/profile_cpu_lora_quick/`` unless ``--out`` says otherwise, and keeps each provider's
``cpu_serving.py --quick`` result beside it (``cpu_serving-<provider>.json`` and ``.png``).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import quick
from run_record import run_record

HERE = Path(__file__).parent
LORA_ENTRY = ("add_lora_linear", "add_shrink", "add_expand", "add_lora_logits")
DEFAULT_OUT = HERE / "results" / "cpu_lora_profile.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, help="HF model folder (default: the embedded SmolLM2)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="profile the tiny test Llama instead")
    p.add_argument("--rate", type=int, help="py-spy samples per second (default: 50; --quick: "
                   "250, since the tiny model's LoRA ops take microseconds)")  # fmt: skip
    args = p.parse_args(argv)
    if args.quick and args.out == DEFAULT_OUT:  # a smoke run never overwrites the committed run
        args.out = quick.out_dir("profile_cpu_lora") / "cpu_lora_profile.json"
    if args.rate is None:
        args.rate = 250 if args.quick else 50
    return args


# The workload: what ``cpu_serving.py --quick`` ran when the committed profile was taken.
WORKLOAD = ["--requests", "8", "--output-tokens", "16", "--repeats", "1"]


def profile(
    provider: str, model: Path, workdir: Path, rate: int, smoke_out: Path | None = None
) -> dict:
    """py-spy over ``cpu_serving.py`` for one provider; ``smoke_out``: ``--quick``, its result
    kept in this folder."""
    raw = workdir / f"{provider}.txt"
    result = (smoke_out or workdir) / f"cpu_serving-{provider}.json"
    subprocess.run(
        [
            str(Path(sys.executable).parent / "py-spy"), "record", "--subprocesses",
            "--nonblocking", "--format", "raw", "-r", str(rate), "-o", str(raw), "--",
            sys.executable, str(HERE / "cpu_serving.py"), *(["--quick"] if smoke_out else WORKLOAD),
            "--providers", provider, "--model", str(model), "--out", str(result),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return summarise(raw)


def summarise(raw: Path) -> dict:
    step = lora = 0
    hot: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "execute_model" not in stack:
            continue
        n = int(count)
        step += n
        frames = stack.split(";")
        entry = next((i for i, f in enumerate(frames) if f.startswith(LORA_ENTRY) or
                      any(f"{e} (" in f for e in LORA_ENTRY)), None)  # fmt: skip
        if entry is not None:
            lora += n
            hot[frames[-1] if len(frames) > entry + 1 else frames[entry]] += n
    return {
        "execute_model_samples": step,
        "lora_share": lora / step if step else None,
        "hottest": [{"frame": f, "share": n / step} for f, n in hot.most_common(5)],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is not None:
            model = args.model.resolve()
        elif args.quick:
            model = quick.tiny_llama(Path(tmp))
        else:  # what cpu_serving.py would load itself: the embedded default
            from vllm_lora_ext.base_models import ensure_default_model
            from vllm_lora_ext.settings import Settings

            model = ensure_default_model(Settings().cache_dir)
        kept = args.out.parent if args.quick else None
        report = {p: profile(p, model, Path(tmp), args.rate, kept) for p in ("vllm", "ours")}
    report["command"] = "py-spy record over `cpu_serving.py --quick` per provider"
    report["model"] = model.name
    report["quick"] = args.quick
    report["run"] = run_record(args)
    if args.quick:
        report["note"] = quick.NOTE
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for p in ("vllm", "ours"):
        share = report[p]["lora_share"]
        print(f"{p}: {'n/a' if share is None else f'{100 * share:.1f}%'} of execute_model in "
              "LoRA ops")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
