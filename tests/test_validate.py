"""Startup checks refuse what the backend cannot serve, naming the setting."""

from types import SimpleNamespace

import pytest

from vllm_sparsekv.config import SparseKVConfigError
from vllm_sparsekv.validate import validate_engine_config


def engine(sparsekv=None, window=None, mla=False, enc_dec=False, cache_dtype="auto", unit=None, kv_transfer=None):
    model = SimpleNamespace(use_mla=mla, is_encoder_decoder=enc_dec, get_sliding_window=lambda: window,
                            get_total_num_hidden_layers=lambda: 30, get_total_num_kv_heads=lambda: 3,
                            get_head_size=lambda: 64)
    return SimpleNamespace(
        additional_config={"sparsekv": sparsekv or {"method": "quest", "token_budget": 512}},
        model_config=model,
        cache_config=SimpleNamespace(cache_dtype=cache_dtype, prefix_match_unit=unit, block_size=16,
                                     enable_prefix_caching=False),
        parallel_config=SimpleNamespace(tensor_parallel_size=1),
        kv_transfer_config=kv_transfer,
    )


def test_a_plain_gqa_model_passes():
    validate_engine_config(engine())


def test_prefill_scored_methods_turn_prefix_caching_off():
    for method, off in (("snapkv", True), ("h2o", True), ("quest", False)):
        cfg = engine(sparsekv={"method": method, "token_budget": 256})
        cfg.cache_config.enable_prefix_caching = True
        validate_engine_config(cfg)
        assert cfg.cache_config.enable_prefix_caching is (not off)


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(window=4096), "sliding-window"),
        (dict(mla=True), "MLA"),
        (dict(enc_dec=True), "encoder-decoder"),
        (dict(cache_dtype="fp8_e4m3"), "kv_cache_dtype='fp8_e4m3'"),
        (dict(unit=4), "prefix_match_unit=4"),
        (dict(kv_transfer=object()), "kv_transfer_config"),
        (dict(sparsekv={"method": "quest", "token_budget": 0}), "sparsekv.token_budget"),
    ],
)
def test_unsupported_settings_stop_startup_with_a_named_reason(kw, words):
    with pytest.raises(SparseKVConfigError, match="sparsekv") as e:
        validate_engine_config(engine(**kw))
    assert words in str(e.value)
