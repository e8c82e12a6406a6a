"""Each migration step on plain data: parsing, sampling, the gate's rule, training guards."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from migrate_fakes import DIGITS, LETTERS, FunctionBackend, number_or_word, strings
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_lora_ext.evaluation.backends import TransformersBackend
from vllm_lora_ext.evaluation.bbh import options_block_end
from vllm_lora_ext.migrate.discriminator import free_prompt
from vllm_lora_ext.migrate.gate import decide
from vllm_lora_ext.migrate.labelling import (
    LabellingStopped,
    answer_all,
    choose_all,
    option_distributions,
)
from vllm_lora_ext.migrate.queries import query_prompt
from vllm_lora_ext.migrate.synthesis import (
    Frame,
    generator_prompt,
    input_frame,
    parse_generated,
    synthesise,
)
from vllm_lora_ext.training import (
    LoraHyperparameters,
    TrainingDiverged,
    TrainingStopped,
    attach_lora,
    train_lora,
)


@pytest.fixture(scope="module")
def llama_tok(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def gemma_tok(tiny_gemma_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_gemma_dir)


# -- synthesis ------------------------------------------------------------------------------


def test_generator_prompt_chat_and_plain(llama_tok, gemma_tok) -> None:
    chat = llama_tok.decode(list(generator_prompt(llama_tok, "sums", ["1+1", "2+2"]).ids))
    assert "Here are 2 examples of sums:\n1. 1+1\n2. 2+2\n" in chat
    assert chat.endswith("<|im_start|>assistant\n3.")
    plain = gemma_tok.decode(list(generator_prompt(gemma_tok, "sums", ["1+1", "2+2"]).ids))
    assert plain == "<bos>Here are 2 examples of sums:\n1. 1+1\n2. 2+2\n3."


@pytest.mark.parametrize(
    ("text", "truncated", "single_line", "expected"),
    [
        (" 7+7\n4. 8+8", True, False, "7+7"),  # item N+2 starts: cut there
        (" two\nlines\n4) next", True, False, "two\nlines"),
        (" 7+7\nchatter", True, True, "7+7"),  # one-line examples: first newline ends it
        (" 7+7", False, False, "7+7"),  # stopped by itself
        (" 7+7 and mo", True, False, None),  # cut off by the token budget
        ("  \n4. x", False, False, None),  # empty
    ],
)
def test_parse_generated(text, truncated, single_line, expected) -> None:
    assert parse_generated(text, 2, truncated, single_line) == expected


@pytest.mark.parametrize(
    ("text", "truncated", "expected"),
    [
        # The generator went on after the options: cut there, stopped or not.
        (" Q?\nOptions:\n(A) x\n(B) y\nSo (A) because", True, "Q?\nOptions:\n(A) x\n(B) y"),
        (" Q?\nOptions:\n(A) x\n(B) y\nSo (A).", False, "Q?\nOptions:\n(A) x\n(B) y"),
        # Cut off inside what may be the last option: unfinished, dropped.
        (" Q?\nOptions:\n(A) x\n(B) y and mo", True, None),
        (" Q?\nOptions:\n(A) x\n(B) y", False, "Q?\nOptions:\n(A) x\n(B) y"),
        (" Q?\nOptions:\n(A) x\nchatter", True, None),  # one option: no block, unfinished
        # Cut off where another option may have begun: unfinished, dropped.
        (" Q?\nOptions:\n(A) x\n(B) y\n(C", True, None),
        (" Q?\nOptions:\n(A) x\n(B) y\n", True, None),
        (" Q?\nOptions:\n- a\n- b\n- ", True, None),
    ],
)  # fmt: skip
def test_parse_generated_ends_an_input_at_its_options(text, truncated, expected) -> None:
    assert parse_generated(text, 2, truncated, False, options_block_end) == expected


def test_synthesise_dedupes_filters_and_counts(llama_tok) -> None:
    script = iter(["12 12", "hello", "12 12", "1 2 3", "34", "abc", "56", "78", "90"] * 3)
    gen = FunctionBackend(llama_tok, lambda prompt, seed: f" {next(script)}\n9. x")
    out = synthesise(
        gen,
        "numbers",
        ["1 2 3", "4 5 6"],
        count=3,
        max_attempts=20,
        seed=0,
        batch=4,
        accept=lambda xs: [x[0].isdigit() for x in xs],
    )
    c = out.counts
    # Round 1: "12 12" kept, "hello" rejected, "12 12" duplicate, "1 2 3" is a seed (duplicate).
    # Round 2: "34", "56", "78" kept, "abc" rejected: 4 kept (the extra of the last round stays).
    assert out.inputs == ["12 12", "34", "56", "78"]
    assert (c.generated, c.kept, c.rejected, c.duplicates, c.unparsable) == (8, 4, 2, 2, 0)
    assert c.generated == c.unparsable + c.duplicates + c.rejected + c.kept


def test_synthesise_stops_at_max_attempts(llama_tok) -> None:
    gen = FunctionBackend(llama_tok, lambda prompt, seed: " unfinished and long")
    out = synthesise(gen, "x", ["a", "b"], count=5, max_attempts=6, seed=0, batch=4, max_tokens=3)
    assert out.inputs == [] and out.counts.generated == 6 and out.counts.unparsable == 6


def test_synthesise_gives_up_when_nothing_it_writes_is_in_the_task_format(llama_tok) -> None:
    """Every generation unparsable, or too few parsable for the budget to reach the count: it
    stops at the first round boundary past ``give_up_after`` instead of spending the whole
    budget; a yield that could reach the count goes on."""
    never = FunctionBackend(llama_tok, lambda prompt, seed: " unfinished and long")
    out = synthesise(never, "x", ["a", "b"], count=50, max_attempts=400, seed=0, batch=4,
                     max_tokens=3, give_up_after=10)  # fmt: skip
    assert out.inputs == [] and out.counts.generated == out.counts.unparsable == 12
    script = iter(["12"] + ["abc"] * 100)
    once = FunctionBackend(llama_tok, lambda prompt, seed: f" {next(script)}\n9. x")
    out = synthesise(once, "x", ["1", "2"], count=50, max_attempts=40, seed=0, batch=4,
                     well_formed=str.isdigit, give_up_after=10)  # fmt: skip
    assert out.inputs == ["12"] and out.counts.generated == 12  # 1 in 12 x 40 < 50
    script = iter(["12", "abc", "13", "abc"] * 100)
    half = FunctionBackend(llama_tok, lambda prompt, seed: f" {next(script)}\n9. x")
    out = synthesise(half, "x", ["1", "2"], count=15, max_attempts=40, seed=0, batch=4,
                     well_formed=str.isdigit, give_up_after=10)  # fmt: skip
    # Half well-formed: 20 of the 40 could reach 15, so it goes on; only 2 distinct inputs exist.
    assert out.inputs == ["12", "13"] and out.counts.generated == 40


FRAMED = [
    "Say which noun the pronoun means.\n\nSentence: Ann told Bo she won.\n  choice: Ann\n"
    "  choice: Bo\nAnswer:",
    "Say which noun the pronoun means.\n\nSentence: Cy met Di, who smiled.\n  choice: Di\n"
    "  choice: Cy\nAnswer:",
]


def test_input_frame_is_the_shared_first_and_last_lines() -> None:
    frame = input_frame(FRAMED)
    assert frame == Frame(("Say which noun the pronoun means.", ""), ("Answer:",))
    body = frame.strip(FRAMED[0])
    assert body == "Sentence: Ann told Bo she won.\n  choice: Ann\n  choice: Bo"
    assert frame.wrap(body) == FRAMED[0]
    assert input_frame(["What is 1 + 2?", "What is 3 + 4?"]) == Frame()  # one line: its own
    assert input_frame(["a\nb", "a\nb"]) == Frame(("a",))  # each keeps a line of its own
    assert input_frame(FRAMED[:1]) == Frame()


@given(
    st.lists(st.text("ab\n", max_size=6), max_size=3),
    st.lists(st.text("ab\n", min_size=1, max_size=8).filter(lambda t: t.strip()), min_size=2,
             max_size=5),
    st.lists(st.text("ab\n", max_size=6), max_size=3),
)  # fmt: skip
def test_input_frame_round_trips(head, bodies, tail) -> None:
    """Whatever the examples, a frame's wrap undoes its strip, and it leaves each a line."""
    examples = ["\n".join([*head, body, *tail]).strip() for body in bodies]
    frame = input_frame(examples)
    for x in examples:
        assert frame.wrap(frame.strip(x)) == x
        assert len(frame.head) + len(frame.tail) < len(x.split("\n"))


