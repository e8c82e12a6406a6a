"""LoRA kernels on the GPU: ours vs vLLM's lora_shrink + lora_expand vs the HBM roofline.

Llama-3-8B projections (hidden 4096): qkv 4096 -> 4096/1024/1024 (three slices), gate_up
4096 -> 2 x 14336, o 4096 -> 4096, down 14336 -> 4096; tokens 1..4096, 1..64 active adapters
(64 slots), ranks 8/16/64; plus merged deltas (K=4 adapters of rank r) against one adapter of
rank 4r (there, vllm_us is vLLM running that rank-4r "cat" adapter). Each op is captured in
a CUDA graph (as vLLM decodes) and replayed after warm-up with L2 flushed before every
replay; the median over --reps CUDA-event timings is reported.
roofline_fraction = (minimal bytes / copy bandwidth) / ours_us.

    python benchmarks/kernels.py                 # needs CUDA and vllm==0.32.0
    python benchmarks/kernels.py --quick         # a few shapes, smoke test
    python benchmarks/kernels.py --tune          # search block configs, rewrite configs.json

Writes benchmarks/results/kernels.json and kernels.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
OPS = {"qkv": (4096, (4096, 1024, 1024)), "gate_up": (4096, (14336, 14336)),
       "o": (4096, (4096,)), "down": (14336, (4096,))}  # fmt: skip
TOKENS = (1, 4, 16, 64, 256, 1024, 4096)
ACTIVE = (1, 8, 64)
RANKS = (8, 16, 64)
SLOTS = 64
DTYPE = torch.float16
DEVICE = "cuda"
FLUSH_BYTES = 256 << 20  # > H100's 50 MB L2


class Timer:
    def __init__(self, reps: int, warmup: int, graphs: bool) -> None:
        self.reps, self.warmup, self.graphs = reps, warmup, graphs
        self.flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=DEVICE)

    def __call__(self, fn: Callable[[], None]) -> float:
        """Median microseconds of ``fn`` (replayed from a CUDA graph unless --no-graphs)."""
        for _ in range(self.warmup):
            fn()
        run = fn
        if self.graphs:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            run = graph.replay
        times = []
        for _ in range(self.reps):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device copy (read + write): the practical HBM ceiling."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    us = Timer(reps=20, warmup=3, graphs=False)(lambda: dst.copy_(src))
    return 2 * src.numel() / (us * 1e-6)


def make_case(op: str, tokens: int, active: int, rank: int, seed: int = 0) -> dict:
    hidden, sizes = OPS[op]
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=DEVICE) * scale).to(DTYPE)

    a = tuple(randn(SLOTS, 1, rank, hidden, scale=hidden**-0.5) for _ in sizes)
    b = tuple(randn(SLOTS, 1, n, rank, scale=rank**-0.5) for n in sizes)
    slots = torch.randperm(SLOTS, generator=g, device=DEVICE)[:active]
    idx = slots[torch.arange(tokens, device=DEVICE) % active].to(torch.int32)
    x = randn(tokens, hidden, scale=1.0)
    y = torch.zeros(tokens, sum(sizes), dtype=DTYPE, device=DEVICE)
    return dict(a=a, b=b, idx=idx, x=x, y=y, sizes=sizes, hidden=hidden, rank=rank)


def min_bytes(c: dict, active: int, tokens: int, k: int = 1) -> int:
    """x once, A and B of every active adapter once, y read and written (fp16)."""
    n, h, r = sum(c["sizes"]), c["hidden"], c["rank"]
    weights = active * k * r * (len(c["sizes"]) * h + n)
    return 2 * (tokens * h + weights + 2 * tokens * n)


def ours_fn(c: dict) -> Callable[[], None]:
    from lora_kernels.configs import select_config
    from lora_kernels.metadata import build_slice_table, build_work_list
    from lora_kernels.multi_lora import launch_groups, r_block_for

    table = build_slice_table(c["a"], c["b"])
    ranks = torch.full((SLOTS,), c["rank"], dtype=torch.int32, device=DEVICE)
    scales = torch.ones(SLOTS, device=DEVICE)
    cfg = c.get("config") or select_config(c["x"].shape[0], 1, r_block_for(c["rank"]))
    work = build_work_list(c["idx"], SLOTS, cfg.block_m)
    return lambda: launch_groups(
        c["y"], c["x"], table, c["idx"], SLOTS, ranks, scales, ranks, scales,
        recipes=False, max_k=1, max_rank=c["rank"], work=work, config=cfg,
    )  # fmt: skip


def vllm_fn(c: dict) -> Callable[[], None]:
    from vllm.lora.ops.triton_ops import LoRAKernelMeta, lora_expand, lora_shrink, utils

    # vLLM caches weight pointers and strides by data_ptr; fresh cases reuse addresses.
    utils._LORA_A_PTR_DICT.clear()
    utils._LORA_B_PTR_DICT.clear()
    tokens = c["x"].shape[0]
    meta = LoRAKernelMeta.make(SLOTS, tokens, device=DEVICE)
    meta.prepare_tensors(c["idx"])
    args = meta.meta_args(tokens, True)
    buf = torch.empty(len(c["sizes"]), tokens, c["rank"], dtype=torch.float32, device=DEVICE)

    def run() -> None:  # what PunicaWrapperGPU.add_lora_linear does
        lora_shrink(c["x"], c["a"], buf, *args, 1.0)
        lora_expand(buf, c["b"], c["y"], *args, offset_start=0, add_inputs=True)

    return run


def check_agree(c: dict) -> None:
    """Both providers must compute the same delta before either is timed."""
    c["y"].zero_()
    ours_fn(c)()
    mine = c["y"].clone()
    c["y"].zero_()
    vllm_fn(c)()
    torch.testing.assert_close(mine, c["y"], atol=2e-2, rtol=2e-2)


def bench_multi_lora(timer: Timer, bw: float, quick: bool) -> list[dict]:
    cases = []
    for op in ("qkv",) if quick else OPS:
        for tokens in (1, 64, 4096) if quick else TOKENS:
            for active in ACTIVE:
                for rank in (16,) if quick else RANKS:
                    if active > tokens:
                        continue
                    c = make_case(op, tokens, active, rank)
                    check_agree(c)
                    ours, vllm = timer(ours_fn(c)), timer(vllm_fn(c))
                    roof = min_bytes(c, active, tokens) / bw * 1e6
                    cases.append(dict(
                        op=op, tokens=tokens, active_adapters=active, rank=rank,
                        hidden=c["hidden"], ours_us=round(ours, 2), vllm_us=round(vllm, 2),
                        speedup=round(vllm / ours, 3), roofline_fraction=round(roof / ours, 3),
                    ))  # fmt: skip
                    print(json.dumps(cases[-1]), flush=True)
    return cases


def bench_merged(timer: Timer, bw: float, quick: bool) -> list[dict]:
    """Every token's request names a merge of K=4 rank-r adapters vs one rank-4r adapter."""
    from lora_kernels.merged_delta import build_recipes, merged_delta

    cases = []
    for tokens in (1, 256) if quick else (1, 16, 256, 4096):
        for r in (16,) if quick else (8, 16, 32):
            c = make_case("qkv", tokens, 1, r)
            recipes = build_recipes([{i: 0.25 for i in range(4)}], device=DEVICE)
            recipe_idx = torch.zeros(tokens, dtype=torch.int32, device=DEVICE)
            ranks = torch.full((SLOTS,), r, dtype=torch.int32, device=DEVICE)
            scales = torch.ones(SLOTS, device=DEVICE)

            def run(c=c, ri=recipe_idx, rec=recipes, rk=ranks, sc=scales) -> None:
                merged_delta(c["y"], c["x"], c["a"], c["b"], ri, rec, rk, sc)

            merged = timer(run)
            single = make_case("qkv", tokens, 1, 4 * r)
            ours, vllm = timer(ours_fn(single)), timer(vllm_fn(single))
            roof = min_bytes(c, 1, tokens, k=4) / bw * 1e6
            cases.append(dict(
                op="qkv_merged_k4", tokens=tokens, active_adapters=4, rank=r, hidden=c["hidden"],
                ours_us=round(merged, 2), vllm_us=round(vllm, 2), speedup=round(vllm / merged, 3),
                roofline_fraction=round(roof / merged, 3), single_rank_4r_us=round(ours, 2),
                merged_over_single=round(merged / ours, 3),
            ))  # fmt: skip
            print(json.dumps(cases[-1]), flush=True)
    return cases


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in OPS if any(c["op"] == op for c in doc["cases"])]
    fig, axes = plt.subplots(2, len(ops), figsize=(4.2 * len(ops), 7), squeeze=False)
    for j, op in enumerate(ops):
        for rank in RANKS:
            for active in ACTIVE:
                pts = [c for c in doc["cases"] if (c["op"], c["rank"], c["active_adapters"])
                       == (op, rank, active)]  # fmt: skip
                if not pts:
                    continue
                xs = [c["tokens"] for c in pts]
                label = f"r{rank} a{active}"
                axes[0][j].plot(xs, [c["speedup"] for c in pts], marker="o", label=label)
                axes[1][j].plot(xs, [c["roofline_fraction"] for c in pts], marker="o")
        axes[0][j].axhline(1.3, color="k", ls="--", lw=0.8)
        axes[1][j].axhline(0.7, color="k", ls="--", lw=0.8)
        axes[0][j].set_title(f"{op}: speed-up vs vLLM")
        axes[1][j].set_title(f"{op}: fraction of HBM roofline")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"lora_kernels vs vLLM 0.32 on {doc['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tune", action="store_true", help="search configs, rewrite configs.json")
    p.add_argument("--tune-candidates", type=int, default=48, help="random configs per bucket")
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--no-graphs", action="store_true", help="time eager launches")
    p.add_argument("--out", type=Path, default=RESULTS / "kernels.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py times CUDA kernels and needs an NVIDIA GPU (built for "
                 "H100 with vllm==0.32.0). On CPU, run: pytest tests/unit/kernels")  # fmt: skip
    timer = Timer(args.reps, args.warmup, graphs=not args.no_graphs)
    if args.tune:
        from kernel_tune import tune

        tune(timer, make_case, args.tune_candidates)
    bw = copy_bandwidth()
    import vllm

    doc = dict(device=torch.cuda.get_device_name(), vllm=vllm.__version__,
               copy_bandwidth_gbs=round(bw / 1e9, 1), cuda_graphs=not args.no_graphs,
               reps=args.reps, cases=[])  # fmt: skip
    doc["cases"] = bench_multi_lora(timer, bw, args.quick) + bench_merged(timer, bw, args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
