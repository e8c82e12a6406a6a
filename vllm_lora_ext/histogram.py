"""A Prometheus-style histogram in plain numbers.

Observed where prometheus-client has no registry to serve it (the vLLM worker, whose counts
cross ``collective_rpc`` as a dict) or summed before it is shown (per-adapter series folded into
``other``); :mod:`vllm_lora_ext.server.service_levels` turns it into metric families.
"""

from __future__ import annotations

import bisect
from typing import Any


class Histogram:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: +Inf
        self.sum = 0.0

    @classmethod
    def from_dict(cls, bounds: tuple[float, ...], data: dict[str, Any]) -> Histogram:
        hist = cls(bounds)
        hist.counts, hist.sum = list(data["counts"]), float(data["sum"])
        return hist

    def observe(self, value: float) -> None:
        self.sum += value
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # le: value <= bound

    def add(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs, as ``HistogramMetricFamily.add_metric`` takes them."""
        out, running = [], 0
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.sum}
