"""What an adapter must fit: the served base model's identity and its linear-layer shapes.

Built from the Hugging Face config alone (no weights), so the API server process, which never
holds the model, can still refuse an adapter whose tensors would not fit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import PurePath
from typing import Any

from pydantic import BaseModel, ConfigDict


class BaseModelInfo(BaseModel):
    """The served base: the names adapters may declare, and ``module -> (in, out)`` shapes."""

    model_config = ConfigDict(frozen=True)

    name: str
    aliases: frozenset[str]
    num_layers: int
    module_shapes: dict[str, tuple[int, int]]

    @classmethod
    def from_hf_config(
        cls, name: str, config: Mapping[str, Any] | Any, aliases: Iterable[str] = ()
    ) -> BaseModelInfo:
        """Shapes of the decoder linears of Llama-family configs (Llama, Mistral, Qwen2, Gemma).

        ``config`` may be a ``PretrainedConfig`` or its dict; text sub-configs are unwrapped.
        """
        cfg = config if isinstance(config, Mapping) else config.to_dict()
        cfg = cfg.get("text_config") or cfg
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        inter = int(cfg["intermediate_size"])
        shapes = {
            "q_proj": (hidden, heads * head_dim),
            "k_proj": (hidden, kv_heads * head_dim),
            "v_proj": (hidden, kv_heads * head_dim),
            "o_proj": (heads * head_dim, hidden),
            "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        }
        names = {name, *aliases}
        names |= {PurePath(n).name for n in list(names) if n}
        return cls(
            name=name,
            aliases=frozenset(n for n in names if n),
            num_layers=int(cfg["num_hidden_layers"]),
            module_shapes=shapes,
        )

    def accepts_declared_base(self, declared: str | None) -> bool:
        """An adapter that names no base is judged by its shapes alone."""
        if not declared:
            return True
        return declared in self.aliases or PurePath(declared).name in self.aliases
