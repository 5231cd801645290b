"""Config validation: every bad field is named, with what is allowed."""

import json

import pytest

from vllm_sparsekv.config import ENV_VAR, SparseKVConfig, SparseKVConfigError, load_config


def test_defaults_and_derived_pages():
    cfg = load_config({})
    assert cfg.method == "quest" and cfg.token_budget == 2048 and cfg.dense_layers == [0, 1]
    assert cfg.sink_pages(32) == 2 and cfg.recent_pages(32) == 2
    # the page being written is always attended, even with recent_tokens=0
    assert load_config({"sparsekv": {"recent_tokens": 0}}).recent_pages(16) == 1
    cfg = load_config({"sparsekv": {"token_budget": 1000, "sink_tokens": 16, "recent_tokens": 16}})
    assert cfg.max_selected_pages(32, 8192) == 32  # ceil(1000/32)
    cfg = load_config({"sparsekv": {"budget_fraction": 0.125}})
    assert cfg.max_selected_pages(16, 8192) == 64
    assert load_config({"sparsekv": {"method": "full"}}).max_selected_pages(16, 1000) == 63
    assert load_config({"sparsekv": {"method": "QUEST", "token_budget": 64}}).method == "quest"


@pytest.mark.parametrize(
    "bad, field, allowed",
    [
        ({"method": "nope"}, "sparsekv.method", "allowed: full, "),  # the registry lists every method
        ({"method": "hash", "hash_bits": 48}, "sparsekv.hash_bits", "multiple of 32"),
        ({"hash_page_reduce": "mean"}, "sparsekv.hash_page_reduce", "'max' or 'sum'"),
        ({"token_budget": 0}, "sparsekv.token_budget", "positive"),
        ({"budget_fraction": 1.5}, "sparsekv.budget_fraction", "(0, 1]"),
        ({"sink_tokens": -1}, "sparsekv.sink_tokens", ">= 0"),
        ({"dense_layers": [-2]}, "sparsekv.dense_layers", ">= 0"),
        ({"token_budgets": 5}, "sparsekv.token_budgets", "allowed fields: method, token_budget"),
        ({"token_budget": 8, "budget_fraction": 0.5}, "sparsekv", "token_budget or budget_fraction"),
        ({"min_context": "many"}, "sparsekv.min_context", "integer"),
    ],
)
def test_bad_fields_are_named(bad, field, allowed):
    with pytest.raises(SparseKVConfigError) as e:
        load_config({"sparsekv": bad})
    assert field in str(e.value) and allowed in str(e.value)


def test_env_var_json_and_path(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, json.dumps({"token_budget": 512}))
    assert load_config({}).token_budget == 512
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps({"budget_fraction": 0.25}))
    monkeypatch.setenv(ENV_VAR, str(p))
    assert load_config(None).budget_fraction == 0.25
    # both sources: fine when equal, an error naming both when they differ
    assert load_config({"sparsekv": {"budget_fraction": 0.25}}).budget_fraction == 0.25
    with pytest.raises(SparseKVConfigError, match=ENV_VAR):
        load_config({"sparsekv": {"budget_fraction": 0.5}})
    monkeypatch.setenv(ENV_VAR, "{not json")
    with pytest.raises(SparseKVConfigError, match="not valid JSON"):
        load_config({})


def test_frozen():
    with pytest.raises(Exception):
        SparseKVConfig().token_budget = 3
