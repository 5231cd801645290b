import os
import zlib

import pytest

TEST_SEED = int(os.environ.get("SPARSEKV_TEST_SEED", int.from_bytes(os.urandom(4), "little") % 2**30))


@pytest.fixture
def seed_gen(request):
    """A torch.Generator seeded by crc32 of the test id plus SPARSEKV_TEST_SEED (random per run
    unless set). The seed is printed, so pytest shows it with a failure; replay with
    SPARSEKV_TEST_SEED=<base> pytest <test id>."""
    import torch

    seed = (zlib.crc32(request.node.nodeid.encode()) + TEST_SEED) % 2**31
    print(f"seed {seed} = crc32({request.node.nodeid!r}) + SPARSEKV_TEST_SEED={TEST_SEED}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def sparsekv_records():
    """Records of the "vllm.sparsekv" logger at DEBUG and above (vLLM's own logging may stop them
    reaching the root), with the once-per-process-tree startup line re-armed."""
    import logging

    got = []
    handler = logging.Handler()
    handler.emit = got.append
    log = logging.getLogger("vllm.sparsekv")
    old = log.level
    log.addHandler(handler)
    os.environ.pop("SPARSEKV_STARTUP_LINE", None)
    log.setLevel(logging.DEBUG)
    yield got
    log.removeHandler(handler)
    log.setLevel(old)


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


@pytest.fixture(scope="session")
def load_benchmark():
    """benchmarks/<name>.py as a module, loaded once per session (benchmarks/ holds scripts, not a
    package)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    mods = {}

    def load(name: str):
        if name not in mods:
            spec = importlib.util.spec_from_file_location(f"bench_{name}", root / f"{name}.py")
            mods[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mods[name])
        return mods[name]
    return load
