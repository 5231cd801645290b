"""Shared helpers for the kernels package (no vLLM import: the package must import without it)."""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: without it (or off CUDA) every public op runs its torch reference.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    HAS_TRITON = False


# SPARSEKV_KERNELS=ref forces the references (debugging); =triton forces the Triton kernels
# (TRITON_INTERPRET=1 on CPU tensors). Read once, at import: the decode path calls the dispatch in
# every layer.
_MODE = os.environ.get("SPARSEKV_KERNELS", "auto")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Dispatch rule of the public names: Triton when every tensor is on CUDA and Triton imports,
    unless SPARSEKV_KERNELS (read at import) says otherwise."""
    if _MODE == "ref" or not HAS_TRITON:
        return False
    if _MODE == "triton":
        return True
    return all(t.is_cuda for t in tensors)


def num_pages(seq_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """[N] tokens -> [N] int64 pages, ceil(seq_len / block_size)."""
    return (seq_lens.long() + block_size - 1) // block_size


def mask_past_pages(scores: torch.Tensor, seq_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """[N, H, P] page scores -> the same with -inf at pages p >= ceil(seq_lens[n] / block_size)
    (pages the request does not hold; the score ops' contract). Out of place, no host sync."""
    p = torch.arange(scores.shape[-1], device=scores.device)
    past = p[None, None, :] >= num_pages(seq_lens, block_size).to(scores.device)[:, None, None]
    return scores.masked_fill(past, float("-inf"))


def flat_slots(slot_mapping: torch.Tensor) -> torch.Tensor:
    """Slot mapping as the flat int64 vector the write-time kernels index with (vLLM passes int64,
    tests and the sweep sometimes int32 or 2-D)."""
    slots = slot_mapping.reshape(-1)
    return slots if slots.dtype == torch.int64 else slots.long()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def popcount32(x: torch.Tensor) -> torch.Tensor:
    """Bit count of each int32 word (SWAR; int32 throughout, safe for the sign bit)."""
    x = x.to(torch.int32)
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    x = x + (x >> 8)
    x = x + (x >> 16)
    return x & 0x3F


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """[..., nbits] bool -> [..., nbits // 32] int32; bit i of the code = bit i % 32 of word i // 32."""
    *lead, nb = bits.shape
    assert nb % 32 == 0, "hash bits must be a multiple of 32"
    b = bits.reshape(*lead, nb // 32, 32).to(torch.int64)
    shifts = torch.arange(32, device=bits.device, dtype=torch.int64)
    w = (b << shifts).sum(-1)
    w = torch.where(w >= 2**31, w - 2**32, w)
    return w.to(torch.int32)
