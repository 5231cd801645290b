"""Per-(layer, KV head) budget multipliers (budgets.py): hand-checked small cases."""

import json
import os

import pytest
import torch
from pydantic import ValidationError

from vllm_sparsekv import budgets
from vllm_sparsekv.budgets import HeadBudgetsError
from vllm_sparsekv.config import SparseKVConfig

PROFILE = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "head_scores_smollm2.json")


def _profile(tmp_path, layers, heads, inf, retr=None, name="p.json"):
    p = tmp_path / name
    p.write_text(json.dumps({"model": "tiny", "num_layers": layers, "num_kv_heads": heads,
                             "scores": {"infscore": inf, "headkv_retrieval": retr if retr is not None else inf}}))
    return str(p)


def test_headkv_hand_checked():
    # s = [.25, .75]; beta 2: w = (1 - 1/2) + 2 * s / 2
    w = budgets.headkv(torch.tensor([1.0, 3.0]), beta=2.0)
    torch.testing.assert_close(w, torch.tensor([0.75, 1.25], dtype=torch.float64))
    # temp 2: s^2 = [1/16, 9/16] -> [.1, .9]
    w = budgets.headkv(torch.tensor([1.0, 3.0]), beta=2.0, temp=2.0)
    torch.testing.assert_close(w, torch.tensor([0.6, 1.4], dtype=torch.float64))
    # beta 1: all of the budget follows the scores
    torch.testing.assert_close(budgets.headkv(torch.tensor([1.0, 3.0]), beta=1.0),
                               torch.tensor([0.5, 1.5], dtype=torch.float64))


def test_infscore_collaborative_hand_checked():
    S = torch.tensor([[1.0, 3.0], [1.0, 1.0]])
    # eps 0: layer aggregates [4, 2] times in-layer shares = S / 6; w = .5 + 4 * share / 2
    w = budgets.infscore(S, beta=2.0, layer_eps=0.0)
    torch.testing.assert_close(w, torch.tensor([[5 / 6, 1.5], [5 / 6, 5 / 6]], dtype=torch.float64))
    # eps 1: layer shares (4 + 1, 2 + 1) -> [[1.25, 3.75], [1.5, 1.5]] / 8; the weaker layer gains
    w = budgets.infscore(S, beta=2.0, layer_eps=1.0)
    torch.testing.assert_close(w, torch.tensor([[0.8125, 1.4375], [0.875, 0.875]], dtype=torch.float64))
    assert abs(float(w.mean()) - 1) < 1e-12
    # a layer whose heads all score 0 gets only the eps share, spread evenly
    w = budgets.infscore(torch.tensor([[2.0, 2.0], [0.0, 0.0]]), beta=2.0, layer_eps=1.0)
    torch.testing.assert_close(w[1], torch.tensor([2 / 3, 2 / 3], dtype=torch.float64))  # .5 + 2 * (.5 / 6)


def test_floor_keeps_the_total():
    w = budgets.apply_floor(torch.tensor([0.2, 1.0, 1.8]), 0.5)
    torch.testing.assert_close(w, torch.tensor([0.5, 1 - 0.5 / 6, 1 + 0.5 / 6 + 0.5], dtype=torch.float64))
    assert abs(float(w.mean()) - 1) < 1e-12
    assert budgets.apply_floor(torch.tensor([0.2, 1.8]), 1.5).tolist() == [1.0, 1.0]


def test_integer_pages_exact_total():
    assert budgets.integer_pages(torch.tensor([0.75, 1.25]), 3).tolist() == [2.0, 4.0]
    p = budgets.integer_pages(torch.tensor([1 / 3, 1 / 3, 7 / 3]), 4, min_pages=1)
    assert p.sum() == 12 and (p >= 1).all()


def test_layer_head_weights_from_profile(tmp_path):
    inf = [[0.9, 0.9], [0.0, 0.8], [0.1, 0.2], [0.05, 0.0]]
    path = _profile(tmp_path, 4, 2, inf)
    for kind in ("infscore", "headkv"):
        cfg = SparseKVConfig(budget_allocation=kind, head_budgets=path, dense_layers=[0], token_budget=256,
                             sink_tokens=32, recent_tokens=32, budget_beta=1.5)
        w = budgets.layer_head_weights(cfg, 4, 2, block_size=32)
        assert w[0].tolist() == [1.0, 1.0]  # dense layer
        pages = w[1:] * 8  # B = 8 pages; the backend's round(B * w) is then exact
        assert torch.allclose(pages, pages.round(), atol=1e-5)
        assert int(pages.round().sum()) == 8 * 6  # the total budget, exactly
        assert bool((pages.round() >= 2).all())  # sink + recent pages
        assert float(w[1, 1]) > float(w[3, 0])  # follows the scores
        w2 = budgets.layer_head_weights(cfg, 4, 2)  # no block size: float multipliers, mean 1
        assert abs(float(w2[1:].double().mean()) - 1) < 1e-6
        assert float(w2[1:].min()) >= 64 / 256 - 1e-6


