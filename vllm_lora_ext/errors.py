"""One error for every request this server refuses: an HTTP status, a machine-readable reason
from a closed set (it labels a Prometheus counter), and a message an operator can act on.

Services and jobs raise :class:`Refused`; one exception handler (``server/http.py``) turns it
into vLLM's error shape with the ``reason`` added. No FastAPI here: the adapter validation and
the offline merge CLI raise it too.
"""

from __future__ import annotations

REASONS = (
    # an adapter that must not be registered
    "invalid_name",
    "duplicate_name",
    "missing_file",
    "pickle_file",
    "unexpected_file",
    "malformed_config",
    "malformed_weights",
    "unsupported_module",
    "shape_mismatch",
    "rank_too_high",
    "non_finite",
    "wrong_base",
    "too_large",
    "engine_rejected",
    "too_many_files",
    "malformed_upload",
    "path_not_allowed",
    # the serving surface
    "invalid_body",
    "lora_disabled",
    "not_found",
    "use_adapters_api",
    "inline_merges_off",
    "too_many_pinned",
    # merges
    "invalid_merge",
    "unknown_adapter",
    "job_conflict",
    # traffic statistics
    "stats_budget",
    "not_capturing",
    "capturing",
    "invalid_stats",
    # migrations
    "source_unavailable",
    "not_a_source",
    "source_unauthorized",
    "wrong_source_base",
    "already_served",
    "too_few_examples",
    "no_source_model",
    "tokenizer_mismatch",
)


class Refused(Exception):
    """A request refused with ``status`` and ``reason`` (one of :data:`REASONS`)."""

    def __init__(self, reason: str, message: str, status: int = 400) -> None:
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status
