"""The training loss skips prompt-position logits without changing the loss or its gradient."""

from __future__ import annotations

import pytest
import torch
from tiny_model import build_tiny_gemma3

from vllm_lora_ext.training import (
    LoraHyperparameters,
    answer_loss,
    attach_lora,
    pad_rows,
    padded_batches,
)


@pytest.fixture(params=["llama", "gemma3"])
def model(request, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir if request.param == "llama" else build_tiny_gemma3(tmp_path / "g")
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lora = attach_lora(base, LoraHyperparameters(targets=("q_proj", "v_proj"), seed=3))
    for name, p in lora.named_parameters():  # B starts at zero: make the LoRA matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return lora


def test_answer_loss_equals_the_full_loss_and_gradient(model):
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    # ragged rows, answers starting at different positions (one at position 1)
    rows = [
        (torch.randint(3, vocab, (n,), generator=g).tolist(), start)
        for n, start in [(12, 9), (7, 2), (15, 14), (5, 1)]
    ]
    ids, mask, labels = next(padded_batches(rows, batch=4, steps=1, seed=0, pad=0))
    model.train()
    ours = answer_loss(model, ids, mask, labels)
    ours.backward()
    ours_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    full = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    full.backward()
    full_grads = [p.grad for p in model.parameters() if p.requires_grad]
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_distribution_loss_is_the_kl_to_the_teachers_top_k(model):
    """Against a float64 reference on the full logits: KL(renormalised teacher top-k || student
    softmax) averaged over the answer tokens, with ragged rows and k smaller than the vocab."""
    from vllm_lora_ext.training import distribution_loss, pad_rows, teacher_tensors

    g = torch.Generator().manual_seed(1)
    vocab, k = model.config.vocab_size, 5
    rows = [
        (torch.randint(3, vocab, (n,), generator=g).tolist(), start)
        for n, start in [(10, 6), (6, 1), (12, 11)]
    ]
    teacher = [
        [
            dict(zip(torch.randperm(vocab, generator=g)[:k].tolist(),
                     (torch.randn(k, generator=g) * 2).tolist(), strict=True))
            for _ in range(len(ids) - start)
        ]
        for ids, start in rows
    ]  # fmt: skip
    ids, mask, _ = pad_rows(rows, pad=0)
    top_ids, top_lp = teacher_tensors(rows, teacher, ids.shape[1])
    model.eval()
    ours = distribution_loss(model, ids, mask, top_ids, top_lp)
    with torch.no_grad():
        logq = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.double(), -1)
    terms = []
    for r, (_, start) in enumerate(rows):
        for j, dist in enumerate(teacher[r]):
            t = start + j
            lp = torch.tensor(list(dist.values()), dtype=torch.float64)
            p = torch.softmax(lp, 0)
            q = logq[r, t - 1, list(dist.keys())]
            terms.append(float((p * (p.log() - q)).sum()))
    reference = sum(terms) / len(terms)
    assert ours.item() == pytest.approx(reference, rel=1e-4)
    assert reference > 0


def test_distribution_loss_is_zero_when_the_student_is_the_teacher(model):
    """k = the whole vocabulary and the teacher = the model itself: nothing to learn."""
    from vllm_lora_ext.training import distribution_loss, pad_rows, teacher_tensors

    g = torch.Generator().manual_seed(2)
    vocab = model.config.vocab_size
    rows = [(torch.randint(3, vocab, (9,), generator=g).tolist(), 4)]
    ids, mask, _ = pad_rows(rows, pad=0)
    model.eval()
    with torch.no_grad():
        logq = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    teacher = [[dict(enumerate(logq[0, t - 1].tolist())) for t in range(4, 9)]]
    top_ids, top_lp = teacher_tensors(rows, teacher, ids.shape[1])
    assert distribution_loss(model, ids, mask, top_ids, top_lp).item() == pytest.approx(
        0.0, abs=1e-5
    )


def test_weighted_answer_loss_is_the_weighted_mean_over_answer_tokens(model):
    """Against a float64 reference on the full logits: sum(w_r * ce_rt) / sum(w_r) over each
    row r's answer tokens t; equal weights give the unweighted loss."""
    g = torch.Generator().manual_seed(4)
    vocab = model.config.vocab_size
    rows = [
        (torch.randint(3, vocab, (n,), generator=g).tolist(), start)
        for n, start in [(11, 7), (6, 1), (14, 12)]
    ]
    weights = torch.tensor([0.2, 1.0, 0.6])
    ids, mask, labels = pad_rows(rows, pad=0)
    model.eval()
    ours = answer_loss(model, ids, mask, labels, weights)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.double(), -1)
    num = den = 0.0
    for r, (seq, start) in enumerate(rows):
        for t in range(start, len(seq)):
            num += float(weights[r]) * -float(logp[r, t - 1, seq[t]])
            den += float(weights[r])
    assert ours.item() == pytest.approx(num / den, rel=1e-5)
    same = answer_loss(model, ids, mask, labels, torch.full((3,), 0.5))
    assert same.item() == pytest.approx(answer_loss(model, ids, mask, labels).item(), rel=1e-6)
    assert ours.item() != pytest.approx(same.item(), rel=1e-3)  # the weights matter here
