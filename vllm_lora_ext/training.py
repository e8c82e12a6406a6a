"""One LoRA training loop for every place that trains an adapter on CPU (or one GPU).

Used by ``benchmarks/train_adapters.py`` (task adapters) and by ``migrate/`` (the discriminator
and the distilled student). Rows are ``(token ids, answer start)``: the loss covers the answer
tokens only, so a model learns what to answer, not to repeat prompts. Everything is seeded (LoRA
init, batch order), float32, and a NaN/inf loss stops training with :class:`TrainingDiverged`
instead of saving a broken adapter.
"""

from __future__ import annotations

import math
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vllm_lora_ext.evaluation.prompts import stop_token_ids

# (token ids, index of the first answer token)
Row = tuple[list[int], int]


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


def answer_end_ids(tokenizer: Any) -> list[int]:
    """The token a trained answer ends with, so the model learns to stop: ChatML's
    ``<|im_end|>`` when the vocabulary has it, else the first stop token (EOS)."""
    if "<|im_end|>" in tokenizer.get_vocab():
        return [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return list(stop_token_ids(tokenizer)[:1])


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


def padded_batches(
    rows: Sequence[Row], batch: int, steps: int, seed: int, pad: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``steps`` batches of (ids, attention mask, labels): seeded reshuffles of all rows, so
    every row is seen once per epoch; labels are -100 outside the answer."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch:
            fresh = list(range(len(rows)))
            rng.shuffle(fresh)
            order += fresh
        picked = [rows[i] for i in order[:batch]]
        del order[:batch]
        width = max(len(ids) for ids, _ in picked)
        ids = torch.full((len(picked), width), pad, dtype=torch.long)
        labels = torch.full((len(picked), width), -100, dtype=torch.long)
        mask = torch.zeros((len(picked), width), dtype=torch.long)
        for r, (seq, start) in enumerate(picked):
            ids[r, : len(seq)] = torch.tensor(seq)
            labels[r, start : len(seq)] = torch.tensor(seq[start:])
            mask[r, : len(seq)] = 1
        yield ids, mask, labels


def answer_loss(
    model: Any,
    ids: torch.Tensor,  # [batch, width]
    mask: torch.Tensor,  # [batch, width]
    labels: torch.Tensor,  # [batch, width], -100 outside the answers
) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens: ``model(..., labels=labels).loss``,
    but with logits only from the earliest answer position of the batch on.

    Prompt positions predict no label, and the output projection is most of a small model's
    compute when its vocabulary is large (Gemma 3 270M: 262k x 640 against ~100M other
    weights), so skipping it there halves a training step on CPU. Logits at position ``p``
    predict token ``p + 1``; the model's own final-logit processing (e.g. soft-capping) still
    applies, as ``logits_to_keep`` only selects positions.
    """
    answer = labels != -100
    first = int(torch.where(answer.any(dim=1), answer.int().argmax(dim=1), ids.shape[1]).min())
    keep = torch.arange(max(first - 1, 0), ids.shape[1] - 1, device=ids.device)
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    targets = labels[:, keep + 1]
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
    )


def train_lora(
    model: Any,
    rows: Sequence[Row],
    hp: LoraHyperparameters,
    pad: int,
    desc: str | None = None,
    on_step: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[float]:
    """AdamW on the trainable (LoRA) parameters of ``model``; returns the loss per step.

    ``on_step(step, loss)`` reports progress (1-based step); ``should_stop()`` is checked before
    every step and raises :class:`TrainingStopped`. ``desc`` shows a tqdm bar.
    """
    if not rows:
        raise ValueError("no training rows")
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=hp.lr)
    device = next(model.parameters()).device
    model.train()
    losses: list[float] = []
    stream = padded_batches(rows, hp.batch, hp.steps, hp.seed, pad)
    if desc is not None:
        from tqdm import tqdm

        stream = tqdm(stream, total=hp.steps, desc=desc)
    try:
        for step, (ids, mask, labels) in enumerate(stream, start=1):
            if should_stop is not None and should_stop():
                raise TrainingStopped(f"stopped before step {step} of {hp.steps}")
            loss = answer_loss(model, ids.to(device), mask.to(device), labels.to(device))
            value = loss.item()
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"loss became {value} at step {step} of {hp.steps} (lr {hp.lr}): lower the "
                    "learning rate"
                )
            loss.backward()
            optim.step()
            optim.zero_grad()
            losses.append(value)
            if desc is not None:
                stream.set_postfix(loss=f"{value:.3f}")
            if on_step is not None:
                on_step(step, value)
    finally:
        model.eval()
    return losses


def save_adapter_atomically(model: Any, target: Path, files: dict[str, str] | None = None) -> Path:
    """``model.save_pretrained`` into a staging directory beside ``target`` (plus extra text
    ``files``), then one rename: readers see the old adapter or the new one, never half."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        for name, text in (files or {}).items():
            (staging / name).write_text(text)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
