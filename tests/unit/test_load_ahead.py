"""The worker's loads ahead: one background load per path, taken once by the step, timed."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_lora_ext.adapters.load_ahead import LOAD_BUCKETS, AheadLoader
from vllm_lora_ext.histogram import Histogram


class Disk:
    """A loader whose reads block until released, counting each read."""

    def __init__(self) -> None:
        self.reads: list[str] = []
        self.release = threading.Event()
        self.fail: set[str] = set()

    def load(self, path: str, name: str) -> dict:
        self.release.wait(10)
        self.reads.append(path)
        if path in self.fail:
            raise FileNotFoundError(path)
        return {"path": path, "name": name}


def wait_state(loader: AheadLoader, path: str, state: str) -> None:
    done = threading.Event()
    for _ in range(1000):
        if loader.state(path) == state:
            return
        done.wait(0.01)
    raise AssertionError(f"{path} never became {state}: {loader.state(path)}")


def test_a_ready_load_is_taken_by_the_step_without_reading_again_or_stalling():
    disk = Disk()
    loader = AheadLoader(disk.load)
    assert loader.start("/a", "a") == "loading"
    assert loader.start("/a", "a") == "loading"  # one load per path
    disk.release.set()
    wait_state(loader, "/a", "ready")
    got = loader.take("/a", lambda: pytest.fail("the step must not read the files again"))
    assert got == {"path": "/a", "name": "a"} and disk.reads == ["/a"]
    assert loader.ahead.count == 1 and loader.in_step.count == 0  # no step time spent
    assert loader.state("/a") == "absent"  # taken once


def test_without_a_load_ahead_the_step_loads_and_the_stall_is_recorded():
    loader = AheadLoader(Disk().load)
    assert loader.take("/b", lambda: "loaded now") == "loaded now"
    assert loader.in_step.count == 1 and loader.ahead.count == 0


def test_the_step_waits_for_a_load_still_running_and_counts_the_wait():
    disk = Disk()
    loader = AheadLoader(disk.load)
    loader.start("/c", "c")
    threading.Timer(0.05, disk.release.set).start()
    assert loader.take("/c", lambda: pytest.fail("must wait, not read twice"))["path"] == "/c"
    assert disk.reads == ["/c"] and loader.in_step.count == 1 and loader.in_step.sum > 0


def test_a_failed_load_ahead_is_retried_in_the_step_where_vllm_reports_its_error():
    disk = Disk()
    disk.fail.add("/gone")
    disk.release.set()
    loader = AheadLoader(disk.load)
    loader.start("/gone", "gone")
    wait_state(loader, "/gone", "failed")

    def load_now():
        raise FileNotFoundError("/gone")

    with pytest.raises(FileNotFoundError):
        loader.take("/gone", load_now)
    assert loader.in_step.count == 1


def test_finished_loads_beyond_the_bound_are_dropped_oldest_first():
    disk = Disk()
    disk.release.set()
    loader = AheadLoader(disk.load, max_pending=2)
    for p in ("/1", "/2"):
        loader.start(p, p)
        wait_state(loader, p, "ready")
    loader.start("/3", "/3")
    assert loader.state("/1") == "absent" and loader.state("/2") == "ready"


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=50))
def test_load_times_are_a_cumulative_histogram_of_what_was_observed(values):
    times = Histogram(LOAD_BUCKETS)
    for v in values:
        times.observe(v)
    assert times.count == len(values) and times.sum == pytest.approx(sum(values))
    running = 0
    for bound, count in zip(LOAD_BUCKETS, times.counts, strict=False):
        running += count
        assert running == sum(v <= bound for v in values)
