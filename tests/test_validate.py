"""Startup checks refuse what the backend cannot serve, naming the setting."""

import logging
import os
from types import SimpleNamespace

import pytest

from vllm_sparsekv.config import SparseKVConfigError
from vllm_sparsekv.validate import validate_engine_config


def engine(sparsekv=None, window=None, mla=False, enc_dec=False, cache_dtype="auto", unit=None, kv_transfer=None,
           tp=1, block_size=16):
    model = SimpleNamespace(use_mla=mla, is_encoder_decoder=enc_dec, get_sliding_window=lambda: window,
                            get_total_num_hidden_layers=lambda: 30, get_total_num_kv_heads=lambda: 3,
                            get_head_size=lambda: 64)
    return SimpleNamespace(
        additional_config={"sparsekv": sparsekv or {"method": "quest", "token_budget": 512}},
        model_config=model,
        cache_config=SimpleNamespace(cache_dtype=cache_dtype, prefix_match_unit=unit, block_size=block_size,
                                     enable_prefix_caching=False),
        parallel_config=SimpleNamespace(tensor_parallel_size=tp),
        kv_transfer_config=kv_transfer,
    )


@pytest.fixture
def records(sparsekv_records):
    return sparsekv_records


def test_a_plain_gqa_model_passes_and_logs_what_will_run(records):
    cfg = engine()
    before = repr(cfg)
    validate_engine_config(cfg, "cpu")
    assert repr(cfg) == before  # nothing to adjust for quest
    validate_engine_config(engine(), "cpu")  # vLLM's engine process runs the hook again: no second line
    info = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert info == ["sparsekv: method quest {'group_reduce': 'sum'}, budget 512 tokens (= 32 pages) per "
                    "(request, KV head) + sink 64 / recent 64 tokens, page size 16 tokens (block size), "
                    "dense layers [0, 1] of 30, min_context 0, kernels: torch reference (cpu)"], info


@pytest.mark.parametrize(
    "sparsekv, block_size, device, words",
    [
        ({"method": "full"}, None, None, ["method full", "budget every page",
                                          "page size the block size (chosen by the platform)",
                                          "kernels: triton on CUDA, torch reference elsewhere"]),
        ({"method": "pyramidkv", "budget_fraction": 0.125, "dense_layers": []}, 32, "cuda",
         ["method pyramidkv", "budget 0.125 of each request's pages, pyramid allocation", "dense layers [] of 30"]),
    ],
)
def test_startup_line(records, sparsekv, block_size, device, words):
    validate_engine_config(engine(sparsekv=sparsekv, block_size=block_size), device)
    (line,) = [r.getMessage() for r in records if r.levelno == logging.INFO]
    for w in words:
        assert w in line, line


def test_dense_layers_must_be_layers_of_the_model():
    validate_engine_config(engine(sparsekv={"dense_layers": [0, 29]}))
    with pytest.raises(SparseKVConfigError) as e:
        validate_engine_config(engine(sparsekv={"dense_layers": [0, 30, 999]}))
    assert str(e.value).startswith("sparsekv.dense_layers: layers [30, 999] are out of range; this model has 30 layers")


def test_stats_file_directory_must_exist_and_be_writable(tmp_path):
    validate_engine_config(engine(sparsekv={"stats_file": str(tmp_path / "stats.json")}))
    cases = [(tmp_path / "missing" / "stats.json", "does not exist"), (tmp_path, "is a directory")]
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        cases.append((ro / "stats.json", "not writable"))
    for path, words in cases:
        with pytest.raises(SparseKVConfigError) as e:
            validate_engine_config(engine(sparsekv={"stats_file": str(path)}))
        assert str(e.value).startswith("sparsekv.stats_file: ") and words in str(e.value), str(e.value)


def test_trained_weights_refuse_tensor_parallelism():
    from vllm_sparsekv.methods import available, get_method

    assert [m for m in available() if get_method(m).whole_model_heads] == ["spotlight"]
    validate_engine_config(engine(sparsekv={"method": "quest"}, tp=2))  # no per-head weights: fine


def test_the_method_hook_is_called(monkeypatch):
    from vllm_sparsekv.methods import get_method

    seen = []

    def check(cls, config, num_layers, num_kv_heads, head_dim):
        seen.append((cls.name, config.method, num_layers, num_kv_heads, head_dim))
        raise ValueError("sparsekv.quest.group_reduce: this model wants sum")

    monkeypatch.setattr(get_method("quest"), "validate_model", classmethod(check))
    with pytest.raises(SparseKVConfigError, match="^sparsekv.quest.group_reduce: this model wants sum"):
        validate_engine_config(engine())
    assert seen == [("quest", "quest", 30, 3, 64)]


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
