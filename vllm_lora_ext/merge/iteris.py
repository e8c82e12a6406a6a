"""IterIS: the closed-form, input-aware merge of LoRA adapters, one linear layer at a time.

Per LoRA-targeted layer with base weight ``W₀`` and adapters ``ΔW_i = s_i B_i A_i``, IterIS
(as its official code computes it) solves

    ΔW* = (Σ_i c_i ΔW_i C_i) (Σ_i c_i G_i)⁻¹,   c_i = λ_i m_i,
    C_i = X_iᵀX̃_i + alpha1 ‖X_iᵀX̃_i‖_F I,   G_i = X̃_iᵀX̃_i + alpha2 ‖X̃_iᵀX̃_i‖_F I,
    λ_i = ‖W₀ + ΔW_i‖²_F / Σ_rows ‖X_i (W₀ + ΔW_i)ᵀ‖²  (= ‖W‖²_F / tr(W X_iᵀX_i Wᵀ)),

the normal equations of ``min Σ_i c_i ‖X̃_i ΔWᵀ - X_i ΔW_iᵀ‖²`` (plus the alpha ridge terms): the
merged layer, fed what the merged model feeds it, should reproduce each adapter's output on
that adapter's own inputs. ``X_i`` are the layer's inputs under base + adapter i on task-i
tokens, ``X̃_i`` under the current merged model on the same tokens (first iteration:
``X̃_i = X_i``); only their Gram sums enter. ``m_i`` are optional manual weights. The official
code also blends ``X̃ <- (1-rho) X̃ + rho X`` (``reg_ceof``, 5e-4 there; ``blend`` here, default 0).

Because ``ΔW_i C_i = s_i B_i (A_i C_i)``, ``ΔW* = Σ_i B_i (c_i s_i A_i C_i G⁻¹)``: exactly a LoRA
of rank ``Σ r_i`` whose B is the concatenation of the ``B_i``. It is returned as such (scaling 1),
optionally truncated to a smaller rank by SVD with its relative error reported. All float64;
``G⁻¹`` is applied with ``torch.linalg.solve``, never formed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from vllm_lora_ext.adapters.lora_weights import LoraWeights
from vllm_lora_ext.merge.factor import truncate_factors
from vllm_lora_ext.merge.methods import check_shapes, module_order
from vllm_lora_ext.stats.accumulators import IterisStats, input_key

F64 = torch.float64
# (A_i [r_i, in], B_i [out, r_i], scaling s_i), or None where adapter i does not adapt the layer
Factors = tuple[torch.Tensor, torch.Tensor, float] | None


class IterisParams(BaseModel):
    """IterIS's knobs; validated so a bad value fails before any solve."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    alpha1: float = Field(default=1e-7, ge=0.0, description="ridge on X_iᵀX̃_i, relative")
    alpha2: float = Field(default=1e-7, ge=0.0, description="ridge on X̃_iᵀX̃_i, relative")
    blend: float = Field(default=0.0, ge=0.0, le=1.0, description="X̃ <- (1-rho)X̃ + rhoX")
    manual_weights: tuple[float, ...] | None = None
    rank: int | None = Field(default=None, gt=0, description="truncate to this rank (SVD)")


@dataclass
class IterisResult:
    weights: LoraWeights
    errors: dict[str, float]
    """Module -> ‖ΔW* - truncated‖_F / ‖ΔW*‖_F (0.0 where nothing was cut)."""


def _ridge(m: torch.Tensor, alpha: float) -> torch.Tensor:
    if alpha == 0.0:
        return m
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    return m + alpha * torch.linalg.matrix_norm(m) * eye


