"""The training loss skips prompt-position logits without changing the loss or its gradient."""

from __future__ import annotations

import pytest
import torch
from tiny_model import build_tiny_gemma3

from vllm_lora_ext.training import LoraHyperparameters, answer_loss, attach_lora, padded_batches


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
