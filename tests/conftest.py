from __future__ import annotations

import pytest

FAMILIES = ("llama", "qwen2", "mistral")


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray session for the whole test run (ray.init costs ~10 s here)."""
    import os

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 object_store_memory=200 * 1024 * 1024, namespace="rayprune-tests")
    yield ray
    ray.shutdown()
