"""Shared fixtures: the tiny model is built once per run into a temporary directory.

Every server of the suite requires an API key, as operators run it: ``VLLM_API_KEY`` is set
for this process, so the servers it starts and the CLI it runs find it as a user's shell would;
``Server.client()`` presents it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import build_tiny_llama, tiny_serve_args

API_KEY = "suite-key-7f3a"
os.environ["VLLM_API_KEY"] = API_KEY


@pytest.fixture
def one_thread():
    """One torch thread for the test (restored after): in-process training of tiny models is
    many times faster so when vLLM servers or other jobs share the two cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real vLLM server with the plugin (our CPU LoRA path) for the whole run."""
    from vllm_lora_ext.server_process import start_server

    work = tmp_path_factory.mktemp("server")
    srv = start_server(
        work,
        base="tiny-llama",
        serve_args=tiny_serve_args(tiny_model_dir),
        allowed_paths=[tmp_path_factory.getbasetemp()],
    )
    srv.model_dir = tiny_model_dir
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def ray_address():
    """A real local Ray head on 127.0.0.1 (2 CPUs, no dashboard), started for the tests that
    submit jobs to Ray and stopped after them (its own process group, not `ray stop`); its
    address."""
    from vllm_lora_ext.jobs.ray_runner import local_head

    with local_head() as address:
        yield address
        import ray

        ray.shutdown()
