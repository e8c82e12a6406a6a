"""Evaluation harness: task cache and splits, scoring, prompts, and both backends on a tiny model.

No download and no server: a small fake sdist stands in for ``bigbench==1.0.0``, and a mock
transport answering in vLLM's ``/v1/completions`` shape stands in for the server.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_lora_ext.evaluation.backends import BackendError, HttpBackend, TransformersBackend
from vllm_lora_ext.evaluation.evaluate import (
    collect_outputs,
    compare_outputs,
    evaluate,
    score_outputs,
)
from vllm_lora_ext.evaluation.prompts import answer_ids, build_prompt, stop_token_ids
from vllm_lora_ext.evaluation.scoring import (
    choose_option,
    exact_match,
    multiple_choice_correct,
    normalize,
    option_probabilities,
    wilson_interval,
)
from vllm_lora_ext.evaluation.task_cache import (
    MANIFEST,
    RECORDED_SHA256,
    TASK_SOURCES,
    ChecksumError,
    copy_tasks,
    fetch_tasks,
)
from vllm_lora_ext.evaluation.task_cache import main as task_cache_main
from vllm_lora_ext.evaluation.tasks import Example, Task, TaskFormat, load_task

PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"


def _task_json(rel: str) -> dict:
    if rel.startswith("arithmetic/"):
        sub = rel.split("/")[1]
        examples = [
            {
                "input": f"{sub}: what is {i} plus 1?",
                "target": str(i + 1),
                "target_scores": {str(i + 1): 1.0, "banana": 0.0},
            }
            for i in range(25)
        ]
        return {"name": sub, "preferred_score": "exact_str_match", "examples": examples}
    examples = [
        {"input": f"Statement {i}", "target_scores": {"plausible": i % 2, "implausible": 1 - i % 2}}
        for i in range(50)
    ]
    if rel.startswith("sports_understanding/"):
        examples += [
            {"input": "Statement 3", "target_scores": {"plausible": 1, "implausible": 0}},
            {"input": "Statement 4", "target_scores": {"plausible": 1, "implausible": 0}},
        ]  # a harmless repeat of 3, a contradiction of 4
    return {
        "name": rel.split("/")[0],
        "preferred_score": "multiple_choice_grade",
        "task_prefix": "Decide.",
        "example_output_prefix": "\nPlausible/implausible? ",
        "examples": examples,
    }


def make_sdist(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        rels = [r for files in TASK_SOURCES.values() for r in files] + ["other_task/task.json"]
        for rel in rels:
            data = json.dumps(_task_json(rel)).encode()
            info = tarfile.TarInfo(PREFIX + rel)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    sdist = make_sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    return fetch_tasks(tmp_path / "tasks", sdist=sdist, expected_sha256=None)


def test_fetch_writes_only_the_development_tasks(cache: Path) -> None:
    written = sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())
    expected = sorted(r for files in TASK_SOURCES.values() for r in files)
    assert written == sorted([*expected, MANIFEST])
    manifest = json.loads((cache / MANIFEST).read_text())
    assert sorted(manifest["files"]) == expected and manifest["source"] == "bigbench==1.0.0"


def test_fetch_refuses_an_sdist_with_the_wrong_checksum(tmp_path: Path) -> None:
    sdist = make_sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    with pytest.raises(ChecksumError, match="expected"):
        fetch_tasks(tmp_path / "tasks", sdist=sdist)
    assert not (tmp_path / "tasks" / MANIFEST).exists()


@pytest.fixture
def local_index(tmp_path: Path):
    """A package index on loopback serving the fake sdist: PEP 691 JSON or PEP 503 HTML by the
    request's Accept header, as PyPI does (and ``html_only`` like a plain file index)."""
    import hashlib
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    sdist = make_sdist(tmp_path / "served.tar.gz").read_bytes()
    sha = hashlib.sha256(sdist).hexdigest()
    state = {"html_only": False, "listed_sha": sha, "release_gone": False, "malformed": False}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/simple/bigbench/":
                name, url = "bigbench-1.0.0.tar.gz", "/files/bigbench-1.0.0.tar.gz"
                if state["release_gone"]:  # as PyPI answered on 2026-12-07
                    name, url = "bigbench-0.0.1.tar.gz", "/files/bigbench-0.0.1.tar.gz"
                if "json" in self.headers.get("Accept", "") and not state["html_only"]:
                    body = json.dumps({"files": [
                        {"filename": "bigbench-0.0.1.tar.gz", "url": "/files/old.tar.gz",
                         "hashes": {"sha256": "0" * 64}},
                        {"filename": name, "url": url,
                         "hashes": {"sha256": state["listed_sha"]}},
                    ][: 1 if state["release_gone"] else 2]}).encode()  # fmt: skip
                    body = b'{"files": [' if state["malformed"] else body
                    kind = "application/vnd.pypi.simple.v1+json"
                else:
                    body = (f'<a href="{url}#sha256={state["listed_sha"]}">{name}</a>').encode()
                    kind = "text/html"
            elif self.path == "/files/bigbench-1.0.0.tar.gz":
                body, kind = sdist, "application/gzip"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/simple", sha, state
    server.shutdown()