def test_uniform_and_pyramid_unchanged():
    cfg = SparseKVConfig(dense_layers=[0, 1])
    assert bool((budgets.layer_head_weights(cfg, 6, 3) == 1).all())
    w = budgets.layer_head_weights(SparseKVConfig(budget_allocation="pyramid", dense_layers=[0]), 5, 2)
    assert abs(float(w[1:].mean()) - 1) < 1e-6 and float(w[1, 0]) > float(w[4, 0])


def test_profile_errors(tmp_path):
    path = _profile(tmp_path, 4, 2, [[1, 1]] * 4)
    cfg = SparseKVConfig(budget_allocation="infscore", head_budgets=path, dense_layers=[])
    with pytest.raises(HeadBudgetsError, match=r"head_budgets.*4 layers x 2 KV heads.*30 layers x 3 KV heads"):
        budgets.layer_head_weights(cfg, 30, 3)
    with pytest.raises(HeadBudgetsError, match="head_budgets"):
        budgets.check_profile(cfg, 4, 3)
    zero = _profile(tmp_path, 2, 1, [[0.0], [0.0]], name="z.json")
    with pytest.raises(HeadBudgetsError, match="score is 0"):
        budgets.layer_head_weights(SparseKVConfig(budget_allocation="headkv", head_budgets=zero, dense_layers=[]), 2, 1)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(HeadBudgetsError, match="not a readable JSON"):
        budgets.load_head_scores(str(bad), 2, 1, "infscore")
    with pytest.raises(HeadBudgetsError, match="head_budgets: required"):
        budgets.load_head_scores(None, 2, 1, "infscore")


def test_config_names_head_budgets(tmp_path):
    with pytest.raises(ValidationError, match="head_budgets"):
        SparseKVConfig(budget_allocation="infscore")
    with pytest.raises(ValidationError, match="file not found"):
        SparseKVConfig(budget_allocation="headkv", head_budgets=str(tmp_path / "missing.json"))
    with pytest.raises(ValidationError, match="budget_beta"):
        SparseKVConfig(budget_beta=0.9)
    with pytest.raises(ValidationError, match="budget_temp"):
        SparseKVConfig(budget_temp=0)


@pytest.mark.skipif(not os.path.exists(PROFILE), reason="no committed SmolLM2 profile")
def test_committed_smollm2_profile_allocates():
    for kind in ("infscore", "headkv"):
        cfg = SparseKVConfig(budget_allocation=kind, head_budgets=PROFILE, token_budget=256,
                             sink_tokens=32, recent_tokens=32)
        w = budgets.layer_head_weights(cfg, 30, 3, block_size=32)
        assert abs(float(w[2:].double().mean()) - 1) < 1e-6 and float(w[2:].min()) >= 0.25 - 1e-6


class _Model:
    use_mla = False
    is_encoder_decoder = False

    def __init__(self, layers, kv_heads):
        self.layers, self.kv_heads = layers, kv_heads

    def get_sliding_window(self):
        return None

    def get_total_num_hidden_layers(self):
        return self.layers

    def get_total_num_kv_heads(self):
        return self.kv_heads

    def get_head_size(self):
        return 64


def test_startup_validation_names_the_mismatch(tmp_path):
    from types import SimpleNamespace

    from vllm_sparsekv.config import SparseKVConfigError
    from vllm_sparsekv.validate import validate_engine_config

    path = _profile(tmp_path, 4, 2, [[1, 2]] * 4)
    sk = {"method": "quest", "budget_allocation": "headkv", "head_budgets": path}

    def vc(layers, heads):
        return SimpleNamespace(additional_config={"sparsekv": sk}, model_config=_Model(layers, heads),
                               cache_config=None, parallel_config=SimpleNamespace(tensor_parallel_size=1),
                               kv_transfer_config=None)

    validate_engine_config(vc(4, 2))
    with pytest.raises(SparseKVConfigError, match=r"head_budgets.*4 layers x 2 KV heads.*30 layers x 3 KV heads"):
        validate_engine_config(vc(30, 3))


# ---------------------------------------------------------------------------- the profiler's metrics


def test_head_metrics_hand_checked():
    from vllm_sparsekv.tools.profile_heads import head_metrics

    attn = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.05, 0.1]])  # needle = positions 1, 2; top-2 = 1, 3
    m = head_metrics(attn, (1, 3), top_k=2)
    expect = {"diligent": 0.4, "distracted": 0.3, "subconscious": 0.1, "diffuse": 0.2, "diliscore": 4 / 7,
              "lazyscore": 0.8, "infscore": 2 / 3, "headkv_retrieval": 0.4, "topk_in_needle": 1.0}
    for k, v in expect.items():
        assert abs(float(m[k]) - v) < 1e-6, (k, float(m[k]), v)


