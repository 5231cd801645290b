"""The offline sweep driver on a tiny random Llama: one dense prefill shared by all runs, the
hook's dense path equals HF generation, a budget covering every page equals dense (IoU 1), and a
small budget selects fewer pages with IoU in [0, 1]."""

import pytest
import torch

pytest.importorskip("transformers")

from vllm_sparsekv.config import SparseKVConfig  # noqa: E402
from sparsekv_eval import sweep  # noqa: E402


def _prompt(n=300):
    g = torch.Generator().manual_seed(1)
    return torch.randint(5, 500, (n,), generator=g).tolist()


def test_dense_hook_matches_hf_generate(tiny_model):
    ids = _prompt()
    ref = tiny_model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    sweep.use_hook(tiny_model)
    try:
        res = sweep.sweep_prompt(tiny_model, ids, [sweep.RunConfig("dense")], max_new_tokens=8)
    finally:
        tiny_model.config._attn_implementation = "sdpa"
    assert res["dense"]["ids"] == ref


def test_sweep_shares_one_prefill_and_full_budget_is_dense(tiny_model):
    sweep.use_hook(tiny_model)
    try:
        runs = [sweep.RunConfig("dense"),
                sweep.RunConfig("quest-all", SparseKVConfig(method="quest", token_budget=4096, dense_layers=[])),
                sweep.RunConfig("full", SparseKVConfig(method="full", dense_layers=[])),
                sweep.RunConfig("quest-f0.125", SparseKVConfig(method="quest", budget_fraction=0.125,
                                                               sink_tokens=16, recent_tokens=16, dense_layers=[0]))]
        before = sweep.prefill_count()
        res = sweep.sweep_prompt(tiny_model, _prompt(), runs, max_new_tokens=6, collect_iou=True)
        assert sweep.prefill_count() - before == 1  # one dense prefill for all four runs
    finally:
        tiny_model.config._attn_implementation = "sdpa"
    assert res["quest-all"]["ids"] == res["dense"]["ids"] == res["full"]["ids"]
    assert res["quest-all"]["iou"]["iou_mean"] == pytest.approx(1.0)
    assert res["quest-all"]["attended_fraction"] == pytest.approx(1.0)
    small = res["quest-f0.125"]
    assert small["iou"]["steps"] == 5 and set(small["iou"]["iou_per_layer_head"]) == {"1", "2"}
    assert 0.0 <= small["iou"]["iou_mean"] <= 1.0
    # 300 tokens = 19 pages; budget ceil(19/8) = 3 pages, 1 sink + 1 recent forced -> 3 of 19
    assert small["attended_fraction"] == pytest.approx(3 / 19, abs=0.02)
    assert small["iou"]["recall_mean"] <= small["iou"]["oracle_recall_mean"] + 1e-6


def test_decode_perplexity(tiny_model):
    sweep.use_hook(tiny_model)
    try:
        runs = [sweep.RunConfig("dense"),
                sweep.RunConfig("quest-all", SparseKVConfig(method="quest", token_budget=4096, dense_layers=[])),
                sweep.RunConfig("quest-b32", SparseKVConfig(method="quest", token_budget=32, sink_tokens=16,
                                                            recent_tokens=16, dense_layers=[]))]
        r = sweep.decode_perplexity(tiny_model, _prompt(200), 10, runs)
    finally:
        tiny_model.config._attn_implementation = "sdpa"
    assert r["dense"]["tokens"] == 10
    assert r["quest-all"]["ppl"] == pytest.approx(r["dense"]["ppl"], rel=1e-4)
    assert r["quest-b32"]["attended_fraction"] < 0.3


def test_rows_from_records():
    runs = sweep.make_configs(["quest"], [0.125], [256])
    recs = [{"task": "vt", "target_length": 2048, "runs": {
        "dense": {"score": 1.0, "iou": None}, "quest-f0.125": {"score": 0.5, "iou": {"iou_mean": 0.4, "recall_mean": 0.9}},
        "quest-b256": {"score": 1.0, "iou": None}}}] * 2
    rows = sweep.rows_from_records(recs, runs, "tiny")
    r = next(x for x in rows if x["task"] == "vt" and x.get("budget_fraction") == 0.125)
    assert r["score"] == 50.0 and r["dense_score"] == 100.0 and r["n"] == 2 and r["iou"] == pytest.approx(0.4)
    assert any(x["task"] == "average" and x.get("token_budget") == 256 for x in rows)
