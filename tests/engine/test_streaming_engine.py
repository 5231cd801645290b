"""StreamingLLM (`streaming`) and per-head budgets (`budget_allocation`) in the real engine on CPU
(SmolLM2-135M-Instruct, float32): it runs, it reads fewer pages, and a budget above the context is
the dense model token for token."""

import os

import pytest

from tests.engine.harness import assert_same_greedy, run_engine
from sparsekv_eval.passkey import SHORT, passkey_prompt

pytestmark = pytest.mark.engine

PROFILE = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results", "head_scores_smollm2.json")


@pytest.fixture(scope="module")
def prompts(smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    return [SHORT[0], passkey_prompt(tok, 1000, "31415", 0.5)]


@pytest.fixture(scope="module")
def stock(smollm2_path, prompts):
    return run_engine({"model": smollm2_path, "backend": "stock", "prompts": prompts, "max_tokens": 8,
                       "max_model_len": 1280})


def test_streaming_budget_above_context_is_dense(smollm2_path, prompts, stock):
    got = run_engine({"model": smollm2_path, "backend": "sparsekv", "prompts": prompts, "max_tokens": 8,
                      "max_model_len": 1280,
                      "sparsekv": {"method": "streaming", "token_budget": 2048, "dense_layers": []}})
    assert got["backends"] == ["SparseKVBackend"]
    s = got["stats"]
    assert s["held_pages"] > 0 and s["attended_pages"] == s["held_pages"]
    assert_same_greedy(stock, got, "streaming, budget above the context")


def test_streaming_small_budget_reads_sinks_and_window(smollm2_path, prompts):
    got = run_engine({"model": smollm2_path, "backend": "sparsekv", "prompts": prompts, "max_tokens": 8,
                      "max_model_len": 1280, "block_size": 32,
                      "sparsekv": {"method": "streaming", "token_budget": 256, "sink_tokens": 32, "recent_tokens": 32}})
    s = got["stats"]
    # the ~1000-token prompt holds 32 pages of 32; 8 are read (1 sink + 7 latest), the short one reads all
    assert 0 < s["attended_pages"] < 0.4 * s["held_pages"], s
    assert all(r["token_ids"] for r in got["results"])


@pytest.mark.skipif(not os.path.exists(PROFILE), reason="no committed SmolLM2 head profile")
def test_infscore_budgets_run_in_the_engine(smollm2_path, prompts):
    got = run_engine({"model": smollm2_path, "backend": "sparsekv", "prompts": prompts, "max_tokens": 8,
                      "max_model_len": 1280,
                      "sparsekv": {"method": "quest", "token_budget": 256, "sink_tokens": 32, "recent_tokens": 32,
                                   "budget_allocation": "infscore", "head_budgets": os.path.abspath(PROFILE)}})
    s = got["stats"]
    assert 0 < s["attended_pages"] < 0.5 * s["held_pages"], s
    assert all(r["token_ids"] for r in got["results"])
