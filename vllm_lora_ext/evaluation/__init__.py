"""Evaluation harness: BIG-bench tasks from PyPI, chat-template prompts, scoring, two backends.

Data flows one way: ``task_cache`` (sdist -> checksummed task.json files) -> ``tasks`` (examples,
seeded splits) -> ``prompts`` (token ids) -> ``backends`` (log-probs / greedy text, over HTTP
from a vLLM server or in-process with transformers + PEFT) -> ``scoring`` (pure functions) ->
``evaluate``. Nothing here imports vLLM or FastAPI.
"""
