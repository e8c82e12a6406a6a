"""BIG-Bench Hard task files at a pinned commit, cached with sha256 checksums.

BBH (github.com/suzgunmirac/BIG-Bench-Hard, MIT) keeps one ``bbh/<task>.json`` per task. We fetch
each file by its raw URL at :data:`BBH_COMMIT` (or copy it from a local folder with the same
layout), check it against the sha256 recorded here, and write it into the cache through a
temporary file and a rename, the manifest last. Every read checks the file against the manifest
again, so a truncated or edited file never reaches an evaluation silently.

Only the tasks of :data:`BBH_SHA256` are known here: the other seven BBH tasks are held out for an
independent check of migration quality and are never fetched.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import httpx

from vllm_lora_ext.files import write_atomic

BBH_REPOSITORY = "suzgunmirac/BIG-Bench-Hard"
BBH_COMMIT = "9ee07bd481feebf959a6b59d61ea57bdcf30964d"
BBH_SOURCE = f"bbh@{BBH_COMMIT[:7]}"
"""``task_source`` of every BBH task in cards and result files."""
DEFAULT_BASE_URL = f"https://raw.githubusercontent.com/{BBH_REPOSITORY}/{BBH_COMMIT}"
MANIFEST = "manifest.json"

# sha256 of bbh/<task>.json at BBH_COMMIT (the repository's bytes, as in
# ../shared/data/big-bench-hard/SHA256SUMS). The seven held-out tasks are deliberately absent.
BBH_SHA256: dict[str, str] = {
    "boolean_expressions": "ea6c754ec005e2d3f2d085d349a740f593b5764f32ea4638ffed4cfc0061b12a",
    "causal_judgement": "6e8bca44dd402008ed41c07a3d0a1d5e7b03db7001a7e002fcdf4c60985ea081",
    "date_understanding": "0148d4ac5fca05b2f82373e5fef7208e15363b9c6079493034d77b3dab496bf5",
    "disambiguation_qa": "cf06df9ebf911b883671cb1b35d3fbd1a1c306b19b9e9a012407e596c85fe8c6",
    "dyck_languages": "3f9badedf15c2be1ce53d94fdf016299bb30ba231ef087ab9f51a7ed6d0bdc25",
    "geometric_shapes": "07be68a124420caa2ebc0b2c858ad79fc55c5c8806170e496e1e17ebfb11f31c",
    "logical_deduction_five_objects":
        "d2df31394b903b7f0e085d42a69572a092987856eac076799017d70ef266fa8f",
    "logical_deduction_seven_objects":
        "2896c7e3482eea318dd37bcc370d24ec3cc91e8374c1784287b5dbd38a529e33",
    "multistep_arithmetic_two": "c9d5a6433c9b78256422a15c78463949c8bec8d85607aa28b52d7234ad4a8595",
    "object_counting": "8acef14dbbdd40d2326ef7755750b6b5fe919fef06276af1bab3f1c297f022ff",
    "reasoning_about_colored_objects":
        "0a8850cf95166020fce7a78244026ceedd7ea839302471512b4f8744e85a6a49",
    "ruin_names": "b6f723aef2bafdd4c7bfc3c7e0329c7e8a8279391a609969c8ed76c9319f5f7f",
    "salient_translation_error_detection":
        "becf3eb8dd53c821a555ecd5c1334ecd93eb25f980e63be963c518e7138de5da",
    "snarks": "54a0661fe2de06167645a4965e6bcf963c4ba307e76262a7c750998b0e3d0d0e",
    "sports_understanding": "63ca262858f6176864515cd8cf53cdaa40839ebecc155b726d77930855d167bf",
    "tracking_shuffled_objects_five_objects":
        "2063a46a4fb484236ed4310523606543a3e1dd4a4dc34eda65d407910ece25a5",
    "tracking_shuffled_objects_seven_objects":
        "b59fd05b850c37cf57cb514ae1e6975c00b1638ade2291722056b2af3c54084d",
    "tracking_shuffled_objects_three_objects":
        "546cc7bf10c6a01a6a4c17ae28a4966485f21f29fd5d111f37858ec78e354f6b",
    "web_of_lies": "3e60323f8514a107fdb4edf35f8832a9171c5a09c0eaa47823559de905e8ab8b",
    "word_sorting": "2a6132d2c99f00d0d2eb1113ac6b4a918bd969d863c48749210d969713db8d43",
}  # fmt: skip


class ChecksumError(ValueError):
    """A task file does not match its recorded sha256."""


class TaskFetchError(RuntimeError):
    """A task file could not be had (no network, HTTP error, missing from a source folder)."""


def task_file(task: str) -> str:
    """A task's path relative to the cache (and to the repository): ``bbh/<task>.json``."""
    return f"bbh/{task}.json"


