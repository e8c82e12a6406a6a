"""How a task input is put to a model and how its answer is read back, for every step.

Teacher, student, gate and discriminator must frame an input identically, or the student learns
a prompt format the gate never shows it. A chat model gets the input as one user turn; a model
without a chat template (e.g. Gemma 3 base) gets ``Q: <input>\\nA:`` and answers on one line.
"""

from __future__ import annotations

from typing import Any

from vllm_lora_ext.evaluation.prompts import Prompt, has_chat_template, message_prompt

PLAIN_CHAT_TEMPLATE = "{{ bos_token }}Q: {{ messages[-1]['content'] }}\nA:"
"""A chat template for a model without one that frames the last message as
:func:`query_prompt` does, so chat clients of a migrated adapter on such a base (e.g. Gemma 3
270M) get the framing its student was trained with; ``serve`` installs it."""


def query_prompt(tokenizer: Any, text: str) -> Prompt:
    """The prompt that asks ``tokenizer``'s model to answer ``text``."""
    if has_chat_template(tokenizer):
        return message_prompt(tokenizer, text)
    return message_prompt(tokenizer, f"Q: {text}\nA:")


def read_answer(text: str, prompt: Prompt) -> str:
    """The answer in a generation: all of it after a chat header, the first line after ``A:``."""
    if prompt.answer_prefix:
        text = text.split("\n", 1)[0]
    return text.strip()


def tokenizer_mismatch(teacher: Any, student: Any, probe: str = "What is 2 plus 3?") -> str | None:
    """Why token-level distillation from ``teacher``'s model to ``student``'s cannot work, or
    ``None``: the two must share the vocabulary (a teacher distribution is over token ids)
    and frame a query with the same ids (the student learns at the teacher's positions)."""
    if teacher.get_vocab() != student.get_vocab():
        return (
            f"the bases have different vocabularies ({len(teacher)} and {len(student)} tokens); "
            "use distillation='sequence'"
        )
    if query_prompt(teacher, probe).ids != query_prompt(student, probe).ids:
        return "the bases frame a query differently (chat templates); use distillation='sequence'"
    return None
