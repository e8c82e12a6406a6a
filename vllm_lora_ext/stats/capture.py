"""Layer-input statistics from live traffic: ``X_iᵀ X_i`` per adapter, per LoRA layer input.

Runs inside the vLLM worker. Every LoRA-wrapped linear layer hands its input rows and the
batch's per-token adapter slots to :meth:`TrafficCapture.observe`; rows served with a captured
adapter are added (float64) to that adapter's accumulator for the layer. vLLM fuses q/k/v into
``qkv_proj`` and gate/up into ``gate_up_proj``, so layers that share an input already share one
key. Pure torch: the vLLM glue (which layer, which slot is which adapter) lives in
``vllm_boundary/``.

Budgets: a token budget per adapter (rows beyond it are ignored), a sampling rate (a seeded
Bernoulli draw per step that every layer repeats identically, so all layers see the same
tokens), and a memory budget checked when a capture starts. When no adapter is captured,
``observe`` is never called (the hook checks ``active`` first): capture off costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from vllm_lora_ext.stats.accumulators import SHARED_INPUTS


def wants_layer(layer_name: str, targets: Iterable[str]) -> bool:
    """Whether a vLLM layer's input is needed for an adapter targeting ``targets`` (leaf names)."""
    leaf = layer_name.rpartition(".")[2]
    wanted = set(targets)
    return leaf in wanted or bool(wanted & set(SHARED_INPUTS.get(leaf, ())))


@dataclass
class CaptureRequest:
    """What to capture for one adapter (validated by the API before it reaches the worker)."""

    lora_id: int
    targets: tuple[str, ...]
    token_budget: int
    sample_rate: float = 1.0
    seed: int = 0


@dataclass
class AdapterCapture:
    request: CaptureRequest
    layers: frozenset[str]
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    """layer key -> float64 ``XᵀX`` [in, in]."""
    tokens: dict[str, int] = field(default_factory=dict)
    """layer key -> rows added (equal across layers, since every layer sees the same rows)."""
    seen_tokens: int = 0
    """Rows served with this adapter while capturing, sampled or not (first layer's count)."""

    @property
    def captured_tokens(self) -> int:
        return max(self.tokens.values(), default=0)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sums.values())


class CaptureBudgetError(ValueError):
    pass


