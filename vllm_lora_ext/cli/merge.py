"""``vllm-lora-ext merge``: merge PEFT adapter folders offline, with PEFT's results."""

from __future__ import annotations

import argparse
from pathlib import Path

from vllm_lora_ext.cli.client import CliError, Exit

_MERGE_PARAMS = (
    "density",
    "majority_sign_method",
    "svd_rank",
    "svd_clamp",
    "svd_full_matrices",
    "svd_driver",
    "seed",
)


def cmd_merge(args: argparse.Namespace) -> int:
    """Offline merge of PEFT adapter folders (same results as PEFT's add_weighted_adapter)."""
    from vllm_lora_ext.merge.offline import merge_folders

    paths, weights = [], []
    for term in args.adapter:
        path, sep, weight = term.rpartition("=")
        try:
            weights.append(float(weight))
        except ValueError:
            sep = ""
        if not sep or not path:
            raise CliError(Exit.BAD_INPUT, f"error: --adapter {term!r}: expected PATH=WEIGHT")
        paths.append(Path(path))
    for path in paths:
        if not path.is_dir():
            raise CliError(Exit.BAD_INPUT, f"error: {path} is not a directory")
    params = {k: getattr(args, k) for k in _MERGE_PARAMS if getattr(args, k) is not None}
    try:
        out = merge_folders(paths, weights, args.method, params, args.out.parent, args.out.name)
    except ValueError as e:
        raise CliError(Exit.BAD_INPUT, f"error: merge refused: {e}") from e
    print(out)
    return Exit.OK


def add_parser(sub: argparse._SubParsersAction) -> None:
    from vllm_lora_ext.merge.methods import MERGE_METHODS

    merge = sub.add_parser("merge", help="merge PEFT adapter folders offline (PEFT's results)")
    merge.add_argument("--method", required=True, choices=sorted(MERGE_METHODS))
    merge.add_argument(
        "--adapter", action="append", required=True, metavar="PATH=WEIGHT",
        help="an adapter folder and its weight; repeat for each adapter",
    )  # fmt: skip
    merge.add_argument("--out", required=True, type=Path, help="new adapter folder (not existing)")
    merge.add_argument("--density", type=float, help="ties/dare/magnitude_prune: fraction kept")
    merge.add_argument("--majority-sign-method", choices=["total", "frequency"])
    merge.add_argument("--svd-rank", type=int)
    merge.add_argument("--svd-clamp", type=float, help="quantile in [0, 1]")
    merge.add_argument("--svd-full-matrices", action=argparse.BooleanOptionalAction, default=None)
    merge.add_argument("--svd-driver", choices=["gesvd", "gesvdj", "gesvda"])
    merge.add_argument("--seed", type=int, help="DARE: reproducible masks")
    merge.set_defaults(func=cmd_merge)
