"""Adapter loads off the request path, in the worker.

vLLM reads an adapter's files when a batch first needs it (``WorkerLoRAManager._load_adapter``,
inside the engine step) or inside ``add_lora`` (a utility call between two steps): either way
every running request waits for the disk. Here the API server asks for the load when the request
is admitted; a worker thread reads the files while the engine keeps stepping, and the request
reaches the scheduler once its adapter is in memory. The step then finds the loaded adapter and
only copies it into its slot.

Loads are keyed by the adapter's path (a store version path: one path, one set of weights), not by
vLLM's int id, which a first request only gets after it is resolved. Plain Python: the vLLM side
(the loader function, the patched ``_load_adapter``) lives in ``vllm_boundary/worker.py`` and
``vllm_boundary/patches.py``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from vllm_lora_ext.histogram import Histogram

LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds (Prometheus ``le`` bounds) of the load-latency histograms."""


class AheadLoader:
    """Loads adapters in one background thread and hands them to the engine step.

    ``load(path, name)`` is vLLM's own loader (it builds the CPU ``LoRAModel``). At most
    ``max_pending`` loaded adapters wait to be taken; past that the oldest finished one is
    dropped (its request, if it still comes, loads in the step as before).
    """

    def __init__(self, load: Callable[[str, str], Any], max_pending: int = 16) -> None:
        self._load = load
        self._max_pending = max_pending
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="lora-ext-load-ahead")
        self._pending: OrderedDict[str, Future] = OrderedDict()
        self._lock = threading.Lock()
        self.ahead = Histogram(LOAD_BUCKETS)
        """Loads done in the background thread."""
        self.in_step = Histogram(LOAD_BUCKETS)
        """Time an engine step (or ``add_lora``) spent loading: files read on the request path,
        or waiting for a background load that had not finished."""

    def start(self, path: str, name: str) -> str:
        """Begin loading ``path`` unless it is already under way; the state after the call."""
        with self._lock:
            if path not in self._pending:
                self._make_room()
                self._pending[path] = self._executor.submit(self._timed_load, path, name)
            return _state(self._pending[path])

    def state(self, path: str) -> str:
        """``absent``, ``loading``, ``ready`` (waiting to be taken) or ``failed``."""
        with self._lock:
            future = self._pending.get(path)
        return "absent" if future is None else _state(future)

    def take(self, path: str, load_now: Callable[[], Any]) -> Any:
        """The adapter for an engine step: the background one if it is ready; else the step
        waits for it (still loading) or loads it now with ``load_now()``, and that wait is
        recorded as step time."""
        with self._lock:
            future = self._pending.pop(path, None)
        if future is not None and future.done() and future.exception() is None:
            return future.result()
        start = time.perf_counter()
        try:
            if future is not None:
                with contextlib.suppress(Exception):  # its error comes again from load_now
                    return future.result()
            return load_now()
        finally:
            self.in_step.observe(time.perf_counter() - start)

    def forget(self, path: str) -> None:
        with self._lock:
            self._pending.pop(path, None)

    def report(self) -> dict[str, Any]:
        return {"ahead": self.ahead.to_dict(), "in_step": self.in_step.to_dict()}

    def _timed_load(self, path: str, name: str) -> Any:
        start = time.perf_counter()
        try:
            return self._load(path, name)
        finally:
            self.ahead.observe(time.perf_counter() - start)

    def _make_room(self) -> None:
        while len(self._pending) >= self._max_pending:
            done = next((p for p, f in self._pending.items() if f.done()), None)
            if done is None:
                return  # all still loading: the queue grows by one, bounded by the admissions
            del self._pending[done]


def _state(future: Future) -> str:
    if not future.done():
        return "loading"
    return "failed" if future.exception() is not None else "ready"