def default_task_dir() -> Path:
    """``<VLLM_LORA_EXT_CACHE_DIR or ~/.cache/vllm-lora-ext>/tasks``."""
    from vllm_lora_ext.settings import Settings

    return Settings().cache_dir / "tasks"


def _check(task: str, data: bytes, where: str, recorded: dict[str, str]) -> str:
    actual = hashlib.sha256(data).hexdigest()
    if actual != recorded[task]:
        raise ChecksumError(f"{where} has sha256 {actual}, expected {recorded[task]} "
                            f"(bbh/{task}.json at {BBH_COMMIT[:7]}): another version or a "
                            "damaged copy")  # fmt: skip
    return actual


def _wanted(tasks: Iterable[str] | None, recorded: dict[str, str]) -> list[str]:
    names = sorted(recorded) if tasks is None else list(dict.fromkeys(tasks))
    unknown = [t for t in names if t not in recorded]
    if unknown:
        raise ValueError(f"unknown BBH task(s) {unknown}; known: {', '.join(sorted(recorded))}")
    return names


def _commit(cache_dir: Path, files: dict[str, bytes], origin: str) -> Path:
    """Write the verified files, then merge them into the manifest (written last)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = cache_dir / MANIFEST
    previous = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    checksums = dict(previous.get("files", {})) if previous.get("source") == BBH_SOURCE else {}
    for task, data in files.items():
        write_atomic(cache_dir / task_file(task), data)
        checksums[task_file(task)] = hashlib.sha256(data).hexdigest()
    manifest = {"source": BBH_SOURCE, "commit": BBH_COMMIT, "origin": origin, "files": checksums}
    write_atomic(manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return cache_dir


def fetch_tasks(
    cache_dir: Path | None = None,
    tasks: Iterable[str] | None = None,
    base_url: str = DEFAULT_BASE_URL,
    recorded: dict[str, str] | None = None,
    progress: bool = True,
) -> Path:
    """Download ``bbh/<task>.json`` for each of ``tasks`` (default: all of :data:`BBH_SHA256`)
    from ``base_url``, check each, and cache them; nothing is written unless all arrive intact.

    ``recorded`` replaces :data:`BBH_SHA256` (tests serve small files of their own).
    """
    from tqdm import tqdm

    recorded = BBH_SHA256 if recorded is None else recorded
    names = _wanted(tasks, recorded)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_task_dir()
    files: dict[str, bytes] = {}
    base = base_url.rstrip("/")
    with httpx.Client(timeout=httpx.Timeout(30.0), follow_redirects=True) as client:
        for task in tqdm(names, desc="BBH tasks", unit="file", disable=not progress):
            url = f"{base}/{task_file(task)}"
            try:
                response = client.get(url)
            except httpx.HTTPError as err:
                raise TaskFetchError(f"cannot fetch {url}: {err or type(err).__name__}") from err
            if response.status_code != 200:
                raise TaskFetchError(f"{url} answered HTTP {response.status_code}")
            _check(task, response.content, url, recorded)
            files[task] = response.content
    return _commit(cache_dir, files, base)


def copy_tasks(
    source_dir: Path,
    cache_dir: Path | None = None,
    tasks: Iterable[str] | None = None,
    recorded: dict[str, str] | None = None,
) -> Path:
    """Fill the cache from a local folder with the repository's layout (``bbh/<task>.json``,
    or the ``bbh`` folder itself), each file checked as :func:`fetch_tasks` checks a download.
    On this project's machines the folder is ``../shared/data/big-bench-hard``."""
    recorded = BBH_SHA256 if recorded is None else recorded
    names = _wanted(tasks, recorded)
    root = Path(source_dir)
    base = root if not (root / "bbh").is_dir() else root / "bbh"
    cache_dir = Path(cache_dir) if cache_dir is not None else default_task_dir()
    missing = [t for t in names if not (base / f"{t}.json").is_file()]
    if missing:
        raise TaskFetchError(f"{base} lacks {', '.join(f'{t}.json' for t in missing)}")
    files = {t: (base / f"{t}.json").read_bytes() for t in names}
    for task, data in files.items():
        _check(task, data, str(base / f"{task}.json"), recorded)
    return _commit(cache_dir, files, f"directory {base.resolve()}")


