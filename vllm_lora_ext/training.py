"""One LoRA training loop for every place that trains an adapter on CPU (or one GPU).

Used by ``benchmarks/train_adapters.py`` (task adapters), by ``migrate/`` (the discriminator
and the distilled student) and by pool merges. Rows are ``(token ids, answer start)``
(:func:`distillation_rows` frames (input, answer) pairs into them): the loss covers the answer
tokens only, so a model learns what to answer, not to repeat prompts. Everything is seeded (LoRA
init, batch order), float32, and a NaN/inf loss stops training with :class:`TrainingDiverged`
instead of saving a broken adapter.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vllm_lora_ext.evaluation.prompts import answer_ids, stop_token_ids
from vllm_lora_ext.files import staged_directory
from vllm_lora_ext.migrate.queries import query_prompt

# (token ids, index of the first answer token)
Row = tuple[list[int], int]
# Per answer token of a row: the teacher's top-k next-token log-probs there, {token id: logprob}.
TopLogprobs = Sequence[dict[int, float]]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the adapter would be garbage."""


class TrainingStopped(RuntimeError):
    """``should_stop`` asked the loop to end early (a cancelled job)."""


@dataclass(frozen=True)
class LoraHyperparameters:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    steps: int = 60
    batch: int = 8
    lr: float = 1e-3
    seed: int = 0
    order_seed: int | None = None
    """Seeds the batch order when set (else ``seed`` seeds both the LoRA init and the order): a
    soup's students share their init and differ in order, so their deltas stay comparable."""
    warmup: float = 0.0
    """Fraction of ``steps`` over which the learning rate rises linearly from 0."""
    decay: bool = False
    """After warmup, cosine decay of the learning rate to :data:`FINAL_LR_FRACTION` of ``lr``."""


FINAL_LR_FRACTION = 0.1