def test_synthesise_shows_the_bodies_and_puts_the_frame_back(llama_tok) -> None:
    prompts: list[str] = []

    def respond(prompt: str, seed: int) -> str:
        prompts.append(prompt)
        return " Sentence: Ed saw Flo as he left.\n  choice: Ed\n  choice: Flo\n4. x"

    gen = FunctionBackend(llama_tok, respond)
    out = synthesise(gen, "pronouns", FRAMED, count=1, max_attempts=1, seed=0, batch=1, frame=True)
    assert out.inputs == [
        "Say which noun the pronoun means.\n\nSentence: Ed saw Flo as he left.\n  choice: Ed\n"
        "  choice: Flo\nAnswer:"
    ]
    assert "Sentence: Ann told Bo" in prompts[0] and "Say which noun" not in prompts[0]
    whole = synthesise(FunctionBackend(llama_tok, respond), "pronouns", FRAMED, count=1,
                       max_attempts=1, seed=0, batch=1)  # fmt: skip
    assert whole.inputs == ["Sentence: Ed saw Flo as he left.\n  choice: Ed\n  choice: Flo"]
    assert "Say which noun" in prompts[1]


def test_synthesise_drops_candidates_not_in_the_task_format_before_the_filter(llama_tok) -> None:
    script = iter([" Ed saw Flo.\n  choice: Ed\n  choice: Flo", " Ed saw Flo.\nA) Ed\nB) Flo"])
    seen: list[str] = []

    def accept(xs: list[str]) -> list[bool]:
        seen.extend(xs)
        return [True] * len(xs)

    gen = FunctionBackend(llama_tok, lambda prompt, seed: f"{next(script)}\n4. x")
    out = synthesise(gen, "pronouns", FRAMED, count=2, max_attempts=2, seed=0, batch=2,
                     well_formed=lambda t: t.count("choice:") >= 2, accept=accept)  # fmt: skip
    assert out.inputs == seen == ["Ed saw Flo.\n  choice: Ed\n  choice: Flo"]
    assert (out.counts.kept, out.counts.unparsable, out.counts.rejected) == (1, 1, 0)


