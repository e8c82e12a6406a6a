"""The task suite: BBH files fetched or copied and checked by sha256, their answer formats, the
arithmetic we generate, and seeded splits with their provenance.

No download: a loopback HTTP server stands in for the raw-file host, with small BBH-shaped files
whose sha256 the tests record themselves. One test reads the real BBH copy of this project's
machines (``../shared/data/big-bench-hard``) when it is there, and says so when it is not.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vllm_lora_ext.evaluation import arithmetic
from vllm_lora_ext.evaluation.bbh import (
    MalformedTask,
    answer_sets,
    options_block_end,
    parse_options,
    scorable,
)
from vllm_lora_ext.evaluation.task_cache import (
    BBH_SHA256,
    BBH_SOURCE,
    MANIFEST,
    ChecksumError,
    TaskFetchError,
    copy_tasks,
    fetch_tasks,
    task_file,
)
from vllm_lora_ext.evaluation.task_cache import main as task_cache_main
from vllm_lora_ext.evaluation.tasks import (
    Example,
    load_task,
    reference_answer,
    split_examples,
    task_names,
)

ROOT = Path(__file__).resolve().parents[2]
SHARED_BBH = ROOT.parent / "shared" / "data" / "big-bench-hard"


def lettered(i: int) -> dict:
    return {"input": f"Which is item {i}?\nOptions:\n(A) item {i}\n(B) item {i + 1}\n(C) none",
            "target": "(A)" if i % 2 else "(C)"}  # fmt: skip


def listed(i: int) -> dict:
    return {
        "input": f"Did wire {i} cause it?\nOptions:\n- Yes\n- No",
        "target": ["Yes", "No"][i % 2],
    }


def closed(i: int) -> dict:
    return {"input": f"not ( {bool(i % 2)} ) is", "target": str(not i % 2)}


def free(i: int) -> dict:
    return {
        "input": f"I have {i} apples and a pear. How many fruits do I have?",
        "target": str(i + 1),
    }


SHAPES = {"disambiguation_qa": lettered, "causal_judgement": listed,
          "boolean_expressions": closed, "object_counting": free}  # fmt: skip


def files(n: int = 60) -> dict[str, bytes]:
    return {t: json.dumps({"canary": "test", "examples": [make(i) for i in range(n)]}).encode()
            for t, make in SHAPES.items()}  # fmt: skip


def recorded(contents: dict[str, bytes]) -> dict[str, str]:
    return {t: hashlib.sha256(data).hexdigest() for t, data in contents.items()}


def write_copy(root: Path, contents: dict[str, bytes]) -> Path:
    for task, data in contents.items():
        (root / "bbh").mkdir(parents=True, exist_ok=True)
        (root / task_file(task)).write_bytes(data)
    return root


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    contents = files()
    return copy_tasks(write_copy(tmp_path / "src", contents), tmp_path / "tasks",
                      recorded=recorded(contents))  # fmt: skip


@pytest.fixture
def raw_host() -> Iterator[tuple[str, dict]]:
    """Loopback stand-in for raw.githubusercontent.com: serves ``state["files"]`` at
    ``/bbh/<task>.json`` and records the paths asked for."""
    state: dict = {"files": files(), "asked": []}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state["asked"].append(self.path)
            task = self.path.removeprefix("/bbh/").removesuffix(".json")
            body = state["files"].get(task)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", state
    server.shutdown()


# -- fetching and copying ------------------------------------------------------------------------


def test_fetch_by_raw_url_checks_each_file_and_writes_the_manifest_last(
    tmp_path: Path, raw_host
) -> None:
    url, state = raw_host
    want = recorded(state["files"])
    cache = fetch_tasks(tmp_path / "tasks", base_url=url, recorded=want, progress=False)
    manifest = json.loads((cache / MANIFEST).read_text())
    assert manifest["source"] == BBH_SOURCE and manifest["origin"] == url
    assert manifest["files"] == {task_file(t): h for t, h in want.items()}
    assert sorted(state["asked"]) == sorted(f"/{task_file(t)}" for t in SHAPES)
    assert len(load_task("disambiguation_qa", cache).examples) == 60  # read back, checked


def test_fetch_writes_nothing_when_one_file_differs_or_is_missing(tmp_path: Path, raw_host) -> None:
    url, state = raw_host
    want = recorded(state["files"])
    state["files"]["causal_judgement"] += b" "  # another version upstream
    with pytest.raises(ChecksumError, match="causal_judgement"):
        fetch_tasks(tmp_path / "a", base_url=url, recorded=want, progress=False)
    del state["files"]["object_counting"]
    with pytest.raises(TaskFetchError, match="HTTP 404"):
        fetch_tasks(tmp_path / "b", tasks=["object_counting"], base_url=url, recorded=want,
                    progress=False)  # fmt: skip
    for d in (tmp_path / "a", tmp_path / "b"):
        assert not d.exists() or not any(d.rglob("*"))


def test_the_held_out_bbh_tasks_are_unknown_here() -> None:
    """Seven BBH tasks are kept for an independent check: the code cannot fetch them."""
    assert len(BBH_SHA256) == 20
    held_out = {"navigate", "movie_recommendation", "hyperbaton", "temporal_sequences",
                "penguins_in_a_table", "formal_fallacies",
                "logical_deduction_three_objects"}  # fmt: skip
    assert not held_out & set(BBH_SHA256)
    with pytest.raises(ValueError, match="unknown BBH task"):
        fetch_tasks(Path("/nonexistent"), tasks=["navigate"], progress=False)


def test_recorded_hashes_are_the_shared_copy_s_sha256sums() -> None:
    if not (SHARED_BBH / "SHA256SUMS").is_file():
        pytest.skip(f"no BBH copy at {SHARED_BBH} on this machine")
    sums = dict(reversed(line.split()) for line in (SHARED_BBH / "SHA256SUMS").read_text()
                .splitlines() if line.strip().endswith(".json") and "bbh/" in line)  # fmt: skip
    assert {task_file(t): h for t, h in BBH_SHA256.items()} == sums


@settings(max_examples=15, deadline=None)
@given(changed=st.sets(st.sampled_from(sorted(SHAPES))), drop=st.booleans())
def test_copy_writes_nothing_unless_every_file_is_there_and_matches(
    tmp_path_factory: pytest.TempPathFactory, changed: set[str], drop: bool
) -> None:
    root = tmp_path_factory.mktemp("copy")
    contents = files()
    write_copy(root / "src", contents)
    for task in changed:  # another version of the file (or, with drop, no file at all)
        path = root / "src" / task_file(task)
        path.unlink() if drop else path.write_bytes(path.read_bytes() + b" ")
    if not changed:
        copy_tasks(root / "src" / "bbh", root / "tasks", recorded=recorded(contents))  # bbh/ too
        assert (root / "tasks" / MANIFEST).is_file()
        return
    with pytest.raises(TaskFetchError if drop else ChecksumError) as err:
        copy_tasks(root / "src", root / "tasks", recorded=recorded(contents))
    assert sorted(changed)[0] in str(err.value)
    assert not (root / "tasks").exists() or not any((root / "tasks").iterdir())


def test_cli_failures_are_one_line_and_an_exit_code(
    tmp_path: Path, raw_host, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = raw_host
    cache_dir = str(tmp_path / "tasks")
    write_copy(tmp_path / "src", files())  # test files: none matches the real record
    cases = [
        (["--source-dir", str(tmp_path / "src"), "--tasks", "disambiguation_qa"], 1, "expected"),
        (["--source-dir", str(tmp_path / "src")], 1, "lacks date_understanding.json"),
        (["--source-dir", str(tmp_path / "nowhere")], 2, "is not a directory"),
        (["--source-dir", str(tmp_path), "--base-url", url], 2, "not both"),
        (["--tasks", "navigate"], 2, "unknown task(s) navigate"),
        (["--tasks", ","], 2, "unknown task(s) (none given)"),
        (["--base-url", url, "--tasks", "snarks"], 1, "HTTP 404"),  # the host lacks it
        (["--base-url", "http://127.0.0.1:9", "--tasks", "snarks"], 1, "cannot fetch"),  # no net
    ]
    for argv, code, says in cases:
        with pytest.raises(SystemExit) as exit_:
            task_cache_main(["--cache-dir", cache_dir, *argv])
        err = capsys.readouterr().err
        assert exit_.value.code == code and says in err, (argv, err)
        last = err.rstrip("\n").rsplit("\n", 1)[-1]  # after the progress bar, if any
        assert last.startswith("task_cache: error: ") and "Traceback" not in err
    assert not (tmp_path / "tasks" / MANIFEST).exists()


def test_cli_copies_the_shared_bbh_copy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not (SHARED_BBH / "bbh").is_dir():
        pytest.skip(f"no BBH copy at {SHARED_BBH} on this machine")
    task_cache_main(["--cache-dir", str(tmp_path), "--source-dir", str(SHARED_BBH)])
    assert "20 BBH task file(s) at 9ee07bd" in capsys.readouterr().out
    for name in task_names():
        task = load_task(name, tmp_path)
        assert task.sizes["heldout"] == 100 and task.sizes["train"] >= 58, name


def test_tampered_task_file_fails_its_checksum(cache: Path) -> None:
    load_task("object_counting", cache)
    path = cache / task_file("object_counting")
    path.write_text(path.read_text().replace("7 apples", "8 apples"))
    with pytest.raises(ChecksumError, match="manifest"):
        load_task("object_counting", cache)


def test_missing_cache_says_how_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="task_cache"):
        load_task("snarks", tmp_path)


def test_bad_task_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError) as err:
        load_task("sports_understandin")
    for name in task_names():
        assert name in str(err.value)


# -- answer formats ------------------------------------------------------------------------------


def test_each_bbh_answer_format(cache: Path) -> None:
    expect = {"disambiguation_qa": ("multiple_choice", ("(A)", "(B)", "(C)")),
              "causal_judgement": ("multiple_choice", ("Yes", "No")),
              "boolean_expressions": ("multiple_choice", ("False", "True")),
              "object_counting": ("generate", ())}  # fmt: skip
    for name, (mode, options) in expect.items():
        task = load_task(name, cache)
        assert task.mode == mode and task.source == BBH_SOURCE
        for e in task.examples:
            assert e.options == options and len(e.targets) == 1
            assert reference_answer(task, e) == e.targets[0]
            if options:
                assert [e.options[i] for i in e.correct] == list(e.targets)
    with pytest.raises(ValueError, match="not multiple choice"):
        load_task("object_counting", cache, mode="multiple_choice")
    assert load_task("disambiguation_qa", cache, mode="generate").mode == "generate"


labels = st.lists(st.sampled_from("ABCDEFGHIJK"), min_size=2, max_size=11, unique=True)
texts = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1,
                max_size=20).map(str.strip).filter(bool)  # fmt: skip


@given(
    question=st.text(max_size=40), letters=labels, words=st.lists(texts, min_size=11, max_size=11)
)
def test_lettered_options_parse_to_their_labels(
    question: str, letters: list[str], words: list[str]
) -> None:
    block = "".join(f"\n({c}) {w}" for c, w in zip(letters, words, strict=False))
    assert parse_options(question + "\nOptions:" + block) == tuple(f"({c})" for c in letters)


@given(question=st.text(max_size=40), answers=st.lists(texts, min_size=2, max_size=6, unique=True))
def test_listed_options_parse_to_their_texts(question: str, answers: list[str]) -> None:
    text = question + "\nOptions:" + "".join(f"\n- {a}" for a in answers)
    assert parse_options(text) == tuple(answers)


@given(text=st.text(max_size=80).filter(lambda t: "\nOptions:\n" not in t))
def test_inputs_without_an_options_block_list_none(text: str) -> None:
    assert parse_options(text) == ()


@pytest.mark.parametrize(
    "block", ["(A) one\n- two", "(A) one\nplain line", "- x\n- x", "(A) a\n(A) b"]
)
def test_malformed_option_blocks_are_refused(block: str) -> None:
    with pytest.raises(MalformedTask):
        parse_options("Q?\nOptions:\n" + block)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Q?\nOptions:\n(A) x\n(B) y\nThe answer is (A).", "Q?\nOptions:\n(A) x\n(B) y"),
        ("Q?\nOptions:\n- Yes\n- No\n\nQ2?\nOptions:\n- a", "Q?\nOptions:\n- Yes\n- No"),
        ("Q?\nOptions:\n(A) x\n(B) y\n(A) again", "Q?\nOptions:\n(A) x\n(B) y"),
        ("Q?\nOptions:\n(A) x\n(B) y", "Q?\nOptions:\n(A) x\n(B) y"),
        ("Q?\nOptions:\n(A) only one\nchatter", None),
        ("Q?\nOptions: (A) x (B) y", None),
        ("no options at all", None),
    ],
)
def test_options_block_end_cuts_after_the_last_option(text: str, expected: str | None) -> None:
    end = options_block_end(text)
    assert (None if end is None else text[:end]) == expected


@given(
    question=st.text(max_size=40).filter(lambda t: "Options:" not in t),
    letters=labels,
    words=st.lists(texts, min_size=11, max_size=11),
    listed=st.booleans(),
    tail=st.sampled_from(["", "\nSo the answer is (A).", "\n\n2. Next", "repeat", "\nx"]),
)
def test_options_block_end_cuts_just_after_the_last_option(
    question: str, letters: list[str], words: list[str], listed: bool, tail: str
) -> None:
    """Whatever follows the block (an answer, the next example, a repeated option), the cut
    leaves the question and every option, and the task loader's own parser reads them back."""
    if listed:
        lines = [f"- {w}" for w in dict.fromkeys(words[: len(letters)])]
        assume(len(lines) >= 2)
    else:
        lines = [f"({c}) {w}" for c, w in zip(letters, words, strict=False)]
    text = question + "\nOptions:\n" + "\n".join(lines)
    tail = "\n" + lines[0] if tail == "repeat" else tail  # the next example's options
    end = options_block_end(text + tail)
    assert end is not None and (text + tail)[:end] == text
    assert len(parse_options(text)) == len(lines)


