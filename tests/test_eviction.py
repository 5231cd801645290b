"""`evicted_pages` and `final_eviction`: with a fixed token budget, the pages an eviction method
(SnapKV, PyramidKV, H2O, StreamingLLM) leaves out at one decode step are never selected again,
so freeing or offloading them is safe; fraction budgets and scoring methods make no such promise."""

import pytest
import torch

from vllm_sparsekv import kernels
from vllm_sparsekv.config import SparseKVConfig
from vllm_sparsekv.methods import available, get_method
from vllm_sparsekv.methods.base import LayerGeometry, evicted_pages

EVICTING = ["snapkv", "pyramidkv", "h2o", "streaming"]


def test_evicted_pages_is_the_complement_of_the_selection():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    n, h, P = 3, 2, 20
    num_pages = torch.randint(1, P + 1, (n,), generator=gen)
    page_idx = torch.full((n, h, 8), -1, dtype=torch.int32)
    want = torch.zeros(n, h, P, dtype=torch.bool)
    for i in range(n):
        want[i, :, : num_pages[i]] = True
        for j in range(h):
            k = int(torch.randint(0, min(8, int(num_pages[i])) + 1, (1,), generator=gen))
            sel = torch.randperm(int(num_pages[i]), generator=gen)[:k]
            page_idx[i, j, :k] = sel.to(torch.int32)
            want[i, j, sel] = False
    assert torch.equal(evicted_pages(page_idx, num_pages, P), want)


def test_final_eviction_needs_an_evicting_method_and_a_token_budget():
    for m in available():
        cls = get_method(m)
        assert cls.final_eviction(SparseKVConfig(method=m, budget_fraction=0.1)) is False
        assert cls.final_eviction(SparseKVConfig(method=m, token_budget=256)) is (m in EVICTING), m


@pytest.mark.parametrize("method", EVICTING)
def test_left_out_pages_never_come_back(method):
    """Prefill, then 150 decode steps one token at a time, through the selector and the shared
    top-k exactly as the backend runs them; the evicted set only grows."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    bs, hkv, g, d, L0, steps = 16, 2, 3, 32, 320, 150
    cfg = SparseKVConfig(method=method, token_budget=96, sink_tokens=16, recent_tokens=32)
    assert get_method(method).final_eviction(cfg)
    sel = get_method(method)(cfg, LayerGeometry(g * hkv, hkv, d, bs, layer=5))
    nblk = -(-(L0 + steps) // bs) + 1
    sel.allocate(nblk, torch.float32, torch.device("cpu"))
    row = torch.randperm(nblk, generator=gen).to(torch.int32)
    cache = torch.randn(nblk, bs, hkv, d, generator=gen)
    slot = lambda pos: (row[pos // bs].long() * bs + pos % bs)  # noqa: E731
    sel.on_kv_write(None, cache, slot(torch.arange(L0)))
    if sel.needs_prefill_queries:
        sel.observe_prefill(torch.randn(L0, g * hkv, d, generator=gen), cache, row, L0, d ** -0.5)
    gone = None
    for t in range(steps):
        L = L0 + t + 1
        sel.on_kv_write(None, cache, slot(torch.tensor([L - 1])))
        P = -(-L // bs)
        q = torch.randn(1, g * hkv, d, generator=gen)
        scores = sel.score_pages(q, cache, row[None], torch.tensor([L], dtype=torch.int32), P)
        budget = torch.full((1, hkv), 96 // bs, dtype=torch.int32)
        page_idx, _ = kernels.select_pages_ref(scores, torch.tensor([L], dtype=torch.int32), bs, budget,
                                               cfg.sink_pages(bs), cfg.recent_pages(bs), P)
        now = evicted_pages(page_idx, torch.tensor([P]), P)
        assert now.sum() >= P * hkv - 96 // bs * hkv  # at most the budget is kept
        if gone is not None:
            back = gone & ~now[..., : gone.shape[-1]]
            assert not back.any(), f"step {t}: evicted pages selected again: {back.nonzero().tolist()}"
        gone = now


def test_scoring_methods_bring_pages_back():
    """Quest re-scores every step: a page left out once can be selected later (no final_eviction)."""
    assert not get_method("quest").final_eviction(SparseKVConfig(method="quest", token_budget=96))