@pytest.mark.parametrize("html_only", [False, True])
def test_fetch_downloads_the_file_from_the_index_without_pip(
    tmp_path: Path, local_index, html_only: bool
) -> None:
    """No pip release can break it: the file is taken from the index's listing (JSON or HTML)
    and checked against the recorded sha256 while it streams."""
    index, sha, state = local_index
    state["html_only"] = html_only
    cache = fetch_tasks(tmp_path / "tasks", expected_sha256=sha, index=index)
    manifest = json.loads((cache / MANIFEST).read_text())
    assert manifest["sdist_sha256"] == sha
    assert sorted(manifest["files"]) == sorted(r for f in TASK_SOURCES.values() for r in f)
    assert not list((tmp_path / "tasks").glob(".download-*"))  # the 358 MB file is not kept


def test_fetch_refuses_a_download_or_a_listing_with_another_checksum(
    tmp_path: Path, local_index
) -> None:
    index, sha, state = local_index
    with pytest.raises(ChecksumError, match="expected"):  # the bytes do not match
        fetch_tasks(tmp_path / "a", expected_sha256="1" * 64, index=index)
    state["listed_sha"] = "2" * 64
    with pytest.raises(ChecksumError, match="index lists"):  # the listing does not match
        fetch_tasks(tmp_path / "b", expected_sha256=sha, index=index)
    for d in (tmp_path / "a", tmp_path / "b"):
        assert not (d / MANIFEST).exists() and not list(d.rglob("*.tar.gz*"))


@pytest.mark.parametrize("html_only", [False, True])
def test_cli_says_what_the_index_lists_when_the_release_is_gone(
    tmp_path: Path, local_index, capsys: pytest.CaptureFixture[str], html_only: bool
) -> None:
    """PyPI stopped listing bigbench 1.0.0 (only 0.0.1, seen 2026-12-07): the command exits with
    a message naming what is listed and the --sdist way round it, not a traceback."""
    index, _, state = local_index
    state["release_gone"], state["html_only"] = True, html_only
    with pytest.raises(SystemExit) as exit_:
        task_cache_main(["--cache-dir", str(tmp_path / "tasks"), "--index", index])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err
    assert "lists: bigbench-0.0.1.tar.gz" in err and "--sdist FILE" in err
    assert not (tmp_path / "tasks" / MANIFEST).exists()


def test_cli_refuses_a_missing_or_wrong_sdist_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache_dir = str(tmp_path / "tasks")
    with pytest.raises(SystemExit) as exit_:
        task_cache_main(["--cache-dir", cache_dir, "--sdist", str(tmp_path / "absent.tar.gz")])
    assert exit_.value.code == 2 and "is not a file" in capsys.readouterr().err
    fake = make_sdist(tmp_path / "bigbench-1.0.0.tar.gz")  # not the recorded bytes
    with pytest.raises(SystemExit) as exit_:
        task_cache_main(["--cache-dir", cache_dir, "--sdist", str(fake)])
    assert exit_.value.code == 1 and "expected" in capsys.readouterr().err
    assert not (tmp_path / "tasks" / MANIFEST).exists()


ROOT = Path(__file__).resolve().parents[2]
WANTED = sorted({r for files in TASK_SOURCES.values() for r in files})


