"""Where the CPU LoRA time goes: py-spy over the --quick serving run, ours vs vLLM's wrapper.

    python benchmarks/profile_cpu_lora.py     # ~4 min on 2 cores; needs py-spy (bench extra)

Samples every process (the engine runs in a child), keeps the stacks under vLLM's
``execute_model`` and reports the share spent inside the LoRA layer ops, with the hottest lines.
Writes benchmarks/results/cpu_lora_profile.json.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
LORA_ENTRY = ("add_lora_linear", "add_shrink", "add_expand", "add_lora_logits")


def profile(provider: str, workdir: Path) -> dict:
    raw = workdir / f"{provider}.txt"
    subprocess.run(
        [
            str(Path(sys.executable).parent / "py-spy"), "record", "--subprocesses",
            "--nonblocking", "--format", "raw", "-r", "50", "-o", str(raw), "--",
            sys.executable, str(HERE / "cpu_serving.py"), "--quick", "--providers", provider,
            "--out", str(workdir / f"{provider}.json"),
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


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = {p: profile(p, Path(tmp)) for p in ("vllm", "ours")}
    report["command"] = "py-spy record over `cpu_serving.py --quick` per provider"
    out = HERE / "results" / "cpu_lora_profile.json"
    out.write_text(json.dumps(report, indent=2))
    for p in ("vllm", "ours"):
        print(f"{p}: {100 * report[p]['lora_share']:.1f}% of execute_model in LoRA ops")
    return 0


if __name__ == "__main__":
    sys.exit(main())
