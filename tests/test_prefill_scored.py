"""SnapKV / H2O page scores from prefill attention, against float64 brute force."""

import pytest
import torch

from vllm_sparsekv.config import SparseKVConfig
from vllm_sparsekv.methods import get_method
from vllm_sparsekv.methods.base import LayerGeometry
from vllm_sparsekv.methods import prefill_scored
from vllm_sparsekv.methods.prefill_scored import window_attention


def paged(keys, bs, num_blocks, gen):
    """Scatter keys [L, H, D] into a random-permuted paged cache; return (cache, block_row)."""
    L, H, D = keys.shape
    npg = -(-L // bs)
    block_row = torch.randperm(num_blocks - 1, generator=gen)[:npg] + 1
    cache = torch.full((num_blocks, bs, H, D), float("nan"))
    pos = torch.arange(L)
    cache[block_row[pos // bs], pos % bs] = keys
    return cache, block_row


def brute(queries, keys, scale):
    """float64 causal attention of the last w queries, summed over queries: [Hq, L]."""
    w, hq, d = queries.shape
    L, hkv, _ = keys.shape
    g = hq // hkv
    out = torch.zeros(hq, L, dtype=torch.float64)
    for h in range(hq):
        for i in range(w):
            p = L - w + i
            logit = (keys[: p + 1, h // g].double() @ queries[i, h].double()) * scale
            out[h, : p + 1] += torch.softmax(logit, 0)
    return out


@pytest.mark.parametrize("g, d, bs, L, w", [(1, 64, 16, 70, 8), (3, 64, 32, 100, 32), (4, 128, 16, 33, 33)])
def test_window_attention_matches_brute_force(g, d, bs, L, w, monkeypatch):
    gen = torch.Generator().manual_seed(L + g)
    monkeypatch.setattr(prefill_scored, "KEY_CHUNK", 24)  # exercise the chunked side pass
    monkeypatch.setattr(prefill_scored, "QUERY_CHUNK", 5)
    hkv = 2
    keys = torch.randn(L, hkv, d, generator=gen)
    queries = torch.randn(w, hkv * g, d, generator=gen)
    cache, row = paged(keys, bs, 16, gen)
    got = window_attention(queries, cache, row, L, d ** -0.5)
    torch.testing.assert_close(got.double(), brute(queries, keys, d ** -0.5), rtol=1e-5, atol=1e-6)


def make(method, g=3, bs=16, **kw):
    geo = LayerGeometry(num_heads=2 * g, num_kv_heads=2, head_size=64, block_size=bs, layer=3)
    sel = get_method(method)(SparseKVConfig(method=method, **kw), geo)
    sel.allocate(16, torch.float32, torch.device("cpu"))
    return sel


def test_snapkv_scores_pages_by_window_mass_and_keeps_new_pages():
    gen = torch.Generator().manual_seed(0)
    L, bs, w = 90, 16, 8
    sel = make("snapkv", bs=bs, snapkv={"observation_window": w, "pooling_kernel": 1})
    keys = torch.randn(L, 2, 64, generator=gen)
    cache, row = paged(keys, bs, 16, gen)
    sel.on_kv_write(None, cache, (row[:, None] * bs + torch.arange(bs)).reshape(-1)[:L])
    queries = torch.randn(40, 6, 64, generator=gen)  # a chunk; only its last w are the window
    sel.observe_prefill(queries, cache, row, L, 0.125)
    per_tok = brute(queries[-w:], keys, 0.125).view(2, 3, L).sum(1)  # group sum per KV head
    want = torch.nn.functional.pad(per_tok, (0, 6 * bs - L)).view(2, 6, bs).sum(-1).T
    torch.testing.assert_close(sel.page_scores[row[:6]].double(), want, rtol=1e-5, atol=1e-6)
    # a page written after prefill (decode) is kept: +inf until a prefill scores it
    new_block = int(torch.tensor([b for b in range(1, 16) if b not in row.tolist()][0]))
    sel.on_kv_write(None, cache, torch.tensor([new_block * bs]))
    assert sel.page_scores[new_block].isinf().all()
    bt = torch.cat([row[:6], torch.tensor([new_block])])[None]
    scores = sel.score_pages(None, cache, bt, torch.tensor([L + 7 * bs - 6 * bs]), 9)
    assert scores[0, :, 6].isinf().all() and scores[0, :, 7:].eq(float("-inf")).all()


def test_h2o_accumulates_over_chunks_like_one_pass():
    gen = torch.Generator().manual_seed(1)
    L, bs = 64, 16
    keys = torch.randn(L, 2, 64, generator=gen)
    cache, row = paged(keys, bs, 16, gen)
    q = torch.randn(L, 6, 64, generator=gen)
    slots = (row[:, None] * bs + torch.arange(bs)).reshape(-1)[:L]
    one, two = make("h2o", bs=bs), make("h2o", bs=bs)
    for sel in (one, two):
        sel.on_kv_write(None, cache, slots)
    one.observe_prefill(q, cache, row, L, 0.1)
    two.observe_prefill(q[:40], cache, row, 40, 0.1)  # chunk 1: positions 0..39
    two.observe_prefill(q[40:], cache, row, L, 0.1)  # chunk 2: positions 40..63
    torch.testing.assert_close(one.page_scores, two.page_scores, rtol=1e-5, atol=1e-5)
    assert torch.allclose(one.page_scores[row].sum(0), torch.full((2,), 3.0 * L))  # every query's mass


def test_pyramidkv_is_snapkv_with_pyramid_budgets():
    cfg = SparseKVConfig(method="pyramidkv")
    assert cfg.budget_allocation == "pyramid"  # the method's default_allocation
    assert SparseKVConfig(method="pyramidkv", budget_allocation="uniform").budget_allocation == "uniform"
    assert SparseKVConfig(method="snapkv").budget_allocation == "uniform"
    assert issubclass(get_method("pyramidkv"), get_method("snapkv"))


def _h2o_selection(ratio, budget_tokens=None, fraction=None, L=400, bs=16):
    """Pages H2O attends for one request whose prefill attention favours early pages (a token at
    position i is summed over the L - i queries after it), through the shared top-k."""
    from vllm_sparsekv import kernels
    from vllm_sparsekv.budgets import request_budget_pages

    kw = {"token_budget": budget_tokens} if budget_tokens else {"budget_fraction": fraction}
    cfg = SparseKVConfig(method="h2o", sink_tokens=16, recent_tokens=16, h2o={"recent_ratio": ratio}, **kw)
    geo = LayerGeometry(num_heads=2, num_kv_heads=1, head_size=8, block_size=bs, layer=3)
    sel = get_method("h2o")(cfg, geo)
    P = -(-L // bs)
    sel.allocate(P + 1, torch.float32, torch.device("cpu"))
    sel.page_scores[:P] = torch.linspace(100.0, 1.0, P)[:, None]  # early pages heaviest
    seq = torch.tensor([L])
    scores = sel.score_pages(None, None, torch.arange(P)[None], seq, P)
    budget = request_budget_pages(cfg, seq, bs)
    idx, num = kernels.select_pages_ref(scores, seq, bs, budget[:, None], cfg.sink_pages(bs), cfg.recent_pages(bs), P)
    return sorted(idx[0, 0, : num[0, 0]].tolist()), int(budget[0]), P


@pytest.mark.parametrize("kw", [{"budget_tokens": 128}, {"fraction": 0.125}, {"budget_tokens": 256}])
def test_h2o_keeps_half_its_budget_for_the_most_recent_pages(kw):
    pages, B, P = _h2o_selection(0.5, **kw)
    window = -(-B // 2)
    assert len(pages) == B
    assert set(range(P - window, P)) <= set(pages), (pages, B)  # the recent half
    heavy = [p for p in pages if p < P - window]
    assert heavy == list(range(B - window)), pages  # the rest: the heaviest (earliest) pages, sink included


def test_h2o_recent_ratio_zero_is_heavy_hitters_plus_recent_tokens_only():
    pages, B, P = _h2o_selection(0.0, budget_tokens=128)
    assert pages == list(range(B - 1)) + [P - 1], pages  # one recent page (16 tokens); the question is lost


@pytest.mark.parametrize("keep_share", [0.0, 0.5, 1.0])
def test_snapquest_keeps_snapkv_top_share_and_ranks_the_rest_by_quest(keep_share):
    """The hybrid through the shared top-k: the selection = sink/recent pages, SnapKV's best
    floor(keep_share * (budget - forced)) other pages, then Quest's best for what is left (each
    checked against the two methods' own scores, every request and KV head)."""
    import random

    from vllm_sparsekv import kernels
    from vllm_sparsekv.budgets import request_budget_pages

    seed = random.randrange(1 << 30)
    print("seed", seed)
    gen = torch.Generator().manual_seed(seed)
    bs, D = 16, 64
    cfg = dict(budget_fraction=0.25, sink_tokens=16, recent_tokens=16)
    hyb = make("snapquest", bs=bs, snapquest={"keep_share": keep_share, "observation_window": 8, "pooling_kernel": 1},
               **cfg)
    quest = make("quest", bs=bs, **cfg)
    snap = make("snapkv", bs=bs, snapkv={"observation_window": 8, "pooling_kernel": 1}, **cfg)
    lens = [200, 150]
    cache = torch.randn(16, bs, 2, D, generator=gen)
    perm = torch.randperm(15, generator=gen) + 1
    # the two requests' blocks: the second shares eight of the first's (scored by its prefill), and
    # two of its own were never scored (SnapKV keeps such pages: +inf)
    rows = [perm[:13], torch.cat([perm[13:15], perm[:8]])]
    for sel in (hyb, quest, snap):
        for L, row in zip(lens, rows):
            slots = (row[:, None] * bs + torch.arange(bs)).reshape(-1)[:L]
            sel.on_kv_write(None, cache, slots)
    q_pre = torch.randn(8, 6, D, generator=gen)
    for sel in (hyb, snap):
        sel.observe_prefill(q_pre, cache, rows[0], lens[0], 0.125)
    seq = torch.tensor(lens)
    P = 13
    bt = torch.zeros(2, P, dtype=torch.long)
    bt[0, :13], bt[1, :10] = rows[0], rows[1]
    q = torch.randn(2, 6, D, generator=gen)
    got = hyb.score_pages(q, cache, bt, seq, P)
    want_q = quest.score_pages(q, cache, bt, seq, P)
    want_s = snap.score_pages(q, cache, bt, seq, P)
    config = SparseKVConfig(method="snapquest", **cfg)
    budget = request_budget_pages(config, seq, bs)
    idx, num = kernels.select_pages_ref(got, seq, bs, budget[:, None].expand(2, 2).contiguous(),
                                        config.sink_pages(bs), config.recent_pages(bs), P)
    for n in range(2):
        npg = -(-lens[n] // bs)
        forced = {0, npg - 1}
        others = [p for p in range(npg) if p not in forced]
        m = int(keep_share * (int(budget[n]) - len(forced)))
        for h in range(2):
            chosen = set(idx[n, h, : num[n, h]].tolist())
            by_snap = sorted(others, key=lambda p: (-float(want_s[n, h, p]), p))[:m]
            rest = [p for p in others if p not in by_snap]
            by_quest = sorted(rest, key=lambda p: (-float(want_q[n, h, p]), p))[: int(budget[n]) - len(forced) - m]
            assert chosen == forced | set(by_snap) | set(by_quest), (n, h, keep_share)
