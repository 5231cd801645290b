"""Quest page summaries: element-wise min/max of a block's keys, per (physical block, KV head)."""

from __future__ import annotations

import torch

from ._common import HAS_TRITON, flat_slots, next_pow2


def page_bounds_update_ref(key_cache: torch.Tensor, slot_mapping: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Recompute bounds[b] = (min, max) over key_cache[b, :last_offset+1] for every block written.

    key_cache [B, bs, Hkv, D] (any strides), slot_mapping [T] int64 (-1 = padding; slots past the
    cache, B * bs or more, are ignored as padding too), bounds [B, Hkv, 2, D] updated in place (and
    returned). The reference selects the written blocks with a boolean mask and torch.unique (a host
    sync on CUDA; the Triton kernel has none)."""
    B, bs = key_cache.shape[:2]
    slots = flat_slots(slot_mapping)
    slots = slots[(slots >= 0) & (slots < B * bs)]
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
    def _bounds_kernel(
        key_ptr, slot_ptr, bounds_ptr,
        s_kb, s_kt, s_kh, s_kd,
        s_bb, s_bh, s_bm, s_bd,
        T, NB, D,
        BS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Program (t, h): if token t is the last one this step writes into its block, recompute
        that block's bounds over offsets 0..its offset. A block's tokens within one step are
        consecutive entries of slot_mapping (one request writes a block, at increasing positions),
        so "last" is "the next entry is another block, padding, or the end": no per-step table."""
        t = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.load(slot_ptr + t)
        nxt = tl.load(slot_ptr + t + 1, mask=t + 1 < T, other=-1)
        blk = s // BS
        if (s >= 0) & (blk < NB) & ((nxt < 0) | (nxt // BS != blk)):
            last = (s % BS).to(tl.int32)
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
    """One launch, no allocation, no host sync (graph-safe); see `page_bounds_update_ref`."""
    B, bs, Hkv, D = key_cache.shape
    slots = flat_slots(slot_mapping)
    T = slots.numel()
    if T == 0:
        return bounds
    _bounds_kernel[(T, Hkv)](
        key_cache, slots, bounds,
        *key_cache.stride(), *bounds.stride(),
        T, B, D, BS=bs, BLOCK_D=next_pow2(D), num_warps=4 if D * bs >= 4096 else 2,
    )
    return bounds