# -- sampling in the backends ---------------------------------------------------------------


def test_transformers_sampling_is_seeded(tiny_model_dir: Path, llama_tok) -> None:
    backend = TransformersBackend.from_pretrained(tiny_model_dir)
    prompt = list(llama_tok("one two")["input_ids"])
    greedy = backend.generate([prompt], 8, [])
    assert backend.generate([prompt], 8, [], temperature=0.0, seed=5) == greedy
    a = backend.generate([prompt, prompt], 8, [], temperature=1.0, seed=1)
    b = backend.generate([prompt, prompt], 8, [], temperature=1.0, seed=1)
    c = backend.generate([prompt], 8, [], temperature=1.0, seed=2)
    assert a == b  # reproducible
    assert a[0] != a[1]  # equal prompts in one call get different seeds
    assert c[0] == a[1]  # prompt i is sampled with seed + i
    assert a[0] != greedy[0]


# -- discriminator prompt, labelling --------------------------------------------------------


def test_free_prompt_has_no_task(llama_tok, gemma_tok) -> None:
    assert llama_tok.decode(list(free_prompt(llama_tok))) == "<|im_start|>user\n"
    assert gemma_tok.decode(list(free_prompt(gemma_tok))) == "<bos>"


def test_answer_all_reads_first_line_on_plain_prompts(gemma_tok) -> None:
    seen: list[str] = []

    def respond(prompt: str, seed: int) -> str:
        seen.append(prompt)
        return " word\nQ: more"

    backend = FunctionBackend(gemma_tok, respond)
    assert answer_all(backend, ["abc", "de"], chunk=1) == ["word", "word"]
    assert seen == ["<bos>Q: abc\nA:", "<bos>Q: de\nA:"]
    assert backend.calls == 2
    with pytest.raises(LabellingStopped):
        answer_all(backend, ["abc"], should_stop=lambda: True)


