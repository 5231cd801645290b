"""Quest page summaries: element-wise min/max of a block's keys, per (physical block, KV head)."""

from __future__ import annotations

import torch

from ._common import HAS_TRITON, flat_slots, next_pow2


def page_bounds_update_ref(key_cache: torch.Tensor, slot_mapping: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Recompute bounds[b] = (min, max) over key_cache[b, :last_offset+1] for every block written.

    key_cache [B, bs, Hkv, D] (any strides), slot_mapping [T] int64 (-1 = padding),
    bounds [B, Hkv, 2, D] updated in place (and returned). The reference selects the written blocks
    with a boolean mask and torch.unique (a host sync on CUDA; the Triton kernel has none)."""
    bs = key_cache.shape[1]
    slots = flat_slots(slot_mapping)
    slots = slots[slots >= 0]
    if slots.numel() == 0:
        return bounds
    blk = slots // bs
    off = slots % bs
    ublk, inv = torch.unique(blk, return_inverse=True)
    last = torch.full((ublk.numel(),), -1, dtype=torch.long, device=slots.device)
    last.scatter_reduce_(0, inv, off, reduce="amax")
    keys = key_cache[ublk].float()  # [M, bs, Hkv, D]
    keep = (torch.arange(bs, device=keys.device)[None, :] <= last[:, None])[:, :, None, None]
    mn = keys.masked_fill(~keep, float("inf")).amin(1)
    mx = keys.masked_fill(~keep, float("-inf")).amax(1)
    bounds[ublk] = torch.stack([mn, mx], dim=2).to(bounds.dtype)
    return bounds


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _last_offset_kernel(slot_ptr, last_ptr, T, BS: tl.constexpr, NB, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < T
        s = tl.load(slot_ptr + i, mask=m, other=-1)
        ok = m & (s >= 0)
        blk = tl.where(ok, s // BS, NB)  # padding goes to the scratch entry NB
        off = tl.where(ok, s % BS, -1)
        tl.atomic_max(last_ptr + blk, off.to(tl.int32), mask=m)

    @triton.jit
    def _bounds_kernel(
        key_ptr, slot_ptr, last_ptr, bounds_ptr,
        s_kb, s_kt, s_kh, s_kd,
        s_bb, s_bh, s_bm, s_bd,
        HKV, D,
        BS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        t = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.load(slot_ptr + t)
        if s >= 0:
            blk = s // BS
            off = (s % BS).to(tl.int32)
            last = tl.load(last_ptr + blk)
            if off == last:  # exactly the tokens that wrote a block's last offset recompute it
                r = tl.arange(0, BS)
                d = tl.arange(0, BLOCK_D)
                m = (r[:, None] <= last) & (d[None, :] < D)
                k = tl.load(
                    key_ptr + blk.to(tl.int64) * s_kb + r[:, None] * s_kt + h * s_kh + d[None, :] * s_kd,
                    mask=m, other=0.0,
                ).to(tl.float32)
                mn = tl.min(tl.where(m, k, float("inf")), axis=0)
                mx = tl.max(tl.where(m, k, float("-inf")), axis=0)
                base = bounds_ptr + blk.to(tl.int64) * s_bb + h * s_bh + d * s_bd
                dm = d < D
                tl.store(base, mn.to(bounds_ptr.dtype.element_ty), mask=dm)
                tl.store(base + s_bm, mx.to(bounds_ptr.dtype.element_ty), mask=dm)


def page_bounds_update_triton(key_cache: torch.Tensor, slot_mapping: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    B, bs, Hkv, D = key_cache.shape
    slots = flat_slots(slot_mapping)
    T = slots.numel()
    if T == 0:
        return bounds
    last = torch.full((B + 1,), -1, dtype=torch.int32, device=slots.device)
    BLOCK = 1024
    _last_offset_kernel[(triton.cdiv(T, BLOCK),)](slots, last, T, BS=bs, NB=B, BLOCK=BLOCK)
    _bounds_kernel[(T, Hkv)](
        key_cache, slots, last, bounds,
        *key_cache.stride(), *bounds.stride(),
        Hkv, D, BS=bs, BLOCK_D=next_pow2(D), num_warps=4 if D * bs >= 4096 else 2,
    )
    return bounds