def make_checkout(root: Path) -> dict[str, str]:
    """A BIG-bench checkout's layout with the fake task files; returns their sha256."""
    import hashlib

    hashes = {}
    for rel in WANTED:
        data = json.dumps(_task_json(rel)).encode()
        path = root / "bigbench" / "benchmark_tasks" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        hashes[rel] = hashlib.sha256(data).hexdigest()
    return hashes


def test_recorded_hashes_are_those_of_the_committed_adapters_cards() -> None:
    """The table a copied file is checked against is what the published adapters trained on."""
    from_cards: dict[str, str] = {}
    for card in sorted(ROOT.glob("adapters/*/*/card.json")):
        from_cards.update(json.loads(card.read_text()).get("task_sources_sha256", {}))
    assert from_cards and from_cards == RECORDED_SHA256
    assert set(RECORDED_SHA256) <= set(WANTED)


def test_copy_from_a_checkout_checks_every_recorded_file(tmp_path: Path) -> None:
    hashes = make_checkout(tmp_path / "BIG-bench")
    recorded = {rel: h for rel, h in hashes.items() if not rel.startswith("sports")}
    cache = copy_tasks(tmp_path / "BIG-bench", tmp_path / "tasks", recorded)
    manifest = json.loads((cache / MANIFEST).read_text())
    assert manifest["files"] == hashes
    assert manifest["unverified"] == ["sports_understanding/task.json"]
    assert len(load_task("snarks", cache).examples) == 50  # read back through the manifest


@settings(max_examples=15, deadline=None)
@given(changed=st.sets(st.sampled_from(WANTED)), drop=st.booleans())
def test_copy_writes_nothing_unless_every_file_is_there_and_matches(
    tmp_path_factory: pytest.TempPathFactory, changed: set[str], drop: bool
) -> None:
    root = tmp_path_factory.mktemp("copy")
    hashes = make_checkout(root / "src")
    for rel in changed:  # another version of the file (or, with drop, no file at all)
        path = root / "src" / "bigbench" / "benchmark_tasks" / rel
        path.unlink() if drop else path.write_bytes(path.read_bytes() + b" ")
    if not changed:
        copy_tasks(root / "src", root / "tasks", hashes)
        assert (root / "tasks" / MANIFEST).is_file()
        return
    with pytest.raises(FileNotFoundError if drop else ChecksumError) as err:
        copy_tasks(root / "src", root / "tasks", hashes)
    assert sorted(changed)[0] in str(err.value)
    assert not (root / "tasks").exists() or not any((root / "tasks").iterdir())


