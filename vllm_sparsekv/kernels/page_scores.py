"""Page scoring for decode: Quest bounds and Hamming similarity of hash codes, each aggregated over
the query heads of a GQA group (every page summary is read once per group)."""

from __future__ import annotations

import os

import torch

from ._common import HAS_TRITON, cdiv, mask_past_pages, next_pow2, popcount32


def _page_blocks(block_table: torch.Tensor, max_pages: int) -> torch.Tensor:
    """[N, max_pages] long physical block ids (columns past the table's width -> 0)."""
    bt = block_table[:, :max_pages].long().clamp(min=0)
    if bt.shape[1] < max_pages:
        bt = torch.nn.functional.pad(bt, (0, max_pages - bt.shape[1]))
    return bt


def quest_page_scores_group_max_ref(q: torch.Tensor, bounds: torch.Tensor, block_table: torch.Tensor,
                                seq_lens: torch.Tensor, max_pages: int, block_size: int) -> torch.Tensor:
    """[N, Hkv, max_pages] float32: max_{h in group} sum_d max(q[h,d]*min[d], q[h,d]*max[d]).

    The per-head bounds cannot be folded into one group vector, so this reads each summary once
    per group but does G dot products; torch ops on any device (no Triton kernel yet)."""
    N, Hq, D = q.shape
    Hkv = bounds.shape[1]
    qf = q.float().reshape(N, Hkv, Hq // Hkv, D)
    b = bounds[_page_blocks(block_table, max_pages)].float()  # [N, P, Hkv, 2, D]
    sc = (torch.einsum("nhgd,nphd->nhgp", qf.clamp(min=0), b[:, :, :, 1])
          + torch.einsum("nhgd,nphd->nhgp", qf.clamp(max=0), b[:, :, :, 0])).amax(2)
    return mask_past_pages(sc, seq_lens, block_size)


def quest_page_scores_ref(q: torch.Tensor, bounds: torch.Tensor, block_table: torch.Tensor,
                          seq_lens: torch.Tensor, max_pages: int, block_size: int) -> torch.Tensor:
    """[N, Hkv, max_pages] float32: sum_{h in group} sum_d max(q[h,d]*min[d], q[h,d]*max[d]).

    Uses max(q*lo, q*hi) = relu(q)*hi + min(q,0)*lo (valid for lo <= hi), so the group sum is two
    [D]-vectors per KV head against each page's bounds: one read of every summary per group."""
    N, Hq, D = q.shape
    Hkv = bounds.shape[1]
    G = Hq // Hkv
    qf = q.float().reshape(N, Hkv, G, D)
    qpos = qf.clamp(min=0).sum(2)  # [N, Hkv, D]
    qneg = qf.clamp(max=0).sum(2)
    b = bounds[_page_blocks(block_table, max_pages)].float()  # [N, P, Hkv, 2, D]
    sc = torch.einsum("nhd,nphd->nhp", qpos, b[:, :, :, 1]) + torch.einsum("nhd,nphd->nhp", qneg, b[:, :, :, 0])
    return mask_past_pages(sc, seq_lens, block_size)


def hash_page_scores_ref(q_codes: torch.Tensor, codes: torch.Tensor, block_table: torch.Tensor,
                         seq_lens: torch.Tensor, max_pages: int, reduce: str = "max") -> torch.Tensor:
    """[N, Hkv, max_pages] float32: per token sum_{h in group} (bits - popcount(q ^ k)), reduced
    (max or sum) over the page's valid tokens; -inf for p >= num_pages."""
    assert reduce in ("max", "sum")
    N, Hq, W = q_codes.shape
    _, bs, Hkv, _ = codes.shape
    G = Hq // Hkv
    bits = 32 * W
    qc = q_codes.reshape(N, 1, 1, Hkv, G, W)
    bt = _page_blocks(block_table, max_pages)
    out = torch.empty(N, max_pages, Hkv, dtype=torch.float32, device=codes.device)
    off = torch.arange(bs, device=codes.device)
    # chunk over pages to bound the [N, chunk, bs, Hkv, G, W] intermediate
    chunk = max(1, (1 << 24) // max(1, N * bs * Hkv * G * W))
    for p0 in range(0, max_pages, chunk):
        p1 = min(max_pages, p0 + chunk)
        kc = codes[bt[:, p0:p1]]  # [N, c, bs, Hkv, W]
        ham = popcount32(kc.unsqueeze(4) ^ qc).sum((-1, -2))  # [N, c, bs, Hkv]
        sim = (G * bits - ham).float()
        pos = torch.arange(p0, p1, device=codes.device)[:, None] * bs + off[None, :]  # [c, bs]
        valid = (pos[None] < seq_lens.long()[:, None, None])[..., None]  # [N, c, bs, 1]
        if reduce == "max":
            out[:, p0:p1] = sim.masked_fill(~valid, float("-inf")).amax(2)
        else:
            out[:, p0:p1] = sim.masked_fill(~valid, 0.0).sum(2)
    return mask_past_pages(out.permute(0, 2, 1), seq_lens, bs).contiguous()


if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def _quest_kernel(
        q_ptr, b_ptr, bt_ptr, sl_ptr, out_ptr,
        s_qn, s_qh, s_qd,
        s_bb, s_bh, s_bm, s_bd,
        s_btn, s_btp,
        s_on, s_oh, s_op,
        P, D, MAXB, HKV,
        BS: tl.constexpr, G: tl.constexpr, PAGES: tl.constexpr, HKV_PAD: tl.constexpr,
        BLOCK_D: tl.constexpr, TILES: tl.constexpr,
    ):
        """Program (page chunk, n): all KV heads at once, so each block's bounds [Hkv, 2, D] (4 KB
        for Hkv=8, D=128, bf16) are one contiguous read. Score = sum_{m,d} q2[h,m,d] * bounds[h,m,d]
        with q2[h,0] = sum_g min(q,0) (against min) and q2[h,1] = sum_g max(q,0) (against max).
        A chunk is TILES tiles of PAGES pages: q2 is built once per chunk, and tiles past the row's
        last page only store -inf (a short request costs what its own pages cost)."""
        pc = tl.program_id(0)
        n = tl.program_id(1)
        hh = tl.arange(0, HKV_PAD)
        mm = tl.arange(0, 2)
        d = tl.arange(0, BLOCK_D)
        hm3 = (hh < HKV)[:, None, None] & (d < D)[None, None, :]  # [HKV_PAD, 1, BLOCK_D]
        seq = tl.load(sl_ptr + n)
        npages = (seq + BS - 1) // BS
        base = pc * (PAGES * TILES)
        busy = tl.minimum(tl.maximum(tl.cdiv(npages - base, PAGES), 0), TILES)  # tiles holding pages
        out_row = out_ptr + n * s_on + hh[None, :] * s_oh
        if busy > 0:
            q2 = tl.zeros([HKV_PAD, 2, BLOCK_D], dtype=tl.float32)
            for g in tl.static_range(G):
                qv = tl.load(q_ptr + n * s_qn + (hh * G + g)[:, None, None] * s_qh + d[None, None, :] * s_qd,
                             mask=hm3, other=0.0).to(tl.float32)  # [HKV_PAD, 1, BLOCK_D]
                q2 += tl.where(mm[None, :, None] == 1, tl.maximum(qv, 0.0), tl.minimum(qv, 0.0))
            for t in range(0, busy):
                p = base + t * PAGES + tl.arange(0, PAGES)
                pv = (p < npages) & (p < P) & (p < MAXB)
                blk = tl.load(bt_ptr + n * s_btn + p * s_btp, mask=pv, other=0).to(tl.int64)
                addr = (blk[:, None, None, None] * s_bb + hh[None, :, None, None] * s_bh
                        + mm[None, None, :, None] * s_bm + d[None, None, None, :] * s_bd)
                m4 = pv[:, None, None, None] & hm3[None, :, :, :]
                b = tl.load(b_ptr + addr, mask=m4, other=0.0).to(tl.float32)  # [PAGES, HKV_PAD, 2, BLOCK_D]
                sc = tl.sum(tl.sum(b * q2[None, :, :, :], axis=3), axis=2)  # [PAGES, HKV_PAD]
                sc = tl.where((p < npages)[:, None], sc, float("-inf"))
                tl.store(out_row + p[:, None] * s_op, sc, mask=(p < P)[:, None] & (hh < HKV)[None, :])
        for t in range(busy, TILES):
            p = base + t * PAGES + tl.arange(0, PAGES)
            tl.store(out_row + p[:, None] * s_op, tl.full([PAGES, HKV_PAD], float("-inf"), tl.float32),
                     mask=(p < P)[:, None] & (hh < HKV)[None, :])

    @triton.jit
    def _popc(x, HW_POPC: tl.constexpr):
        if HW_POPC:
            return libdevice.popc(x)
        else:
            u = x.to(tl.uint32, bitcast=True)
            u = u - ((u >> 1) & 0x55555555)
            u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
            u = (u + (u >> 4)) & 0x0F0F0F0F
            u = u + (u >> 8)
            u = u + (u >> 16)
            return (u & 0x3F).to(tl.int32)

    @triton.jit
    def _hash_score_kernel(
        qc_ptr, c_ptr, bt_ptr, sl_ptr, out_ptr,
        s_qn, s_qh, s_qw,
        s_cb, s_ct, s_ch, s_cw,
        s_btn, s_btp,
        s_on, s_oh, s_op,
        P, MAXB, HKV,
        BS: tl.constexpr, G: tl.constexpr, W: tl.constexpr, W_PAD: tl.constexpr, HKV_PAD: tl.constexpr,
        PAGES: tl.constexpr, REDUCE_MAX: tl.constexpr, HW_POPC: tl.constexpr,
    ):
        """Program (page chunk, n): all KV heads at once, so a block's codes [bs, Hkv, W] are one
        contiguous read (per-head programs would read 16 B out of every 128 B row). Popcounts are
        accumulated per word and reduced over words once (on an H100 this ran 30% faster than
        reducing a thread's words per group member). A chunk past the row's last page only stores
        -inf (a short request costs what its own pages cost)."""
        pc = tl.program_id(0)
        n = tl.program_id(1)
        seq = tl.load(sl_ptr + n)
        npages = (seq + BS - 1) // BS
        p = pc * PAGES + tl.arange(0, PAGES)
        hh = tl.arange(0, HKV_PAD)
        out_tile = out_ptr + n * s_on + hh[None, :] * s_oh + p[:, None] * s_op
        out_mask = (p < P)[:, None] & (hh < HKV)[None, :]
        if pc * PAGES < npages:
            pv = (p < npages) & (p < P) & (p < MAXB)
            blk = tl.load(bt_ptr + n * s_btn + p * s_btp, mask=pv, other=0).to(tl.int64)
            o = tl.arange(0, BS)
            w = tl.arange(0, W_PAD)
            tv = pv[:, None] & ((p[:, None] * BS + o[None, :]) < seq)  # [PAGES, BS]
            hw = (hh < HKV)[:, None] & (w < W)[None, :]  # [HKV_PAD, W_PAD]
            m4 = tv[:, :, None, None] & hw[None, None, :, :]
            addr = (blk[:, None, None, None] * s_cb + o[None, :, None, None] * s_ct
                    + hh[None, None, :, None] * s_ch + w[None, None, None, :] * s_cw)
            kc = tl.load(c_ptr + addr, mask=m4, other=0)
            acc = tl.zeros([PAGES, BS, HKV_PAD, W_PAD], dtype=tl.int32)
            for g in tl.static_range(G):
                qw = tl.load(qc_ptr + n * s_qn + (hh[:, None] * G + g) * s_qh + w[None, :] * s_qw, mask=hw, other=0)
                acc += _popc(kc ^ qw[None, None, :, :], HW_POPC)  # padded words: 0 ^ 0
            ham = tl.sum(acc, axis=3)
            sim = (G * W * 32 - ham).to(tl.float32)
            t3 = tv[:, :, None]
            if REDUCE_MAX:
                sc = tl.max(tl.where(t3, sim, float("-inf")), axis=1)
            else:
                sc = tl.sum(tl.where(t3, sim, 0.0), axis=1)  # [PAGES, HKV_PAD]
            tl.store(out_tile, tl.where((p < npages)[:, None], sc, float("-inf")), mask=out_mask)
        else:
            tl.store(out_tile, tl.full([PAGES, HKV_PAD], float("-inf"), tl.float32), mask=out_mask)


QUEST_TILE_ELEMS = 8192  # bound elements (min and max, all KV heads) per quest-scoring program
QUEST_WARPS = 4
QUEST_TILES = 4  # tiles per program: one q2 per 4 tiles (q is re-read per program, from L2)
HASH_TILE_WORDS = 4096  # code words per hash-scoring program (H100 sweep)
HASH_WARPS = 4


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def quest_page_scores_triton(q, bounds, block_table, seq_lens, max_pages, block_size,
                             pages: int | None = None, tiles: int | None = None):
    """`pages` per tile and `tiles` per program: knobs for tuning and tests (defaults from
    QUEST_TILE_ELEMS and QUEST_TILES)."""
    N, Hq, D = q.shape
    Hkv = bounds.shape[1]
    out = torch.empty(N, Hkv, max_pages, dtype=torch.float32, device=q.device)
    if N == 0 or max_pages == 0:
        return out
    BLOCK_D = next_pow2(max(D, 16))
    HKV_PAD = next_pow2(Hkv)
    PAGES = pages or max(1, min(64, QUEST_TILE_ELEMS // (HKV_PAD * 2 * BLOCK_D)))
    TILES = tiles or QUEST_TILES
    grid = (cdiv(max_pages, PAGES * TILES), N)
    _quest_kernel[grid](
        q, bounds, block_table, seq_lens, out,
        *q.stride(), *bounds.stride(), *block_table.stride(), *out.stride(),
        max_pages, D, block_table.shape[1], Hkv,
        BS=block_size, G=Hq // Hkv, PAGES=PAGES, HKV_PAD=HKV_PAD, BLOCK_D=BLOCK_D, TILES=TILES,
        num_warps=QUEST_WARPS,
    )
    return out


def hash_page_scores_triton(q_codes, codes, block_table, seq_lens, max_pages, reduce="max", pages: int | None = None):
    """`pages` per program: a knob for tuning and tests (default from HASH_TILE_WORDS)."""
    assert reduce in ("max", "sum")
    N, Hq, W = q_codes.shape
    _, bs, Hkv, _ = codes.shape
    out = torch.empty(N, Hkv, max_pages, dtype=torch.float32, device=codes.device)
    if N == 0 or max_pages == 0:
        return out
    HKV_PAD, W_PAD = next_pow2(Hkv), next_pow2(W)
    PAGES = pages or max(1, min(64, HASH_TILE_WORDS // (bs * HKV_PAD * W_PAD)))
    grid = (cdiv(max_pages, PAGES), N)
    _hash_score_kernel[grid](
        q_codes, codes, block_table, seq_lens, out,
        *q_codes.stride(), *codes.stride(), *block_table.stride(), *out.stride(),
        max_pages, block_table.shape[1], Hkv,
        BS=bs, G=Hq // Hkv, W=W, W_PAD=W_PAD, HKV_PAD=HKV_PAD, PAGES=PAGES,
        REDUCE_MAX=(reduce == "max"), HW_POPC=not _interpreting(),
        num_warps=HASH_WARPS,
    )
    return out
