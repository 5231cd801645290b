"""CPU tests: every torch reference against a float64 brute force (vllm_sparsekv.kernels.testing)."""

import math
import os
import zlib

import pytest
import torch

from vllm_sparsekv.kernels import (
    hash_codes_update_ref, hash_page_scores_ref, hash_query_ref, page_bounds_update_ref,
    quest_page_scores_group_max, quest_page_scores_ref, select_pages_ref, sparse_paged_decode_ref,
)
from vllm_sparsekv.kernels.testing import (
    all_pages, brute_bounds, brute_decode, brute_hash, brute_hash_scores, brute_quest, brute_select,
    make_paged, rel_err,
)

GROUPS = [1, 3, 4, 8]
DIMS = [64, 128]
BLOCKS = [16, 32]


SEED = int(os.environ.get("SPARSEKV_TEST_SEED", torch.randint(0, 2**30, ()).item()))


def _lens(bs, g):
    return [1, bs, bs + 1, int(torch.randint(2 * bs, 6 * bs, (1,), generator=g))]


def _gen(*key):
    """Fresh inputs every run, reproducible: the seed is crc32 of the test's key plus SEED
    (SPARSEKV_TEST_SEED), printed, so pytest shows it with a failure."""
    seed = (zlib.crc32(repr(key).encode()) + SEED) % (2**31)
    print(f"inputs: seed {seed} (key {key!r}, SPARSEKV_TEST_SEED={SEED})")
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("bs", BLOCKS)
@pytest.mark.parametrize("layout", ["nhd", "cpu"])
def test_page_bounds(bs, layout):
    g = _gen("bounds", bs, layout)
    Hkv, D = 2, 64
    _, kc, _, bt, sl = make_paged([3 * bs + 5, 2 * bs], Hkv, 1, D, bs, layout=layout, gen=g)
    B = kc.shape[0]
    bounds = torch.randn(B, Hkv, 2, D, generator=g)
    # a chunked prefill (request 0, partial 2nd block), a decode token, padding, a reused block
    slots = [int(bt[0, p]) * bs + o for p in range(2) for o in range(bs) if p * bs + o < bs + 7]
    slots += [-1, int(bt[1, 1]) * bs + 3, -1, int(bt[1, 0]) * bs + bs - 1, int(bt[1, 0]) * bs + 2]
    sm = torch.tensor(slots, dtype=torch.int64)
    exp = brute_bounds(kc, sm, bounds)
    page_bounds_update_ref(kc, sm, bounds)
    torch.testing.assert_close(bounds.double(), exp, rtol=0, atol=0)
    page_bounds_update_ref(kc, torch.full((4,), -1, dtype=torch.int64), bounds)  # all padding: no-op
    torch.testing.assert_close(bounds.double(), exp, rtol=0, atol=0)


def _check_codes(codes, exp, margin, tol=1e-4):
    """Equal bits, except where |projection| is within rounding of 0."""
    W = codes.shape[-1]
    a = codes.reshape(-1, W).long() & 0xFFFFFFFF
    b = exp.reshape(-1, W).long() & 0xFFFFFFFF
    i = torch.arange(32)
    abits = ((a[..., None] >> i) & 1).reshape(a.shape[0], -1)
    bbits = ((b[..., None] >> i) & 1).reshape(b.shape[0], -1)
    sure = margin.reshape(a.shape[0], -1).abs() > tol
    assert torch.equal(abits[sure], bbits[sure])


