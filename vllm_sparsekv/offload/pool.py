"""The host pool: passive KV pages in host memory, one slot per page (all layers), and the copies.

The scheduler side owns which slots are free (`SlotAllocator`, so it knows when the pool is full
before it frees a block); the worker side owns the memory (`HostPool`). Both size the pool with
`num_slots`, from the same config and KV page size.
"""

from __future__ import annotations

import torch


def num_slots(cpu_bytes: int, page_bytes: int, num_layers: int) -> int:
    """Host slots that fit in `cpu_bytes`: one slot holds one KV page of every layer."""
    return cpu_bytes // max(1, page_bytes * num_layers)


class SlotAllocator:
    """Free host slots (scheduler side). Lowest slot first, so runs are reproducible."""

    def __init__(self, slots: int):
        self.capacity = slots
        self._free = list(range(slots - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self) -> int:
        return self._free.pop()

    def give_back(self, slots) -> None:
        self._free.extend(slots)
        self._free.sort(reverse=True)


class HostPool:
    """Per layer, `slots` pages [slots, *page_shape] in the KV cache's own layout (worker side),
    so a page is one contiguous copy each way and the decode reads it with the same views.
    Pinned on CUDA hosts (for asynchronous copies later); plain memory on CPU."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], slots: int):
        self.slots = slots
        pin = any(kv.is_cuda for kv in kv_caches.values())
        self.pages = {name: torch.empty((slots, *kv.shape[1:]), dtype=kv.dtype, pin_memory=pin)
                      for name, kv in kv_caches.items()}

    def store(self, kv_caches: dict[str, torch.Tensor], blocks: torch.Tensor, slots: torch.Tensor) -> None:
        """Copy KV blocks `blocks` of every layer into host `slots` (before the blocks are reused)."""
        for name, kv in kv_caches.items():
            host = self.pages[name]
            host.index_copy_(0, slots.to(host.device), kv.index_select(0, blocks.to(kv.device)).to(host.device))

    def load(self, kv_caches: dict[str, torch.Tensor], slots: torch.Tensor, blocks: torch.Tensor) -> None:
        """Copy host `slots` back into KV blocks `blocks` of every layer (a recall)."""
        for name, kv in kv_caches.items():
            host = self.pages[name]
            kv.index_copy_(0, blocks.to(kv.device), host.index_select(0, slots.to(host.device)).to(kv.device))


def store_side_state(side: dict[str, torch.Tensor], blocks: torch.Tensor, rows: torch.Tensor) -> None:
    """Copy a layer's page summaries (side tensors [num_blocks + slots, ...]) of `blocks` into the
    rows that stand for the host slots, so scoring still sees every page of the context; a recall
    copies the other way (host rows into the new blocks' rows)."""
    for tensor in side.values():
        tensor.index_copy_(0, rows.to(tensor.device), tensor.index_select(0, blocks.to(tensor.device)))
