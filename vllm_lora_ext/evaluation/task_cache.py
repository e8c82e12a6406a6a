"""BIG-bench task files from the PyPI sdist ``bigbench==1.0.0``, cached with sha256 checksums.

The sdist (358 MB) holds every ``bigbench/benchmark_tasks/<task>/task.json``. We fetch the file
itself from the package index's listing (the simple API, PEP 691 JSON or PEP 503 HTML), never
through ``pip download``: pip prepares an sdist's metadata, which pip >= 26.3 refuses for this
one ("Distributions from PyPI cannot declare direct URL dependencies"). The download is checked
against the recorded sha256 as it streams. We then write only the development tasks' files into
the cache (each through a temporary file and a rename, the manifest last), and check every file
against the manifest when it is read, so a truncated or edited file never reaches an evaluation
silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urldefrag, urljoin

import httpx

from vllm_lora_ext.files import sha256_file, write_atomic

SDIST_REQUIREMENT = "bigbench==1.0.0"
SDIST_FILENAME = "bigbench-1.0.0.tar.gz"
DEFAULT_INDEX = "https://pypi.org/simple"
# sha256 of bigbench-1.0.0.tar.gz as served by PyPI (checked when the sdist is read).
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
_MEMBER_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"
MANIFEST = "manifest.json"

# Task name -> its task.json files, relative to ``benchmark_tasks/``. Only the development tasks of
# issue 3; do not tune on anything else.
TASK_SOURCES: dict[str, tuple[str, ...]] = {
    "arithmetic": tuple(
        f"arithmetic/{sub}/task.json"
        for sub in (
            "1_digit_addition",
            "1_digit_subtraction",
            "2_digit_addition",
            "2_digit_subtraction",
        )
    ),
    "causal_judgment": ("causal_judgment/task.json",),
    "date_understanding": ("date_understanding/task.json",),
    "disambiguation_qa": ("disambiguation_qa/task.json",),
    "object_counting": ("object_counting/task.json",),
    "snarks": ("snarks/task.json",),
    "sports_understanding": ("sports_understanding/task.json",),
    "word_sorting": ("word_sorting/task.json",),
}


# sha256 of each task.json as extracted from that sdist, copied from the committed adapters'
# cards (``task_sources_sha256``): every published result used these bytes. A copy taken from
# anywhere else (``--source-dir``: a BIG-bench checkout) must match them; a test keeps this table
# equal to the cards. sports_understanding has no card, so no recorded hash.
RECORDED_SHA256: dict[str, str] = {
    "arithmetic/1_digit_addition/task.json":
        "533525ec8298560cfa7be75399c77538e4d458eb3cfc343b56263e7d879203b1",
    "arithmetic/1_digit_subtraction/task.json":
        "c075571c6c5546b313c758d4c9ccc6cda7ae7a6bbf0d6229c60815202523033c",
    "arithmetic/2_digit_addition/task.json":
        "1dd3e6fd6bc325a0010b21cef74bd94321b991003715e7299eb0cbd29f1d5582",
    "arithmetic/2_digit_subtraction/task.json":
        "7437e2ef68b0725da20a4321c32251c828a7dc062c627da9e63409c1fb2653db",
    "causal_judgment/task.json":
        "72dea28a03226a15a6081c7bef3599569887258a90e7db923e98a8232d5d7c29",
    "date_understanding/task.json":
        "ff716f0e399109146db3a998281c39954907b78268a9b633a95582d63847822f",
    "disambiguation_qa/task.json":
        "118b6a250c6e1744384763d51cfd48c931467325dbe94d79ccb2103805fa4c6a",
    "object_counting/task.json":
        "ec6371b4d9078a871ef6962d4991d2318db0b399cca78a0c90678972bdb115d6",
    "snarks/task.json": "bf78ad6f611db889d1e3cd092a5187c33aee87aa64281c9209809569e8c3dea9",
    "word_sorting/task.json": "8633aac2c5e59b0580f17a702d78c3a8294092144c7bb1380192dd5bb4255f29",
}  # fmt: skip


class ChecksumError(ValueError):
    """A cached file (or the sdist) does not match its recorded sha256."""


class SdistUnavailable(FileNotFoundError):
    """The index does not list ``SDIST_FILENAME`` (PyPI listed only ``bigbench-0.0.1`` when
    this was last tried, 2026-12-07): the message names what it lists and the ways round it."""


def default_task_dir() -> Path:
    """``<VLLM_LORA_EXT_CACHE_DIR or ~/.cache/vllm-lora-ext>/tasks``."""
    from vllm_lora_ext.settings import Settings

    return Settings().cache_dir / "tasks"


def index_url() -> str:
    """pip's own ``PIP_INDEX_URL`` if set, else PyPI's simple API."""
    return os.environ.get("PIP_INDEX_URL", DEFAULT_INDEX).rstrip("/")


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.hrefs.append(href)


def sdist_location(index: str, client: httpx.Client) -> tuple[str, str | None]:
    """(URL, the sha256 the index lists or None) of ``SDIST_FILENAME`` in the index's listing."""
    page = f"{index}/bigbench/"
    accept = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
    response = client.get(page, headers={"Accept": accept}, follow_redirects=True)
    response.raise_for_status()
    listed_names: list[str] = []
    if "json" in response.headers.get("content-type", ""):
        for entry in response.json().get("files", []):
            listed_names.append(str(entry.get("filename")))
            if entry.get("filename") == SDIST_FILENAME:
                return urljoin(page, entry["url"]), entry.get("hashes", {}).get("sha256")
    else:
        links = _Links()
        links.feed(response.text)
        for href in links.hrefs:
            url, fragment = urldefrag(urljoin(page, href))
            listed_names.append(url.rsplit("/", 1)[-1])
            if url.rsplit("/", 1)[-1] == SDIST_FILENAME:
                listed = re.fullmatch(r"sha256=([0-9a-f]{64})", fragment)
                return url, listed.group(1) if listed else None
    raise SdistUnavailable(
        f"{page} does not list {SDIST_FILENAME} (it lists: {', '.join(listed_names) or 'nothing'})."
        f" With a copy of the file (sha256 {SDIST_SHA256}), run `python -m "
        "vllm_lora_ext.evaluation.task_cache --sdist FILE`; with a BIG-bench checkout, "
        "--source-dir DIR; or name an index that has it with --index URL"
    )


