"""A migration row over several seeds: the seeds option, and the mean and its paired interval;
the benchmark's student budget is the server's default."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from migration_quality import (  # noqa: E402
    build_spec,
    optional_float,
    over_seeds,
    parse_args,
    seed_list,
    task_counts,
    task_overrides,
    work_digest,
)


@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=8, unique=True))
def test_seed_list_reads_distinct_non_negative_seeds(seeds: list[int]) -> None:
    assert seed_list(",".join(map(str, seeds))) == seeds


@pytest.mark.parametrize("text", ["", "0,0", "-1", "0,a", "1.5", "0,,1"])
def test_seed_list_refuses_bad_input(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        seed_list(text)


def distinct_seeds(seeds: list[int]) -> bool:
    return bool(seeds) and min(seeds) >= 0 and len(set(seeds)) == len(seeds)


def positive_counts(counts: dict[str, int]) -> bool:
    return bool(counts) and min(counts.values()) >= 1


@pytest.mark.parametrize(("parse", "valid"), [(seed_list, distinct_seeds),
                                               (task_counts, positive_counts)])  # fmt: skip
@given(text=st.text(max_size=16))
def test_list_options_answer_any_text_with_a_value_or_a_clear_error(parse, valid, text) -> None:
    try:
        value = parse(text)
    except argparse.ArgumentTypeError as e:
        assert repr(text) in str(e)
    else:
        assert valid(value)


@given(st.dictionaries(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), st.integers(1, 10**4),
                       min_size=1, max_size=4))  # fmt: skip
def test_task_counts_reads_task_count_pairs(counts: dict[str, int]) -> None:
    assert task_counts(",".join(f"{t}={n}" for t, n in counts.items())) == counts


@pytest.mark.parametrize("text", ["", "object_counting", "a=0", "a=-3", "a=x", "=4", "a=1,a=2"])
def test_task_counts_refuses_bad_input(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        task_counts(text)


def test_task_target_count_must_name_a_task_of_the_run() -> None:
    args = parse_args(["--tasks", "object_counting", "--task-target-count", "object_counting=96"])
    assert args.task_target_count == {"object_counting": 96}
    with pytest.raises(SystemExit):
        parse_args(["--tasks", "arithmetic", "--task-target-count", "object_counting=96"])
    with pytest.raises(SystemExit):  # a smoke run keeps its own tiny counts
        parse_args(["--quick", "--task-target-count", "arithmetic=96"])


def test_a_task_runs_with_its_budget_then_its_own_target_count() -> None:
    args = parse_args(["--task-target-count", "object_counting=96"])
    assert task_overrides(args, "object_counting") == {"target_count": 96, "disc_steps": 12}
    assert task_overrides(args, "disambiguation_qa") == {"target_count": 32, "disc_steps": 12}
    assert task_overrides(args, "arithmetic") == {}  # the command line's 48
    assert task_overrides(parse_args(["--quick"]), "object_counting") == {}


def score(hits: list[bool]) -> dict:
    return {"acc": sum(hits) / len(hits), "hits": hits}


hit_lists = st.integers(2, 40).flatmap(
    lambda n: st.tuples(
        st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=1, max_size=3),
        st.lists(st.booleans(), min_size=n, max_size=n),
    )
)


@given(hit_lists)
def test_over_seeds_is_the_paired_mean_difference_with_its_normal_interval(case) -> None:
    runs, source = case
    n = len(source)
    out = over_seeds([score(h) for h in runs], score(source))
    assert out["acc"] == pytest.approx(statistics.mean(sum(h) / n for h in runs))
    assert out["per_seed"] == [sum(h) / n for h in runs]
    # the mean of per-example differences is the difference of the mean accuracies
    assert out["paired_diff"] == pytest.approx(out["acc"] - sum(source) / n)
    per_example = [sum(h[j] for h in runs) / len(runs) - source[j] for j in range(n)]
    half = 1.96 * statistics.stdev(per_example) / n**0.5
    lo, hi = out["paired_diff_ci"]
    assert lo == pytest.approx(max(-1.0, out["paired_diff"] - half))
    assert hi == pytest.approx(min(1.0, out["paired_diff"] + half))
    assert -1.0 <= lo <= out["paired_diff"] <= hi <= 1.0


def test_over_seeds_without_per_example_hits_gives_no_interval() -> None:
    out = over_seeds([{"acc": 0.5}], {"acc": 0.4, "hits": [True, False]})
    assert out["acc"] == 0.5 and out["paired_diff_ci"] is None


@given(st.one_of(st.floats(allow_nan=True), st.text(max_size=8)))
def test_optional_float_reads_none_or_a_positive_number(value) -> None:
    text = str(value)
    try:
        parsed = optional_float(text)
    except argparse.ArgumentTypeError as e:
        assert repr(text) in str(e)
    else:
        assert parsed is None if text.strip().lower() == "none" else parsed > 0


def test_the_benchmark_migrates_with_the_servers_default_student_budget(
    tiny_model_dir: Path,
) -> None:
    """The committed migration run is the defaults' run: what the benchmark builds with no
    options is what a server's migration spec holds when a request names none."""
    from transformers import AutoTokenizer

    from vllm_lora_ext.evaluation.tasks import load_task
    from vllm_lora_ext.migrate.spec import MigrationOptions

    spec = build_spec(
        parse_args([]), load_task("arithmetic"), "arithmetic", "filtered",
        AutoTokenizer.from_pretrained(tiny_model_dir),
    )  # fmt: skip
    default = MigrationOptions()
    assert spec.student_epochs == default.student_epochs == 8
    assert spec.student_fit == default.student_fit == 0
    assert spec.student.lr == default.student.lr
    assert (spec.student.warmup, spec.student.decay) == (default.student.warmup, True)


def test_work_dirs_are_named_by_what_the_migration_reads(tiny_model_dir: Path) -> None:
    """Vote settings change a free-form task's work dir, not a multiple-choice one's (its
    teacher picks options, it never votes); a setting it does read changes both."""
    from transformers import AutoTokenizer

    from vllm_lora_ext.evaluation.tasks import load_task

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def digest(task: str, *argv: str) -> str:
        args = parse_args(["--modes", "filtered", *argv])
        return work_digest(build_spec(args, load_task(task), task, "filtered", tok))

    votes = ("--vote-weights", "--vote-agreement", "0.1")
    assert digest("arithmetic") != digest("arithmetic", *votes)
    assert digest("disambiguation_qa") == digest("disambiguation_qa", *votes)
    assert digest("disambiguation_qa") != digest("disambiguation_qa", "--soft-draws", "4")
    assert digest("arithmetic") == digest("arithmetic")
    # The options cut is read by a multiple-choice synthesis alone.
    assert digest("arithmetic") == digest("arithmetic", "--options-end")
    assert digest("disambiguation_qa") != digest("disambiguation_qa", "--options-end")