def test_option_distributions_are_the_softmax_of_summed_option_loglikelihoods(
    tiny_model_dir: Path,
) -> None:
    """Oracle: the tiny model's own float64 log-softmax, each option scored as the continuation
    of the student's query prompt; ragged option counts and lengths."""
    from vllm_lora_ext.evaluation.prompts import answer_ids

    backend = TransformersBackend.from_pretrained(tiny_model_dir)
    tok = backend.tokenizer
    inputs = ["Which is it?", "Pick one of these"]
    options = [["one", "two three", "four five six"], ["yes", "no"]]
    got = option_distributions(backend, inputs, options)
    for text, opts, dist in zip(inputs, options, got, strict=True):
        prompt = query_prompt(tok, text)
        sums = []
        for o in opts:
            ans = answer_ids(tok, prompt, o)
            ids = torch.tensor([[*prompt.ids, *ans]])
            with torch.no_grad():
                logp = torch.log_softmax(backend.model(input_ids=ids).logits[0].double(), -1)
            start = len(prompt.ids) - 1
            sums.append(sum(logp[start + i, t] for i, t in enumerate(ans)))
        want = torch.softmax(torch.stack(sums), 0).tolist()
        assert dist == pytest.approx(want, abs=1e-5)
        assert math.fsum(dist) == pytest.approx(1.0)
    assert choose_all(backend, inputs, options) == [
        max(range(len(d)), key=d.__getitem__) for d in got
    ]


def test_query_prompt_chat(llama_tok) -> None:
    text = llama_tok.decode(list(query_prompt(llama_tok, "12 34").ids))
    assert text == "<|im_start|>user\n12 34<|im_end|>\n<|im_start|>assistant\n"


# -- gate -----------------------------------------------------------------------------------


def test_gate_uses_the_task_metric_when_answers_are_known() -> None:
    teacher = ["a", "b", "c", "x"]
    targets = ["a", "b", "c", "d"]  # teacher 0.75
    ok = decide(teacher, ["A.", "b", "c", "y"], targets, tolerance=0.0, min_known=4)
    assert ok.passed and ok.student_accuracy == 0.75 and ok.teacher_accuracy == 0.75
    bad = decide(teacher, ["a", "b", "z", "z"], targets, tolerance=0.2, min_known=4)
    assert not bad.passed and "0.500 (95% interval [0.15, 0.85]) < teacher 0.750" in bad.reason
    assert decide(teacher, ["a", "b", "z", "z"], targets, tolerance=0.25, min_known=4).passed


def test_gate_needs_min_known_answers_before_the_metric_decides() -> None:
    """One known answer decides nothing: agreement on every held-out input does."""
    teacher, student = list("abcdefghij"), list("abcdefghiz")
    one_known = ["a"] + [None] * 9
    r = decide(teacher, student, one_known, min_agreement=0.8, min_checked=10)
    assert r.passed and r.student_accuracy is None and r.n_with_targets == 1
    assert "9/10" in r.reason and "95% interval [0.60, 0.98]" in r.reason
    lo, hi = r.interval
    assert lo < 0.9 < hi


def test_gate_uses_agreement_without_known_answers() -> None:
    none = [None] * 5
    assert decide(list("abcde"), list("abcdz"), none, min_agreement=0.8, min_checked=5).passed
    result = decide(list("abcde"), list("abczz"), none, min_agreement=0.8, min_checked=5)
    assert not result.passed and result.agreement == 0.6
    assert "3/5" in result.reason and "0.8 required" in result.reason
    assert result.interval is not None and result.interval[0] < 0.6 < result.interval[1]
    assert not decide([], [], []).passed


def test_gate_refuses_to_decide_on_agreement_over_too_few_inputs() -> None:
    """Full agreement on 19 inputs (interval [0.83, 1.00]) is not enough with the default 20;
    on 20 it passes; known answers (>= min_known) decide whatever the count."""
    teacher = [str(i) for i in range(20)]
    few = decide(teacher[:19], teacher[:19], [None] * 19)
    assert not few.passed and few.agreement == 1.0 and few.n == 19
    assert "too few held-out inputs" in few.reason and "19/19" in few.reason
    assert few.interval is not None and few.interval[0] > 0.8
    assert decide(teacher, teacher, [None] * 20).passed
    known = decide(teacher[:10], teacher[:10], teacher[:10])
    assert known.passed and known.student_accuracy == 1.0


