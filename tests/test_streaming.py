"""StreamingLLM (`streaming`): sinks plus the most recent pages within the budget."""

import math

import torch

from vllm_sparsekv import kernels
from vllm_sparsekv.config import SparseKVConfig
from vllm_sparsekv.methods import available, get_method
from vllm_sparsekv.methods.base import LayerGeometry
from vllm_sparsekv.methods.streaming import position_scores


def _select(seq_lens, budget, bs=4, sink=1, recent=1, hkv=2, max_pages=8):
    cfg = SparseKVConfig(method="streaming", token_budget=budget * bs, sink_tokens=sink * bs, recent_tokens=recent * bs)
    sel = get_method("streaming")(cfg, LayerGeometry(4, hkv, 8, bs, 3))
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    scores = sel.score_pages(torch.randn(len(seq_lens), 4, 8), None, None, sl, max_pages)
    b = torch.full((len(seq_lens), hkv), budget, dtype=torch.int32)
    return kernels.select_pages_ref(scores, sl, bs, b, cfg.sink_pages(bs), cfg.recent_pages(bs), max_pages)


def test_registered():
    assert "streaming" in available()
    assert SparseKVConfig(method="Streaming").method == "streaming"


def test_position_scores_hand_checked():
    s = position_scores(torch.tensor([9, 4]), 4, 2, 4)  # 3 pages and 1 page of 4 tokens
    inf = float("-inf")
    assert s.shape == (2, 2, 4)
    assert s[0, 1].tolist() == [0.0, 1.0, 2.0, inf]
    assert s[1, 0].tolist() == [0.0, inf, inf, inf]


def test_keeps_sink_and_latest_pages():
    # 30 tokens = 8 pages of 4; budget 4 pages: sink page 0, then the 3 latest (5, 6, 7)
    idx, n = _select([30], budget=4)
    assert n.tolist() == [[4, 4]]
    assert idx[0, 0].tolist() == [0, 5, 6, 7, -1, -1, -1, -1]
    # two sink pages, budget 5: 0, 1 and the 3 latest; another request of 3 pages keeps all
    idx, n = _select([32, 10], budget=5, sink=2)
    assert idx[0, 1].tolist()[:5] == [0, 1, 5, 6, 7] and n[0].tolist() == [5, 5]
    assert idx[1, 0].tolist()[:3] == [0, 1, 2] and n[1].tolist() == [3, 3]


def test_budget_above_context_is_dense():
    idx, n = _select([30], budget=16)
    assert idx[0, 0].tolist() == list(range(8)) and n.tolist() == [[8, 8]]


def test_decode_equals_dense_reference_over_sink_and_window():
    torch.manual_seed(0)
    bs, hkv, g, d, L = 4, 2, 2, 8, 29  # 8 pages, the last one partly filled
    P = math.ceil(L / bs)
    k = torch.randn(P * bs, hkv, d, dtype=torch.float64)
    v = torch.randn(P * bs, hkv, d, dtype=torch.float64)
    q = torch.randn(1, hkv * g, d, dtype=torch.float64)
    idx, _ = _select([L], budget=3, bs=bs, sink=1, recent=1, hkv=hkv, max_pages=P)
    out = kernels.sparse_paged_decode_ref(q.float(), k.view(P, bs, hkv, d).float(), v.view(P, bs, hkv, d).float(),
                                          torch.arange(P, dtype=torch.int32)[None], torch.tensor([L], dtype=torch.int32),
                                          idx, 1 / math.sqrt(d))
    keep = list(range(0, bs)) + list(range(6 * bs, L))  # sink page 0, latest pages 6 and 7 (tokens 24..28)
    for h in range(hkv * g):
        kh, vh = k[keep, h // g], v[keep, h // g]
        p = torch.softmax(kh @ q[0, h] / math.sqrt(d), dim=0)
        torch.testing.assert_close(out[0, h].double(), p @ vh, rtol=1e-5, atol=1e-5)
