"""A model soup of students: the mean of several students' LoRA deltas, as one adapter.

Students trained from one base and one LoRA init by one recipe on the same rows, differing
only in batch order, land in one basin; averaging their deltas keeps what they agree on and
averages out what the order alone decided. How much one student's held-out accuracy moves with
its seed alone has no committed measurement yet (the committed migration replicates, 0.65,
0.55 and 0.61 on disambiguation_qa, also changed their data and splits). The mean is exact as a
cat merge (rank K x r); cut back to the students' rank it serves like any one of them. Whether
it pays is measured by ``benchmarks/migration_ceilings.py --soup`` and ``migration_quality.py
--student-soup``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm_lora_ext.adapters.lora_weights import LoraWeights, load_lora, save_lora
from vllm_lora_ext.adapters.peft_format import CONFIG_FILE
from vllm_lora_ext.files import staged_directory
from vllm_lora_ext.merge.cat import cat_merge
from vllm_lora_ext.merge.factor import truncate_factors


def mean_delta(students: Sequence[LoraWeights]) -> LoraWeights:
    """One adapter whose delta is exactly the mean of the students' deltas (rank sum of r)."""
    return cat_merge(students, [1.0 / len(students)] * len(students))


def truncated(adapter: LoraWeights, rank: int) -> LoraWeights:
    """``adapter``'s best rank-``rank`` approximation, module by module (scale folded in)."""
    return truncated_with_errors(adapter, rank)[0]


def truncated_with_errors(adapter: LoraWeights, rank: int) -> tuple[LoraWeights, dict[str, float]]:
    """:func:`truncated`, and each module's relative Frobenius error of the cut."""
    tensors, errors = {}, {}
    for module in adapter.modules():
        a = adapter.tensors[f"{module}.lora_A.weight"].float() * adapter.scaling
        b = adapter.tensors[f"{module}.lora_B.weight"].float()
        a, b, errors[module] = truncate_factors(a, b, rank)
        tensors[f"{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{module}.lora_B.weight"] = b.contiguous()
    return LoraWeights(tensors=tensors, rank=rank, lora_alpha=float(rank)), errors


def save_soup(students: Sequence[Path], out_dir: Path, rank: int | None) -> dict[str, Any]:
    """The students' mean delta, cut to ``rank`` (``None``: kept whole, rank K x r), written
    as a PEFT directory at ``out_dir`` (staged beside it, then renamed into place). The folder
    holds PEFT files only, so a server registers it like any adapter. Returns the record for the
    caller's card: the rank and what the cut lost (each module's relative Frobenius error of
    its approximation of the mean)."""
    mean = mean_delta([load_lora(d) for d in students])
    cut, errors = (mean, {}) if rank is None else truncated_with_errors(mean, rank)
    config = json.loads((students[0] / CONFIG_FILE).read_text())
    with staged_directory(out_dir) as staging:
        save_lora(cut, staging, config.get("base_model_name_or_path"))
    return {"soup_of": [str(d) for d in students], "rank": cut.rank,
            "max_cut_error": max(errors.values(), default=0.0),
            "mean_cut_error": sum(errors.values()) / max(len(errors), 1)}  # fmt: skip
