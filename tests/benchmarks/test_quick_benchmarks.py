"""Every benchmark's ``--quick`` smoke run, as a user runs it: the script as a subprocess, its
JSON (and PNG) written into ``tmp_path``, and the JSON checked for what the report renders, the
run record and numbers in range, not just the exit code.

The quick runs use the tiny test models and synthetic tasks (``benchmarks/quick.py``). Those
that need a vLLM server are pointed at the session's server (``--url``, the tiny Llama of
``tests/conftest.py``) instead of starting their own; what they register there is removed after.
``cpu_serving.py --quick`` runs as the workload of ``profile_cpu_lora.py --quick`` (one vLLM
engine per provider instead of five engines for the two). ``gpu_check.py``'s dry run is tested
in ``tests/unit/kernels/test_gpu_check.py``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402


def quick(script: str, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run ``benchmarks/<script> --quick ARGS`` with its scratch files under ``tmp_path`` (where
    the session's server may read adapters); returns its stdout."""
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(scratch), **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=800,
    )  # fmt: skip
    assert proc.returncode == 0, f"{script}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def load(path: Path) -> dict:
    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text())


def check_record(doc: dict) -> None:
    """``"quick": true`` and the run record: commit, versions, the arguments with --quick."""
    assert doc["quick"] is True
    run = doc["run"]
    assert run["commit"] and len(run["commit"].split("+")[0]) == 40, run["commit"]
    assert run["versions"]["torch"] and run["versions"]["python"]
    assert run["args"]["quick"] is True


def finite(x: float | None, low: float = -math.inf, high: float = math.inf) -> bool:
    return x is not None and math.isfinite(x) and low <= x <= high


def accuracy(acc: float, interval: list[float] | None = None) -> bool:
    inside = interval is None or interval[0] - 1e-9 <= acc <= interval[1] + 1e-9
    return finite(acc, 0.0, 1.0) and inside


def png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def on_server(server):
    """The session's server; the adapters (merges included) and statistics a benchmark leaves
    there are deleted afterwards."""
    with server.client() as c:
        before = {a["name"] for a in c.get("/v1/adapters").json()["adapters"]}
    yield server
    with server.client() as c:
        for a in c.get("/v1/adapters").json()["adapters"]:
            if a["name"] not in before:
                c.delete(f"/v1/stats/{a['name']}")
                assert c.delete(f"/v1/adapters/{a['name']}").status_code in (200, 204, 404)


def server_args(server) -> list[str]:
    return ["--url", server.url, "--model-dir", str(server.model_dir)]


# -- in process, no server -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "script",
    ["adaptive_merge", "cpu_serving", "eval_adapters", "hot_upgrade", "job_isolation",
     "max_loras_curve", "merge_quality",
     "migration_ceilings", "migration_quality", "profile_cpu_lora", "train_adapters"],
)  # fmt: skip
def test_quick_writes_under_the_temporary_directory_by_default(script):
    """Never over the committed results (nor adapters/): <tmp>/<script>_quick/."""
    args = importlib.import_module(script).parse_args(["--quick"])
    assert args.out.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve()), args.out
    assert f"{script}_quick" in args.out.parts


def test_train_adapters_quick(tmp_path):
    from safetensors.torch import load_file

    screen = tmp_path / "screen.json"
    quick("train_adapters.py", tmp_path, "--out", str(tmp_path / "out"), "--screen", str(screen))
    rows = {r["task"]: r for r in load(screen)["rows"]}
    for task, mode in (("arithmetic", "generate"), ("sports_understanding", "multiple_choice")):
        folder = tmp_path / "out" / task
        card = load(folder / "card.json")
        check_record(card)
        assert card["task"] == task and card["mode"] == mode and card["base"] == "tiny-llama"
        assert card["steps"] == 3 and card["train_rows"] > 0 and card["heldout_n"] == 6
        assert accuracy(card["base_heldout_acc"]) and accuracy(card["adapter_heldout_acc"])
        assert card["train_seconds"] >= 0 and set(card["split_sha256"]) == {
            "train", "validation", "heldout"}  # fmt: skip
        files = 0 if task == "arithmetic" else 1  # arithmetic is generated: no file
        assert len(card["task_files_sha256"]) == files and card["task_source"] in (
            "generated:arithmetic@seed0", "bbh@9ee07bd")  # fmt: skip
        row = rows[task]
        assert row["kept"] == (row["adapter_minus_base"] >= 0.10)
        assert row["adapter_minus_base"] == card["adapter_heldout_acc"] - card["base_heldout_acc"]
        config = load(folder / "adapter_config.json")
        assert config["r"] == 8 and set(config["target_modules"]) == {"q_proj", "v_proj"}
        tensors = load_file(folder / "adapter_model.safetensors")
        assert tensors and all(t.isfinite().all() for t in tensors.values())


