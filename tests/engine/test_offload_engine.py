"""The passive store inside vLLM (SmolLM2, greedy; CPU float32, or CUDA fp16 with FULL decode graphs
and 32-token pages, as on CPU): in a small KV space more
requests decode at once with offload on, the answers stay token for token those of sparsekv without
offload, and abort, preemption, prefix-cache hits on freed blocks, a full host pool and recalls
lose no request and leak no block or slot."""

import os

import pytest

from sparsekv_eval.passkey import passkey_prompt
from tests.engine.harness import ON_CUDA, run_engine

pytestmark = pytest.mark.engine

LIFECYCLE = os.path.join(os.path.dirname(__file__), "offload_lifecycle.py")
SPAWNED = os.path.join(os.path.dirname(__file__), "offload_spawned.py")
# six ~300-token prompts = 10 of sparsekv's 32-token CPU pages each, in a KV space of 24 blocks:
# without offload two requests fit at once
SPARSE = {"method": "quest", "token_budget": 192, "sink_tokens": 32, "recent_tokens": 32, "dense_layers": []}
ENGINE = {"max_tokens": 16, "num_blocks": 24, "max_model_len": 448, "block_size": 32}
# SmolLM2: one page of every layer (30 layers, 3 KV heads, 64-dim K and V, fp32 on CPU, fp16 on CUDA)
PAGE_BYTES = 30 * 3 * 32 * 2 * 64 * (2 if ON_CUDA else 4)
# the spawned/in-process offload scripts: vLLM's async scheduling is refused with the passive store
LLM_KW = {"block_size": 32, "async_scheduling": False} if ON_CUDA else {}


def offload(slots: int, **extra) -> dict:
    return {**SPARSE, "offload": {"enabled": True, "cpu_bytes": slots * PAGE_BYTES, "resident_fraction": 0.25,
                                  **extra}}


@pytest.fixture(scope="module")
def prompts(smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    keys = (("31415", .3), ("27182", .6), ("16180", .5), ("14142", .2), ("17320", .8), ("22360", .4))
    return [passkey_prompt(tok, 300, key, depth) for key, depth in keys]


@pytest.fixture(scope="module")
def without_offload(smollm2_path, prompts):
    return run_engine({"model": smollm2_path, "backend": "sparsekv", "sparsekv": SPARSE, "prompts": prompts,
                       **ENGINE})


def test_offload_runs_more_requests_at_once_with_the_same_answers(smollm2_path, prompts, without_offload):
    # with the engine core and the worker in processes of their own, as `vllm serve` runs them: the
    # plugin's connector reaches both through the pickled config
    got = run_engine({"model": smollm2_path, "sparsekv": offload(slots=200), "prompts": prompts, **ENGINE,
                      "llm": LLM_KW}, script=SPAWNED)
    off, on = without_offload["stats"], got["stats"]
    assert on["pid"] != got["pid"]  # counted in the worker's own process
    assert on["offloaded_pages"] > 0 and "offloaded_pages" not in off
    assert not on.get("offload_pool_full_pages")
    # decode rows of one step: what the KV space allows at once (vLLM admits a request only when
    # its whole prompt fits), 2 without offload here
    assert on["max_decode_rows"] >= off["max_decode_rows"] + 2, (on, off)
    for i, (a, b) in enumerate(zip(without_offload["results"], got["results"])):
        assert b["token_ids"] == a["token_ids"], f"prompt {i}: {b['token_ids']} vs {a['token_ids']} ({a['text']!r})"


def test_abort_preemption_prefix_hits_and_a_full_pool_lose_no_request(smollm2_path, prompts, without_offload):
    """With `read_back: recall` (a page read from the host at 2 of the last 4 steps goes back into a
    block), so that promoted blocks too must come back at finish, abort and preemption."""
    got = run_engine({"model": smollm2_path, "prompts": prompts, "first_max_tokens": 32, **ENGINE,
                      "sparsekv": offload(slots=12, read_back="recall", recall_k=2, recall_window=4),
                      "llm": LLM_KW}, script=LIFECYCLE)
    s = got["stats"]
    assert s["recalled_pages"] > 0 and s["host_page_reads"] > 0  # both read paths ran
    assert got["aborted"] == ["1"]  # aborted while it held passive pages
    assert got["passive_at_preemption"] > 0 and s["preempted_with_passive_pages"] >= 1
    assert s["offload_pool_full_pages"] > 0  # the pool filled; those pages stayed in the KV cache
    assert got["prefix_hits_on_offloaded_blocks"] > 0  # freed blocks kept their bytes for prefix hits
    results = got["results"]
    assert sorted(results) == ["0", "2", "3", "4", "5"]
    assert results["0"]["preemptions"] >= 1
    for rid in ("0", "2", "3", "4", "5"):
        want = without_offload["results"][int(rid)]["token_ids"]
        assert results[rid]["token_ids"][: len(want)] == want, f"request {rid}"
    # nothing held after the last request: every slot back, every block back in vLLM's pool
    assert got["held_slots"] == 0 and got["scheduler_passive"] == {} and got["worker_passive"] == {}
    assert got["free_blocks"] == got["num_blocks"] - 1  # all but the null block

