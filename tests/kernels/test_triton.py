"""Triton kernels against their torch references.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1) on small shapes
(CI). With CUDA the same tests run compiled, plus real sizes and a CUDA-graph capture/replay of
the decode path (benchmarks/gpu_check.py runs them all in one device call). Outputs are poisoned
(NaN / sentinel) before each call and every element is compared."""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
triton = pytest.importorskip("triton")
# Triton picks the interpreter when it is imported (triton.language's own jit helpers included), so
# without CUDA these tests run in a child pytest started with TRITON_INTERPRET=1
# (see test_interpreter_subprocess); run them directly with `TRITON_INTERPRET=1 pytest <this file>`.
INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
RUN_HERE = CUDA or INTERP
# tests/kernels/conftest.py deselects these where they cannot run here (they run in the child)
here = pytest.mark.kernel_in_process

from vllm_sparsekv.kernels import hash_codes, page_bounds, page_scores, page_select, sparse_decode  # noqa: E402
from vllm_sparsekv.kernels.testing import all_pages, make_paged, rel_err  # noqa: E402
from vllm_sparsekv.offload.pool import host_memory  # noqa: E402


@pytest.mark.skipif(RUN_HERE, reason="kernels run in this process")
def test_interpreter_subprocess():
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
                       cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-4000:]
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) >= 40, r.stdout[-3000:]  # the kernels really ran there

DEV = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}
DTYPES = [torch.float32, torch.bfloat16] + ([torch.float16] if CUDA else [])
big = pytest.mark.skipif(not CUDA, reason="real sizes need CUDA")
_real_empty = torch.empty


@contextlib.contextmanager
def poisoned():
    """torch.empty returns NaN (float) / 0x5EAD5EAD (int) filled tensors: unwritten outputs show."""
    def empty(*a, **k):
        t = _real_empty(*a, **k)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(0x5EAD5EAD)
        return t
    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = _real_empty


SEED = int(os.environ.get("SPARSEKV_TEST_SEED", torch.randint(0, 2**30, ()).item()))
print(f"kernel tests: SPARSEKV_TEST_SEED={SEED}")


def gen(*key):
    """Fresh inputs every run (SEED), reproducible with SPARSEKV_TEST_SEED."""
    return torch.Generator().manual_seed((zlib.crc32(repr(key).encode()) + SEED) % (2**31))


def lens_for(bs, N, max_len, g):
    base = [1, bs, bs + 1, max_len]
    extra = torch.randint(1, max_len + 1, (max(0, N - 4),), generator=g).tolist()
    return (base + extra)[:N]