@given(
    st.lists(st.tuples(st.sampled_from("ab"), st.sampled_from("ab")), min_size=1, max_size=40),
    st.integers(1, 40),
)
def test_gate_never_passes_on_agreement_below_min_checked(pairs, min_checked) -> None:
    teacher, student = [t for t, _ in pairs], [s for _, s in pairs]
    r = decide(teacher, student, [None] * len(pairs), min_agreement=0.0, min_checked=min_checked)
    assert r.passed == (len(pairs) >= min_checked)
    assert r.interval is not None and r.interval[0] - 1e-9 <= r.agreement <= r.interval[1] + 1e-9


# -- training guards ------------------------------------------------------------------------


def _tiny_rows(tokenizer) -> list[tuple[list[int], int]]:
    rows = []
    for text in strings(random.Random(0), DIGITS + LETTERS, 8):
        ids = tokenizer(text)["input_ids"]
        rows.append((ids, 1))
    return rows


def test_training_divergence_is_an_error(tiny_model_dir: Path, llama_tok) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    hp = LoraHyperparameters(steps=20, batch=4, lr=1e30, targets=("q_proj", "v_proj", "o_proj"))
    model = attach_lora(base, hp)
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        train_lora(model, _tiny_rows(llama_tok), hp, pad=0)


def test_training_reports_every_step(tiny_model_dir: Path, llama_tok) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    hp = LoraHyperparameters(steps=10, batch=4, lr=1e-3)
    model = attach_lora(base, hp)
    steps: list[int] = []
    losses = train_lora(
        model, _tiny_rows(llama_tok), hp, pad=0, on_step=lambda s, _: steps.append(s)
    )
    assert steps == list(range(1, 11)) and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]


def test_training_should_stop_is_checked_each_step(tiny_model_dir: Path, llama_tok) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    hp = LoraHyperparameters(steps=10, batch=4, lr=1e-3)
    model = attach_lora(base, hp)
    done: list[int] = []
    with pytest.raises(TrainingStopped, match="before step 3 of 10"):
        train_lora(
            model,
            _tiny_rows(llama_tok),
            hp,
            pad=0,
            on_step=lambda s, _: done.append(s),
            should_stop=lambda: len(done) >= 2,
        )
    assert done == [1, 2]


# -- a student that fits, labels from options ------------------------------------------------


def test_lr_schedule_warms_up_then_decays_to_a_tenth() -> None:
    from vllm_lora_ext.training import FINAL_LR_FRACTION, lr_factor

    hp = LoraHyperparameters(steps=100, warmup=0.1, decay=True)
    factors = [lr_factor(s, hp) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(factors[:10]))
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert factors[-1] == pytest.approx(FINAL_LR_FRACTION)
    flat = LoraHyperparameters(steps=50)
    assert {lr_factor(s, flat) for s in range(50)} == {1.0}