def test_a_screen_grows_by_task(tmp_path):
    """A second screening run keeps the rows of tasks it did not train (with their commit) and
    replaces those it did; a quick run never mixes with a real screen."""
    import argparse

    import train_adapters

    def card(task: str, gain: float, commit: str) -> dict:
        keys = ("task_source", "mode", "heldout_n", "base_heldout_acc", "base_heldout_ci95",
                "adapter_heldout_acc", "adapter_heldout_ci95", "adapter_minus_base_ci95",
                "epochs", "steps", "train_rows", "train_seconds")  # fmt: skip
        return dict.fromkeys(keys, 0) | {"task": task, "adapter_minus_base": gain,
                                          "run": {"commit": commit}}  # fmt: skip

    args = argparse.Namespace(keep_margin=0.1, quick=False)
    screen = tmp_path / "screen.json"
    train_adapters.write_screen(screen, args, [card("a", 0.3, "c1"), card("b", 0.0, "c1")])
    train_adapters.write_screen(screen, args, [card("b", 0.2, "c2"), card("c", 0.05, "c2")])
    rows = {r["task"]: (r["kept"], r["commit"]) for r in load(screen)["rows"]}
    assert rows == {"a": (True, "c1"), "b": (True, "c2"), "c": (False, "c2")}
    train_adapters.write_screen(screen, argparse.Namespace(keep_margin=0.1, quick=True),
                                [card("d", 0.5, "c3")])  # fmt: skip
    assert [r["task"] for r in load(screen)["rows"]] == ["d"]


def test_adaptive_merge_quick(tmp_path):
    quick("adaptive_merge.py", tmp_path, "--out", str(tmp_path / "out"))
    doc = load(tmp_path / "out" / "adaptive_merge.json")
    check_record(doc)
    assert doc["model"] == "tiny-llama (quick)" and doc["target_task"] == "sports_understanding"
    rows = {r["method"]: r for r in doc["rows"]}
    assert set(rows) == {"adaptive", "base", "uniform", "random_pool", "fresh_lora"}
    for r in rows.values():
        assert accuracy(r["acc"], r["ci95"]) and r["n"] == doc["heldout_scored"] == 6
        assert finite(r["heldout_loss"], 0.0) and finite(r["seconds"], 0.0)
    assert len(doc["selected"]) == 2 and set(doc["selected"]) <= set(doc["pool"])
    assert set(doc["weights"]) == set(doc["selected"])
    assert all(finite(w) for w in doc["weights"].values())
    assert doc["verdict"] and doc["target_task"] in report.adaptive_merge(doc)
    assert png(tmp_path / "out" / "adaptive_merge.png")


