"""Per-adapter service levels: bounded labels, exact sums, residency, worker load times."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from vllm_lora_ext.server.service_levels import TTFT_BUCKETS, AdapterServiceLevels

TTFT = "vllm_lora_ext_adapter_time_to_first_token_seconds"


def scrape(levels: AdapterServiceLevels) -> dict[str, list]:
    registry = CollectorRegistry()
    registry.register(levels)
    text = generate_latest(registry).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def counts_by_adapter(samples, name: str = TTFT) -> dict[str, float]:
    return {s.labels["adapter"]: s.value for s in samples if s.name == f"{name}_count"}


def test_top_adapters_by_requests_get_their_name_the_rest_are_other():
    levels = AdapterServiceLevels(top_n=2)
    for adapter, n in (("a", 5), ("b", 3), ("c", 2), ("d", 1), (None, 4)):
        for _ in range(n):
            levels.observe(adapter, 0.2, 0.01)
    counts = counts_by_adapter(scrape(levels)[TTFT])
    assert counts == {"base": 4, "a": 5, "b": 3, "other": 3}
    assert levels.top() == ["a", "b"]


def test_a_request_without_a_second_token_has_no_time_per_output_token():
    levels = AdapterServiceLevels()
    levels.observe("a", 0.3, None)
    samples = scrape(levels)
    assert counts_by_adapter(samples[TTFT]) == {"a": 1}
    assert (
        counts_by_adapter(
            samples["vllm_lora_ext_adapter_time_per_output_token_seconds"],
            "vllm_lora_ext_adapter_time_per_output_token_seconds",
        )
        == {}
    )


def test_residency_counts_each_registered_adapter_once_and_names_the_top_ones():
    levels = AdapterServiceLevels(top_n=1)
    levels.observe("a", 0.1, None)
    levels.set_residency(slots={"a"}, cached={"a", "b"}, registered={"a", "b", "c", "d"})
    samples = scrape(levels)
    counts = {s.labels["where"]: s.value for s in samples["vllm_lora_ext_adapters_resident"]}
    assert counts == {"slot": 1, "cpu_cache": 1, "disk": 2}
    named = [
        (s.labels["adapter"], s.labels["where"]) for s in samples["vllm_lora_ext_adapter_residency"]
    ]
    assert named == [("a", "slot")]


def test_worker_load_times_are_shown_as_histograms_per_path():
    levels = AdapterServiceLevels()
    counts = [0] * 14
    counts[3] = 2
    levels.set_loads(
        {"ahead": {"counts": counts, "sum": 0.02}, "in_step": {"counts": [0] * 14, "sum": 0.0}}
    )
    samples = scrape(levels)["vllm_lora_ext_adapter_load_seconds"]
    totals = {s.labels["path"]: s.value for s in samples if s.name.endswith("_count")}
    assert totals == {"ahead": 2, "in_step": 0}


@given(
    st.lists(
        st.tuples(st.sampled_from([None, "a", "b", "c", "d", "e"]), st.floats(0, 500)), max_size=60
    ),
    st.integers(0, 6),
)
def test_whatever_the_top_n_the_series_sum_to_every_observation(observations, top_n):
    levels = AdapterServiceLevels(top_n=top_n)
    for adapter, ttft in observations:
        levels.observe(adapter, ttft, None)
    samples = scrape(levels)[TTFT]
    counts = counts_by_adapter(samples)
    assert sum(counts.values()) == len(observations)
    assert len(set(counts) - {"base", "other"}) <= top_n
    inf = sum(s.value for s in samples if s.name == f"{TTFT}_bucket" and s.labels["le"] == "+Inf")
    assert inf == len(observations)
    le_1 = sum(s.value for s in samples if s.name == f"{TTFT}_bucket" and s.labels["le"] == "1.0")
    assert 1.0 in TTFT_BUCKETS and le_1 == sum(t <= 1.0 for _, t in observations)
