"""Prometheus metrics, registered in the default registry that vLLM serves on ``/metrics``."""

from prometheus_client import Counter, Gauge

ADAPTERS_REGISTERED = Gauge(
    "vllm_lora_ext_adapters_registered", "Adapters in the store for the served base"
)
ADAPTER_LOADS = Counter("vllm_lora_ext_adapter_loads", "Adapters loaded into the vLLM engine")
ADAPTER_UNLOADS = Counter("vllm_lora_ext_adapter_unloads", "Adapters unloaded from the vLLM engine")
REQUESTS = Counter(
    "vllm_lora_ext_requests",
    "Generation requests by the model they name (an adapter name, or 'base')",
    ["adapter"],
)
VALIDATION_FAILURES = Counter(
    "vllm_lora_ext_validation_failures",
    "Adapters refused by validation (registrations and inline merges), by reason",
    ["reason"],
)
REFUSALS = Counter(
    "vllm_lora_ext_refusals",
    "Requests refused by the plugin's APIs (4xx/502 with a reason), by API and reason",
    ["api", "reason"],
)
STATS_HELD_TOKENS = Gauge(
    "vllm_lora_ext_stats_held_tokens",
    "Tokens summed into the held traffic statistics, per adapter",
    ["adapter"],
)
CAPTURES_RUNNING = Gauge("vllm_lora_ext_captures_running", "Traffic captures running")
MERGE_JOBS = Counter(
    "vllm_lora_ext_merge_jobs",
    "Merge jobs finished, by method and final state",
    ["method", "state"],
)
MERGE_SECONDS = Counter(
    "vllm_lora_ext_merge_seconds", "Wall time spent in merge jobs, by method", ["method"]
)
MERGE_ITERATION = Gauge(
    "vllm_lora_ext_merge_iteration", "Current IterIS iteration of running merge jobs", ["job"]
)
FORWARDED_ADAPTERS = Gauge(
    "vllm_lora_ext_forwarded_adapters",
    "Adapters whose requests are forwarded to another server (not migrated here yet)",
)
FORWARDED_REQUESTS = Counter(
    "vllm_lora_ext_forwarded_requests",
    "Generation requests proxied to the server that still serves their adapter",
    ["adapter"],
)
FORWARD_FAILURES = Counter(
    "vllm_lora_ext_forward_failures", "Forwarded requests whose target server was unreachable"
)
MIGRATION_ADAPTERS = Gauge(
    "vllm_lora_ext_migration_adapters",
    "Adapters of the current migration by state (pending, running, switched, kept_old, ...)",
    ["state"],
)
MIGRATION_PROGRESS = Gauge(
    "vllm_lora_ext_migration_progress",
    "The migrating adapter's counters: generated, kept, rejected, labelled, train_step, loss",
    ["adapter", "field"],
)
MIGRATION_SECONDS = Counter(
    "vllm_lora_ext_migration_seconds", "Wall time spent migrating adapters, by final state",
    ["state"],
)  # fmt: skip
MERGED_CACHE_BYTES = Gauge(
    "vllm_lora_ext_merged_cache_bytes", "Bytes held by the inline-merge cache (<store>/.merged)"
)
MERGED_EVICTIONS = Counter(
    "vllm_lora_ext_merged_evictions", "Inline merges dropped from the cache to fit its budget"
)
REFUSED_ROUTES = Counter(
    "vllm_lora_ext_refused_routes",
    "Requests to vLLM's own adapter routes, refused (use /v1/adapters)",
    ["path"],
)