def test_migration_ceilings_quick(tmp_path):
    """Teacher (tiny Llama + random adapter) and students (tiny Gemma 3) in process."""
    quick("migration_ceilings.py", tmp_path, "--out", str(tmp_path / "out"))
    doc = load(tmp_path / "out" / "migration_ceilings.json")
    check_record(doc)
    assert doc["source_base"] == "tiny-llama" and doc["target_base"].startswith("tiny-gemma3")
    rows = {t["task"]: t for t in doc["tasks"]}
    assert set(rows) == {"arithmetic", "disambiguation_qa"}
    assert rows["arithmetic"]["mode"] == "generate"
    assert rows["disambiguation_qa"]["mode"] == "multiple_choice"
    for t in rows.values():
        assert t["train_inputs"] == 4  # --steps 2 x --batch 2
        for key in ("source", "target_base", "three_shot", "true_labels", "teacher_labels"):
            r = t[key]
            assert r["n"] == 6 and 0 <= r["correct"] <= 6, (t["task"], key, r)
            assert accuracy(r["acc"], r["ci95"]) and r["acc"] == r["correct"] / 6
            assert finite(r["seconds"], 0.0) and "predictions" not in r
        for key in ("true_labels", "teacher_labels"):  # a student was trained on each
            training = t[key]["training"]
            assert 0 < training["rows"] <= 4 and finite(training["final_loss"], 0.0), training
        label = t["teacher_label_acc"]
        assert label["n"] == 4 and accuracy(label["acc"], label["ci95"])
    sure = rows["disambiguation_qa"]["voted_label_acc"]  # options: the teacher's probability
    assert sure["kind"] == "option probability" and sure["min_agreement"] == 0.6
    assert sum(b["n"] for b in sure["by_agreement"].values()) == 4
    assert sure["n"] == sum(b["n"] for k, b in sure["by_agreement"].items() if float(k) >= 0.6)
    assert (rows["disambiguation_qa"]["voted_labels"] is None) == (sure["n"] == 0)
    voted = rows["arithmetic"]["voted_label_acc"]
    assert voted["votes"] == 2 and voted["coverage"] == voted["n"] / 4
    levels = voted["by_agreement"]  # every input at its agreement level, kept or not
    assert sum(b["n"] for b in levels.values()) == 4
    assert voted["n"] == sum(b["n"] for k, b in levels.items() if float(k) >= 0.5)
    assert all(accuracy(b["acc"], b["ci95"]) for b in levels.values())
    assert "arithmetic" in report.vote_threshold(doc)
    assert accuracy(voted["acc"], voted["ci95"])
    ceiling = rows["arithmetic"]["voted_labels"]  # none when no vote reached a majority
    assert (ceiling is None) == (voted["n"] == 0)
    assert ceiling is None or accuracy(ceiling["acc"], ceiling["ci95"])
    weighted = rows["arithmetic"]["weighted_labels"]  # every voted input, at its agreement
    assert accuracy(weighted["acc"], weighted["ci95"]) and 0 < weighted["training"]["rows"] <= 4
    assert rows["disambiguation_qa"]["weighted_labels"] is None  # options: soft labels instead
    text = report.migration_ceilings(doc)
    assert "disambiguation_qa" in text and "tiny-gemma3" in text
    assert png(tmp_path / "out" / "migration_ceilings.png")


def test_migration_ceilings_quick_soup(tmp_path):
    """--soup 2 --soup-rank 2: each row's two students (seeds 0 and 1) scored, and the mean of
    their deltas cut to rank 2 scored as the row, with what the cut lost."""
    quick("migration_ceilings.py", tmp_path, "--out", str(tmp_path / "out"),
          "--rows", "true_labels,soft_labels", "--soup", "2", "--soup-rank", "2")  # fmt: skip
    doc = load(tmp_path / "out" / "migration_ceilings.json")
    assert doc["run"]["args"]["soup"] == 2 and doc["run"]["args"]["soup_rank"] == 2
    rows = {t["task"]: t for t in doc["tasks"]}
    for task, key in (("arithmetic", "true_labels"), ("disambiguation_qa", "true_labels"),
                      ("disambiguation_qa", "soft_labels")):  # fmt: skip
        r = rows[task][key]
        assert [m["order_seed"] for m in r["members"]] == [0, 1], (task, key)
        assert [m["seed"] for m in r["members"]] == [0, 0], (task, key)  # one LoRA init
        assert all(accuracy(m["acc"], m["ci95"]) and m["n"] == 6 for m in r["members"])
        assert accuracy(r["acc"], r["ci95"]) and r["n"] == 6
        assert r["soup"]["rank"] == 2 and finite(r["soup"]["max_cut_error"], 0.0, 1.0)
    assert rows["arithmetic"]["soft_labels"] is None  # multiple choice only
    text = report.soup_ceilings(doc)
    assert "cut to rank 2" in text and text.count("| disambiguation_qa |") == 2


# -- kernels: offline compile, interpreter ---------------------------------------------------------


