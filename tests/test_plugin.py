"""Plugin registration: the alias, the CUSTOM slot, the CPU selector, spawn-safety."""

import os
import pickle
import subprocess
import sys

import pytest

pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def enum():
    from vllm.plugins import load_general_plugins
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    load_general_plugins()
    return AttentionBackendEnum


def test_alias_is_case_insensitive_and_resolves_to_custom(enum):
    from vllm.config.attention import AttentionConfig

    for name in ("sparsekv", "SparseKV", "SPARSEKV"):
        assert AttentionConfig(backend=name).backend is enum.CUSTOM
    assert enum.CUSTOM.get_path() == "vllm_sparsekv.backend.sparsekv_backend.SparseKVBackend"
    from vllm_sparsekv.backend.sparsekv_backend import SparseKVBackend

    assert enum.CUSTOM.get_class() is SparseKVBackend
    assert enum[SparseKVBackend.get_name()] is enum.CUSTOM  # vLLM looks the name up exactly


def test_register_is_idempotent(enum):
    from vllm_sparsekv.plugin import register

    register()
    register()
    assert enum["SPARSEKV"] is enum.CUSTOM


def test_cpu_selector_returns_ours_only_when_selected(enum):
    from vllm.platforms import current_platform
    from vllm.v1.attention.selector import AttentionSelectorConfig
    import torch

    assert current_platform.is_cpu()
    fields = AttentionSelectorConfig._fields
    kw = {f: None for f in fields}
    kw.update(head_size=64, dtype=torch.float32, kv_cache_dtype="auto", block_size=None,
              use_mla=False, use_sparse=False, has_sink=False)
    cfg = AttentionSelectorConfig(**{k: v for k, v in kw.items() if k in fields})
    assert current_platform.get_attn_backend_cls(enum.CUSTOM, cfg).endswith("SparseKVBackend")
    assert current_platform.get_attn_backend_cls(None, cfg) == enum.CPU_ATTN.get_path()
    assert current_platform.get_attn_backend_cls(enum.CPU_ATTN, cfg) == enum.CPU_ATTN.get_path()


def test_selection_survives_pickling_into_a_fresh_process(enum):
    """The engine config crosses into spawned children by pickle, before plugins load there."""
    from vllm.config.attention import AttentionConfig

    blob = pickle.dumps(AttentionConfig(backend="sparsekv"))
    code = (
        "import pickle,sys; c = pickle.loads(sys.stdin.buffer.read());"
        "print(c.backend.name);"
        "from vllm.plugins import load_general_plugins; load_general_plugins();"
        "print(c.backend.get_path())"
    )
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().split() == ["CUSTOM", "vllm_sparsekv.backend.sparsekv_backend.SparseKVBackend"]


@pytest.fixture
def fake_platform(enum, sparsekv_records):
    """A platform class whose own check does nothing, wrapped like the real one."""
    from vllm_sparsekv.plugin import _wrap_platform

    class Platform:
        device_type = "cpu"

        @classmethod
        def check_and_update_config(cls, vllm_config):
            vllm_config.checked = True

    _wrap_platform(Platform)
    yield Platform, sparsekv_records


def _vllm_config(backend, sparsekv=None):
    from types import SimpleNamespace

    return SimpleNamespace(attention_config=SimpleNamespace(backend=backend),
                           additional_config={"sparsekv": sparsekv} if sparsekv is not None else {},
                           model_config=None, cache_config=None, parallel_config=None)


def test_env_config_without_the_backend_warns_naming_both(fake_platform, monkeypatch, enum):
    import logging

    platform, records = fake_platform
    monkeypatch.setenv("VLLM_SPARSEKV_CONFIG", '{"method": "quest"}')
    cfg = _vllm_config(None)
    platform.check_and_update_config(cfg)
    assert cfg.checked
    warn = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warn) == 1 and "VLLM_SPARSEKV_CONFIG is set but --attention-backend sparsekv is not" in warn[0]
    assert "dense" in warn[0]
    records.clear()
    platform.check_and_update_config(_vllm_config(enum.CPU_ATTN))
    assert "--attention-backend CPU_ATTN" in records[0].getMessage()
    records.clear()
    monkeypatch.delenv("VLLM_SPARSEKV_CONFIG")
    platform.check_and_update_config(_vllm_config(None))
    assert not records  # nothing set: nothing to say


def test_config_error_is_logged_before_the_traceback(fake_platform, enum):
    import logging

    from vllm_sparsekv.config import SparseKVConfigError

    platform, records = fake_platform
    with pytest.raises(SparseKVConfigError):
        platform.check_and_update_config(_vllm_config(enum.CUSTOM, {"token_budget": -5}))
    errors = [r.getMessage() for r in records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("sparsekv.token_budget: must be a positive number of tokens")
    records.clear()
    platform.check_and_update_config(_vllm_config(enum.CUSTOM, {"token_budget": 64}))
    assert [r.levelno for r in records] == [logging.INFO]  # the startup line