def test_captured_attention_rows_equal_eager_attention():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    from vllm_sparsekv.tools.profile_heads import _register, attention_rows, to_kv_heads

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    eager = LlamaForCausalLM(cfg).eval()
    eager.config._attn_implementation = "eager"
    ids = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        ref = eager(ids, output_attentions=True).attentions  # per layer [1, Hq, T, T]
    _register(eager)
    rows = [30, 35, 39]
    got = attention_rows(eager, ids[0].tolist(), rows)
    for layer, a in enumerate(got):
        torch.testing.assert_close(a, ref[layer][0, :, rows, :].float(), rtol=1e-4, atol=1e-5)
    assert to_kv_heads(torch.tensor([[1.0, 3.0, 5.0, 7.0]]), 2).tolist() == [[2.0, 6.0]]


# ---------------------------------------------------------------------------- per-request pages


def _budget_rule(cfg, seq_len: int, bs: int, selects_all: bool) -> int:
    """The rules as written in the README / the issue, one request at a time in Python."""
    import math

    num_pages = math.ceil(seq_len / bs)
    if selects_all:
        return num_pages
    if cfg.token_budget is not None:
        budget = math.ceil(cfg.token_budget / bs)
    else:
        budget = math.ceil(num_pages * cfg.budget_fraction)
    if cfg.min_context and seq_len < cfg.min_context:
        budget = num_pages
    return budget


def test_request_budget_pages_matches_the_rules(seed_gen):
    g = seed_gen
    for _ in range(60):
        bs = [16, 32, 128][int(torch.randint(0, 3, (1,), generator=g))]
        n = int(torch.randint(1, 9, (1,), generator=g))
        seq_lens = torch.randint(1, 9000, (n,), generator=g, dtype=torch.int32)
        kw = {"min_context": int(torch.randint(0, 2, (1,), generator=g)) * int(torch.randint(1, 9000, (1,), generator=g))}
        if torch.rand((), generator=g) < 0.5:
            kw["token_budget"] = int(torch.randint(1, 5000, (1,), generator=g))
        else:
            kw["budget_fraction"] = round(float(torch.rand((), generator=g)) * 0.999 + 0.001, 4)
        method = ["quest", "full", "snapkv"][int(torch.randint(0, 3, (1,), generator=g))]
        cfg = SparseKVConfig(method=method, **kw)
        sel_all = method == "full"
        want = torch.tensor([_budget_rule(cfg, int(s), bs, sel_all) for s in seq_lens], dtype=torch.int32)
        got = budgets.request_budget_pages(cfg, seq_lens, bs)  # selects_all looked up from the method
        assert got.dtype == torch.int32 and torch.equal(got, want), (cfg, bs, seq_lens)
        assert torch.equal(budgets.request_budget_pages(cfg, seq_lens.long(), bs, sel_all), want)
        # into a persistent buffer: [N] and [N, H] (every head the same), no new tensor returned
        out = torch.full((n, 3), -7, dtype=torch.int32)
        assert budgets.request_budget_pages(cfg, seq_lens, bs, sel_all, out=out) is out
        assert torch.equal(out, want[:, None].expand(n, 3))
        flat = torch.empty(n, dtype=torch.int32)
        assert budgets.request_budget_pages(cfg, seq_lens, bs, sel_all, out=flat) is flat and torch.equal(flat, want)
        # the static k covers every request any context up to max_model_len could get
        k = budgets.max_selected_pages(cfg, bs, 9000)
        forced = cfg.sink_pages(bs) + cfg.recent_pages(bs)
        all_lens = torch.arange(1, 9001, dtype=torch.int32)
        need = torch.minimum(torch.maximum(budgets.request_budget_pages(cfg, all_lens, bs),
                                           torch.tensor(forced)), (all_lens + bs - 1) // bs)
        assert int(need.max()) <= k <= -(-9000 // bs)


def test_request_budget_pages_fraction_edge_is_python_ceil():
    # float64 like Python's math.ceil. In float32 (the builder's arithmetic before this function)
    # 100 pages * 0.07 gives 7 (float64: 7.000000000000001 -> 8) and 50 * 0.3 gives 16 (float64:
    # 15.0 -> 15), so the backend and the offline sweep disagreed on those budgets.
    for frac, pages, want in ((0.07, 100, 8), (0.3, 50, 15)):
        cfg = SparseKVConfig(budget_fraction=frac)
        got = budgets.request_budget_pages(cfg, torch.tensor([pages * 16 - 3]), 16).tolist()
        assert got == [want] == [_budget_rule(cfg, pages * 16 - 3, 16, False)], (frac, pages, got)
        assert int(torch.ceil(torch.tensor([pages], dtype=torch.float32) * frac)) != want  # float32 differs