# ---------------------------------------------------------------- page bounds
@here
@pytest.mark.parametrize("bs", [16, 32] + ([64] if CUDA else []))
@pytest.mark.parametrize("dtype", DTYPES)
def test_page_bounds(bs, dtype):
    g = gen("pb", bs, dtype)
    Hkv, D = 2, 64
    lens = [3 * bs + 5, 2 * bs, bs - 1]
    _, kc, _, bt, sl = make_paged(lens, Hkv, 1, D, bs, dtype=dtype, device=DEV, layout="cpu", gen=g)
    B = kc.shape[0]
    bounds = torch.randn(B, Hkv, 2, D, generator=g).to(dtype).to(DEV)
    slots = [int(bt[0, p]) * bs + o for p in range(3) for o in range(bs) if p * bs + o < 2 * bs + 7]
    # padding (-1) and slots past the cache (B * bs + ...: stale ids) are skipped, not written
    slots += [-1, int(bt[1, 1]) * bs + 3, -1, B * bs + 7, int(bt[2, 0]) * bs + bs - 2, int(bt[1, 0]) * bs + 2]
    sm = torch.tensor(slots, dtype=torch.int64, device=DEV)
    ref = page_bounds.page_bounds_update_ref(kc, sm, bounds.clone())
    out = bounds.clone()
    written = torch.unique(sm[(sm >= 0) & (sm < B * bs)] // bs)
    out[written] = float("nan")  # poison exactly the blocks that must be rewritten
    page_bounds.page_bounds_update_triton(kc, sm, out)
    assert torch.equal(out.cpu(), ref.cpu())


# ---------------------------------------------------------------- hash codes
def _bits(x):
    W = x.shape[-1]
    a = x.reshape(-1, W).long().cpu() & 0xFFFFFFFF
    return ((a[..., None] >> torch.arange(32)) & 1).reshape(a.shape[0], -1)


def _margin(x, proj, G):
    return torch.einsum("mhd,hdk->mhk", x.double().cpu(), proj.double().cpu().repeat_interleave(G, 0))


@here
@pytest.mark.parametrize("bits", [64, 96, 128, 256])
@pytest.mark.parametrize("D", [64, 96])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hash_codes(bits, D, dtype):
    g = gen("hc", bits, D, dtype)
    Hkv, G, bs, B, T = 2, 4, 16, 5, 23
    proj = torch.randn(Hkv, D, bits, generator=g).to(DEV)
    key = torch.randn(T, Hkv, D, generator=g).to(dtype).to(DEV)
    slots = torch.randperm(B * bs, generator=g)[:T]
    slots[[3, 11]] = -1
    slots[7] = B * bs + 2  # past the cache: skipped like padding
    slots = slots.to(DEV)
    codes0 = torch.randint(-2**31, 2**31 - 1, (B, bs, Hkv, bits // 32), generator=g, dtype=torch.int32).to(DEV)
    ref = hash_codes.hash_codes_update_ref(key, slots, proj, codes0.clone())
    out = codes0.clone()
    v = (slots >= 0) & (slots < B * bs)
    out.view(B * bs, Hkv, -1)[slots[v]] = 0x5EAD5EAD
    hash_codes.hash_codes_update_triton(key, slots, proj, out)
    sure = _margin(key, proj, 1).abs().reshape(T, -1) > 1e-3
    flat_o, flat_r = out.view(B * bs, Hkv, -1), ref.view(B * bs, Hkv, -1)
    untouched = torch.ones(B * bs, dtype=torch.bool, device=DEV)
    untouched[slots[v]] = False
    assert torch.equal(flat_o[untouched], flat_r[untouched])
    bo, br = _bits(flat_o[slots[v]]).reshape(int(v.sum()), -1), _bits(flat_r[slots[v]]).reshape(int(v.sum()), -1)
    s = sure[v.cpu()]
    assert torch.equal(bo[s], br[s])
    q = torch.randn(7, Hkv * G, D, generator=g).to(dtype).to(DEV)
    with poisoned():
        qc = hash_codes.hash_query_triton(q, proj)
    qr = hash_codes.hash_query_ref(q, proj)
    sure = _margin(q, proj, G).abs().reshape(7 * Hkv * G, -1) > 1e-3
    assert torch.equal(_bits(qc)[sure], _bits(qr)[sure])


# ---------------------------------------------------------------- page scores
QUEST_CASES = [(1, 64, 16), (4, 128, 32), (3, 96, 16)] + ([(8, 256, 64), (4, 128, 16)] if CUDA else [])


@here
@pytest.mark.parametrize("G,D,bs", QUEST_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tiling", [(None, None), (2, 3)])  # (pages, tiles): several programs per row
def test_quest_scores(G, D, bs, dtype, tiling):
    g = gen("qs", G, D, bs, dtype, tiling)
    Hkv, N = 2, 5
    lens = lens_for(bs, N, 9 * bs + 3, g)
    q, kc, _, bt, sl = make_paged(lens, Hkv, G, D, bs, dtype=dtype, device=DEV, gen=g)
    lo = torch.randn(kc.shape[0], Hkv, D, generator=g)
    bounds = torch.stack([lo, lo + torch.rand(kc.shape[0], Hkv, D, generator=g)], 2).to(dtype).to(DEV)
    P = bt.shape[1] + 3
    ref = page_scores.quest_page_scores_ref(q, bounds, bt, sl, P, bs)
    with poisoned():
        out = page_scores.quest_page_scores_triton(q, bounds, bt, sl, P, bs, *tiling)
    assert torch.equal(torch.isinf(out), torch.isinf(ref)) and not out.isnan().any()
    f = torch.isfinite(ref)
    torch.testing.assert_close(out[f], ref[f], rtol=1e-5, atol=1e-4)


HASH_CASES = [(1, 16, 4), (3, 32, 2), (4, 16, 3)] + ([(8, 64, 8), (4, 32, 4)] if CUDA else [])


@here
@pytest.mark.parametrize("G,bs,W", HASH_CASES)
@pytest.mark.parametrize("reduce", ["max", "sum"])
@pytest.mark.parametrize("pages", [None, 2])  # 2: several programs per row, some past its last page
def test_hash_scores(G, bs, W, reduce, pages):
    g = gen("hs", G, bs, W, reduce, pages)
    Hkv, N = (3 if G == 3 else 2), 5  # a non-power-of-two head count too
    lens = lens_for(bs, N, 7 * bs + 3, g)
    _, kc, _, bt, sl = make_paged(lens, Hkv, 1, 16, bs, device=DEV, gen=g)
    codes = torch.randint(-2**31, 2**31 - 1, (kc.shape[0], bs, Hkv, W), generator=g, dtype=torch.int32).to(DEV)
    qc = torch.randint(-2**31, 2**31 - 1, (N, Hkv * G, W), generator=g, dtype=torch.int32).to(DEV)
    P = bt.shape[1] + 2
    ref = page_scores.hash_page_scores_ref(qc, codes, bt, sl, P, reduce)
    with poisoned():
        out = page_scores.hash_page_scores_triton(qc, codes, bt, sl, P, reduce, pages)
    assert torch.equal(out.cpu(), ref.cpu())


# ---------------------------------------------------------------- selection
SELECT_CASES = [(42, False), (42, True), (200, True), (120, "close")] + ([(8192, False), (20000, True)] if CUDA else [])


@here
@pytest.mark.parametrize("P,ties", SELECT_CASES)
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("ways", [2, 4])
def test_select(P, ties, chunked, ways):
    if chunked and not CUDA and (P > 64 or not ties):
        pytest.skip("interpreter: the chunked path is covered at P=42 with ties")
    if ways == 4 and not CUDA and P == 200:
        pytest.skip("interpreter: the four-way search is covered at P=42 and P=120 (close keys)")
    # chunked: rows longer than register_pages re-read chunks; rows up to short_row_pages (twice as
    # many) rank a smaller block. Interpreter: pages 1, 3 (short), 9 (mid), 21 (register), 42 (chunked)
    register_pages, short_rows = ((32, 8) if not CUDA else (2048, 512)) if chunked else (None, None)
    g = gen("sel", P, ties, chunked, ways)
    bs = 16
    N, Hkv = 6, 3
    lens = [1, bs * 3, bs * (P // 5) + 1, bs * P - 3, bs * P, bs * (P // 2)]
    sl = torch.tensor(lens, dtype=torch.int32)
    sc = torch.randn(N, Hkv, P, generator=g)
    if ties == "close":  # keys equal in their high bytes: the radix select's later passes decide
        sc = 1000.0 + sc * 1e-3
    elif ties:
        sc = (sc * 2).round()
        sc[0, 0, 0] = float("nan")
        sc[2, 1, :3] = float("-inf")
        sc[3, 2, 5] = float("inf")
        sc[4, 1, 7] = float("nan")
    budget = torch.randint(0, P // 2, (N, Hkv), generator=g, dtype=torch.int32)
    budget[1, 0] = 10**6
    budget[4, 2] = 0
    sc, sl, budget = sc.to(DEV), sl.to(DEV), budget.to(DEV)
    configs = [(1, 2, max(4, P // 4)), (0, 0, 8), (2, 3, P + 5), (4, 4, 6)]
    if chunked and not CUDA:
        configs = configs[:1]  # the interpreter is slow on the multi-pass bisection
    for sink, recent, k_max in configs:
        ri, rn = page_select.select_pages_ref(sc, sl, bs, budget, sink, recent, k_max)
        with poisoned():
            oi, on = page_select.select_pages_triton(sc, sl, bs, budget, sink, recent, k_max, register_pages,
                                                     short_rows, ways)
        assert torch.equal(on.cpu(), rn.cpu()), (sink, recent, k_max)
        assert torch.equal(oi.cpu(), ri.cpu()), (sink, recent, k_max)


# ---------------------------------------------------------------- sparse decode
DECODE_CASES = [  # (G, D, bs, N, max_len)
    (1, 64, 16, 4, 70), (4, 64, 32, 4, 150), (8, 96, 16, 3, 90), (3, 128, 16, 4, 60),
] + ([(4, 128, 16, 32, 5000), (8, 256, 64, 8, 3000), (2, 96, 32, 64, 2000), (1, 64, 16, 256, 600),
      (4, 128, 32, 2, 70000)] if CUDA else [])


@here
@pytest.mark.parametrize("G,D,bs,N,max_len", DECODE_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [None, 3])
def test_sparse_decode(G, D, bs, N, max_len, dtype, splits):
    g = gen("dec", G, D, bs, N, dtype, splits)
    Hkv = 2
    lens = lens_for(bs, N, max_len, g)
    q, kc, vc, bt, sl = make_paged(lens, Hkv, G, D, bs, dtype=dtype, device=DEV, gen=g,
                                   layout="cpu" if G == 3 else "nhd")
    scale = 1 / math.sqrt(D)
    P = bt.shape[1]
    # sparse: random distinct pages per (request, head), -1 padded, some rows empty
    k_max = max(3, P // 4)
    idx = torch.full((N, Hkv, k_max), -1, dtype=torch.int32)
    for n, s in enumerate(lens):
        npg = math.ceil(s / bs)
        for h in range(Hkv):
            take = min(k_max, npg) - (1 if (n + h) % 3 == 1 and npg > 1 else 0)
            sel = torch.randperm(npg, generator=g)[:take].sort().values
            idx[n, h, :take] = sel.to(torch.int32)
    idx[0, 0] = -1  # a head with nothing selected -> zeros
    # num_selected: the selection's counts, or fewer (only the first ns listed pages may be read)
    listed = (idx >= 0).sum(-1).to(torch.int32)
    fewer = (torch.rand(listed.shape, generator=g) * (listed + 1).float()).floor().to(torch.int32)
    for pi, ns in ((idx.to(DEV), None), (idx.to(DEV), listed.to(DEV)), (idx.to(DEV), fewer.to(DEV)),
                   (all_pages(lens, bs, P, Hkv, DEV), None)):
        ref = sparse_decode.sparse_paged_decode_ref(q, kc, vc, bt, sl, pi, scale, num_selected=ns)
        out = torch.full_like(q, float("nan"))
        with poisoned():
            sparse_decode.sparse_paged_decode_triton(q, kc, vc, bt, sl, pi, scale, out=out, num_selected=ns,
                                                     num_splits=splits)
        assert not out.isnan().any()
        assert rel_err(out, ref) < TOL[dtype], rel_err(out, ref)


@here
@pytest.mark.parametrize("G,D,bs,N,max_len", DECODE_CASES[:2] + ([(4, 128, 16, 8, 3000)] if CUDA else []))
@pytest.mark.parametrize("dtype", DTYPES[:2])
def test_sparse_decode_reads_passive_pages_from_the_host_pool(G, D, bs, N, max_len, dtype):
    """The passive store's zero-copy path: some pages moved to a host pool (pinned on CUDA), their
    blocks poisoned as if vLLM reused them, the block table pointing past the cache: the same
    output as the reference over the unmoved cache."""
    g = gen("dec-host", G, D, bs, N, dtype)
    Hkv = 2
    lens = lens_for(bs, N, max_len, g)
    q, kc, vc, bt, sl = make_paged(lens, Hkv, G, D, bs, dtype=dtype, device=DEV, gen=g)
    P = bt.shape[1]
    idx = all_pages(lens, bs, P, Hkv, DEV)
    ref = sparse_decode.sparse_paged_decode_ref(q, kc, vc, bt, sl, idx, 1 / math.sqrt(D))
    B = kc.shape[0]
    held = [(n, p) for n, s in enumerate(lens) for p in range(math.ceil(s / bs))]
    moved = [held[i] for i in torch.randperm(len(held), generator=g)[: max(1, len(held) // 2)].tolist()]
    slots = len(moved) + 2
    shape = (slots, bs, Hkv, D)
    nbytes = math.prod(shape) * dtype.itemsize
    buf = host_memory(2 * nbytes, pinned=CUDA)  # the pool's own host memory (cudaHostRegister on CUDA)
    hk, hv = (buf[i * nbytes:(i + 1) * nbytes].view(dtype).view(shape).fill_(float("nan")) for i in range(2))
    table = bt.clone()
    for s, (n, p) in enumerate(moved):
        b = int(bt[n, p])
        hk[s + 1].copy_(kc[b])
        hv[s + 1].copy_(vc[b])
        table[n, p] = B + s + 1
    for n, p in moved:
        kc[int(bt[n, p])] = float("nan")
        vc[int(bt[n, p])] = float("nan")
    out = torch.full_like(q, float("nan"))
    with poisoned():
        sparse_decode.sparse_paged_decode_triton(q, kc, vc, table, sl, idx, 1 / math.sqrt(D), out=out,
                                                 host_pages=(hk, hv))
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOL[dtype], rel_err(out, ref)


# ---------------------------------------------------------------- CUDA graphs
@big
@pytest.mark.parametrize("method", ["quest", "hash"])
def test_cuda_graph_decode_path(method):
    """score + select + attend captured once, replayed on new queries and new lengths."""
    from vllm_sparsekv import kernels as K

    torch.manual_seed(0)
    bs, G, D, Hkv, N = 16, 4, 128, 8, 8
    lens = [4000 + 97 * i for i in range(N)]
    q, kc, vc, bt, sl = make_paged(lens, Hkv, G, D, bs, dtype=torch.bfloat16, device=DEV)
    P = bt.shape[1]
    bounds = torch.empty(kc.shape[0], Hkv, 2, D, dtype=torch.bfloat16, device=DEV)
    proj = torch.randn(Hkv, D, 128, device=DEV)
    codes = torch.empty(kc.shape[0], bs, Hkv, 4, dtype=torch.int32, device=DEV)
    slots = torch.cat([bt[n, : math.ceil(s / bs)].long().repeat_interleave(bs) * bs
                       + torch.arange(math.ceil(s / bs) * bs, device=DEV) % bs for n, s in enumerate(lens)])
    K.page_bounds_update(kc, slots, bounds)
    keys = kc.reshape(-1, Hkv, D)[slots]
    K.hash_codes_update(keys, slots, proj, codes)
    budget = torch.full((N, Hkv), P // 8, dtype=torch.int32, device=DEV)
    k_max = P // 8 + 4
    out = torch.empty_like(q)

    def step():
        if method == "quest":
            sc = K.quest_page_scores(q, bounds, bt, sl, P, bs)
        else:
            sc = K.hash_page_scores(K.hash_query(q, proj), codes, bt, sl, P, "max")
        idx, _ = K.select_pages(sc, sl, bs, budget, 1, 2, k_max)
        K.sparse_paged_decode(q, kc, vc, bt, sl, idx, D ** -0.5, out=out)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up compiles outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for trial in range(3):
        q.copy_(torch.randn_like(q))
        sl.copy_(torch.tensor([L - 50 * trial for L in lens], dtype=torch.int32, device=DEV))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        got = out.clone()
        step()  # eager
        assert torch.equal(got, out)
        # and eager equals the reference path
        if method == "quest":
            sc = page_scores.quest_page_scores_ref(q, bounds, bt, sl, P, bs)
        else:
            sc = page_scores.hash_page_scores_ref(hash_codes.hash_query_ref(q, proj), codes, bt, sl, P, "max")
        idx, _ = page_select.select_pages_ref(sc, sl, bs, budget, 1, 2, k_max)
        ref = sparse_decode.sparse_paged_decode_ref(q, kc, vc, bt, sl, idx, D ** -0.5)
        assert rel_err(got, ref) < 2e-2
