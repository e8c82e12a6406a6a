"""``python -m vllm_lora_ext.jobs run WORKDIR``: run one job in this process (the child that
the server starts, or an operator's own scheduler, e.g. a Kubernetes Job).

Exit codes: 0 done (``result.json``), 1 failed (``error.json``), 2 bad arguments, 3 cancelled,
4 another process is running this folder's job. The job dies with the process that started it
(``--parent-pid``, default: this process's parent) unless ``--detached``.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import IO

EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED, EXIT_BUSY = 1, 2, 3, 4
LOCK_FILE = ".lock"


def main(argv: list[str] | None = None) -> int:
    parent = os.getppid()  # before anything slow: the parent may be gone by the time it ends
    p = argparse.ArgumentParser(prog="python -m vllm_lora_ext.jobs", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the job of a work folder")
    run.add_argument("workdir", type=Path)
    run.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    run.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    run.add_argument(
        "--detached", action="store_true", help="keep running if the parent process exits"
    )
    args = p.parse_args(argv)
    if not args.detached:
        _die_with(args.parent_pid or parent)
    if not (args.workdir / "job.json").is_file():
        print(f"error: {args.workdir} holds no job.json", file=sys.stderr)
        return EXIT_USAGE
    if args.threads is not None and args.threads < 1:
        print("error: --threads must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    lock = _lock(args.workdir)
    if lock is None:
        print(f"error: another process is running the job in {args.workdir}", file=sys.stderr)
        return EXIT_BUSY
    import torch

    from vllm_lora_ext.jobs.folder import JobFolder, job_secrets
    from vllm_lora_ext.jobs.kinds import JobCancelled, JobContext, execute, stops_at_checks

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    context = JobContext(JobFolder(args.workdir), secrets=job_secrets())
    # SIGTERM asks a job that checks for it to stop at its next check (it checkpoints first;
    # the runner kills it if it does not stop in time); any other job ends at once.
    if stops_at_checks(context.folder):
        signal.signal(signal.SIGTERM, lambda _s, _f: context.stop.set())
    try:
        execute(context)
    except JobCancelled as e:
        print(f"cancelled: {e}", file=sys.stderr)
        return EXIT_CANCELLED
    except Exception as e:
        traceback.print_exc()
        print(f"failed: {type(e).__name__}: {e}", file=sys.stderr)  # the tail a runner shows
        return EXIT_FAILED
    finally:
        lock.close()
    return 0


def _lock(workdir: Path) -> IO[str] | None:
    """An exclusive lock on the folder for this process's life; None if another holds it."""
    handle = (workdir / LOCK_FILE).open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _die_with(parent: int) -> None:
    """A job whose server died is an orphan nobody reads: exit when the parent goes."""

    def watch() -> None:
        while os.getppid() == parent or _alive(parent):
            time.sleep(1.0)
        os._exit(EXIT_CANCELLED)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    sys.exit(main())