def test_cli_copies_from_a_checkout_only_when_it_matches_the_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_checkout(tmp_path / "BIG-bench")  # fake files: none matches the real record
    cache_dir = str(tmp_path / "tasks")
    with pytest.raises(SystemExit) as exit_:
        task_cache_main(["--cache-dir", cache_dir, "--source-dir", str(tmp_path / "BIG-bench")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "differ from the recorded sha256" in err
    assert not (tmp_path / "tasks" / MANIFEST).exists()
    for argv, says in (
        (["--source-dir", str(tmp_path / "nowhere")], "is not a directory"),
        (["--source-dir", str(tmp_path), "--sdist", str(tmp_path)], "not both"),
    ):
        with pytest.raises(SystemExit) as exit_:
            task_cache_main(["--cache-dir", cache_dir, *argv])
        assert exit_.value.code == 2 and says in capsys.readouterr().err


def test_cli_refuses_an_index_with_a_local_source_and_a_malformed_listing(
    tmp_path: Path, local_index, capsys: pytest.CaptureFixture[str]
) -> None:
    index, _, state = local_index
    with pytest.raises(SystemExit) as exit_:
        task_cache_main(["--sdist", str(tmp_path), "--index", index])
    assert exit_.value.code == 2 and "--index is for downloading" in capsys.readouterr().err
    state["malformed"] = True  # a JSON listing cut short
    with pytest.raises(SystemExit) as exit_:
        task_cache_main(["--cache-dir", str(tmp_path / "tasks"), "--index", index])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.startswith("task_cache: error:") and "Traceback" not in err


def test_tampered_task_file_fails_its_checksum(cache: Path) -> None:
    load_task("snarks", cache)
    path = cache / "snarks" / "task.json"
    path.write_text(path.read_text().replace("Statement 7", "Statement 8"))
    with pytest.raises(ChecksumError, match="manifest"):
        load_task("snarks", cache)


def test_missing_cache_says_how_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="task_cache"):
        load_task("snarks", tmp_path)


def test_bad_task_name_lists_the_valid_ones(cache: Path) -> None:
    with pytest.raises(ValueError) as err:
        load_task("sports_understandin", cache)
    for name in TASK_SOURCES:
        assert name in str(err.value)


def test_splits_are_seeded_disjoint_and_recorded(cache: Path) -> None:
    a, b = load_task("snarks", cache, seed=3), load_task("snarks", cache, seed=3)
    assert (a.train, a.validation, a.heldout) == (b.train, b.validation, b.heldout)
    c = load_task("snarks", cache, seed=4)
    assert a.heldout != c.heldout
    assert a.seed == 3 and a.sizes == {"train": 30, "validation": 5, "heldout": 15}
    inputs = [e.input for e in a.examples]
    assert len(set(inputs)) == len(inputs) == 50
    d = load_task("snarks", cache, validation=0, heldout=10)
    assert d.sizes == {"train": 40, "validation": 0, "heldout": 10}
    with pytest.raises(ValueError, match="exceed"):
        load_task("snarks", cache, validation=30, heldout=30)


def test_repeats_and_contradictions_are_dropped(cache: Path) -> None:
    task = load_task("sports_understanding", cache)
    inputs = [e.input for e in task.examples]
    assert task.dropped == 3 and len(inputs) == 49 and "Statement 4" not in inputs
    assert len(set(inputs)) == len(inputs)


def test_modes_options_and_answers(cache: Path) -> None:
    arith = load_task("arithmetic", cache)
    assert arith.mode == "generate" and len(arith.examples) == 100
    assert {e.subtask for e in arith.examples} == {
        "1_digit_addition",
        "1_digit_subtraction",
        "2_digit_addition",
        "2_digit_subtraction",
    }
    ex = next(e for e in arith.examples if e.input == "2_digit_addition: what is 4 plus 1?")
    assert ex.targets == ("5",) and ex.options[ex.correct[0]] == "5"
    sports = load_task("sports_understanding", cache)
    assert sports.mode == "multiple_choice"
    for e in sports.examples:
        number = int(e.input.split()[-1])
        assert e.targets == ("plausible" if number % 2 else "implausible",)
        assert [e.options[i] for i in e.correct] == list(e.targets)
    assert load_task("arithmetic", cache, mode="multiple_choice").mode == "multiple_choice"


def test_choose_option_by_summed_loglikelihood() -> None:
    # The one-token option has the best first token but the lower total: the sum decides.
    options = [[-0.5, -0.5, -0.5], [-0.1, -2.0], [-1.2]]
    assert choose_option(options) == 2
    assert multiple_choice_correct(options, correct=[2])
    assert not multiple_choice_correct(options, correct=[0, 1])
    assert choose_option([[-1.0], [-1.0]]) == 0
    with pytest.raises(ValueError):
        choose_option([])


def test_option_probabilities_are_a_softmax_and_uniform_when_no_option_is_possible() -> None:
    inf = float("-inf")
    probs = option_probabilities([[-1.0, -1.0], [-0.5], [inf]])  # sums -2, -0.5, -inf
    total = math.exp(-2.0) + math.exp(-0.5)
    assert probs == pytest.approx([math.exp(-2.0) / total, math.exp(-0.5) / total, 0.0])
    assert option_probabilities([[inf], [-1.0, inf]]) == [0.5, 0.5]


def test_exact_match_normalisation() -> None:
    assert normalize("  Gelatine   Stick.\n") == "gelatine stick"
    assert exact_match("Plausible!", ["plausible"])
    assert exact_match(" 3 ", ["three", "3"])
    assert exact_match("-12", ["-12"]) and not exact_match("12", ["-12"])
    assert not exact_match("3 apples", ["3"])
    assert not exact_match("", ["3"])
    lo, hi = wilson_interval(50, 100)
    assert lo < 0.5 < hi and wilson_interval(0, 10)[0] == 0.0


def _task(mode: str, examples: list[Example], **fmt: object) -> Task:
    return Task("t", mode, TaskFormat(**fmt), (), (), tuple(examples), seed=0, dropped=0)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> TransformersBackend:
    return TransformersBackend.from_pretrained(tiny_model_dir, batch_size=3)


def test_prompt_uses_the_chat_template(tiny: TransformersBackend) -> None:
    tok = tiny.tokenizer
    example = Example("Is two plus two four?", ("yes",), ("yes", "no"), (1.0, 0.0))
    task = _task("multiple_choice", [example], task_prefix="Answer.", output_prefix="\nYes/no? ")
    text = tok.decode(build_prompt(tok, task, example).ids)
    assert text.startswith("<|im_start|>user\nAnswer.Is two plus two four?\n  choice: yes")
    assert text.endswith("Yes/no?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tok)


def test_prompt_without_chat_template_falls_back_to_q_a(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    example = Example("What is 1 plus 1?", ("2",))
    prompt = build_prompt(tok, _task("generate", [example]), example)
    assert tok.decode(prompt.ids).endswith("Q: What is 1 plus 1?\nA:")
    assert tok.decode(answer_ids(tok, prompt, "2")) == " 2"


def test_transformers_logprobs_match_one_sequence_at_a_time(tiny: TransformersBackend) -> None:
    import torch

    tok = tiny.tokenizer
    seqs = [tok("one two three")["input_ids"], tok("Paris is the capital of France")["input_ids"]]
    requests = [(s[:2], s[2:]) for s in seqs] + [(seqs[1][:1], seqs[1][1:3])]
    got = tiny.continuation_logprobs(requests)
    for (ctx, cont), lps in zip(requests, got, strict=True):
        ids = torch.tensor([[*ctx, *cont]])
        with torch.no_grad():
            logp = torch.log_softmax(tiny.model(input_ids=ids).logits[0], -1)
        want = [logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)]
        assert lps == pytest.approx(want, abs=1e-5)
        assert all(x <= 0 for x in lps)


def test_known_multiple_choice_item_through_evaluate(tiny: TransformersBackend) -> None:
    # An option that extends another by more tokens has a lower summed log-likelihood (every
    # token adds a log-prob < 0), so the short option is the known right choice.
    tok = tiny.tokenizer
    short, long = "one two", "one two three four five six"
    example = Example("Count.", (short,), (long, short), (0.0, 1.0))
    task = _task("multiple_choice", [example], append_choices=False)
    prompt = build_prompt(tok, task, example)
    assert answer_ids(tok, prompt, long)[: len(answer_ids(tok, prompt, short))] == answer_ids(
        tok, prompt, short
    )
    result = evaluate(task, tiny)
    assert (result.n, result.correct, result.accuracy, result.predictions) == (1, 1, 1.0, (short,))


def test_greedy_generation_matches_transformers_generate(tiny: TransformersBackend) -> None:
    import torch

    prompt = tiny.tokenizer("Question: what is two plus two?")["input_ids"]
    stops = list(stop_token_ids(tiny.tokenizer))
    ours = tiny.generate([prompt], max_tokens=12, stop_token_ids=stops)[0]
    with torch.no_grad():
        ref = tiny.model.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=12,
            eos_token_id=stops,
            pad_token_id=tiny.tokenizer.pad_token_id,
        )[0, len(prompt) :].tolist()
    if ref and ref[-1] in stops:
        ref = ref[:-1]
    assert list(ours.token_ids) == ref and 0 < len(ours.token_ids) <= 12


def fake_vllm(ref: TransformersBackend, seen: list[dict]) -> httpx.Client:
    """A mock ``/v1/completions`` answering in vLLM 0.32's JSON shape, computed by ``ref``."""

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        choices = []
        for i, prompt in enumerate(body["prompt"]):
            choice = {"index": i, "prompt_token_ids": prompt}
            if body.get("prompt_logprobs") is not None:
                lps = ref.continuation_logprobs([(prompt[:1], prompt[1:])])[0]
                pairs = zip(prompt[1:], lps, strict=True)
                entries = [{str(t): {"logprob": lp, "rank": 1}} for t, lp in pairs]
                choice |= {
                    "text": "x",
                    "token_ids": [5],
                    "finish_reason": "length",
                    "prompt_logprobs": [None, *entries],
                }
            else:
                g = ref.generate([prompt], body["max_tokens"], body["stop_token_ids"])[0]
                stopped = len(g.token_ids) < body["max_tokens"]
                ids = [*g.token_ids, *body["stop_token_ids"][:1]] if stopped else list(g.token_ids)
                choice |= {
                    "text": g.text,
                    "token_ids": ids,
                    "finish_reason": "stop" if stopped else "length",
                }
            choices.append(choice)
        return httpx.Response(200, json={"choices": choices[::-1]})

    return httpx.Client(base_url="http://vllm", transport=httpx.MockTransport(handler))


def test_http_backend_speaks_vllm_and_agrees(tiny: TransformersBackend) -> None:
    seen: list[dict] = []
    http = HttpBackend(
        "http://vllm", "math", tiny.tokenizer, batch_size=2, client=fake_vllm(tiny, seen)
    )
    mc = _task(
        "multiple_choice",
        [
            Example(f"Statement {i}", ("plausible",), ("plausible", "implausible"), (1.0, 0.0))
            for i in range(3)
        ],
    )
    a, b = collect_outputs(mc, http), collect_outputs(mc, tiny)
    agreement = compare_outputs(a, b)
    # Batched (padded) vs one at a time: float32 rounding only.
    assert agreement.max_logprob_diff < 1e-5 and agreement.same_prediction == 1.0
    assert evaluate(mc, http).predictions == evaluate(mc, tiny).predictions
    first = seen[0]
    assert first["model"] == "math" and first["prompt_logprobs"] == 0
    assert all(isinstance(t, int) for t in first["prompt"][0]) and len(first["prompt"]) == 2

    gen = _task("generate", [Example("What is 1 plus 1?", ("2",)), Example("Count.", ("3",))])
    a, b = collect_outputs(gen, http), collect_outputs(gen, tiny)
    assert a.generations == b.generations and compare_outputs(a, b).same_prediction == 1.0
    assert seen[-1]["temperature"] == 0.0 and seen[-1]["repetition_penalty"] == 1.0
    assert seen[-1]["stop_token_ids"] == list(stop_token_ids(tiny.tokenizer))
    # Rescore the same outputs against a target equal to the first generation, shouted.
    target = a.generations[0].text.upper() + " ."
    rescored = _task("generate", [Example(gen.heldout[0].input, (target,)), gen.heldout[1]])
    result = score_outputs(rescored, a)
    assert (result.n, result.correct, result.accuracy) == (2, 1, 0.5)


def test_http_backend_samples_seeded_one_prompt_per_request_or_unseeded_in_batches(
    tiny: TransformersBackend,
) -> None:
    """vLLM applies a request's seed to all its prompts: seeded samples go one prompt per
    request (prompt i with seed + i); unseeded ones (``seeded=False``) in batched requests."""
    prompts = [[1, 2, 3], [1, 2, 4], [1, 2, 5]]
    for seeded, requests, seeds in ((True, 3, [7, 8, 9]), (False, 2, [None, None])):
        seen: list[dict] = []
        http = HttpBackend("http://vllm", "m", tiny.tokenizer, batch_size=2,
                           client=fake_vllm(tiny, seen), seeded=seeded)  # fmt: skip
        out = http.generate(prompts, 3, [], temperature=1.0, seed=7)
        assert len(out) == 3 and len(seen) == requests
        assert [b.get("seed") for b in seen] == seeds
        assert [len(b["prompt"]) for b in seen] == ([1, 1, 1] if seeded else [2, 1])


def test_http_backend_reports_server_errors(tiny: TransformersBackend) -> None:
    client = httpx.Client(
        base_url="http://vllm",
        transport=httpx.MockTransport(lambda r: httpx.Response(404, json={"error": "no"})),
    )
    http = HttpBackend("http://vllm", "missing", tiny.tokenizer, client=client)
    with pytest.raises(BackendError, match="404"):
        http.continuation_logprobs([([1, 2], [3])])
