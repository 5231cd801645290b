import os

import pytest


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The converted SmolLM2-135M-Instruct folder (scripts/setup.sh makes it; made here if missing)."""
    from vllm_sparsekv.models import ensure_model

    return str(ensure_model("smollm2"))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SPARSEKV_SKIP_SLOW"):
        skip = pytest.mark.skip(reason="SPARSEKV_SKIP_SLOW is set")
        for item in items:
            if "engine" in item.keywords or "server" in item.keywords:
                item.add_marker(skip)