def test_fitted_rows_is_greedy_agreement_and_training_stops_once_rows_fit(
    tiny_model_dir: Path, llama_tok
) -> None:
    """Oracle: the model's own greedy generation. Training with a fit target stops early."""
    from vllm_lora_ext.training import answer_end_ids, distillation_rows, fitted_rows

    pairs = [(x, number_or_word(x)) for x in strings(random.Random(3), DIGITS + LETTERS, 12)]
    rows, _ = distillation_rows(llama_tok, pairs)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    hp = LoraHyperparameters(steps=120, batch=12, lr=1e-2, targets=("q_proj", "v_proj", "o_proj"))
    model = attach_lora(base, hp)
    fits: list[tuple[int, float]] = []
    losses = train_lora(model, rows, hp, pad=0, fit_target=0.9, fit_every=5,
                        on_fit=lambda *f: fits.append(f))  # fmt: skip
    assert fits and fits[-1][1] >= 0.9 and len(losses) == fits[-1][0] < hp.steps
    assert all(f < 0.9 for _, f in fits[:-1])
    fitted = fitted_rows(model, rows, pad=0, batch=5)
    backend = TransformersBackend(model, llama_tok)
    gens = backend.generate([ids[:start] for ids, start in rows], 8, answer_end_ids(llama_tok))
    # a generation ends at the stop token (not included): the answer, then the end token
    greedy = [g.token_ids == tuple(ids[start:-1]) for g, (ids, start) in
              zip(gens, rows, strict=True)]  # fmt: skip
    assert fitted == greedy and sum(fitted) / len(fitted) == fits[-1][1]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Sentence: x\n  choice: A cook\n  choice: Ambiguous\nPronoun:", ["A cook", "Ambiguous"]),
        ("no options here", []),
        ("  choice: only", ["only"]),
        ("  choice: \n  choice: b", ["b"]),  # an empty option is no option
    ],
)
def test_parse_options(text: str, expected: list[str]) -> None:
    from vllm_lora_ext.migrate.labelling import parse_options

    assert parse_options(text, "\n  choice: " if "\n" in text else "  choice: ") == expected


def test_parse_options_reads_a_bbh_options_block_as_its_answers() -> None:
    from vllm_lora_ext.evaluation.bbh import OPTIONS_HEADER
    from vllm_lora_ext.migrate.labelling import lists_options, parse_options

    lettered = "Which one?\nOptions:\n(A) the cat\n(B) the dog"
    assert parse_options(lettered, OPTIONS_HEADER) == ["(A)", "(B)"]
    assert parse_options("Did it?\nOptions:\n- Yes\n- No", OPTIONS_HEADER) == ["Yes", "No"]
    for unusable in ("not ( True ) is", "Q?\nOptions:\n(A) one\n- two"):  # none; malformed
        assert not lists_options(parse_options(unusable, OPTIONS_HEADER))


@given(st.text(max_size=200), st.lists(st.text(max_size=20), max_size=5))
def test_parse_options_returns_what_follows_each_marker(head: str, options: list[str]) -> None:
    from vllm_lora_ext.migrate.labelling import parse_options

    marker = "\n  choice: "
    head = head.replace("choice:", "")
    text = head + "".join(marker + o for o in options)
    expected = [o.split("\n", 1)[0].strip() for o in options]
    assert parse_options(text, marker) == [o for o in expected if o]


class OptionScorer(FunctionBackend):
    """Scores an option by a known function of its text: the teacher's preference."""

    def __init__(self, tokenizer, prefer: str) -> None:
        super().__init__(tokenizer, lambda p, _: "free text")
        self.prefer = prefer

    def continuation_logprobs(self, requests):
        out = []
        for _, answer in requests:
            text = self.tokenizer.decode(list(answer))
            out.append((0.0,) if self.prefer in text else (-1.0, -1.0))
        return out


def test_label_all_picks_the_teachers_option_and_skips_inputs_without_options(llama_tok):
    from vllm_lora_ext.migrate.labelling import label_all

    marker = "\n  choice: "
    inputs = [
        f"Who teaches?{marker}The assistant{marker}The cook{marker}Ambiguous",
        "Who teaches? (no options were written)",
        f"Who cooks?{marker}Ambiguous{marker}The cook",
    ]
    labels = label_all(OptionScorer(llama_tok, "cook"), inputs, choice_prefix=marker, chunk=2)
    assert [label.text for label in labels] == ["The cook", None, "The cook"]
    free = label_all(OptionScorer(llama_tok, "cook"), inputs[:1], max_tokens=16)
    assert [label.text for label in free] == ["free text"]