@pytest.mark.parametrize("bits", [64, 128, 256])
@pytest.mark.parametrize("G", [1, 4])
def test_hash_codes_and_query(bits, G):
    g = _gen("hash", bits, G)
    Hkv, D, bs, B = 2, 64, 16, 6
    proj = torch.randn(Hkv, D, bits, generator=g)
    key = torch.randn(9, Hkv, D, generator=g)
    codes = torch.randint(-2**31, 2**31 - 1, (B, bs, Hkv, bits // 32), generator=g, dtype=torch.int32)
    before = codes.clone()
    slots = torch.tensor([5, 17, -1, 40, 41, 95, -1, 0, 63])
    hash_codes_update_ref(key, slots, proj, codes)
    exp_c, margin = brute_hash(key, proj)
    exp = before.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            exp[s // bs, s % bs] = exp_c[t]
    touched = torch.zeros(B * bs, dtype=torch.bool)
    touched[slots[slots >= 0]] = True
    flat, eflat = codes.reshape(B * bs, Hkv, -1), exp.reshape(B * bs, Hkv, -1)
    assert torch.equal(flat[~touched], eflat[~touched])
    _check_codes(flat[slots[slots >= 0]], exp_c[slots >= 0], margin[slots >= 0])
    q = torch.randn(3, Hkv * G, D, generator=g)
    qc = hash_query_ref(q, proj)
    exp_q, margin_q = brute_hash(q, proj, G=G)
    assert qc.shape == (3, Hkv * G, bits // 32) and qc.dtype == torch.int32
    _check_codes(qc, exp_q, margin_q)


@pytest.mark.parametrize("G", GROUPS)
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("bs", BLOCKS)
def test_quest_scores(G, D, bs):
    g = _gen("quest", G, D, bs)
    lens = _lens(bs, g)
    Hkv = 2
    q, kc, _, bt, sl = make_paged(lens, Hkv, G, D, bs, gen=g)
    lo = torch.randn(kc.shape[0], Hkv, D, generator=g)
    bounds = torch.stack([lo, lo + torch.rand(kc.shape[0], Hkv, D, generator=g)], 2)
    P = bt.shape[1] + 2
    out = quest_page_scores_ref(q, bounds, bt, sl, P, bs)
    exp = brute_quest(q, bounds, bt, sl, P, bs)
    assert out.dtype == torch.float32 and out.shape == (len(lens), Hkv, P)
    torch.testing.assert_close(out.double(), exp, rtol=1e-5, atol=1e-4)
    out = quest_page_scores_group_max(q, bounds, bt, sl, P, bs)
    exp = brute_quest(q, bounds, bt, sl, P, bs, group_reduce="max")
    assert out.dtype == torch.float32 and out.shape == (len(lens), Hkv, P)
    torch.testing.assert_close(out.double(), exp, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("G", GROUPS)
@pytest.mark.parametrize("bs", BLOCKS)
@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_hash_scores(G, bs, reduce):
    g = _gen("hs", G, bs, reduce)
    lens = _lens(bs, g)
    Hkv, W = 2, 4
    _, kc, _, bt, sl = make_paged(lens, Hkv, G, 16, bs, gen=g)
    codes = torch.randint(-2**31, 2**31 - 1, (kc.shape[0], bs, Hkv, W), generator=g, dtype=torch.int32)
    qc = torch.randint(-2**31, 2**31 - 1, (len(lens), Hkv * G, W), generator=g, dtype=torch.int32)
    P = bt.shape[1]
    out = hash_page_scores_ref(qc, codes, bt, sl, P, reduce)
    exp = brute_hash_scores(qc, codes, bt, sl, P, reduce)
    torch.testing.assert_close(out.double(), exp, rtol=0, atol=0)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("bs", BLOCKS)
def test_select(ties, bs):
    g = _gen("sel", ties, bs)
    lens = [1, bs * 3, bs * 7 + 1, bs * 20 - 3, bs * 40]
    N, Hkv = len(lens), 3
    P = 42
    sl = torch.tensor(lens, dtype=torch.int32)
    sc = torch.randn(N, Hkv, P, generator=g)
    if ties:
        sc = sc.round()
        sc[0, 0, 0] = float("nan")
        sc[2, 1, :3] = float("-inf")
        sc[3, 2, 5] = float("inf")
    sc[..., 41] = float("-inf")
    budget = torch.randint(0, 30, (N, Hkv), generator=g, dtype=torch.int32)
    budget[1, 0] = 1000
    for sink, recent, k_max in [(1, 2, 16), (0, 0, 8), (2, 3, 64), (4, 4, 6)]:
        idx, num = select_pages_ref(sc, sl, bs, budget, sink, recent, k_max)
        eidx, enum = brute_select(sc, sl, bs, budget, sink, recent, k_max)
        assert idx.dtype == torch.int32 and num.dtype == torch.int32
        assert torch.equal(num, enum), (sink, recent, k_max)
        assert torch.equal(idx, eidx), (sink, recent, k_max)


@pytest.mark.parametrize("G", GROUPS)
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("bs", BLOCKS)
def test_sparse_decode(G, D, bs):
    g = _gen("dec", G, D, bs)
    lens = _lens(bs, g)
    Hkv = 2
    q, kc, vc, bt, sl = make_paged(lens, Hkv, G, D, bs, gen=g, layout="cpu" if G == 3 else "nhd")
    scale = 1 / math.sqrt(D)
    P = bt.shape[1]
    # budgets below the context: random page subsets per head (-1 padded, unsorted on purpose)
    k_max = 3
    idx = torch.full((len(lens), Hkv, k_max), -1, dtype=torch.int32)
    for n, s in enumerate(lens):
        npg = math.ceil(s / bs)
        for h in range(Hkv):
            sel = torch.randperm(npg, generator=g)[: min(k_max, npg) - (h == 1 and npg > 1)]
            idx[n, h, : len(sel)] = sel.to(torch.int32)
    out = sparse_paged_decode_ref(q, kc, vc, bt, sl, idx, scale)
    exp = brute_decode(q, kc, vc, bt, sl, idx, scale)
    assert rel_err(out, exp) < 1e-5
    # budget >= pages: the dense result (and `out=` writes in place)
    dense = all_pages(lens, bs, P + 1, Hkv)
    res = torch.full_like(q, float("nan"))
    sparse_paged_decode_ref(q, kc, vc, bt, sl, dense, scale, out=res)
    exp = brute_decode(q, kc, vc, bt, sl, dense, scale)
    assert rel_err(res, exp) < 1e-5
    # and the dense result does not depend on the paging: contiguous SDPA per request
    for n, s in enumerate(lens):
        ks = torch.cat([kc[int(bt[n, p])] for p in range(math.ceil(s / bs))])[:s]  # [s, Hkv, D]
        vs = torch.cat([vc[int(bt[n, p])] for p in range(math.ceil(s / bs))])[:s]
        kq = ks.double().repeat_interleave(G, 1).transpose(0, 1)
        vq = vs.double().repeat_interleave(G, 1).transpose(0, 1)
        w = torch.softmax(torch.einsum("hd,htd->ht", q[n].double(), kq) * scale, -1)
        assert rel_err(res[n], torch.einsum("ht,htd->hd", w, vq)) < 1e-5


def test_end_to_end_budget_above_context_is_dense():
    """score -> select -> attend with a budget >= pages equals dense attention."""
    g = _gen("e2e")
    bs, G, D, Hkv = 16, 4, 64, 2
    lens = [37, 160, 5]
    q, kc, vc, bt, sl = make_paged(lens, Hkv, G, D, bs, gen=g)
    bounds = torch.zeros(kc.shape[0], Hkv, 2, D)
    slots = torch.tensor([int(bt[n, t // bs]) * bs + t % bs for n, s in enumerate(lens) for t in range(s)])
    page_bounds_update_ref(kc, slots, bounds)
    P = bt.shape[1]
    sc = quest_page_scores_ref(q, bounds, bt, sl, P, bs)
    budget = torch.full((len(lens), Hkv), P, dtype=torch.int32)
    idx, num = select_pages_ref(sc, sl, bs, budget, 1, 1, P)
    assert num.tolist() == [[math.ceil(s / bs)] * Hkv for s in lens]
    out = sparse_paged_decode_ref(q, kc, vc, bt, sl, idx, 1 / math.sqrt(D))
    exp = brute_decode(q, kc, vc, bt, sl, all_pages(lens, bs, P, Hkv), 1 / math.sqrt(D))
    assert rel_err(out, exp) < 1e-5


def test_mask_past_pages():
    """-inf exactly at the pages past ceil(seq_len / bs), the rest untouched (out of place)."""
    from vllm_sparsekv.kernels import mask_past_pages, num_pages

    g = _gen("mask")
    for bs in BLOCKS:
        sl = torch.tensor(_lens(bs, g) + [0], dtype=torch.int32)
        P = int(num_pages(sl, bs).max()) + 2
        scores = torch.randn(len(sl), 3, P, generator=g)
        got = mask_past_pages(scores, sl, bs)
        for n, s in enumerate(sl.tolist()):
            held = math.ceil(s / bs)
            assert torch.equal(got[n, :, :held], scores[n, :, :held])
            assert bool((got[n, :, held:] == float("-inf")).all())
        assert bool(torch.isfinite(scores).all())  # the input is not modified
