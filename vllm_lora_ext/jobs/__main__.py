"""``python -m vllm_lora_ext.jobs run WORKDIR``: run one job in this process (the child that
the server starts, or an operator's own scheduler, e.g. a Kubernetes Job).

Exit codes: 0 done (``result.json``), 1 failed (``error.json``), 3 cancelled, 2 bad arguments.
The job dies with the process that started it unless ``--detached`` (its parent is watched).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 1, 2, 3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vllm_lora_ext.jobs", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the job of a work folder")
    run.add_argument("workdir", type=Path)
    run.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    run.add_argument(
        "--detached", action="store_true", help="keep running if the parent process exits"
    )
    args = p.parse_args(argv)
    if not (args.workdir / "job.json").is_file():
        print(f"error: {args.workdir} holds no job.json", file=sys.stderr)
        return EXIT_USAGE
    if args.threads is not None and args.threads < 1:
        print("error: --threads must be at least 1", file=sys.stderr)
        return EXIT_USAGE
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
    if not args.detached:
        _die_with_parent()
    try:
        execute(context)
    except JobCancelled as e:
        print(f"cancelled: {e}", file=sys.stderr)
        return EXIT_CANCELLED
    except Exception as e:
        if context.stopping():
            return EXIT_CANCELLED
        traceback.print_exc()
        print(f"failed: {type(e).__name__}: {e}", file=sys.stderr)  # the tail a runner shows
        return EXIT_FAILED
    return 0


def _die_with_parent() -> None:
    """A job whose server died is an orphan nobody reads: exit when the parent goes."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(EXIT_CANCELLED)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
