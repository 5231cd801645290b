"""The host pool: passive KV pages in host memory, one slot per page (all layers), and the copies.

The scheduler side owns which slots are free (`SlotAllocator`, so it knows when the pool is full
before it frees a block); the worker side owns the memory (`HostPool`). Both size the pool with
`num_slots`, from the same config and KV page size.
"""

from __future__ import annotations

import math
import weakref

import torch


def num_slots(cpu_bytes: int, page_bytes: int, num_layers: int) -> int:
    """Host slots that fit in `cpu_bytes`: one slot holds one KV page of every layer."""
    return cpu_bytes // max(1, page_bytes * num_layers)


class SlotAllocator:
    """Free host slots (scheduler side). Lowest slot first, so runs are reproducible. Slots given
    back are sorted in at the next `take`, once: a step that gives back none costs nothing, and a
    burst of takes pops a sorted stack."""

    def __init__(self, slots: int):
        self.capacity = slots
        self._free = list(range(slots - 1, -1, -1))  # descending: the lowest pops first
        self._unsorted = False

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self) -> int:
        if self._unsorted:
            self._free.sort(reverse=True)
            self._unsorted = False
        return self._free.pop()

    def give_back(self, slots) -> None:
        n = len(self._free)
        self._free.extend(slots)
        self._unsorted = self._unsorted or len(self._free) > n


def host_memory(nbytes: int, pinned: bool) -> torch.Tensor:
    """`nbytes` of host memory; `pinned`: page-locked and mapped into the GPU's address space (the
    decode kernel reads it in place). Registered with cudaHostRegister rather than taken from
    torch's pinned allocator, which rounds every block up to a power of two (a 48 GiB pool would
    lock 64 GiB)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if pinned and nbytes:
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(buf.data_ptr(), nbytes, 0)
        if int(err) != 0:
            raise RuntimeError(f"sparsekv offload: cannot pin {nbytes / 2**30:.1f} GiB of host memory for the pool "
                               f"(cudaHostRegister error {int(err)}); lower sparsekv.offload.cpu_bytes")
        weakref.finalize(buf, cudart.cudaHostUnregister, buf.data_ptr())  # before the memory goes back
    return buf


class HostPool:
    """Per layer, `slots` pages [slots, *page_shape] in the KV cache's own layout (worker side),
    so a page is one contiguous copy each way and the decode reads it with the same views. One
    host buffer for all layers, pinned on CUDA hosts; plain memory on CPU."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], slots: int):
        self.slots = slots
        shapes = {name: ((slots, *kv.shape[1:]), kv.dtype) for name, kv in kv_caches.items()}
        sizes = {name: _align(math.prod(shape) * dtype.itemsize) for name, (shape, dtype) in shapes.items()}
        self.buffer = host_memory(sum(sizes.values()), any(kv.is_cuda for kv in kv_caches.values()))
        self.pages, offset = {}, 0
        for name, (shape, dtype) in shapes.items():
            self.pages[name] = self.buffer[offset: offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            offset += sizes[name]

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


def _align(nbytes: int) -> int:
    return -(-nbytes // 256) * 256


def store_side_state(side: dict[str, torch.Tensor], blocks: torch.Tensor, rows: torch.Tensor) -> None:
    """Copy a layer's page summaries (side tensors [num_blocks + slots, ...]) of `blocks` into the
    rows that stand for the host slots, so scoring still sees every page of the context; a recall
    copies the other way (host rows into the new blocks' rows)."""
    for tensor in side.values():
        tensor.index_copy_(0, rows.to(tensor.device), tensor.index_select(0, blocks.to(tensor.device)))