def test_kernel_compile_report_quick(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # it compiles
    out = tmp_path / "kernel_compile.json"
    subprocess.run(
        [sys.executable, str(BENCH / "kernel_compile_report.py"), "--quick", "--out", str(out)],
        cwd=ROOT, env=env, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    doc = load(out)
    check_record(doc)
    assert doc["rows"] and {r["arch"] for r in doc["rows"]} == {"sm_90"}
    assert len({(r["r_block"], r["max_tokens"]) for r in doc["rows"]}) == 1
    for r in doc["rows"]:
        assert r["built"] and not r["spills"] and 0 < r["registers"] <= 255, r
        assert r["dynamic_shared_bytes"] + r["static_shared_bytes"] <= 227 * 1024
    assert "builds" in report.kernel_compile(doc)


def test_kernel_tune_quick(tmp_path):
    from lora_kernels.configs import CONFIG_DIR, load_entries

    def committed() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in CONFIG_DIR.iterdir()}

    before = committed()
    quick("kernel_tune.py", tmp_path, "--out", str(tmp_path / "out"))
    assert committed() == before, "the quick run writes only under --out"
    doc = load(tmp_path / "out" / "kernel_tune.json")
    check_record(doc)
    (bucket,) = doc["buckets"]
    assert bucket["candidates"] == 2
    assert len(bucket["scored"]) + len(bucket["skipped"]) == 2
    assert all(finite(s["score"], 0.0) for s in bucket["scored"])
    assert finite(bucket["score"], 0.0, 1.0) and all(finite(t, 0.0) for t in bucket["old_us"])
    (entry,) = load_entries(tmp_path / "out" / "configs.json")
    assert (entry.r_block, entry.max_tokens) == (bucket["r_block"], bucket["max_tokens"])
    assert entry.config.to_dict() == bucket["best"]


def test_vllm_lora_ops_quick(tmp_path):
    quick("vllm_lora_ops.py", tmp_path, "--out", str(tmp_path / "out"))
    doc = load(tmp_path / "out" / "vllm_lora_ops.json")
    check_record(doc)
    assert doc["ok"] and {"lora_shrink_op.py", "lora_expand_op.py", "shim.py"} <= set(doc["files"])
    assert len(doc["cases"]) == 3
    for c in doc["cases"]:  # a real delta, matched: an op that wrote nothing would fail
        assert c["ok"] and c["max_abs_ref"] > 0.5 and c["max_abs_err"] < 0.02, c


# -- against the session's server ----------------------------------------------------------------


def test_serving_quick(tmp_path, on_server):
    out = tmp_path / "out" / "serving-cpu.json"
    quick("serving.py", tmp_path, *server_args(on_server), "--out", str(out))
    doc = load(out)
    check_record(doc)
    assert doc["model"] == "tiny-llama"
    sat = [r for r in doc["rows"] if r["kind"] == "saturation"]
    opened = [r for r in doc["rows"] if r["kind"] == "open"]
    assert [r["n_adapters"] for r in sat] == [0, 1, 4, 0] and sat[3]["repeat"]
    assert [r["n_adapters"] for r in opened] == [0, 1, 4]
    assert all(r["requests"] == 8 for r in sat)
    assert sat[0]["ratio_to_base"] + sat[3]["ratio_to_base"] == pytest.approx(2.0)
    capacity = (sat[0]["requests_per_s"] + sat[3]["requests_per_s"]) / 2
    assert all(r["rate"] == pytest.approx(0.5 * capacity) for r in opened)
    for r in doc["rows"]:
        assert r["requests"] > 0 and r["errors"] == 0, r
        assert finite(r["throughput_tok_s"], 0.0) and r["throughput_tok_s"] > 0
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"]
        assert 0 <= r["tpot_p50_ms"] <= r["tpot_p99_ms"]
        assert 0 < len(r["ttft_ms"]) <= r["requests"]
        assert r["loads_in_step"] is not None and r["loads_ahead"] >= 0  # read from /metrics
    assert finite(sat[2]["ratio_to_base"], 0.0)
    low, high = sat[2]["ratio_range"]
    assert low <= sat[2]["ratio_to_base"] <= high
    scraped = "\n".join(doc["metrics_sample"])
    assert 'vllm_lora_ext_adapter_time_to_first_token_seconds_count{adapter="base"}' in scraped
    assert 'vllm_lora_ext_adapters_resident{where="slot"}' in scraped
    assert "N adapters" in report.serving(doc)
    assert png(out.with_suffix(".png"))


def test_eval_adapters_quick(tmp_path, on_server):
    out = tmp_path / "out" / "adapters.json"
    quick("eval_adapters.py", tmp_path, *server_args(on_server), "--out", str(out))
    doc = load(out)
    check_record(doc)
    assert doc["base"] == on_server.base
    rows = {r["task"]: r for r in doc["adapters"]}
    assert set(rows) == {"arithmetic", "sports_understanding"}
    assert rows["arithmetic"]["mode"] == "generate"
    assert rows["sports_understanding"]["mode"] == "multiple_choice"
    for r in rows.values():
        assert r["n_heldout"] == 6
        assert accuracy(r["base_acc"], r["base_ci95"])
        assert accuracy(r["adapter_acc"], r["adapter_ci95"])
    assert "sports_understanding" in report.adapters(doc)


def test_merge_quality_quick(tmp_path, on_server):
    quick("merge_quality.py", tmp_path, *server_args(on_server), "--out", str(tmp_path / "out"))
    doc = load(tmp_path / "out" / "merge_quality.json")
    check_record(doc)
    tasks = doc["tasks"]
    assert tasks == ["arithmetic", "sports_understanding"] and doc["limit"] == 4
    assert set(doc["methods"]) == {"linear", "ties", "dare_ties", "cat_svd", "iteris_1", "iteris_2"}
    for m in doc["methods"].values():
        assert set(m["per_task"]) == set(tasks) and all(accuracy(a) for a in m["per_task"].values())
        assert accuracy(m["mean_acc"]) and finite(m["seconds"], 0.0)
    assert finite(doc["methods"]["iteris_2"]["residual"], 0.0)  # the change between iterations
    assert set(doc["base"]) == set(tasks) and accuracy(doc["single_adapter_mean_acc"])
    assert doc["stats_bytes"] > 0 and len(doc["stats_tokens"]) == 2
    assert all(n > 0 for n in doc["stats_tokens"].values())
    assert finite(doc["capture_throughput_ratio"], 0.0) and doc["capture_throughput_ratio"] > 0
    assert "iteris_2" in report.merge_quality(doc)
    assert png(tmp_path / "out" / "merge_quality.png")


def test_migration_quality_quick(tmp_path, on_server):
    """The old base is the session's server; the students (tiny Gemma 3) train in process."""
    modes = {"filtered": "migrated_acc", "excess": "excess_acc", "unfiltered": "unfiltered_acc",
             "seeds_only": "seeds_only_acc"}  # fmt: skip
    out = tmp_path / "out"
    quick("migration_quality.py", tmp_path, *server_args(on_server), "--out", str(out))
    doc = load(out / "migration_quality.json")
    check_record(doc)
    assert doc["note"] and doc["settings"]["quick"] is True
    assert doc["source_base"] == "tiny-llama" and doc["target_base"].startswith("tiny-gemma3")
    rows = {r["task"]: r for r in doc["tasks"]}
    assert set(rows) == {"arithmetic", "disambiguation_qa"}
    assert rows["arithmetic"]["scoring"] == "greedy exact match"
    assert rows["disambiguation_qa"]["scoring"] == "option log-likelihood"
    finished = []
    for task, r in rows.items():
        assert r["n"] == 8 and r["source_via"] == "vllm server"
        assert accuracy(r["source_acc"], r["source_ci95"])
        assert accuracy(r["target_base_acc"], r["target_base_ci95"])
        assert set(r["modes"]) == set(modes)
        for mode, summary in r["modes"].items():
            if "error" in summary:
                assert summary["error"] and r[modes[mode]] is None and mode != "seeds_only"
                continue
            finished.append((task, mode))
            assert summary["seeds"] == [0] and len(summary["runs"]) == 1, summary
            m = summary["runs"][0]
            assert r[modes[mode]] == summary["acc"] == m["acc"], (task, mode)
            assert accuracy(m["acc"], m["ci95"]), (task, mode)
            assert summary["paired_diff"] == pytest.approx(m["acc"] - r["source_acc"])
            lo, hi = summary["paired_diff_ci"]
            assert -1 <= lo <= summary["paired_diff"] <= hi <= 1, summary
            assert isinstance(m["gate"]["passed"], bool) and m["gate"]["reason"], m["gate"]
            assert m["gate"]["n"] > 0 and accuracy(m["gate"]["agreement"])
            paired = m["vs_source"]  # the same 8 examples: the counts give the difference
            assert paired["diff"] == pytest.approx(m["acc"] - r["source_acc"]), paired
            assert paired["diff"] * 8 == pytest.approx(
                paired["only_migrated"] - paired["only_source"]
            )
            assert -1 <= paired["ci95"][0] <= paired["diff"] <= paired["ci95"][1] <= 1, paired
            assert m["train_rows"] > 0 and finite(m["distil"]["final_loss"], 0.0)
            assert 0 < m["distil"]["steps_run"] <= 4 and finite(m["seconds"], 0.0)
            kept, fallback = m["synthesis"]["kept"], m["synthesis_fallback"]
            if mode == "seeds_only":
                assert kept == 0 and fallback is None
            else:  # a filter may keep none of a random base's inputs: the real ones then
                assert (kept > 0) != bool(fallback), (mode, m["synthesis"], fallback)
        assert (task, "seeds_only") in finished  # needs no synthetic input
    text = report.migration_quality(doc)
    assert "disambiguation_qa" in text and "tiny-gemma3" in text
    assert png(out / "migration_quality.png")


def test_migration_quality_quick_student_soup_two_seeds(tmp_path):
    """--student-soup 2 over migration seeds 0 and 1, in process: every migration trains two
    students and serves the mean of their deltas cut to the student rank; both members and the
    cut are on record, and the task's row is the mean over the seeds, compared with the source
    per held-out example."""
    out = tmp_path / "out"
    quick("migration_quality.py", tmp_path, "--in-process", "--modes", "filtered",
          "--student-soup", "2", "--migration-seeds", "0,1", "--out", str(out))  # fmt: skip
    doc = load(out / "migration_quality.json")
    assert doc["settings"]["student_soup"] == 2 and doc["settings"]["migration_seeds"] == [0, 1]
    for r in doc["tasks"]:
        summary = r["modes"]["filtered"]
        assert "error" not in summary and r["seeds"] == summary["seeds"] == [0, 1], summary
        runs = summary["runs"]
        assert [m["seed"] for m in runs] == [0, 1]
        assert r["migrated_acc"] == pytest.approx((runs[0]["acc"] + runs[1]["acc"]) / 2)
        assert summary["per_seed"] == [m["acc"] for m in runs]
        assert r["paired_diff_ci"] == summary["paired_diff_ci"]
        assert summary["paired_diff"] == pytest.approx(r["migrated_acc"] - r["source_acc"])
        lo, hi = summary["paired_diff_ci"]
        assert -1 <= lo <= summary["paired_diff"] <= hi <= 1, summary
        assert r["task_source"] and r["n"] == len(runs[0]["hits"])
        for m in runs:
            assert accuracy(m["acc"], m["ci95"]), (r["task"], m)
            soup = m["distil"]["soup"]
            assert [x["seed_offset"] for x in soup["members"]] == [0, 1]
            assert soup["rank"] == doc["settings"]["rank"]
            assert finite(soup["max_cut_error"], 0.0, 1.0)
            assert finite(soup["mean_cut_error"], 0.0, soup["max_cut_error"])
    text = report.migration_quality(doc)
    assert "[0, 1]" in text


@pytest.mark.slow
def test_hot_upgrade_quick(tmp_path, on_server):
    """The old server is the session's; the new one (tiny Gemma 3) is started by the script."""
    quick("hot_upgrade.py", tmp_path, *server_args(on_server), "--out", str(tmp_path / "out"))
    doc = load(tmp_path / "out" / "hot_upgrade.json")
    check_record(doc)
    assert doc["source_base"] == "tiny-llama" and doc["target_base"] == "tiny-gemma3"
    assert doc["requests"] > 0 and doc["failed"] == 0, doc["failures"]
    assert doc["forwarded"] + doc["served_here"] == doc["requests"]
    m = doc["migration"]
    assert m["state"] != "running" and m["finished_at"] >= m["created_at"]
    (adapter,) = m["adapters"]
    assert adapter["name"] == "arithmetic" and adapter["gate"] is not None, adapter
    assert finite(doc["new_server_start_seconds"], 0.0)
    assert "0 failed" in report.hot_upgrade(doc)


# -- vLLM engines of their own -------------------------------------------------------------------


@pytest.mark.slow
def test_profile_cpu_lora_and_cpu_serving_quick(tmp_path):
    """One run for both (each vLLM engine costs ~30-50 s to start here): the profile's workload
    is ``cpu_serving.py --quick`` per provider, whose results it keeps beside its own."""
    out = tmp_path / "out" / "cpu_lora_profile.json"
    quick("profile_cpu_lora.py", tmp_path, "--out", str(out))
    doc = load(out)
    check_record(doc)
    assert doc["model"] == "tiny-llama"
    for provider in ("vllm", "ours"):
        p = doc[provider]
        assert p["execute_model_samples"] > 0 and finite(p["lora_share"], 0.0, 1.0), p
        # At --quick's scale a provider's LoRA ops may fall between samples: then no hot lines.
        assert bool(p["hottest"]) == (p["lora_share"] > 0), p
        assert all(finite(h["share"], 0.0, p["lora_share"]) for h in p["hottest"]), p
    assert doc["run"]["args"]["rate"] == 250
    assert "with ours" in report.cpu_lora_profile(doc)

    for provider in ("vllm", "ours"):
        serving = load(tmp_path / "out" / f"cpu_serving-{provider}.json")
        check_record(serving)
        assert serving["run"]["args"]["providers"] == provider
        assert serving["model"] == "tiny-llama"
        assert "8 requests x 64 prompt + 16" in serving["workload"]
        rows = serving["rows"]
        assert [r["mode"] for r in rows] == ["base", "1 adapter", "8 adapters", "32 adapters"]
        for r in rows:  # only this provider ran: its rate in every mode, no other
            assert finite(r[f"{provider}_tok_s"], 0.0) and r[f"{provider}_tok_s"] > 0, r
            assert len(r[f"{provider}_all"]) == 1
            other = "ours" if provider == "vllm" else "vllm"
            assert r[f"{other}_tok_s"] is None and r["base_tok_s"] is None
        assert png(tmp_path / "out" / f"cpu_serving-{provider}.png")


@pytest.mark.slow
def test_max_loras_curve_quick(tmp_path):
    """Two servers of its own (2 and 4 slots) on the tiny Llama: a capacity row each."""
    out = tmp_path / "out" / "max_loras_curve.json"
    quick("max_loras_curve.py", tmp_path, "--out", str(out))
    doc = load(out)
    check_record(doc)
    assert [r["max_loras"] for r in doc["rows"]] == [2, 4] and doc["n_adapters"] == 4
    for r in doc["rows"]:
        assert r["base_tok_s"] > 0 and r["adapters_tok_s"] > 0
        assert finite(r["ratio_to_base"], 0.0) and r["loads_in_step"] is not None
    assert "--max-loras" in report.max_loras_curve(doc)
    assert png(out.with_suffix(".png"))


@pytest.mark.slow
def test_job_isolation_quick(tmp_path, on_server):
    """Old server: the session's; one tiny Gemma 3 server per mode, a local Ray head for ray."""
    quick("job_isolation.py", tmp_path, *server_args(on_server), "--out", str(tmp_path / "out"))
    doc = load(tmp_path / "out" / "job_isolation.json")
    check_record(doc)
    assert [r["mode"] for r in doc["rows"]] == ["in_process", "subprocess", "ray"]
    for row in doc["rows"]:
        assert row["failed"] == 0 and row["migration_state"] != "running", row
        assert finite(row["migration_s"], 0.0) and row["api_server_rss_peak_bytes"] > 0
    assert png(tmp_path / "out" / "job_isolation.png")
    assert "`subprocess`" in report.job_isolation(doc)