def test_closed_pairs_free_forms_and_unscorable_examples() -> None:
    assert answer_sets(["a", "b", "c"], ["yes", "no", "yes"]) == [("no", "yes")] * 3
    assert answer_sets(["a", "b", "c"], ["1", "2", "3"]) == [()] * 3
    with pytest.raises(MalformedTask, match="some inputs"):
        answer_sets(["a\nOptions:\n- x\n- y", "b"], ["x", "y"])
    # ruin_names lists "(A) ..." yet twice targets a name: such an example cannot be scored
    assert not scorable(("(A)", "(B)"), "dearth, wind, & fire") and scorable((), "anything")


# -- generated arithmetic ------------------------------------------------------------------------


def test_arithmetic_is_seeded_in_big_bench_wording_and_correct() -> None:
    problems = arithmetic.generate()
    assert problems == arithmetic.generate()
    assert problems != arithmetic.generate(seed=1)
    assert len(problems) == 4 * arithmetic.PER_SUBTASK
    for p in problems:
        word, sign = ("plus", 1) if p.operator == "plus" else ("minus", -1)
        assert p.input == f"What is {p.a} {word} {p.b}?"
        assert int(p.target) == p.a + sign * p.b
        digits = int(p.subtask[0])
        assert all(len(str(x)) == digits for x in (p.a, p.b))
    task = load_task("arithmetic")
    assert task.mode == "generate" and task.source == "generated:arithmetic@seed0"
    assert task.sources == {} and task.sizes["heldout"] == 100


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_no_operand_pair_is_in_two_splits(seed: int) -> None:
    task = load_task("arithmetic", seed=seed)
    pairs = [{e.group for e in task.split(s)} for s in ("train", "validation", "heldout")]
    assert not (pairs[0] & pairs[1]) and not (pairs[0] & pairs[2]) and not (pairs[1] & pairs[2])
    assert task.sizes["heldout"] >= 100 and task.sizes["validation"] >= 20
    assert sum(task.sizes.values()) == 4 * arithmetic.PER_SUBTASK