def download_sdist(
    dest: Path, index: str | None = None, expected_sha256: str | None = SDIST_SHA256
) -> Path:
    """Stream the sdist from the index into ``dest`` (a progress bar on stderr), checking it
    against ``expected_sha256`` before it is renamed into place."""
    from tqdm import tqdm

    dest.mkdir(parents=True, exist_ok=True)
    target = dest / SDIST_FILENAME
    with httpx.Client(timeout=httpx.Timeout(60.0, read=300.0)) as client:
        url, listed = sdist_location(index or index_url(), client)
        if expected_sha256 is not None and listed not in (None, expected_sha256):
            raise ChecksumError(f"the index lists sha256 {listed} for {url}, expected "
                                f"{expected_sha256}")  # fmt: skip
        digest = hashlib.sha256()
        part = dest / f".{SDIST_FILENAME}.part"
        with client.stream("GET", url, follow_redirects=True) as response:
            response.raise_for_status()
            total = int(response.headers.get("content-length", 0)) or None
            with part.open("wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                               desc=SDIST_FILENAME) as bar:  # fmt: skip
                for chunk in response.iter_bytes(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{url} has sha256 {digest.hexdigest()}, expected {expected_sha256}")
    part.replace(target)
    return target


def fetch_tasks(
    cache_dir: Path | None = None,
    sdist: Path | None = None,
    expected_sha256: str | None = SDIST_SHA256,
    index: str | None = None,
) -> Path:
    """Extract the development tasks into ``cache_dir`` and write its manifest; return the dir.

    ``sdist``: an already downloaded ``bigbench-1.0.0.tar.gz``; without it the sdist is
    downloaded from ``index`` (default: :func:`index_url`) into a temporary directory and
    removed afterwards. ``expected_sha256=None``
    skips the sdist check (tests build small fake sdists).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_task_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    if sdist is None:
        with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir) as tmp:
            downloaded = download_sdist(Path(tmp), index, expected_sha256)
            return _extract(downloaded, cache_dir, expected_sha256)
    return _extract(Path(sdist), cache_dir, expected_sha256)


def copy_tasks(
    source_dir: Path, cache_dir: Path | None = None, recorded: dict[str, str] | None = None
) -> Path:
    """Fill the cache from a directory that holds the task files (a BIG-bench checkout, an
    unpacked sdist, or its ``benchmark_tasks``): the way round a package index that no longer
    serves the sdist. Each file must match its recorded sha256 (``recorded``, default
    :data:`RECORDED_SHA256`), so results stay comparable with the published ones; files with no
    recorded hash are copied and named ``unverified`` in the manifest. Nothing is written unless
    every file is present and matches."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_task_dir()
    recorded = RECORDED_SHA256 if recorded is None else recorded
    root = Path(source_dir)
    for base in (root / "bigbench" / "benchmark_tasks", root / "benchmark_tasks", root):
        if base.is_dir() and (base / "disambiguation_qa").is_dir():
            break
    else:
        raise FileNotFoundError(f"{root} holds no bigbench/benchmark_tasks/ (nor task folders)")
    wanted = sorted({rel for files in TASK_SOURCES.values() for rel in files})
    missing = [rel for rel in wanted if not (base / rel).is_file()]
    if missing:
        raise FileNotFoundError(f"{base} lacks {missing}")
    files = {rel: (base / rel).read_bytes() for rel in wanted}
    checksums = {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
    differ = [rel for rel in wanted if rel in recorded and checksums[rel] != recorded[rel]]
    if differ:
        raise ChecksumError(f"{base}: {differ} differ from the recorded sha256 (the bytes every "
                            "published result used); this copy is another version")  # fmt: skip
    cache_dir.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        write_atomic(cache_dir / rel, data)
    unverified = [rel for rel in wanted if rel not in recorded]
    manifest = {"source": f"directory {base.resolve()}", "sdist_sha256": None,
                "files": checksums, "unverified": unverified}  # fmt: skip
    write_atomic(cache_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return cache_dir


def _extract(sdist: Path, cache_dir: Path, expected_sha256: str | None) -> Path:
    sdist_sha = sha256_file(sdist)
    if expected_sha256 is not None and sdist_sha != expected_sha256:
        raise ChecksumError(f"{sdist} has sha256 {sdist_sha}, expected {expected_sha256}")
    wanted = {rel for files in TASK_SOURCES.values() for rel in files}
    checksums: dict[str, str] = {}
    # Stream mode: one pass over the gzip; only names from TASK_SOURCES are ever written, so a
    # hostile member name cannot escape the cache directory.
    with tarfile.open(sdist, mode="r|gz") as tar:
        for member in tar:
            rel = member.name.removeprefix(_MEMBER_PREFIX)
            if rel not in wanted or not member.isfile():
                continue
            handle = tar.extractfile(member)
            assert handle is not None
            data = handle.read()
            write_atomic(cache_dir / rel, data)
            checksums[rel] = hashlib.sha256(data).hexdigest()
    missing = sorted(wanted - checksums.keys())
    if missing:
        raise FileNotFoundError(f"{sdist} lacks {missing}")
    manifest = {"source": SDIST_REQUIREMENT, "sdist_sha256": sdist_sha, "files": checksums}
    write_atomic(cache_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return cache_dir


def read_task_file(rel: str, cache_dir: Path | None = None) -> tuple[dict, str]:
    """Parse one cached ``task.json`` after checking it against the manifest: (data, sha256)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_task_dir()
    manifest_path = cache_dir / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"no BIG-bench task cache in {cache_dir}; fetch it once with "
            "`python -m vllm_lora_ext.evaluation.task_cache` (downloads the 358 MB sdist)"
        )
    expected = json.loads(manifest_path.read_text())["files"].get(rel)
    if expected is None:
        raise FileNotFoundError(f"{rel} is not in {manifest_path}; fetch the tasks again")
    data = (cache_dir / rel).read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ChecksumError(
            f"{cache_dir / rel} has sha256 {actual}, but the manifest records {expected}: "
            "the file changed since it was fetched; fetch the tasks again"
        )
    return json.loads(data), actual


def main(argv: list[str] | None = None) -> None:
    """``python -m vllm_lora_ext.evaluation.task_cache [--cache-dir DIR] [--sdist FILE |
    --source-dir DIR] [--index URL]``: exit 1 with a message when the tasks cannot be had."""
    import argparse

    parser = argparse.ArgumentParser(description="fetch the BIG-bench development tasks")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--sdist", type=Path, default=None, help="an already downloaded sdist")
    parser.add_argument("--index", default=None, help=f"simple index (default {index_url()})")
    parser.add_argument(
        "--source-dir", type=Path, default=None,
        help="a BIG-bench checkout (or unpacked sdist) to copy from, checked file by file "
        "against the recorded sha256",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.sdist is not None and args.source_dir is not None:
        parser.exit(2, "task_cache: error: give --sdist or --source-dir, not both\n")
    if args.index is not None and (args.sdist or args.source_dir) is not None:
        parser.exit(2, "task_cache: error: --index is for downloading; it does nothing with "
                    "--sdist or --source-dir\n")  # fmt: skip
    if args.sdist is not None and not args.sdist.is_file():
        parser.exit(2, f"task_cache: error: --sdist {args.sdist} is not a file\n")
    if args.source_dir is not None and not args.source_dir.is_dir():
        parser.exit(2, f"task_cache: error: --source-dir {args.source_dir} is not a directory\n")
    try:
        if args.source_dir is not None:
            out = copy_tasks(args.source_dir, args.cache_dir)
        else:
            out = fetch_tasks(args.cache_dir, args.sdist, index=args.index)
    except (OSError, ValueError, tarfile.TarError, httpx.HTTPError, httpx.InvalidURL) as err:
        # OSError: missing, unreadable or unwritable paths; ValueError: checksums, a malformed
        # index page; the rest: a broken sdist or an index that cannot be reached
        parser.exit(1, f"task_cache: error: {err}\n")
    print(f"BIG-bench tasks cached in {out}")


if __name__ == "__main__":
    main()
