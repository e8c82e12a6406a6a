"""Per-adapter service levels on ``/metrics``: TTFT and time per output token, residency, loads.

A server may hold thousands of adapters; one Prometheus series per adapter and bucket would
swamp the scrape. Observations are kept per adapter here, in plain counts, and each scrape shows
the ``top_n`` adapters with the most requests so far under their own name, the rest summed under
``other`` and requests on the base model under ``base``. Summed over labels every series is a
monotone counter; an adapter that enters the top moves its counts out of ``other``, which
Prometheus reads as a reset of ``other`` (``rate()`` copes, the series' sums stay exact).

Fed by ``vllm_boundary.patches.patch_request_service_levels`` (vLLM's own timestamps of each
finished request) and by the residency poll (``VllmEngineAdapters.residency``, from the worker).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import REGISTRY, GaugeMetricFamily, HistogramMetricFamily, Metric

from vllm_lora_ext.adapters.load_ahead import LOAD_BUCKETS
from vllm_lora_ext.histogram import Histogram

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BASE, OTHER = "base", "other"
WHERE = ("slot", "cpu_cache", "disk")


class AdapterServiceLevels:
    """A Prometheus collector; ``observe`` is called from vLLM's output loop, ``collect`` from
    the scrape (another thread), hence the lock."""

    def __init__(self, top_n: int = 20) -> None:
        self.top_n = top_n
        self._lock = threading.Lock()
        self._ttft: dict[str, Histogram] = {}
        self._tpot: dict[str, Histogram] = {}
        self._residency: dict[str, set[str]] = {w: set() for w in WHERE}
        self._loads: dict[str, Any] = {}

    def observe(self, adapter: str | None, ttft: float, tpot: float | None) -> None:
        """One finished request: ``adapter`` None for the base model."""
        name = BASE if adapter is None else adapter
        with self._lock:
            self._ttft.setdefault(name, Histogram(TTFT_BUCKETS)).observe(ttft)
            if tpot is not None:
                self._tpot.setdefault(name, Histogram(TPOT_BUCKETS)).observe(tpot)

    def set_residency(self, slots: Iterable[str], cached: Iterable[str], registered: Iterable[str]):
        """Where each registered adapter is: in a batch slot, in the CPU cache only, on disk."""
        slot, cache = set(slots), set(cached)
        with self._lock:
            self._residency = {
                "slot": slot,
                "cpu_cache": cache - slot,
                "disk": set(registered) - cache - slot,
            }

    def set_loads(self, report: dict[str, Any]) -> None:
        """The worker's load-time histograms (``AheadLoader.report``)."""
        with self._lock:
            self._loads = report

    def top(self) -> list[str]:
        """The adapters shown under their own name: most requests first (ties by name)."""
        with self._lock:
            return self._top()

    def _top(self) -> list[str]:
        ranked = sorted(
            (n for n in self._ttft if n != BASE), key=lambda n: (-sum(self._ttft[n].counts), n)
        )
        return ranked[: self.top_n]

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            top = self._top()
            yield _histograms(
                "vllm_lora_ext_adapter_time_to_first_token_seconds",
                "Time to first token of finished requests, per adapter (top adapters by "
                "requests, the rest under 'other', the base model under 'base')",
                self._ttft,
                top,
                TTFT_BUCKETS,
            )
            yield _histograms(
                "vllm_lora_ext_adapter_time_per_output_token_seconds",
                "Time per output token after the first, of finished requests, per adapter",
                self._tpot,
                top,
                TPOT_BUCKETS,
            )
            counts = GaugeMetricFamily(
                "vllm_lora_ext_adapters_resident",
                "Registered adapters by where their weights are: in a batch slot, in the CPU "
                "cache only, or on disk only",
                labels=["where"],
            )
            per_adapter = GaugeMetricFamily(
                "vllm_lora_ext_adapter_residency",
                "1 where each top adapter's weights are now (slot, cpu_cache, disk)",
                labels=["adapter", "where"],
            )
            for where in WHERE:
                counts.add_metric([where], len(self._residency[where]))
                for name in top:
                    if name in self._residency[where]:
                        per_adapter.add_metric([name, where], 1)
            yield counts
            yield per_adapter
            loads = HistogramMetricFamily(
                "vllm_lora_ext_adapter_load_seconds",
                "Adapter loads in the worker: 'ahead' read in the background before the "
                "request is scheduled; 'in_step' time an engine step spent loading (a stall "
                "of the whole batch)",
                labels=["path"],
            )
            for path, h in sorted(self._loads.items()):
                hist = Histogram.from_dict(LOAD_BUCKETS, h)
                loads.add_metric([path], hist.buckets(), hist.sum)
            yield loads


def _histograms(
    name: str,
    doc: str,
    by_adapter: dict[str, Histogram],
    top: list[str],
    bounds: tuple[float, ...],
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["adapter"])
    other = Histogram(bounds)
    shown = set(top) | {BASE}
    for adapter, hist in by_adapter.items():
        if adapter not in shown:
            other.add(hist)
    for adapter in [BASE, *top]:
        if adapter in by_adapter:
            family.add_metric([adapter], by_adapter[adapter].buckets(), by_adapter[adapter].sum)
    if any(other.counts):
        family.add_metric([OTHER], other.buckets(), other.sum)
    return family


SERVICE_LEVELS = AdapterServiceLevels()
REGISTRY.register(SERVICE_LEVELS)