# -- splits and provenance ------------------------------------------------------------------------


def test_splits_are_seeded_disjoint_and_recorded(cache: Path) -> None:
    a, b = (
        load_task("causal_judgement", cache, seed=3),
        load_task("causal_judgement", cache, seed=3),
    )
    assert (a.train, a.validation, a.heldout) == (b.train, b.validation, b.heldout)
    c = load_task("causal_judgement", cache, seed=4)
    assert a.heldout != c.heldout
    assert a.seed == 3 and a.sizes == {"train": 18, "validation": 6, "heldout": 36}  # 60% held out
    inputs = [e.input for e in a.examples]
    assert len(set(inputs)) == len(inputs) == 60
    d = load_task("causal_judgement", cache, validation=0, heldout=10)
    assert d.sizes == {"train": 50, "validation": 0, "heldout": 10}
    with pytest.raises(ValueError, match="exceed"):
        load_task("causal_judgement", cache, validation=30, heldout=31)
    record = a.provenance()
    assert record["task_source"] == BBH_SOURCE and record["split_seed"] == 3
    assert record["task_files_sha256"] == {
        task_file("causal_judgement"): a.sources[task_file("causal_judgement")]
    }
    assert (
        record["split_sha256"] == b.provenance()["split_sha256"] != c.provenance()["split_sha256"]
    )