def test_votes_keep_the_majority_and_drop_inputs_without_one(llama_tok) -> None:
    from migrate_fakes import query_of

    from vllm_lora_ext.migrate.labelling import VoteParams, label_all

    def respond(prompt: str, seed: int) -> str:
        x = query_of(prompt)
        if x == "sure":  # always the same answer, worded differently when sampled
            return "Four." if seed % 2 else "four"
        if x == "split":  # greedy says one thing, the samples mostly another
            return "a" if seed < 1000 else "b"
        return f"guess {seed}"  # never agrees with itself

    backend = FunctionBackend(llama_tok, respond)
    labels = label_all(
        backend, ["sure", "split", "unsure"], 8, votes=VoteParams(votes=4, seed=1000)
    )
    assert [label.text for label in labels] == ["four", "b", None]
    assert [label.agreement for label in labels] == [1.0, 0.8, 0.2]
    assert backend.calls == 5  # one greedy round and four sampled ones
    greedy = label_all(backend, ["split", "unsure"], 8)
    assert [(label.text, label.agreement) for label in greedy] == [("a", 1.0), ("guess 1", 1.0)]


@pytest.mark.parametrize(
    ("text", "truncated", "max_lines", "expected"),
    [
        ("42", False, 1, "42"),  # ended by the model: kept whole
        ("42\nand then more", False, 1, "42\nand then more"),
        ("42\nand then mo", True, 1, "42"),  # cut where the task's answers end
        ("line one\nline two\nline thr", True, None, "line one\nline two"),  # drop the stub
        ("only a stub", True, None, None),
        ("   ", False, None, None),
    ],
)
def test_cut_answer(text, truncated, max_lines, expected) -> None:
    from vllm_lora_ext.migrate.labelling import cut_answer

    assert cut_answer(text, truncated, max_lines) == expected


def test_truncated_answers_are_recorded_and_cut(llama_tok) -> None:
    from vllm_lora_ext.migrate.labelling import answer_lines, label_all

    backend = FunctionBackend(llama_tok, lambda p, s: "7\n" + "eight nine ten " * 20)
    labels = label_all(backend, ["x"], max_tokens=6, max_lines=answer_lines(["3", "12"]))
    assert labels[0].truncated and labels[0].text == "7"
    short = label_all(backend, ["x"], max_tokens=400)
    assert not short[0].truncated and short[0].text.startswith("7\neight")


@given(st.lists(st.text(min_size=1, max_size=30), max_size=6))
def test_answer_lines_counts_the_longest_known_answer(known: list[str]) -> None:
    from vllm_lora_ext.migrate.labelling import answer_lines

    got = answer_lines(known)
    if not known:
        assert got is None
    else:
        assert got == max(max(1, len(k.strip().splitlines())) for k in known)


def test_a_multiple_choice_label_carries_the_teachers_probability_for_its_option(llama_tok):
    """Against a float64 softmax over the options' summed log-likelihoods."""
    import torch

    from vllm_lora_ext.migrate.labelling import label_all

    marker = "\n  choice: "
    inputs = [f"Who teaches?{marker}The assistant{marker}The cook{marker}Ambiguous"]
    (label,) = label_all(OptionScorer(llama_tok, "cook"), inputs, choice_prefix=marker)
    sums = []
    for option in ("The assistant", "The cook", "Ambiguous"):
        # OptionScorer: 0.0 for the preferred option, -1.0 a token for the others (2 tokens)
        sums.append(0.0 if "cook" in option else -2.0)
    expected = torch.softmax(torch.tensor(sums, dtype=torch.float64), 0)[1].item()
    assert label.text == "The cook" and label.agreement == pytest.approx(expected, rel=1e-12)


@given(
    weights=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=6).filter(lambda w: sum(w) > 0),
    draws=st.integers(1, 16),
    seed=st.integers(0, 2**16),
)
def test_soft_draws_come_from_the_options_by_their_probabilities(
    weights: list[float], draws: int, seed: int
) -> None:
    """Drawn labels are always listed options, as many as asked, never one the teacher gives
    no probability, the same for the same seed; a label without options is refused."""
    from vllm_lora_ext.migrate.labelling import Label, soft_draws

    total = sum(weights)
    options = tuple(f"({chr(65 + i)})" for i in range(len(weights)))
    label = Label(options[0], 1.0, options=options, probabilities=tuple(w / total for w in weights))
    out = soft_draws(label, draws, random.Random(seed))
    possible = {o for o, w in zip(options, weights, strict=True) if w > 0}
    assert len(out) == draws and set(out) <= possible
    assert out == soft_draws(label, draws, random.Random(seed))
    with pytest.raises(ValueError, match="options"):
        soft_draws(Label("x"), draws, random.Random(seed))
