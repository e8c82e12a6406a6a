"""The one prepared check for a lent GPU: ceilings, correctness, CUDA graphs, timing.

Made for the host we can borrow: one H200, Python 3.12, torch 2.11, triton 3.6, no vLLM, no
network, 64 MiB of files, one command of at most 10 minutes. It needs torch, triton, this
repository and vLLM's own ``lora_shrink`` / ``lora_expand`` copied beforehand into
``benchmarks/_vendor`` (``python benchmarks/vllm_lora_ops.py`` here; the folder travels with the
command). Problems, tolerances, the float64 reference and the vLLM-ops oracle are the kernel
test kit's (``lora_kernels/testing.py``), as in the unit tests. Parts, each written to
``OUT/gpu_check.json`` as soon as it ends, so a killed run keeps what it did:

1. ``env``: versions, device, commit, arguments.
2. ``ceilings``: device-to-device copy bandwidth (the practical HBM roofline) and bf16 matmul rate.
3. ``correctness``: ours against a float64 reference on fresh random inputs, fp16 and bf16:
   ragged ranks, -1 tokens, q/k/v slices, and slices an adapter does not target (skipped);
   outputs poisoned beforehand (rows no adapter touches must stay bit-identical); each case
   run twice (a moving result is a race).
4. ``graph``: the wrapper's per-step work (work lists rebuilt into persistent buffers, then the
   launch) captured in a CUDA graph and replayed after the batch's adapter mapping changed.
5. ``timing``: ours vs vLLM's ops vs a grouped torch baseline, decode and prefill token counts,
   1/8/64 adapters, ranks 16 and 64, Llama-3-8B and SmolLM2 projections; CUDA-event medians with
   L2 flushed, each case twice; each as a fraction of the HBM roofline. Stops at ``--budget-s``.
6. ``rank_exact``: adapters of rank r in slots padded to rank 64 (vLLM's ``max_lora_rank``),
   computed with their own rank vs with the padded one: what rank-exact serving saves. (A merge
   of K adapters is served as one "cat" adapter of rank Σ r_k, so K = 4 rank-16 adapters cost
   what the rank-64 rows of ``timing`` show.)

It prints a short table last.

    python benchmarks/gpu_check.py --out DIR             # on the GPU (about 6 minutes)
    python benchmarks/gpu_check.py --dry-run --out DIR   # CPU, Triton interpreter, tiny shapes
    python benchmarks/gpu_check.py --tune --out DIR      # also tune lora_kernels/configs/<gpu>.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from lora_kernels.testing import (  # noqa: E402
    ORACLE_TOLERANCE,
    Problem,
    make_batch,
    make_problem,
    reference,
    small_grid_config,
    tolerance,
    vllm_apply,
)

LLAMA3_8B = {
    "qkv": (4096, (4096, 1024, 1024)),
    "gate_up": (4096, (14336, 14336)),
    "o": (4096, (4096,)),
    "down": (14336, (4096,)),
}
SMOLLM2 = {
    "qkv": (576, (576, 192, 192)),
    "gate_up": (576, (1536, 1536)),
    "o": (576, (576,)),
    "down": (1536, (576,)),
}
TINY = {"qkv": (64, (32, 16, 16))}
DECODE, PREFILL = (1, 16), (256, 4096)
SLOTS = 64
FLUSH_BYTES = 256 << 20  # > the H200's 60 MB L2


class Plan:
    """Shapes and repetitions: the real run, or the dry run's tiny version of the same path."""

    def __init__(self, dry: bool) -> None:
        self.dry = dry
        self.device = "cpu" if dry else "cuda"
        self.models = {"tiny": TINY} if dry else {"llama3-8b": LLAMA3_8B, "smollm2": SMOLLM2}
        self.tokens = (1, 5) if dry else (*DECODE, *PREFILL)
        self.active = (1, 2) if dry else (1, 8, 64)
        self.ranks = (16,) if dry else (16, 64)
        self.slots = 4 if dry else SLOTS
        self.reps, self.warmup = (1, 0) if dry else (50, 5)