def lr_factor(step: int, hp: LoraHyperparameters) -> float:
    """Multiplier of ``hp.lr`` at 0-based ``step``: linear warmup, then constant or cosine."""
    warm = math.ceil(hp.warmup * hp.steps)
    if step < warm:
        return (step + 1) / warm
    if not hp.decay or hp.steps - warm <= 1:
        return 1.0
    progress = (step - warm) / (hp.steps - warm - 1)
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def answer_end_ids(tokenizer: Any) -> list[int]:
    """The token a trained answer ends with, so the model learns to stop: ChatML's
    ``<|im_end|>`` when the vocabulary has it, else the first stop token (EOS)."""
    if "<|im_end|>" in tokenizer.get_vocab():
        return [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return list(stop_token_ids(tokenizer)[:1])


def distillation_rows(
    tokenizer: Any, pairs: Sequence[tuple[str, str]], max_len: int = 256
) -> tuple[list[Row], int]:
    """(rows, number dropped as too long) for (input, answer) pairs: each input framed as every
    migration step frames it (``migrate.queries.query_prompt``), the answer and its end token
    after it."""
    rows, _ = kept_distillation_rows(tokenizer, pairs, max_len)
    return rows, len(pairs) - len(rows)


def kept_distillation_rows(
    tokenizer: Any, pairs: Sequence[tuple[str, str]], max_len: int = 256
) -> tuple[list[Row], list[int]]:
    """:func:`distillation_rows` with the index of each kept pair instead of the count dropped,
    so that per-pair data (loss weights) follows the rows that fit in ``max_len``."""
    end = answer_end_ids(tokenizer)
    rows: list[Row] = []
    kept: list[int] = []
    for i, (text, answer) in enumerate(pairs):
        prompt = query_prompt(tokenizer, text)
        ids = [*prompt.ids, *answer_ids(tokenizer, prompt, answer), *end]
        if len(ids) <= max_len:
            rows.append((ids, len(prompt.ids)))
            kept.append(i)
    return rows, kept


def attach_lora(base: Any, hp: LoraHyperparameters) -> Any:
    """``base`` wrapped in a fresh PEFT LoRA whose init is seeded by ``hp.seed``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(hp.seed)
    config = LoraConfig(
        r=hp.rank,
        lora_alpha=hp.alpha,
        lora_dropout=0.0,
        target_modules=list(hp.targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, config)


def batch_indices(n_rows: int, batch: int, steps: int, seed: int) -> Iterator[list[int]]:
    """``steps`` lists of row indices: seeded reshuffles of all rows, so every row is seen
    once per epoch."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch:
            fresh = list(range(n_rows))
            rng.shuffle(fresh)
            order += fresh
        yield order[:batch]
        del order[:batch]


def pad_rows(picked: Sequence[Row], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, labels) of right-padded rows; labels are -100 outside the answer."""
    width = max(len(ids) for ids, _ in picked)
    ids = torch.full((len(picked), width), pad, dtype=torch.long)
    labels = torch.full((len(picked), width), -100, dtype=torch.long)
    mask = torch.zeros((len(picked), width), dtype=torch.long)
    for r, (seq, start) in enumerate(picked):
        ids[r, : len(seq)] = torch.tensor(seq)
        labels[r, start : len(seq)] = torch.tensor(seq[start:])
        mask[r, : len(seq)] = 1
    return ids, mask, labels


def padded_batches(
    rows: Sequence[Row], batch: int, steps: int, seed: int, pad: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``steps`` padded batches (:func:`pad_rows`) in :func:`batch_indices` order."""
    for picked in batch_indices(len(rows), batch, steps, seed):
        yield pad_rows([rows[i] for i in picked], pad)


def teacher_tensors(
    picked: Sequence[Row], teacher: Sequence[TopLogprobs], width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(top ids, top log-probs), each [batch, width, k]: at position ``t`` the teacher's
    distribution over token ``t`` (so answer positions only); -inf log-probs pad the rest."""
    k = max((len(d) for dists in teacher for d in dists), default=1)
    top_ids = torch.zeros((len(picked), width, k), dtype=torch.long)
    top_lp = torch.full((len(picked), width, k), -math.inf)
    for r, ((seq, start), dists) in enumerate(zip(picked, teacher, strict=True)):
        if len(dists) != len(seq) - start:
            raise ValueError(
                f"row {r}: {len(seq) - start} answer tokens but {len(dists)} teacher distributions"
            )
        for t, dist in enumerate(dists, start=start):
            ranked = sorted(dist.items(), key=lambda kv: -kv[1])
            top_ids[r, t, : len(ranked)] = torch.tensor([i for i, _ in ranked])
            top_lp[r, t, : len(ranked)] = torch.tensor([lp for _, lp in ranked])
    return top_ids, top_lp


def answer_logits(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, answer: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, kept positions ``keep``): the logits of positions ``keep`` only, from the one
    before the batch's earliest ``answer`` token on; ``logits[:, j]`` predicts token
    ``keep[j] + 1``."""
    first = int(torch.where(answer.any(dim=1), answer.int().argmax(dim=1), ids.shape[1]).min())
    keep = torch.arange(max(first - 1, 0), ids.shape[1] - 1, device=ids.device)
    return model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits, keep


def answer_loss(
    model: Any,
    ids: torch.Tensor,  # [batch, width]
    mask: torch.Tensor,  # [batch, width]
    labels: torch.Tensor,  # [batch, width], -100 outside the answers
    row_weights: torch.Tensor | None = None,  # [batch]
) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens: ``model(..., labels=labels).loss``,
    but with logits only from the earliest answer position of the batch on. With
    ``row_weights``, each row's tokens count with its weight: sum(w_r * ce_rt) / sum(w_r * 1).

    Prompt positions predict no label, and the output projection is most of a small model's
    compute when its vocabulary is large (Gemma 3 270M: 262k x 640 against ~100M other
    weights), so skipping it there halves a training step on CPU. Logits at position ``p``
    predict token ``p + 1``; the model's own final-logit processing (e.g. soft-capping) still
    applies, as ``logits_to_keep`` only selects positions.
    """
    logits, keep = answer_logits(model, ids, mask, labels != -100)
    targets = labels[:, keep + 1]
    flat = logits.float().reshape(-1, logits.shape[-1])
    if row_weights is None:
        return torch.nn.functional.cross_entropy(flat, targets.reshape(-1), ignore_index=-100)
    per_token = torch.nn.functional.cross_entropy(
        flat, targets.reshape(-1), ignore_index=-100, reduction="none"
    ).reshape(targets.shape)
    weight = row_weights.to(per_token.dtype)[:, None] * (targets != -100)
    return (per_token * weight).sum() / weight.sum()


def distribution_loss(
    model: Any,
    ids: torch.Tensor,  # [batch, width]
    mask: torch.Tensor,  # [batch, width]
    top_ids: torch.Tensor,  # [batch, width, k]
    top_logprobs: torch.Tensor,  # [batch, width, k], -inf where no teacher token
) -> torch.Tensor:
    """Token-level distillation: mean over the answer tokens of KL(teacher || student), the
    teacher's top-k renormalised (what a served teacher returns), the student's full softmax.

    Each term is >= 0 and is 0 only when the student puts exactly the teacher's probabilities
    on those k tokens and nothing elsewhere. Logits come only from the earliest answer position
    on, as in :func:`answer_loss`.
    """
    has = torch.isfinite(top_logprobs).any(dim=-1)  # [batch, width]: positions with a target
    logits, keep = answer_logits(model, ids, mask, has)
    logits = logits.float()
    target = has[:, keep + 1]  # selected first: a position without target is all -inf (NaN)
    student = torch.log_softmax(logits, dim=-1).gather(-1, top_ids[:, keep + 1])[target]
    teacher = torch.log_softmax(top_logprobs[:, keep + 1][target].float(), dim=-1)
    p = teacher.exp()
    # p * log(p / q) with 0 where p = 0 (a padded entry: -inf - q would give 0 * -inf = NaN)
    return (p * torch.where(p > 0, teacher - student, torch.zeros_like(student))).sum(-1).mean()


@torch.no_grad()
def fitted_rows(model: Any, rows: Sequence[Row], pad: int, batch: int = 16) -> list[bool]:
    """Per row: is every answer token the model's most likely next token given the row so far?

    Then greedy decoding of the prompt yields exactly the row's answer (and its end token), so
    this is the greedy agreement with the labels, measured with one forward pass per batch
    instead of a generation.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    fitted: list[bool] = []
    try:
        for at in range(0, len(rows), batch):
            ids, mask, labels = pad_rows(rows[at : at + batch], pad)
            ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
            logits, keep = answer_logits(model, ids, mask, labels != -100)
            targets = labels[:, keep + 1]
            hit = (logits.argmax(-1) == targets) | (targets == -100)
            fitted += hit.all(dim=1).tolist()
    finally:
        model.train(was_training)
    return fitted


def train_lora(
    model: Any,
    rows: Sequence[Row],
    hp: LoraHyperparameters,
    pad: int,
    desc: str | None = None,
    on_step: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    teacher: Sequence[TopLogprobs] | None = None,
    fit_target: float | None = None,
    fit_every: int = 10,
    on_fit: Callable[[int, float], None] | None = None,
    stop_when: Callable[[int], bool] | None = None,
    weights: Sequence[float] | None = None,
) -> list[float]:
    """AdamW on the trainable (LoRA) parameters of ``model``; returns the loss per step.

    The loss is cross-entropy on each row's answer tokens (with ``weights``, one per row, each
    row's tokens weighted by it: a label the teacher was less sure of teaches less), or, given
    ``teacher`` (one entry per row: a distribution per answer token), :func:`distribution_loss`
    against it. The learning
    rate follows :func:`lr_factor`. With ``fit_target``, every ``fit_every`` steps the fraction
    of :func:`fitted_rows` is measured (``on_fit(step, fraction)``) and training ends once it
    reaches the target: ``hp.steps`` is then a budget, not a prescription.
    ``stop_when(step)`` is asked after every step and ends training there if true (early
    stopping on a held-out measure; the model is back in training mode after it).
    ``on_step(step, loss)`` reports progress (1-based step); ``should_stop()`` is checked before
    every step and raises :class:`TrainingStopped`. ``desc`` shows a tqdm bar.
    """
    if not rows:
        raise ValueError("no training rows")
    if teacher is not None and len(teacher) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(teacher)} teacher entries")
    if weights is not None:
        if teacher is not None:
            raise ValueError("row weights apply to the cross-entropy loss, not to a teacher's")
        if len(weights) != len(rows) or not all(w > 0 and math.isfinite(w) for w in weights):
            raise ValueError(f"need one positive finite weight per row ({len(rows)} rows)")
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=hp.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: lr_factor(step, hp))
    device = next(model.parameters()).device
    model.train()
    losses: list[float] = []
    order = hp.seed if hp.order_seed is None else hp.order_seed
    stream = batch_indices(len(rows), hp.batch, hp.steps, order)
    if desc is not None:
        from tqdm import tqdm

        stream = tqdm(stream, total=hp.steps, desc=desc)
    try:
        for step, picked in enumerate(stream, start=1):
            if should_stop is not None and should_stop():
                raise TrainingStopped(f"stopped before step {step} of {hp.steps}")
            batch_rows = [rows[i] for i in picked]
            ids, mask, labels = pad_rows(batch_rows, pad)
            ids, mask = ids.to(device), mask.to(device)
            if teacher is None:
                w = None
                if weights is not None:
                    w = torch.tensor([weights[i] for i in picked], device=device)
                loss = answer_loss(model, ids, mask, labels.to(device), w)
            else:
                top_ids, top_lp = teacher_tensors(
                    batch_rows, [teacher[i] for i in picked], ids.shape[1]
                )
                loss = distribution_loss(model, ids, mask, top_ids.to(device), top_lp.to(device))
            value = loss.item()
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"loss became {value} at step {step} of {hp.steps} (lr {hp.lr}): lower the "
                    "learning rate"
                )
            loss.backward()
            optim.step()
            optim.zero_grad()
            schedule.step()
            losses.append(value)
            if desc is not None:
                stream.set_postfix(loss=f"{value:.3f}")
            if on_step is not None:
                on_step(step, value)
            if fit_target is not None and (step % fit_every == 0 or step == hp.steps):
                fitted = fitted_rows(model, rows, pad)
                fraction = sum(fitted) / len(fitted)
                if on_fit is not None:
                    on_fit(step, fraction)
                if fraction >= fit_target:
                    break
            if stop_when is not None:
                done = stop_when(step)
                model.train()
                if done:
                    break
    finally:
        model.eval()
    return losses


def save_adapter_atomically(model: Any, target: Path, files: dict[str, str] | None = None) -> Path:
    """``model.save_pretrained`` into a staging directory beside ``target`` (plus extra text
    ``files``), then renamed into place (``files.staged_directory``): never half an adapter."""
    target = Path(target)
    with staged_directory(target) as staging:
        model.save_pretrained(staging)
        for name, text in (files or {}).items():
            (staging / name).write_text(text)
    return target
