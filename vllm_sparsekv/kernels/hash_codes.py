"""Linear-hash codes (Spotlight-style, training-free): sign bits of a fixed random projection,
one code per (token, KV head), packed into int32 words (bit i = bit i % 32 of word i // 32)."""

from __future__ import annotations

import torch

from ._common import HAS_TRITON, flat_slots, next_pow2, pack_bits


def _project(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """x [M, H, D] with projection [H, D, bits] -> [M, H, bits] float32."""
    return torch.einsum("mhd,hdk->mhk", x.float(), projection.float())


def hash_codes_update_ref(key: torch.Tensor, slot_mapping: torch.Tensor, projection: torch.Tensor,
                          codes: torch.Tensor) -> torch.Tensor:
    """codes[b, off, h, :] = pack(key[t, h] @ projection[h] > 0) for every t with 0 <= slot < B * bs
    (other slots are padding).

    key [T, Hkv, D] (rows past len(slot_mapping) ignored), projection [Hkv, D, bits] float32,
    codes [B, bs, Hkv, bits // 32] int32 (in place; returned)."""
    B, bs = codes.shape[:2]
    slots = flat_slots(slot_mapping)
    T = slots.numel()
    valid = (slots >= 0) & (slots < B * bs)
    packed = pack_bits(_project(key[:T], projection) > 0)  # [T, Hkv, W]
    s = slots[valid]
    codes[s // bs, s % bs] = packed[valid]
    return codes


def hash_query_ref(q: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """[N, Hq, D] -> [N, Hq, bits // 32] int32; query head h uses projection[h // G]."""
    Hq = q.shape[1]
    G = Hq // projection.shape[0]
    return pack_bits(_project(q, projection.repeat_interleave(G, dim=0)) > 0)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _hash_kernel(
        x_ptr, proj_ptr, slot_ptr, out_ptr,
        M, D, G, NSLOTS,
        s_xm, s_xh, s_xd,
        s_ph, s_pd, s_pk,
        s_o0, s_o1, s_oh, s_ow,
        BS: tl.constexpr, W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
        SCATTER: tl.constexpr,
    ):
        """One program: BLOCK_M rows of head h, word w (grid axis 2: a decode batch still spreads
        over rows x heads x words programs).
        SCATTER (hash_codes_update): rows are new keys of KV head h, written to
        codes[slot // BS, slot % BS, h, :] (strides s_o0, s_o1, s_oh, s_ow); slot < 0 skipped.
        else (hash_query): rows are decode queries, query head h uses projection[h // G],
        out[m, h, :] (strides s_o0, -, s_oh, s_ow)."""
        pm = tl.program_id(0)
        h = tl.program_id(1)
        w = tl.program_id(2)
        rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        d = tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * s_xm + h * s_xh + d[None, :] * s_xd,
                    mask=rmask[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
        hp = h // G
        bit = tl.arange(0, 32)
        if SCATTER:
            slot = tl.load(slot_ptr + rows, mask=rmask, other=-1)
            wmask = rmask & (slot >= 0) & (slot < NSLOTS)
            ss = tl.where(wmask, slot, 0)
            obase = out_ptr + (ss // BS) * s_o0 + (ss % BS) * s_o1 + h * s_oh
        else:
            wmask = rmask
            obase = out_ptr + rows.to(tl.int64) * s_o0 + h * s_oh
        p = tl.load(proj_ptr + hp * s_ph + d[:, None] * s_pd + (w * 32 + bit[None, :]) * s_pk,
                    mask=d[:, None] < D, other=0.0).to(tl.float32)
        y = tl.dot(x, p, input_precision="ieee")  # [BLOCK_M, 32], exact fp32 products
        b = (y > 0).to(tl.uint32) << bit[None, :].to(tl.uint32)
        word = tl.sum(b, axis=1).to(tl.int32, bitcast=True)  # distinct bits: sum == or
        tl.store(obase + w * s_ow, word, mask=wmask)


def _block_m(m: int) -> int:
    return 16 if m <= 16 else (32 if m <= 64 else 64)


def hash_codes_update_triton(key, slot_mapping, projection, codes):
    B, bs, Hkv, W = codes.shape
    slots = flat_slots(slot_mapping)
    T = slots.numel()
    if T == 0:
        return codes
    D = key.shape[2]
    BM = _block_m(T)
    _hash_kernel[(triton.cdiv(T, BM), Hkv, W)](
        key, projection, slots, codes, T, D, 1, B * bs,
        *key.stride(), *projection.stride(), *codes.stride(),
        BS=bs, W=W, BLOCK_M=BM, BLOCK_D=next_pow2(max(D, 16)), SCATTER=True,
    )
    return codes


def hash_query_triton(q, projection):
    N, Hq, D = q.shape
    Hkv, _, bits = projection.shape
    W = bits // 32
    out = torch.empty(N, Hq, W, dtype=torch.int32, device=q.device)
    BM = _block_m(N)
    _hash_kernel[(triton.cdiv(N, BM), Hq, W)](
        q, projection, q, out, N, D, Hq // Hkv, 0,
        *q.stride(), *projection.stride(), out.stride(0), 0, out.stride(1), out.stride(2),
        BS=1, W=W, BLOCK_M=BM, BLOCK_D=next_pow2(max(D, 16)), SCATTER=False,
    )
    return out