def read_task_file(rel: str, cache_dir: Path | None = None) -> tuple[dict, str]:
    """Parse one cached task file after checking it against the manifest: (data, sha256)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_task_dir()
    manifest_path = cache_dir / MANIFEST
    hint = ("fetch the tasks with `python -m vllm_lora_ext.evaluation.task_cache` (or "
            "`--source-dir DIR` for a local copy)")  # fmt: skip
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no task cache in {cache_dir}; {hint}")
    expected = json.loads(manifest_path.read_text())["files"].get(rel)
    if expected is None:
        raise FileNotFoundError(f"{rel} is not in {manifest_path}; {hint}")
    data = (cache_dir / rel).read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ChecksumError(
            f"{cache_dir / rel} has sha256 {actual}, but the manifest records {expected}: "
            f"the file changed since it was fetched; {hint}"
        )
    return json.loads(data), actual


def main(argv: list[str] | None = None) -> None:
    """``python -m vllm_lora_ext.evaluation.task_cache [--cache-dir DIR] [--source-dir DIR |
    --base-url URL] [--tasks a,b]``: exit 0 when cached, 1 when the tasks cannot be had, 2 on
    bad arguments; always one line, never a traceback."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="task_cache", description=f"cache the BIG-Bench Hard tasks at {BBH_COMMIT[:7]}"
    )
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument(
        "--source-dir", type=Path, default=None,
        help="a local copy with the repository's layout (bbh/<task>.json), checked the same way",
    )  # fmt: skip
    parser.add_argument("--base-url", default=None, help=f"default {DEFAULT_BASE_URL}")
    parser.add_argument("--tasks", default=None, help="comma-separated (default: all known)")
    args = parser.parse_args(argv)
    if args.source_dir is not None and args.base_url is not None:
        parser.exit(2, "task_cache: error: give --source-dir or --base-url, not both\n")
    if args.source_dir is not None and not args.source_dir.is_dir():
        parser.exit(2, f"task_cache: error: --source-dir {args.source_dir} is not a directory\n")
    tasks = None if args.tasks is None else [t for t in args.tasks.split(",") if t]
    if tasks is not None and (not tasks or any(t not in BBH_SHA256 for t in tasks)):
        unknown = [t for t in tasks if t not in BBH_SHA256] or ["(none given)"]
        parser.exit(2, f"task_cache: error: unknown task(s) {', '.join(unknown)}; known: "
                    f"{', '.join(sorted(BBH_SHA256))}\n")  # fmt: skip
    try:
        if args.source_dir is not None:
            out = copy_tasks(args.source_dir, args.cache_dir, tasks)
        else:
            out = fetch_tasks(args.cache_dir, tasks, args.base_url or DEFAULT_BASE_URL)
    except (OSError, ValueError, TaskFetchError) as err:
        # OSError: unreadable or unwritable paths; ValueError: checksums, a malformed manifest
        parser.exit(1, f"task_cache: error: {err}\n")
    count = len(tasks) if tasks is not None else len(BBH_SHA256)
    print(f"{count} BBH task file(s) at {BBH_COMMIT[:7]} cached in {out}")


if __name__ == "__main__":
    main()
