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


def test_evicted_pages_is_the_complement_of_the_selection(seed_gen):
    gen = seed_gen
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


BS, HKV, G, D, L0, BUDGET = 16, 2, 3, 32, 320, 96


def _decode(method, gen, steps, query_at=None):
    """Prefill L0 tokens, then `steps` decode steps one token at a time, through the selector and
    the shared top-k exactly as the backend runs them. Returns the evicted mask of every step
    ([1, Hkv, P_t] bool) and the selector. `query_at(t, sel, cache, row)` gives step t's query
    (random by default)."""
    cfg = SparseKVConfig(method=method, token_budget=BUDGET, sink_tokens=16, recent_tokens=32)
    sel = get_method(method)(cfg, LayerGeometry(G * HKV, HKV, D, BS, layer=5))
    nblk = -(-(L0 + steps) // BS) + 1
    sel.allocate(nblk, torch.float32, torch.device("cpu"))
    row = torch.randperm(nblk, generator=gen).to(torch.int32)
    cache = torch.randn(nblk, BS, HKV, D, generator=gen)
    slot = lambda pos: (row[pos // BS].long() * BS + pos % BS)  # noqa: E731
    if query_at is not None:  # keys of page p point along a page direction: a query can pick a page
        dirs = torch.nn.functional.normalize(torch.randn(nblk, HKV, D, generator=gen), dim=-1)
        cache = 0.1 * cache + 4.0 * dirs[torch.arange(nblk)][:, None]  # logical page p lives in block row[p]
    keys = cache.view(-1, HKV, D)
    sel.on_kv_write(keys[slot(torch.arange(L0))], cache, slot(torch.arange(L0)))
    if sel.needs_prefill_queries:
        sel.observe_prefill(torch.randn(L0, G * HKV, D, generator=gen), cache, row, L0, D ** -0.5)
    evicted = []
    for t in range(steps):
        L = L0 + t + 1
        sel.on_kv_write(keys[slot(torch.tensor([L - 1]))], cache, slot(torch.tensor([L - 1])))
        P = -(-L // BS)
        q = torch.randn(1, G * HKV, D, generator=gen) if query_at is None else query_at(t, cache, row)
        scores = sel.score_pages(q, cache, row[None], torch.tensor([L], dtype=torch.int32), P)
        budget = torch.full((1, HKV), BUDGET // BS, dtype=torch.int32)
        page_idx, _ = kernels.select_pages_ref(scores, torch.tensor([L], dtype=torch.int32), BS, budget,
                                               cfg.sink_pages(BS), cfg.recent_pages(BS), P)
        now = evicted_pages(page_idx, torch.tensor([P]), P)
        assert int(now.sum()) == P * HKV - BUDGET // BS * HKV  # exactly the budget is kept
        evicted.append(now)
    return evicted


def _came_back(evicted) -> list[tuple[int, list]]:
    """(step, [[n, head, page], ...]) for every step that selected a page an earlier step left out."""
    out, gone = [], torch.zeros_like(evicted[0])
    for t, now in enumerate(evicted):
        w = now.shape[-1]
        back = gone[..., :w] & ~now if gone.shape[-1] >= w else gone & ~now[..., : gone.shape[-1]]
        if back.any():
            out.append((t, back.nonzero().tolist()))
        grown = torch.zeros_like(now)
        grown[..., : gone.shape[-1]] = gone[..., :w]
        gone = grown | now
    return out


@pytest.mark.parametrize("method", EVICTING)
def test_left_out_pages_never_come_back(method, seed_gen):
    """With a fixed token budget, the evicted set only grows over 150 decode steps."""
    assert get_method(method).final_eviction(SparseKVConfig(method=method, token_budget=BUDGET))
    back = _came_back(_decode(method, seed_gen, 150))
    assert not back, f"{method}: evicted pages selected again: {back[:3]}"


@pytest.mark.parametrize("method", ["quest", "hash"])
def test_scoring_methods_bring_pages_back(method, seed_gen):
    """Quest and hash re-score every step: each step's query points at another prompt page, which
    is then selected although an earlier step left it out. So they make no final_eviction promise."""
    assert not get_method(method).final_eviction(SparseKVConfig(method=method, token_budget=BUDGET))
    targets = [3, 9, 14, 6, 11]  # prompt pages, none of them sink or recent

    def query_at(t, cache, row):
        blk = int(row[targets[t % len(targets)]])
        q = cache[blk].mean(0)  # [Hkv, D]: the page's direction, per KV head
        return q.repeat_interleave(G, dim=0)[None]  # every query head of the group

    evicted = _decode(method, seed_gen, 10, query_at)
    back = _came_back(evicted)
    for t in range(len(targets), 10):  # every target was left out by some earlier step, then chosen again
        page = targets[t % len(targets)]
        assert not evicted[t][0, :, page].any(), f"step {t}: target page {page} not selected"
    assert back, "no page came back"