class TrafficCapture:
    """All running captures of one worker; ``observe`` is the hot-path entry."""

    def __init__(self, layer_dims: dict[str, int], memory_budget_bytes: int) -> None:
        self.layer_dims = layer_dims
        """vLLM layer name -> input width, for every LoRA-wrapped linear layer."""
        self.memory_budget_bytes = memory_budget_bytes
        self.captures: dict[int, AdapterCapture] = {}
        self.recordings: dict[int, dict[str, list[torch.Tensor]]] = {}
        """LoRA id -> layer -> the raw rows, in arrival order (IterIS replays pair them)."""
        self._recorded_layers: frozenset[str] = frozenset()
        self._generators: dict[tuple[int, str], torch.Generator] = {}

    @property
    def active(self) -> bool:
        return bool(self.captures) or bool(self.recordings)

    def record_start(self, lora_ids: Sequence[int], targets: Sequence[str]) -> None:
        """Keep every row served with ``lora_ids`` at the targets' layers, until taken."""
        self._recorded_layers = frozenset(n for n in self.layer_dims if wants_layer(n, targets))
        if not self._recorded_layers:
            raise CaptureBudgetError(f"no LoRA layer matches the targets {tuple(targets)}")
        self.recordings = {i: {} for i in lora_ids}

    def record_take(self, own_id: int, merged_id: int) -> dict[str, tuple[torch.Tensor, ...]]:
        """Pair the rows recorded under ``own_id`` and ``merged_id`` token by token and reduce
        them: layer -> (XᵀX, XᵀX̃, X̃ᵀX̃ in float64, rows). Clears the recorded rows."""
        own, merged = self.recordings.get(own_id, {}), self.recordings.get(merged_id, {})
        out: dict[str, tuple[torch.Tensor, ...]] = {}
        for layer in sorted(set(own) | set(merged)):
            x = torch.cat(own.get(layer, [])).double() if own.get(layer) else None
            xm = torch.cat(merged.get(layer, [])).double() if merged.get(layer) else None
            if x is None or xm is None or x.shape != xm.shape:
                raise ValueError(
                    f"layer {layer}: {0 if x is None else x.shape[0]} rows under the adapter, "
                    f"{0 if xm is None else xm.shape[0]} under the merge; a replay must send "
                    "each prompt once to each, one prompt at a time, without prefix-cache hits"
                )
            out[layer] = (x.T @ x, x.T @ xm, xm.T @ xm, torch.tensor(x.shape[0]))
        for rows in self.recordings.values():
            rows.clear()
        return out

    def record_stop(self) -> None:
        self.recordings = {}

    def bytes_needed(self, targets: Sequence[str]) -> int:
        return sum(8 * d * d for name, d in self.layer_dims.items() if wants_layer(name, targets))

    def start(self, request: CaptureRequest) -> None:
        if request.lora_id in self.captures:
            return
        layers = frozenset(n for n in self.layer_dims if wants_layer(n, request.targets))
        if not layers:
            raise CaptureBudgetError(f"no LoRA layer matches the targets {request.targets}")
        used = sum(self.bytes_needed(c.request.targets) for c in self.captures.values())
        need = self.bytes_needed(request.targets)
        if used + need > self.memory_budget_bytes:
            raise CaptureBudgetError(
                f"capture needs {need} bytes, {self.memory_budget_bytes - used} of the "
                f"{self.memory_budget_bytes}-byte statistics budget are free"
            )
        self.captures[request.lora_id] = AdapterCapture(request, layers)

    def stop(self, lora_id: int) -> AdapterCapture | None:
        for key in [k for k in self._generators if k[0] == lora_id]:
            del self._generators[key]
        return self.captures.pop(lora_id, None)

    def observe(
        self,
        layer: str,
        x: torch.Tensor,  # [num_tokens, in]
        token_slots: torch.Tensor,  # [>= num_tokens], slot per token, -1 = base model
        slot_to_id: Sequence[int | None],  # slot -> LoRA int id
    ) -> None:
        slots = token_slots[: x.shape[0]]
        for slot, lora_id in enumerate(slot_to_id):
            recording = self.recordings.get(lora_id) if lora_id is not None else None
            if recording is not None and layer in self._recorded_layers:
                rows = x[slots == slot]
                if rows.shape[0]:
                    recording.setdefault(layer, []).append(rows.to(torch.float32, copy=True))
            capture = self.captures.get(lora_id) if lora_id is not None else None
            if capture is None or layer not in capture.layers:
                continue
            rows = x[slots == slot]
            if rows.shape[0] == 0:
                continue
            if layer == self._first_layer_of(capture):
                capture.seen_tokens += rows.shape[0]
            rows = self._sample(capture, layer, rows)
            room = capture.request.token_budget - capture.tokens.get(layer, 0)
            rows = rows[: max(room, 0)]
            if rows.shape[0] == 0:
                continue
            rows = rows.to(torch.float64)
            gram = rows.T @ rows
            if layer in capture.sums:
                capture.sums[layer] += gram
            else:
                capture.sums[layer] = gram
            capture.tokens[layer] = capture.tokens.get(layer, 0) + rows.shape[0]

    @staticmethod
    def _first_layer_of(capture: AdapterCapture) -> str:
        return min(capture.layers)

    def _sample(self, capture: AdapterCapture, layer: str, rows: torch.Tensor) -> torch.Tensor:
        """Keep each row with probability ``sample_rate``; every layer draws the same mask."""
        rate = capture.request.sample_rate
        if rate >= 1.0:
            return rows
        key = (capture.request.lora_id, layer)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator().manual_seed(capture.request.seed)
            self._generators[key] = gen
        keep = torch.rand(rows.shape[0], generator=gen) < rate
        return rows[keep.to(rows.device)]
