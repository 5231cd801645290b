"""Sparse paged decode attention: query head h attends over the valid tokens of the pages
page_idx[n, h // G], read straight from the paged cache. page_idx = every page is dense decode."""

from __future__ import annotations

import functools
import os

import torch

from ._common import HAS_TRITON, cdiv, next_pow2

_REF_CHUNK_TOKENS = 1 << 15  # reference: online softmax over page chunks of about this many tokens


def _gather_pages(cache, host, b, hidx):
    """cache[b, :, hidx, :], where ids b >= B (the cache's blocks) index `host` at b - B."""
    if host is None:
        return cache[b, :, hidx, :]
    num_blocks = cache.shape[0]
    on_host = (b >= num_blocks)[..., None, None]
    dev = cache[b.clamp(max=num_blocks - 1), :, hidx, :]
    return torch.where(on_host, host[(b - num_blocks).clamp(min=0), :, hidx, :], dev)


def sparse_paged_decode_ref(q, key_cache, value_cache, block_table, seq_lens, page_idx, scale, out=None,
                            num_selected=None, host_pages=None):
    """q [N, Hq, D]; key/value_cache [B, bs, Hkv, D] (any strides); block_table [N, max_blocks];
    seq_lens [N]; page_idx [N, Hkv, K] logical pages (< 0 ignored; entries must be distinct);
    num_selected [N, Hkv] (optional): only page_idx[n, h, :num_selected[n, h]] is read, so the
    kernels' work follows the pages really selected, not the static K.
    host_pages: optional (key, value) [S, bs, Hkv, D] of the passive store; block ids B + s in the
    block table read slot s there.
    Returns out [N, Hq, D] in q's dtype (a request/head with no valid token gets zeros)."""
    host_k, host_v = host_pages if host_pages is not None else (None, None)
    N, Hq, D = q.shape
    _, bs, Hkv, _ = key_cache.shape
    G = Hq // Hkv
    K = page_idx.shape[2]
    dev = q.device
    qf = q.float().reshape(N, Hkv, G, D)
    pid = page_idx.long()
    if num_selected is not None:
        pid = pid.masked_fill(torch.arange(K, device=dev) >= num_selected.long().to(dev)[..., None], -1)
    pvalid = pid >= 0
    pidc = pid.clamp(min=0, max=max(block_table.shape[1] - 1, 0))
    blk = torch.gather(block_table.long(), 1, pidc.reshape(N, Hkv * K)).reshape(N, Hkv, K).clamp(min=0)
    hidx = torch.arange(Hkv, device=dev).view(1, Hkv, 1)
    off = torch.arange(bs, device=dev)
    m = torch.full((N, Hkv, G, 1), float("-inf"), device=dev)
    l = torch.zeros((N, Hkv, G, 1), device=dev)
    acc = torch.zeros((N, Hkv, G, D), device=dev)
    chunk = max(1, _REF_CHUNK_TOKENS // bs)
    for k0 in range(0, K, chunk):
        k1 = min(K, k0 + chunk)
        b = blk[:, :, k0:k1]
        kk = _gather_pages(key_cache, host_k, b, hidx).float().reshape(N, Hkv, (k1 - k0) * bs, D)  # [N, Hkv, c*bs, D]
        vv = _gather_pages(value_cache, host_v, b, hidx).float().reshape(N, Hkv, (k1 - k0) * bs, D)
        pos = pid[:, :, k0:k1, None] * bs + off
        valid = (pvalid[:, :, k0:k1, None] & (pos < seq_lens.long()[:, None, None, None])).reshape(N, Hkv, 1, -1)
        s = torch.einsum("nhgd,nhtd->nhgt", qf, kk) * scale
        s = s.masked_fill(~valid, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        alpha = torch.exp(m - m_safe)
        p = torch.exp(s - m_safe)
        l = l * alpha + p.sum(-1, keepdim=True)
        acc = acc * alpha + torch.einsum("nhgt,nhtd->nhgd", p, vv)
        m = m_new
    res = torch.where(l > 0, acc / l.clamp(min=1e-30), torch.zeros_like(acc)).reshape(N, Hq, D).to(q.dtype)
    if out is None:
        return res
    out.copy_(res)
    return out


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _split_kernel(
        q_ptr, k_ptr, v_ptr, hk_ptr, hv_ptr, bt_ptr, sl_ptr, pi_ptr, ns_ptr, wo_ptr, wl_ptr, scale_log2,
        s_qn, s_qh, s_qd,
        s_kb, s_kt, s_kh, s_kd,
        s_vb, s_vt, s_vh, s_vd,
        s_hkb, s_hkt, s_hkh, s_hkd,
        s_hvb, s_hvt, s_hvh, s_hvd,
        s_btn, s_btp,
        s_pn, s_ph, s_pk,
        s_nsn, s_nsh,
        K_MAX, NUM_SPLITS, HQ, D, NUM_BLOCKS,
        G: tl.constexpr, G_PAD: tl.constexpr, BS: tl.constexpr, BLOCK_D: tl.constexpr,
        PAGES_PER_ITER: tl.constexpr, IEEE: tl.constexpr, HAS_NS: tl.constexpr, HOST: tl.constexpr,
    ):
        """Program (h, split, n): the query heads of KV head h over the split's share of the
        row's k = num_selected[n, h] listed pages (K_MAX without num_selected), so the work follows
        the pages really selected while the grid stays static (CUDA graphs); each K/V page is read
        once for the whole group. Writes the split's normalised partial output and its
        log2-sum-exp to the workspace. HOST: block ids >= NUM_BLOCKS are passive pages, read
        from the host pool (pinned memory, mapped into the device's address space) at id - NUM_BLOCKS."""
        h = tl.program_id(0)
        sp = tl.program_id(1)
        n = tl.program_id(2)
        seq = tl.load(sl_ptr + n)
        g = tl.arange(0, G_PAD)
        gm = g < G
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        q = tl.load(q_ptr + n * s_qn + (h * G + g)[:, None] * s_qh + d[None, :] * s_qd,
                    mask=gm[:, None] & dm[None, :], other=0.0)
        BLOCK_N: tl.constexpr = PAGES_PER_ITER * BS
        r = tl.arange(0, BLOCK_N)
        rp = r // BS
        ro = r % BS
        m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([G_PAD], dtype=tl.float32)
        acc = tl.zeros([G_PAD, BLOCK_D], dtype=tl.float32)
        if HAS_NS:
            k_row = tl.minimum(tl.load(ns_ptr + n * s_nsn + h * s_nsh), K_MAX)
        else:
            k_row = K_MAX
        per_split = tl.cdiv(tl.cdiv(k_row, PAGES_PER_ITER), NUM_SPLITS) * PAGES_PER_ITER
        j_start = sp * per_split
        j_end = tl.minimum(j_start + per_split, k_row)
        pi_row = pi_ptr + n * s_pn + h * s_ph
        for j0 in range(j_start, j_end, PAGES_PER_ITER):
            j = j0 + rp
            pid = tl.load(pi_row + j * s_pk, mask=j < j_end, other=-1)
            pos = pid * BS + ro
            valid = (pid >= 0) & (pos < seq)
            blk = tl.load(bt_ptr + n * s_btn + pid * s_btp, mask=valid, other=0).to(tl.int64)
            m2 = valid[:, None] & dm[None, :]
            if HOST:
                on_host = blk >= NUM_BLOCKS
                hblk = tl.where(on_host, blk - NUM_BLOCKS, 0)
                blk = tl.where(on_host, 0, blk)
                mh = m2 & on_host[:, None]
                m2 = m2 & ~on_host[:, None]
            kt = tl.load(k_ptr + blk[:, None] * s_kb + ro[:, None] * s_kt + h * s_kh + d[None, :] * s_kd,
                         mask=m2, other=0.0)
            if HOST:
                kt = tl.where(mh, tl.load(hk_ptr + hblk[:, None] * s_hkb + ro[:, None] * s_hkt + h * s_hkh
                                          + d[None, :] * s_hkd, mask=mh, other=0.0), kt)
            if IEEE:
                s = tl.dot(q.to(tl.float32), tl.trans(kt.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kt))
            s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vt = tl.load(v_ptr + blk[:, None] * s_vb + ro[:, None] * s_vt + h * s_vh + d[None, :] * s_vd,
                         mask=m2, other=0.0)
            if HOST:
                vt = tl.where(mh, tl.load(hv_ptr + hblk[:, None] * s_hvb + ro[:, None] * s_hvt + h * s_hvh
                                          + d[None, :] * s_hvd, mask=mh, other=0.0), vt)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, vt.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
            m_i = m_new
        has = l_i > 0
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        row = (n * HQ + h * G + g).to(tl.int64) * NUM_SPLITS + sp  # workspace [N, Hq, S, (D)]
        tl.store(wo_ptr + row[:, None] * D + d[None, :], o, mask=gm[:, None] & dm[None, :])
        tl.store(wl_ptr + row, lse, mask=gm)

    @triton.jit
    def _combine_kernel(
        wo_ptr, wl_ptr, out_ptr, s_on, s_oh, s_od, NUM_SPLITS, HQ, D,
        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        hq = tl.program_id(0)
        n = tl.program_id(1)
        row0 = (n * HQ + hq).to(tl.int64) * NUM_SPLITS
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        mx = tl.full([], float("-inf"), dtype=tl.float32)
        for s0 in range(0, NUM_SPLITS, BLOCK_S):
            lse = tl.load(wl_ptr + row0 + s0 + s, mask=(s0 + s) < NUM_SPLITS, other=float("-inf"))
            mx = tl.maximum(mx, tl.max(lse, axis=0))
        mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
        tot = tl.zeros([], dtype=tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for s0 in range(0, NUM_SPLITS, BLOCK_S):
            sm = (s0 + s) < NUM_SPLITS
            lse = tl.load(wl_ptr + row0 + s0 + s, mask=sm, other=float("-inf"))
            w = tl.exp2(lse - mx_safe)
            o = tl.load(wo_ptr + (row0 + s0 + s)[:, None] * D + d[None, :], mask=sm[:, None] & dm[None, :], other=0.0)
            acc += tl.sum(w[:, None] * o, axis=0)
            tot += tl.sum(w, axis=0)
        res = acc / tl.where(tot > 0, tot, 1.0)
        tl.store(out_ptr + n * s_on + hq * s_oh + d * s_od, res.to(out_ptr.dtype.element_ty), mask=dm)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


TILE_TOKENS = 128  # tokens per inner iteration (pages_per_iter = TILE_TOKENS // block_size, >= 1)
NUM_WARPS = 4
NUM_STAGES = 2  # tuned on H100: B=8, 128K, page 16/32 (see benchmarks/README_kernels.md)
SPLITS_PER_SM = 4  # aim for about this many split programs per SM
SPLITS_PER_SM_SPARSE = 8  # when page_idx holds <= 1/4 of the block table's pages (short per-split work)


def plan_splits(N: int, Hkv: int, k_max: int, pages_per_iter: int, device: torch.device,
                num_splits: int | None = None, splits_per_sm: int = SPLITS_PER_SM) -> int:
    """Number of splits per (request, KV head), from static sizes only (graph-safe); the kernel
    shares each row's actual pages over them."""
    iters = max(1, cdiv(k_max, pages_per_iter))
    if num_splits is None:
        sms = _num_sms(device.index or 0) if device.type == "cuda" else 8
        num_splits = max(1, cdiv(splits_per_sm * sms, max(1, N * Hkv)))
        num_splits = min(num_splits, 128)
    return max(1, min(num_splits, iters))


def sparse_paged_decode_triton(q, key_cache, value_cache, block_table, seq_lens, page_idx, scale, out=None,
                               num_selected=None, host_pages=None, num_splits: int | None = None,
                               tile_tokens: int | None = None, num_warps: int | None = None,
                               num_stages: int | None = None, splits_per_sm: int | None = None):
    """Split-K launch + combine. The keyword knobs exist for tuning/tests; the defaults are
    module-level (TILE_TOKENS, NUM_WARPS, NUM_STAGES, SPLITS_PER_SM). host_pages: the passive
    store's (key, value) [S, bs, Hkv, D] in pinned host memory, read in place (zero-copy) for block
    ids past the cache; the kernel is the same launch with or without passive pages (graph-safe)."""
    N, Hq, D = q.shape
    _, bs, Hkv, _ = key_cache.shape
    G = Hq // Hkv
    K = page_idx.shape[2]
    if out is None:
        out = torch.empty(N, Hq, D, dtype=q.dtype, device=q.device)
    if N == 0:
        return out
    BLOCK_D = next_pow2(max(D, 16))
    tile = tile_tokens or TILE_TOKENS
    esize = q.element_size()
    while tile > bs and tile * BLOCK_D * esize > 32768:  # K tile <= 32 KiB (fp32 / D=256)
        tile //= 2
    ppi = max(1, tile // bs)
    stages = num_stages or NUM_STAGES
    while stages > 1 and stages * 2 * ppi * bs * BLOCK_D * esize > 160 * 1024:  # K+V buffers in smem
        stages -= 1
    if splits_per_sm is None:
        splits_per_sm = SPLITS_PER_SM_SPARSE if 4 * K <= block_table.shape[1] else SPLITS_PER_SM
    S = plan_splits(N, Hkv, K, ppi, q.device, num_splits, splits_per_sm)
    wo = torch.empty(N * Hq * S * D, dtype=torch.float32, device=q.device)
    wl = torch.empty(N * Hq * S, dtype=torch.float32, device=q.device)
    # fp32 inputs: exact fp32 products (no tf32). The interpreter has no bf16/fp16 dot: upcast there.
    ieee = q.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET", "0") == "1"
    host_k, host_v = host_pages if host_pages is not None else (key_cache, value_cache)
    _split_kernel[(Hkv, S, N)](
        q, key_cache, value_cache, host_k, host_v, block_table, seq_lens, page_idx,
        page_idx if num_selected is None else num_selected,
        wo, wl, float(scale) * 1.4426950408889634,
        *q.stride(), *key_cache.stride(), *value_cache.stride(), *host_k.stride(), *host_v.stride(),
        *block_table.stride(), *page_idx.stride(),
        *((0, 0) if num_selected is None else num_selected.stride()),
        K, S, Hq, D, key_cache.shape[0],
        G=G, G_PAD=max(16, next_pow2(G)), BS=bs, BLOCK_D=BLOCK_D, PAGES_PER_ITER=ppi, IEEE=ieee,
        HAS_NS=num_selected is not None, HOST=host_pages is not None,
        num_warps=num_warps or NUM_WARPS, num_stages=stages,
    )
    _combine_kernel[(Hq, N)](
        wo, wl, out, *out.stride(), S, Hq, D, BLOCK_S=min(32, next_pow2(S)), BLOCK_D=BLOCK_D, num_warps=4,
    )
    return out
