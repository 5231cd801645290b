"""Sliding-window perplexity (callable and endpoint) and IoU functions, against hand values."""

import math

import pytest
import torch
from fake_server import FakeServer, fake_logprob

from sparsekv_eval import iou as I
from sparsekv_eval import ppl


def test_sliding_windows_score_every_token_once():
    w = ppl.sliding_windows(10, 4, 2)
    assert w == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    scored = [p for b, e, f in w for p in range(f, e)]
    assert scored == list(range(1, 10))
    assert ppl.sliding_windows(3, 8, 8) == [(0, 3, 1)]
    with pytest.raises(ValueError):
        ppl.sliding_windows(10, 4, 5)


def test_ppl_with_callable_hand_value():
    ids = list(range(20))
    expected_nll = sum(-fake_logprob(t) for t in ids[1:])

    def lp(window):
        return [None] + [fake_logprob(t) for t in window[1:]]

    r = ppl.sliding_window_ppl(ids, lp, window=8, stride=4)
    assert r["tokens"] == 19 and r["nll"] == pytest.approx(expected_nll)
    assert r["ppl"] == pytest.approx(math.exp(expected_nll / 19))
    # context-dependent model: window start matters, so the stride changes the value
    assert ppl.perplexity_from_logprobs([-1.0, -1.0]) == pytest.approx(math.e)


def test_ppl_through_endpoint_echo_logprobs():
    ids = [5, 9, 2, 7, 7, 1, 3, 8, 4, 6, 0, 11]
    expected = sum(-fake_logprob(t) for t in ids[1:])
    with FakeServer() as srv:
        r = ppl.endpoint_ppl(srv.url, "fake", ids, window=5, stride=3)
        assert all(b["echo"] is True and b["max_tokens"] == 1 for _, b in srv.requests)
    assert r["tokens"] == len(ids) - 1 and r["nll"] == pytest.approx(expected)


def test_masks_and_iou():
    m = I.indices_to_mask(torch.tensor([[0, 2, -1], [3, 3, 1]]), 4)
    assert m.tolist() == [[True, False, True, False], [False, True, False, True]]
    a = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert I.iou(a, b).tolist() == pytest.approx([1 / 3, 1.0])


def test_topk_mask_ties_and_forced():
    s = torch.tensor([[0.5, 0.9, 0.5, 0.1, 0.5]])
    assert I.topk_mask(s, 2).tolist() == [[True, True, False, False, False]]  # tie -> lower index
    f = torch.tensor([False, False, False, False, True])
    assert I.topk_mask(s, 2, f).tolist() == [[False, True, False, False, True]]
    assert I.topk_mask(torch.tensor([[1.0, float("-inf")]]), 2).tolist() == [[True, False]]


def test_exact_attention_and_oracle_pages():
    torch.manual_seed(0)
    L, hkv, g, d, ps = 40, 2, 3, 16, 8
    q = torch.randn(hkv * g, d)
    k = torch.randn(L, hkv, d)
    a = I.exact_attention(q, k)
    assert a.shape == (6, L) and torch.allclose(a.sum(-1), torch.ones(6))
    ref = torch.softmax((q[0] @ k[:, 0].T) / 4.0, -1)  # head 0 belongs to KV head 0
    assert torch.allclose(a[0], ref, atol=1e-6)
    pm = I.page_mass(I.group_attention(a, hkv), ps)
    assert pm.shape == (hkv, 5) and torch.allclose(pm.sum(-1), torch.full((hkv,), 3.0))
    orc = I.oracle_pages(a, hkv, ps, budget_pages=2)
    for h in range(hkv):
        assert set(torch.nonzero(orc[h]).flatten().tolist()) == set(pm[h].topk(2).indices.tolist())
    # the oracle selection scored as a method: IoU 1, recall = oracle recall
    idx = torch.stack([torch.nonzero(orc[h]).flatten() for h in range(hkv)])
    r = I.page_iou(idx, a, ps)
    assert torch.allclose(r["iou"], torch.ones(hkv)) and torch.allclose(r["recall"], r["oracle_recall"])
    # a disjoint selection of the same size: IoU 0 and less attention mass
    worst = torch.stack([pm[h].topk(2, largest=False).indices for h in range(hkv)])
    r2 = I.page_iou(worst, a, ps)
    assert torch.all(r2["iou"] == 0) and torch.all(r2["recall"] < r2["oracle_recall"])


def test_oracle_agrees_with_backend_selection():
    """The oracle uses the same top-k rule as the backend's select_pages (given the same scores)."""
    from vllm_sparsekv import kernels

    torch.manual_seed(1)
    L, hkv, g, d, ps = 100, 2, 2, 8, 16
    a = I.exact_attention(torch.randn(hkv * g, d), torch.randn(L, hkv, d))
    pm = I.page_mass(I.group_attention(a, hkv), ps)
    P = pm.shape[-1]
    idx, n = kernels.select_pages(pm[None].float(), torch.tensor([L], dtype=torch.int32), ps,
                                  torch.full((1, hkv), 3, dtype=torch.int32), 1, 1, P)
    sel = I.indices_to_mask(idx[0], P)
    orc = I.oracle_pages(a, hkv, ps, 3, sink_pages=1, recent_pages=1)
    assert torch.equal(sel, orc)


def test_summarize():
    x = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    s = I.summarize(x)
    assert s["mean"] == pytest.approx(0.5) and s["min"] == 0.0 and s["per_layer"] == [0.5, 0.5]
