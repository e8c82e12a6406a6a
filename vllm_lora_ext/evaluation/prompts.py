"""Prompts as token ids, built once with the model's own tokenizer and chat template.

Both backends receive these ids, so the HTTP path and the in-process path score exactly the same
tokens (no second tokenisation on the server that could drift). A model without a chat template
(e.g. the Gemma 3 base GGUF) falls back to BIG-bench's own ``Q: ... A:`` layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm_lora_ext.evaluation.tasks import Example, Task

# End-of-turn tokens of common chat templates; generation stops on these and on EOS.
_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")


@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]
    answer_prefix: str
    """Text put before an answer: "" after a chat template's assistant header, " " after "A:"."""


def user_message(task: Task, example: Example, chat: bool = True) -> str:
    """Task prefix, the task's own input/output prefixes, the input and (if asked) the choices.

    The task's output prefix often carries the question ("Plausible/implausible?"), so it stays
    in the user turn. BIG-bench's default ``Q:``/``A:`` prefixes are used only without a chat
    template, where they are the only cue that an answer follows.
    """
    fmt = task.format
    in_prefix = fmt.input_prefix if fmt.input_prefix is not None else ("" if chat else "\nQ: ")
    out_prefix = fmt.output_prefix if fmt.output_prefix is not None else ("" if chat else "\nA: ")
    text = fmt.task_prefix + in_prefix + example.input
    if task.mode == "multiple_choice" and fmt.append_choices and example.options:
        text += "".join(fmt.choice_prefix + option for option in example.options)
    return (text + out_prefix).strip()


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(tokenizer: Any, task: Task, example: Example) -> Prompt:
    """Token ids of the prompt, ending where the model's answer begins."""
    return message_prompt(tokenizer, user_message(task, example, has_chat_template(tokenizer)))


def message_prompt(tokenizer: Any, message: str) -> Prompt:
    """One user turn and the assistant header with a chat template; else ``message`` as plain
    text (with BOS), which the caller has already ended with its answer cue (e.g. ``A:``)."""
    if has_chat_template(tokenizer):
        messages = [{"role": "user", "content": message}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return Prompt(tuple(ids), answer_prefix="")
    ids = tokenizer(message, add_special_tokens=True)["input_ids"]
    return Prompt(tuple(ids), answer_prefix=" ")


def answer_ids(tokenizer: Any, prompt: Prompt, answer: str) -> tuple[int, ...]:
    """Token ids of an answer continuing ``prompt`` (tokenised on its own, as a model emits it)."""
    return tuple(tokenizer(prompt.answer_prefix + answer, add_special_tokens=False)["input_ids"])


def stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """EOS plus whichever end-of-turn tokens the tokenizer knows as special tokens."""
    ids = set() if tokenizer.eos_token_id is None else {tokenizer.eos_token_id}
    special = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    for token in _END_OF_TURN:
        if token in special:
            ids.add(tokenizer.convert_tokens_to_ids(token))
    return tuple(sorted(ids))