def iteris_layer(
    factors: Sequence[Factors],
    w0: torch.Tensor,  # [out, in]
    gram_own: Sequence[torch.Tensor],  # X_iᵀX_i [in, in]
    cross: Sequence[torch.Tensor],  # X_iᵀX̃_i [in, in]
    gram_merged: Sequence[torch.Tensor],  # X̃_iᵀX̃_i [in, in]
    alpha1: float = 1e-7,
    alpha2: float = 1e-7,
    manual_weights: Sequence[float] | None = None,
    blend: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [Σr_i, in], B [out, Σr_i])`` in float64 with ``B @ A = ΔW*``; ``B = [B_1 … B_K]``.

    An adapter without this layer (``None``) still counts: the merged layer should keep the
    base behaviour (ΔW_i = 0) on its inputs.
    """
    k = len(factors)
    if not (len(gram_own) == len(cross) == len(gram_merged) == k) or k == 0:
        raise ValueError("need one set of statistics per adapter, and at least one adapter")
    m = [1.0] * k if manual_weights is None else list(manual_weights)
    if len(m) != k:
        raise ValueError(f"{len(m)} manual weights for {k} adapters")
    w0 = w0.to(F64)
    g_sum = torch.zeros(w0.shape[1], w0.shape[1], dtype=F64)
    a_rows, b_cols = [], []
    for f, own, xc, xm, m_i in zip(factors, gram_own, cross, gram_merged, m, strict=True):
        own, xc, xm = own.to(F64), xc.to(F64), xm.to(F64)
        if blend:
            xc, xm = (
                (1 - blend) * xc + blend * own,
                (1 - blend) ** 2 * xm + blend * (1 - blend) * (xc + xc.T) + blend**2 * own,
            )
        delta = torch.zeros_like(w0) if f is None else f[2] * (f[1].to(F64) @ f[0].to(F64))
        w = w0 + delta
        energy = float((w @ own * w).sum())  # tr(W XᵀX Wᵀ)
        if energy <= 0.0:
            raise ValueError("a layer input with no (or all-zero) statistics")
        c_i = float(w.square().sum()) / energy * m_i
        g_sum += c_i * _ridge(xm, alpha2)
        if f is not None:
            a_rows.append(c_i * f[2] * (f[0].to(F64) @ _ridge(xc, alpha1)))
            b_cols.append(f[1].to(F64))
    if not a_rows:
        raise ValueError("no adapter adapts this layer")
    rhs = torch.cat(a_rows, dim=0)  # [Σr, in]
    a = torch.linalg.solve(g_sum.T, rhs.T).T  # rhs @ G⁻¹
    return a, torch.cat(b_cols, dim=1)


def iteris_merge(
    adapters: Sequence[LoraWeights],
    names: Sequence[str],
    base_weights: Mapping[str, torch.Tensor],
    stats: IterisStats,
    params: IterisParams | None = None,
    key_of: Callable[[str], str] = input_key,
    dtype: torch.dtype = torch.float32,
) -> IterisResult:
    """One IterIS step over every module any adapter adapts.

    ``names[i]`` is adapter i's name in ``stats``; ``base_weights`` maps a module (as in
    :meth:`LoraWeights.modules`, or without the ``base_model.model.`` prefix) to ``W₀ [out, in]``.
    Statistics come from ``stats.get(names[i], key_of(module))``: the paired sums when present,
    else ``X̃ = X``. The own Gram is rescaled to the paired token count so that ``λ_i G_i`` does
    not depend on how many rows each sum holds. Every module gets the same rank: ``params.rank``
    (truncated by SVD, errors reported) or the largest ``Σ r_i`` (zero-padded elsewhere).
    """
    params = params or IterisParams()
    if len(names) != len(adapters):
        raise ValueError("need one statistics name per adapter")
    check_shapes(adapters)
    solved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module in module_order(adapters):
        w0 = base_weights.get(module)
        if w0 is None:
            w0 = base_weights.get(module.removeprefix("base_model.model."))
        if w0 is None:
            raise KeyError(f"no base weight for {module}")
        factors: list[Factors] = []
        own, cross, merged = [], [], []
        for adapter, name in zip(adapters, names, strict=True):
            a = adapter.tensors.get(f"{module}.lora_A.weight")
            b = adapter.tensors.get(f"{module}.lora_B.weight")
            factors.append(None if a is None or b is None else (a, b, adapter.scaling))
            s = stats.get(name, key_of(module))
            if s.xtx.shape[0] != w0.shape[1]:
                raise ValueError(f"{module}: statistics of width {s.xtx.shape[0]}, W₀ {w0.shape}")
            if s.cross is None or s.merged is None or s.paired_tokens == 0:
                own.append(s.xtx)
                cross.append(s.xtx)
                merged.append(s.xtx)
            else:
                own.append(s.xtx * (s.paired_tokens / s.tokens))
                cross.append(s.cross)
                merged.append(s.merged)
        solved[module] = iteris_layer(
            factors, w0, own, cross, merged, params.alpha1, params.alpha2,
            params.manual_weights, params.blend,
        )  # fmt: skip
    rank = params.rank or max(a.shape[0] for a, _ in solved.values())
    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    for module, (a, b) in solved.items():
        a, b, errors[module] = truncate_factors(a, b, rank)
        tensors[f"{module}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{module}.lora_B.weight"] = b.to(dtype).contiguous()
    return IterisResult(LoraWeights(tensors, rank=rank, lora_alpha=float(rank)), errors)
