from __future__ import annotations

import pytest

FAMILIES = ("llama", "qwen2", "mistral")


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray session for the whole test run (ray.init costs ~10 s here), started the way
    ``rayprune run`` starts its private session: token authentication, loopback only."""
    import os

    import ray

    from cluster.session import connect

    os.environ.pop("RAY_ADDRESS", None)
    connect(num_cpus=2, namespace="rayprune-tests")
    yield ray
    ray.shutdown()