class Timer:
    """Median microseconds: CUDA events around graph replays, L2 flushed before each; on the dry
    run, wall time of one call (the path is checked, not the number)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.flush = (
            None if plan.dry else torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
        )

    def __call__(self, fn: Callable[[], object], graph: bool = True) -> float:
        if self.plan.dry:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e6
        for _ in range(self.plan.warmup):
            fn()
        run = capture(fn).replay if graph else fn
        times = []
        for _ in range(self.plan.reps):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return statistics.median(times)


class _Eager:
    def __init__(self, fn: Callable[[], object]) -> None:
        self.replay = fn


def capture(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


# -- cases and providers ----------------------------------------------------------------------


def make_case(
    plan: Plan,
    model: str,
    op: str,
    tokens: int,
    active: int,
    rank: int,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
) -> Problem:
    """A served batch of ``model``'s projection ``op`` (the kit's :func:`make_batch`)."""
    hidden, sizes = plan.models[model][op]
    return make_batch(hidden, sizes, tokens, active, rank, plan.slots, dtype, seed, plan.device)


def min_bytes(p: Problem, active: int, tokens: int) -> int:
    """x once, A and B of every active adapter once, y read and written (2-byte dtypes)."""
    n, h, r = sum(p.sizes), p.hidden, p.r_max
    weights = active * r * (len(p.sizes) * h + n)
    return 2 * (tokens * h + weights + 2 * tokens * n)


def ours_fn(
    p: Problem,
    y: torch.Tensor,
    ranks: torch.Tensor | None = None,
    work: object | None = None,
) -> Callable[[], list]:
    """What our wrapper does per layer: one launch over a work list built beforehand."""
    from lora_kernels.configs import select_config
    from lora_kernels.metadata import build_slice_table, build_work_list
    from lora_kernels.multi_lora import launch, r_block_for

    table = build_slice_table(p.lora_a, p.lora_b, p.offset_start)
    ranks = p.ranks if ranks is None else ranks
    cfg = select_config(p.x.shape[0], r_block_for(p.r_max))
    if work is None:
        work = build_work_list(p.idx, p.slots, cfg.block_m)
    return lambda: launch(
        y, p.x, table, p.idx, ranks, p.scales, p.r_max, work=work, config=cfg,
        live_ranks=p.live_ranks,
    )  # fmt: skip


def agree(p: Problem, ops) -> bool:
    """Ours and vLLM's ops compute the same delta before either is timed."""
    mine, theirs = p.fresh_y(), p.fresh_y()
    ours_fn(p, mine)()
    vllm_apply(ops, p, theirs)()
    return bool(torch.allclose(mine.float(), theirs.float(), **ORACLE_TOLERANCE))


def torch_fn(p: Problem, y: torch.Tensor) -> Callable[[], None]:
    """A plain grouped torch baseline: per active adapter, its rows' two matmuls (eager)."""
    active = torch.unique(p.idx).tolist()
    rows = {s: (p.idx == s).nonzero().squeeze(1) for s in active}

    def run() -> None:
        for s, r in rows.items():
            xs, off = p.x[r], 0
            for a, b, n in zip(p.lora_a, p.lora_b, p.sizes, strict=True):
                y[r, off : off + n] += (xs @ a[s, 0].T) @ b[s, 0].T
                off += n

    return run


# -- parts ------------------------------------------------------------------------------------


