from __future__ import annotations

import pytest

FAMILIES = ("llama", "qwen2", "mistral")


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param
