"""Top-k page selection per (request, KV head) with forced sink/recent pages, per-head budgets,
a fixed k_max (static shape, padded with -1), output in ascending page order."""

from __future__ import annotations

import os

import torch

from ._common import HAS_TRITON, next_pow2


def _select_common(scores, seq_lens, block_size, budget_pages, sink_pages, recent_pages, k_max):
    N, Hkv, P = scores.shape
    npg = ((seq_lens.long() + block_size - 1) // block_size).clamp(max=P)[:, None]  # [N, 1]
    nforced = torch.clamp(npg, max=sink_pages + recent_pages)
    k = torch.minimum(torch.maximum(budget_pages.long(), nforced), npg).clamp(max=k_max)  # [N, Hkv]
    return npg, k


def select_pages_ref(scores: torch.Tensor, seq_lens: torch.Tensor, block_size: int, budget_pages: torch.Tensor,
                     sink_pages: int, recent_pages: int, k_max: int):
    """-> (page_idx [N, Hkv, k_max] int32 ascending, -1 padded; num_selected [N, Hkv] int32).

    k = min(max(budget, forced), num_pages, k_max). Ranking: forced pages first (the first
    sink_pages and last recent_pages pages), then by score (NaN counts as -inf), ties to the lower
    page index; the k best are written in ascending page order. (Forced pages beyond k_max: the
    lower page indices win.)"""
    N, Hkv, P = scores.shape
    dev = scores.device
    npg, k = _select_common(scores, seq_lens, block_size, budget_pages, sink_pages, recent_pages, k_max)
    p = torch.arange(P, device=dev)[None, None, :]
    n3 = npg[:, :, None]
    valid = p < n3
    forced = (((p < sink_pages) | (p >= n3 - recent_pages)) & valid).expand(N, Hkv, P)
    sc = scores.float().nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    # invalid pages: below every valid page, even a valid -inf (stable sort keeps lower index first)
    sc = sc.masked_fill(~valid, float("-inf")).masked_fill(forced, float("inf"))  # forced: by index
    order = torch.sort(sc, dim=-1, descending=True, stable=True).indices
    f_sorted = torch.gather(forced, -1, order).to(torch.int8)
    order = torch.gather(order, -1, torch.sort(f_sorted, dim=-1, descending=True, stable=True).indices)
    kk = min(k_max, P)
    top = order[..., :kk]
    rank = torch.arange(kk, device=dev)[None, None, :]
    big = P + 1
    top = torch.where(rank < k[:, :, None], top, big)
    top = torch.sort(top, dim=-1).values
    top = torch.where(top == big, -1, top)
    page_idx = torch.full((N, Hkv, k_max), -1, dtype=torch.int32, device=dev)
    page_idx[..., :kk] = top.to(torch.int32)
    return page_idx, k.to(torch.int32)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _keys(s_row, s_op, p, P, npages, sink, recent):
        """Monotone int32 keys: forced -> INT32_MAX, invalid -> INT32_MIN, NaN -> -inf."""
        sc = tl.load(s_row + p * s_op, mask=p < P, other=float("-inf")).to(tl.float32)
        sc = tl.where(sc != sc, float("-inf"), sc)
        sc = tl.where(sc == 0.0, 0.0, sc)  # -0.0 ties with +0.0, as in torch.sort
        bits = sc.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        valid = p < npages
        forced = ((p < sink) | (p >= npages - recent)) & valid
        key = tl.where(forced, 2147483647, key)
        key = tl.where(valid, key, -2147483648)
        return key

    @triton.jit
    def _count3(key, m1, m2, m3):
        """count(key >= m1), (>= m2), (>= m3) in one reduction: three 21-bit fields of an int64."""
        v = (key >= m1).to(tl.int64) + ((key >= m2).to(tl.int64) << 21) + ((key >= m3).to(tl.int64) << 42)
        return tl.sum(v, axis=0)

    @triton.jit
    def _select_row(s_row, s_sp, out_row, s_ik, P, npages, k, sink, recent, BLOCK: tl.constexpr,
                    WAYS: tl.constexpr):
        """One (request, KV head): the row's first BLOCK keys stay in registers; pages past BLOCK are
        re-read per pass in BLOCK chunks, only as many as the row holds."""
        nchunks = tl.cdiv(npages, BLOCK)
        offs = tl.arange(0, BLOCK)
        key0 = _keys(s_row, s_sp, offs, P, npages, sink, recent)
        # search of the key space for T = the k-th largest key: count(key >= T) >= k > count(key > T);
        # [lo, hi] holds T and count(key >= lo) >= k throughout
        lo = tl.zeros([], dtype=tl.int64) - 2147483648
        hi = tl.zeros([], dtype=tl.int64) + 2147483647
        if WAYS == 4:  # 16 passes: three pivots cut [lo, hi] (a power-of-4 width) into equal quarters
            for _ in range(16):
                q = (hi - lo + 1) >> 2
                m1 = (lo + q).to(tl.int32)
                m2 = (lo + 2 * q).to(tl.int32)
                m3 = (lo + 3 * q).to(tl.int32)
                packed = _count3(key0, m1, m2, m3)
                for c in range(1, nchunks):
                    kc = _keys(s_row, s_sp, c * BLOCK + offs, P, npages, sink, recent)
                    packed += _count3(kc, m1, m2, m3)
                c1 = packed & 0x1FFFFF
                c2 = (packed >> 21) & 0x1FFFFF
                c3 = packed >> 42
                new_lo = tl.where(c3 >= k, lo + 3 * q, tl.where(c2 >= k, lo + 2 * q, tl.where(c1 >= k, lo + q, lo)))
                hi = new_lo + q - 1
                lo = new_lo
        else:  # 32 passes of bisection
            for _ in range(32):
                mid = (lo + hi + 1) >> 1
                m32 = mid.to(tl.int32)
                cnt = tl.sum((key0 >= m32).to(tl.int32), axis=0)
                for c in range(1, nchunks):
                    kc = _keys(s_row, s_sp, c * BLOCK + offs, P, npages, sink, recent)
                    cnt += tl.sum((kc >= m32).to(tl.int32), axis=0)
                take = cnt >= k
                lo = tl.where(take, mid, lo)
                hi = tl.where(take, hi, mid - 1)
        thr = lo.to(tl.int32)
        need = k - tl.sum((key0 > thr).to(tl.int32), axis=0)
        for c in range(1, nchunks):
            kc = _keys(s_row, s_sp, c * BLOCK + offs, P, npages, sink, recent)
            need -= tl.sum((kc > thr).to(tl.int32), axis=0)
        # write the selected pages in ascending order; ties at T go to the lower page indices
        eq = key0 == thr
        sel = (key0 > thr) | (eq & (tl.cumsum(eq.to(tl.int32), axis=0) - 1 < need))
        tl.store(out_row + (tl.cumsum(sel.to(tl.int32), axis=0) - 1) * s_ik, offs, mask=sel)
        eq_base = tl.sum(eq.to(tl.int32), axis=0)
        pos_base = tl.sum(sel.to(tl.int32), axis=0)
        for c in range(1, nchunks):
            p = c * BLOCK + offs
            kc = _keys(s_row, s_sp, p, P, npages, sink, recent)
            eq = kc == thr
            sel = (kc > thr) | (eq & (tl.cumsum(eq.to(tl.int32), axis=0) - 1 + eq_base < need))
            tl.store(out_row + (tl.cumsum(sel.to(tl.int32), axis=0) - 1 + pos_base) * s_ik, p, mask=sel)
            eq_base += tl.sum(eq.to(tl.int32), axis=0)
            pos_base += tl.sum(sel.to(tl.int32), axis=0)

    @triton.jit
    def _select_kernel(
        s_ptr, sl_ptr, b_ptr, idx_ptr, num_ptr,
        s_sn, s_sh, s_sp,
        s_bn, s_bh,
        s_in, s_ih, s_ik,
        P, K_MAX, sink, recent,
        BS: tl.constexpr, BLOCK: tl.constexpr, SHORT: tl.constexpr, MID: tl.constexpr, KBLOCK: tl.constexpr,
        WAYS: tl.constexpr,
    ):
        """Program (h, n). Rows of at most SHORT pages rank a SHORT-key register block, rows of at
        most MID (2 x SHORT) pages a MID one, longer rows a BLOCK one (a request in a long-
        max_model_len engine costs what its own pages cost: a 32K prompt plus the tokens generated
        is 2,049+ pages of 16, which would otherwise rank 8,192 keys)."""
        h = tl.program_id(0)
        n = tl.program_id(1)
        seq = tl.load(sl_ptr + n)
        npages = tl.minimum((seq + BS - 1) // BS, P)
        budget = tl.load(b_ptr + n * s_bn + h * s_bh).to(tl.int32)
        nforced = tl.minimum(npages, sink + recent)
        k = tl.minimum(tl.minimum(tl.maximum(budget, nforced), npages), K_MAX)
        s_row = s_ptr + n * s_sn + h * s_sh
        out_row = idx_ptr + n * s_in + h * s_ih
        if SHORT < BLOCK:
            if npages <= SHORT:
                _select_row(s_row, s_sp, out_row, s_ik, P, npages, k, sink, recent, SHORT, WAYS)
            else:
                if MID < BLOCK:
                    if npages <= MID:
                        _select_row(s_row, s_sp, out_row, s_ik, P, npages, k, sink, recent, MID, WAYS)
                    else:
                        _select_row(s_row, s_sp, out_row, s_ik, P, npages, k, sink, recent, BLOCK, WAYS)
                else:
                    _select_row(s_row, s_sp, out_row, s_ik, P, npages, k, sink, recent, BLOCK, WAYS)
        else:
            _select_row(s_row, s_sp, out_row, s_ik, P, npages, k, sink, recent, BLOCK, WAYS)
        for k0 in range(0, K_MAX, KBLOCK):
            kk = k0 + tl.arange(0, KBLOCK)
            tl.store(out_row + kk * s_ik, tl.full([KBLOCK], -1, tl.int32), mask=(kk >= k) & (kk < K_MAX))
        tl.store(num_ptr + n * tl.num_programs(0) + h, k)  # num_selected is contiguous [N, Hkv]


MAX_REGISTER_PAGES = 8192  # pages a program keeps in registers (128K tokens at page 16); a longer row re-reads the rest per pass
SHORT_ROW_PAGES = 2048  # rows up to this many pages rank a smaller block (H200: 10 us per call vs 19 us with 8192),
# rows up to twice as many a block of that size
SELECT_WARPS = 8
# passes of the threshold search: 2 = 32 bisection passes, 4 = 16 four-way passes with three counts
# packed in one reduction (fewer barriers; not yet timed end to end, so not the default)
SELECT_WAYS = int(os.environ.get("SPARSEKV_SELECT_WAYS", "2"))  # the env var: end-to-end A/B runs


def select_pages_triton(scores, seq_lens, block_size, budget_pages, sink_pages, recent_pages, k_max,
                        register_pages: int | None = None, short_row_pages: int | None = None,
                        ways: int | None = None):
    """`register_pages`, `short_row_pages` and `ways` (tuning/tests): the in-register blocks of long and
    short rows and the search's fan-out, MAX_REGISTER_PAGES, SHORT_ROW_PAGES and SELECT_WAYS by default."""
    N, Hkv, P = scores.shape
    ways = ways or SELECT_WAYS
    if ways not in (2, 4) or (ways == 4 and P >= 1 << 21):
        raise ValueError(f"select ways={ways} with {P} pages: 2, or 4 below 2**21 pages (21-bit counts)")
    page_idx = torch.empty(N, Hkv, k_max, dtype=torch.int32, device=scores.device)
    num = torch.empty(N, Hkv, dtype=torch.int32, device=scores.device)
    if N == 0 or Hkv == 0:
        return page_idx, num
    BLOCK = min(next_pow2(max(P, 16)), next_pow2(register_pages or MAX_REGISTER_PAGES))
    SHORT = min(BLOCK, next_pow2(short_row_pages or SHORT_ROW_PAGES))
    _select_kernel[(Hkv, N)](
        scores, seq_lens, budget_pages, page_idx, num,
        *scores.stride(), *budget_pages.stride(), *page_idx.stride(),
        P, k_max, sink_pages, recent_pages,
        BS=block_size, BLOCK=BLOCK, SHORT=SHORT, MID=min(BLOCK, 2 * SHORT), KBLOCK=min(1024, next_pow2(max(k_max, 16))), WAYS=ways,
        num_warps=SELECT_WARPS if BLOCK >= 4096 else 4,
    )
    return page_idx, num
