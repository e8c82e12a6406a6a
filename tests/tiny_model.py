"""A tiny Llama and a byte-level BPE tokenizer built offline in seconds, plus random adapters.

Weights are drawn with a larger spread than a fresh init, so greedy decoding has clear winners
and vLLM and transformers agree token for token in float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from vllm_lora_ext.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, tensor_key

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Adapters change what a model says; merging combines them; migration moves them.",
    "one two three four five six seven eight nine ten eleven twelve",
    "Question: what is two plus two? Answer: four.",
    "Paris is the capital of France. Rome is the capital of Italy.",
] * 20

TINY = dict(hidden=128, heads=2, kv_heads=1, layers=2, inter=256)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_tiny_llama(out: Path, seed: int = 0) -> Path:
    """Write a ~0.4M-parameter Llama (float32) with its tokenizer into ``out``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY["hidden"],
        intermediate_size=TINY["inter"],
        num_hidden_layers=TINY["layers"],
        num_attention_heads=TINY["heads"],
        num_key_value_heads=TINY["kv_heads"],
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    return _init_and_save(LlamaForCausalLM, config, seed, out)


def module_shapes() -> dict[str, tuple[int, int]]:
    hd = TINY["hidden"] // TINY["heads"]
    h, inter = TINY["hidden"], TINY["inter"]
    return {
        "q_proj": (h, TINY["heads"] * hd),
        "k_proj": (h, TINY["kv_heads"] * hd),
        "v_proj": (h, TINY["kv_heads"] * hd),
        "o_proj": (TINY["heads"] * hd, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def random_lora_tensors(
    seed: int, rank: int = 8, targets: tuple[str, ...] = TARGETS, layers: int | None = None
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = module_shapes()
    tensors = {}
    for layer in range(TINY["layers"] if layers is None else layers):
        for module in targets:
            fan_in, fan_out = shapes[module]
            a = torch.randn(rank, fan_in, generator=g) / fan_in**0.5
            b = torch.randn(fan_out, rank, generator=g) / rank**0.5
            tensors[tensor_key(layer, module, "A")] = a
            tensors[tensor_key(layer, module, "B")] = b
    return tensors


def write_adapter(
    out: Path,
    tensors: dict[str, torch.Tensor],
    base: str,
    rank: int = 8,
    alpha: float = 16.0,
    targets: tuple[str, ...] = TARGETS,
    **config_overrides: object,
) -> Path:
    """Write a PEFT-format LoRA adapter directory."""
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(targets),
        "base_model_name_or_path": base,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        **config_overrides,
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_FILE))
    return out


_PLAIN_CORPUS = [
    "Q: what is seven minus three? A: four",
    "numbers 0 1 2 3 4 5 6 7 8 9 and words alpha beta gamma delta",
    "A base model without a chat template continues plain text.",
    "zero one two three four five six seven eight nine",
] * 20


def build_plain_tokenizer(out: Path):
    """A second byte-level BPE (other vocabulary, other specials, no chat template) that adds
    BOS like Gemma's: for tests that cross tokenizers and use plain ``Q: ... A:`` prompts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<bos>", "<eos>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_PLAIN_CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    fast.save_pretrained(out)
    return fast


def build_tiny_gemma3(out: Path, seed: int = 0) -> Path:
    """Write a tiny Gemma 3 text model (float32) with :func:`build_plain_tokenizer` into ``out``."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_plain_tokenizer(out)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=48,
        max_position_embeddings=1024,
        sliding_window=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    # Embeddings are tied to the output (scaled by sqrt(hidden) on input): the std of 0.1 that
    # _init_and_save gives embeddings keeps logits neither flat nor saturated.
    return _init_and_save(Gemma3ForCausalLM, config, seed, out)


def _init_and_save(model_cls, config, seed: int, out: Path) -> Path:
    """Seeded init (weights ~ N(0, 2/sqrt(fan_in)), embeddings ~ N(0, 0.1)), then save."""
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 2.0 / p.shape[1] ** 0.5 if "embed" not in name else 0.1)
    model.save_pretrained(out, safe_serialization=True)
    return out


def tiny_serve_args(model_dir: Path) -> list[str]:
    """4 adapter slots, 8 kept in memory: small enough that tests overflow both."""
    return [
        "--model",
        str(model_dir),
        "--max-loras",
        "4",
        "--max-cpu-loras",
        "8",
        "--max-lora-rank",
        "16",
        "--max-model-len",
        "512",
        "--kv-cache-gib",
        "1",
    ]