@settings(max_examples=30, deadline=None)
@given(groups=st.lists(st.integers(1, 4), min_size=1, max_size=30), seed=st.integers(0, 99),
       held=st.integers(0, 20), val=st.integers(0, 20))  # fmt: skip
def test_split_keeps_groups_whole_and_fills_each_split_to_its_count(
    groups: list[int], seed: int, held: int, val: int
) -> None:
    examples = [Example(f"{g}-{k}", ("x",), group=str(g)) for g, size in enumerate(groups)
                for k in range(size)]  # fmt: skip
    if held + val > len(examples):
        with pytest.raises(ValueError, match="exceed"):
            split_examples(examples, seed, val, held)
        return
    train, validation, heldout = split_examples(examples, seed, val, held)
    assert sorted(train + validation + heldout, key=lambda e: e.input) == sorted(
        examples, key=lambda e: e.input)  # fmt: skip
    where = {e.group: s for s, part in enumerate((train, validation, heldout)) for e in part}
    assert all(
        where[e.group] == s for s, part in enumerate((train, validation, heldout)) for e in part
    )
    assert held <= len(heldout) < held + 4 or (held == 0 and not heldout)
    assert len(validation) >= val or not train


def test_repeats_and_contradictions_are_dropped(tmp_path: Path) -> None:
    examples = [free(i) for i in range(20)] + [free(3), {"input": free(4)["input"], "target": "99"}]
    data = json.dumps({"examples": examples}).encode()
    source = write_copy(tmp_path / "src", {"object_counting": data})
    sha = hashlib.sha256(data).hexdigest()
    cache = copy_tasks(source, tmp_path / "t", ["object_counting"], {"object_counting": sha})
    task = load_task("object_counting", cache)
    inputs = [e.input for e in task.examples]
    assert task.dropped == 3 and len(inputs) == 19 and free(4)["input"] not in inputs