def part_env(plan: Plan, args: argparse.Namespace) -> dict:
    import triton

    commit = (
        subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        or None
    )
    env = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        triton=triton.__version__,
        commit=commit,
        args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        dry_run=plan.dry,
    )
    if not plan.dry:
        props = torch.cuda.get_device_properties(0)
        env |= dict(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    return env


def part_ceilings(plan: Plan, timer: Timer) -> dict:
    n = 1 << (20 if plan.dry else 30)
    src = torch.empty(n, dtype=torch.uint8, device=plan.device)
    dst = torch.empty_like(src)
    copy_us = timer(lambda: dst.copy_(src), graph=False)
    m = 256 if plan.dry else 8192
    dtype = torch.float32 if plan.dry else torch.bfloat16
    x = torch.randn(m, m, device=plan.device).to(dtype)
    mm_us = timer(lambda: x @ x, graph=False)
    return dict(
        copy_bandwidth_gbs=round(2 * n / copy_us / 1e3, 1),
        matmul_tflops=round(2 * m**3 / mm_us / 1e6, 1),
        matmul_dtype=str(dtype),
    )


def part_correctness(plan: Plan) -> dict:
    dtypes = (torch.float16,) if plan.dry else (torch.float16, torch.bfloat16)
    hidden, sizes = (64, (32, 16, 16)) if plan.dry else (512, (256, 128, 128))
    # Per slice and slot: slot 0 a q/v adapter (k untargeted), slot 3 targets nothing here.
    live = torch.tensor([[16, 8, 24, 0], [0, 8, 24, 0], [16, 8, 24, 0]], dtype=torch.int32)
    results = []
    for dtype in dtypes:
        for seed, tokens in enumerate((7, 33) if plan.dry else (1, 37, 300)):
            for skip in (False, True):
                torch.manual_seed(seed)
                p = make_problem(dtype, tokens, [16, 8, 24, 4], sizes, hidden, 0, 0)
                p = _on(p, plan.device, live if skip else None)
                runs = []
                for _ in range(2):
                    y = p.fresh_y()
                    ours_fn(p, y)()
                    runs.append(y)
                results.append(_compare(p, runs, skip))
    return dict(cases=results, ok=all(r["ok"] for r in results))


def _on(p: Problem, device: str, live: torch.Tensor | None) -> Problem:
    """``p`` on ``device``; with ``live``, the untargeted slices' weights set to NaN (a kernel
    reading them would write NaN)."""
    moved = [[t.to(device) for t in ts] for ts in (p.lora_a, p.lora_b)]
    if live is not None:
        for s, row in enumerate(live.tolist()):
            for slot, rank in enumerate(row):
                if rank == 0:
                    moved[0][s][slot] = float("nan")
                    moved[1][s][slot] = float("nan")
    return Problem(
        p.x.to(device), moved[0], moved[1], p.idx.to(device), p.ranks.to(device),
        p.scales.to(device), p.y0.to(device), p.offset_start,
        None if live is None else live.to(device),
    )  # fmt: skip


def _compare(p: Problem, runs: list, skip: bool) -> dict:
    first, second = (r.cpu() for r in runs)
    ref = reference(p)
    untouched = p.idx.cpu() < 0
    poisoned_ok = bool(torch.equal(first[untouched], p.y0.cpu()[untouched]))
    err = (first.double() - ref).abs()
    tol = tolerance(first.dtype, p.x.device)
    bound = tol["atol"] + tol["rtol"] * ref.abs()
    ok = bool((err <= bound).all()) and poisoned_ok and bool(torch.equal(first, second))
    return dict(
        kernel="multi_lora",
        dtype=str(first.dtype),
        tokens=p.x.shape[0],
        untargeted_slices_skipped=skip,
        max_abs_err=float(err.max()),
        untouched_rows_bit_identical=poisoned_ok,
        repeat_identical=bool(torch.equal(first, second)),
        ok=ok,
    )


def part_graph(plan: Plan) -> dict:
    """Capture once, change the batch's mapping (work lists rebuilt into the same buffers, as
    ``update_metadata`` does between steps), replay: the new mapping must be served."""
    from dataclasses import replace

    from lora_kernels.configs import select_config
    from lora_kernels.metadata import WorkList, build_work_list, max_work_items
    from lora_kernels.multi_lora import r_block_for

    tokens, dev = (8 if plan.dry else 64), plan.device
    p = make_case(plan, next(iter(plan.models)), "qkv", tokens, 2, 16)
    cfg = select_config(tokens, r_block_for(16))
    n = max_work_items(tokens, p.slots, cfg.block_m)
    work_buf = torch.full((n, 3), -1, dtype=torch.int32, device=dev)
    sorted_buf = torch.zeros(tokens, dtype=torch.int32, device=dev)
    idx_buf = p.idx.clone()

    def step_metadata(idx: torch.Tensor) -> None:
        idx_buf.copy_(idx)
        wl = build_work_list(idx_buf, p.slots, cfg.block_m)
        work_buf[: wl.max_work].copy_(wl.work)
        sorted_buf.copy_(wl.sorted_tokens)

    work = WorkList(work_buf, sorted_buf, cfg.block_m, tokens)
    step_metadata(p.idx)
    y = p.fresh_y()
    # The dry run replays the same closure without a graph (no CUDA): the logic is checked.
    served = replace(p, idx=idx_buf)
    graph = (_Eager if plan.dry else capture)(ours_fn(served, y, work=work))
    new_idx = torch.randint(-1, p.slots, (tokens,), device=dev, dtype=torch.int32)
    step_metadata(new_idx)  # outside the graph, between steps
    y.zero_()
    graph.replay()
    if not plan.dry:
        torch.cuda.synchronize()
    err = float((y.cpu().double() - reference(p, idx=new_idx)).abs().max())
    return dict(
        cuda_graph=not plan.dry, replayed_after_new_mapping=True, max_abs_err=err, ok=err < 2e-2
    )


def part_timing(plan: Plan, timer: Timer, bw: float, deadline: float, ops) -> dict:
    cases, stopped = [], False
    for model, projections in plan.models.items():
        for op in projections:
            for tokens in plan.tokens:
                for active in plan.active:
                    for rank in plan.ranks:
                        if active > tokens:
                            continue
                        if time.monotonic() > deadline:
                            stopped = True
                            break
                        c = make_case(plan, model, op, tokens, active, rank)
                        y = c.fresh_y()
                        row = dict(
                            model=model,
                            op=op,
                            tokens=tokens,
                            active_adapters=active,
                            rank=rank,
                            phase="decode" if tokens <= 16 else "prefill",
                        )
                        row["agrees_with_vllm"] = agree(c, ops)
                        for name, fn, graph in (
                            ("ours", ours_fn(c, y), True),
                            ("vllm", vllm_apply(ops, c, y), True),
                            ("torch", torch_fn(c, y), False),
                        ):
                            twice = [timer(fn, graph) for _ in range(2)]
                            row[f"{name}_us"] = round(min(twice), 2)
                            row[f"{name}_us_runs"] = [round(t, 2) for t in twice]
                        roof = min_bytes(c, active, tokens) / bw * 1e6
                        row["vllm_over_ours"] = round(row["vllm_us"] / row["ours_us"], 3)
                        row["roofline_fraction"] = round(roof / row["ours_us"], 3)
                        cases.append(row)
                        print(json.dumps(row), flush=True)
    decode = [r["vllm_over_ours"] for r in cases if r["phase"] == "decode"]
    return dict(
        cases=cases,
        stopped_at_budget=stopped,
        median_decode_speedup_vs_vllm=statistics.median(decode) if decode else None,
        median_roofline_fraction=statistics.median([r["roofline_fraction"] for r in cases])
        if cases
        else None,
    )


def part_rank_exact(plan: Plan, timer: Timer) -> dict:
    """Slots padded to rank 64 holding rank-r adapters: own rank vs padded rank, same data."""
    model, padded = next(iter(plan.models)), 16 if plan.dry else 64
    rows = []
    for tokens in plan.tokens:
        for r in (8,) if plan.dry else (8, 16):
            c = make_case(plan, model, "qkv", tokens, min(8, tokens, plan.slots), padded)
            for a, b in zip(c.lora_a, c.lora_b, strict=True):  # zero padding, as in vLLM's slots
                a[..., r:, :].zero_()
                b[..., r:].zero_()
            own = torch.full((plan.slots,), r, dtype=torch.int32, device=plan.device)
            y = c.fresh_y()
            own_us = timer(ours_fn(c, y, own))
            pad_us = timer(ours_fn(c, y))
            rows.append(
                dict(
                    tokens=tokens,
                    rank=r,
                    padded_rank=padded,
                    own_rank_us=round(own_us, 2),
                    padded_rank_us=round(pad_us, 2),
                    padded_over_own=round(pad_us / own_us, 3),
                )
            )
    return dict(cases=rows)


# -- driver -----------------------------------------------------------------------------------


def small_vllm_grid(ops) -> None:
    """Dry run only: the kit's one-split, wide-block configs for vLLM's kernels (the
    interpreter pays ~2 ms per program); the code path is what the dry run checks."""
    ops.lora_shrink_op.get_lora_op_configs = small_grid_config
    ops.lora_expand_op.get_lora_op_configs = small_grid_config


def write(doc: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".gpu_check.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, out / "gpu_check.json")


def plot(doc: dict, path: Path) -> None:
    """Speed-up over vLLM's ops and roofline fraction per timed case, by token count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = doc.get("timing", {}).get("cases", [])
    if not cases:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({(c["model"], c["op"], c["rank"]) for c in cases}):
        pts = [c for c in cases if (c["model"], c["op"], c["rank"]) == key]
        label = f"{key[0]} {key[1]} r{key[2]}"
        axes[0].plot(
            [c["tokens"] for c in pts], [c["vllm_over_ours"] for c in pts], "o", ms=3, label=label
        )
        axes[1].plot([c["tokens"] for c in pts], [c["roofline_fraction"] for c in pts], "o", ms=3)
    axes[0].axhline(1.3, color="k", ls="--", lw=0.8)
    axes[1].axhline(0.7, color="k", ls="--", lw=0.8)
    axes[0].set_title("vLLM time / ours (goal 1.3 at decode)")
    axes[1].set_title("fraction of the HBM roofline (goal 0.7)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
    axes[0].legend(fontsize=6)
    fig.suptitle(
        f"lora_kernels on {doc['env'].get('device', 'CPU (dry run)')}, commit "
        f"{str(doc['env'].get('commit'))[:10]}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(doc: dict) -> str:
    lines = [f"{'part':<12} result"]
    c = doc.get("ceilings", {})
    lines.append(
        f"{'ceilings':<12} copy {c.get('copy_bandwidth_gbs')} GB/s, matmul "
        f"{c.get('matmul_tflops')} TFLOP/s ({c.get('matmul_dtype')})"
    )
    lines.append(f"{'correctness':<12} ok={doc.get('correctness', {}).get('ok')}")
    lines.append(f"{'graph':<12} {doc.get('graph')}")
    t = doc.get("timing", {})
    lines.append(
        f"{'timing':<12} {len(t.get('cases', []))} cases, median decode speed-up vs "
        f"vLLM {t.get('median_decode_speedup_vs_vllm')}, median roofline fraction "
        f"{t.get('median_roofline_fraction')}, stopped at budget "
        f"{t.get('stopped_at_budget')}"
    )
    for m in doc.get("rank_exact", {}).get("cases", []):
        lines.append(
            f"{'rank_exact':<12} T={m['tokens']} r={m['rank']} in {m['padded_rank']}: padded / "
            f"own = {m['padded_over_own']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    p.add_argument("--dry-run", action="store_true", help="CPU, interpreter, tiny shapes")
    p.add_argument("--budget-s", type=float, default=360.0, help="timing stops past this")
    p.add_argument("--tune", action="store_true", help="tune lora_kernels/configs/<gpu>.json first")
    p.add_argument("--tune-candidates", type=int, default=24)
    p.add_argument(
        "--vendor",
        type=Path,
        default=ROOT / "benchmarks" / "_vendor",
        help="where benchmarks/vllm_lora_ops.py put vLLM's ops",
    )
    args = p.parse_args(argv)
    started = time.monotonic()
    plan = Plan(args.dry_run)
    if plan.dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device (or --dry-run)")
    from vllm_lora_ops import load

    ops = load(args.vendor)
    if plan.dry:
        small_vllm_grid(ops)
    timer = Timer(plan)
    doc: dict = {"env": part_env(plan, args)}
    write(doc, args.out)
    if args.tune and not plan.dry:
        from kernel_tune import tune

        tune(
            lambda fn: timer(fn),
            lambda *a, **k: make_case(plan, "llama3-8b", *a, **k),
            args.tune_candidates,
        )
    doc["ceilings"] = part_ceilings(plan, timer)
    write(doc, args.out)
    bw = doc["ceilings"]["copy_bandwidth_gbs"] * 1e9
    for name, run in (
        ("correctness", lambda: part_correctness(plan)),
        ("graph", lambda: part_graph(plan)),
        ("timing", lambda: part_timing(plan, timer, bw, started + args.budget_s, ops)),
        ("rank_exact", lambda: part_rank_exact(plan, timer)),
    ):
        if time.monotonic() > started + args.budget_s + 60:  # stays within ~8 minutes
            doc[name] = {"skipped": "past the time budget"}
            continue
        try:
            doc[name] = run()
        except Exception as e:  # a broken part must not lose the others
            doc[name] = {"error": f"{type(e).__name__}: {e}"}
        doc["seconds"] = round(time.monotonic() - started, 1)
        write(doc, args.out)
    if not plan.dry:
        plot(doc, args.out / "gpu_check.png")
    print(table(doc))
    return doc


if __name__ == "__main__":
    main()
