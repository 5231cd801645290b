"""`streaming`: StreamingLLM (Xiao et al., 2023): attention sinks plus a window of the most recent
tokens. Pages are scored by position, so the shared top-k keeps the latest pages within the budget;
the first `sink_tokens` (the sinks) are forced by the selection like for every method. No side
state, nothing to update at KV writes: the window moves with the sequence, and pages that left it
are simply not read; with a token budget they never come back (`final_eviction`), so freeing
them is the passive store's job once it exists (`base.evicted_pages` names them)."""

from __future__ import annotations

import torch

from vllm_sparsekv.kernels import mask_past_pages
from vllm_sparsekv.methods.base import PageSelector, register


def position_scores(seq_lens: torch.Tensor, block_size: int, num_kv_heads: int, max_pages: int) -> torch.Tensor:
    """[N] lengths -> [N, Hkv, max_pages] float32: the page index (later is better), -inf past the end."""
    pages = torch.arange(max_pages, device=seq_lens.device, dtype=torch.float32)
    s = pages[None, None, :].expand(seq_lens.shape[0], num_kv_heads, max_pages)
    return mask_past_pages(s, seq_lens, block_size)


@register("streaming")
class StreamingSelector(PageSelector):
    summary = "StreamingLLM: sink pages plus the most recent pages."
    evicts = True

    def score_pages(self, query, key_cache, block_table, seq_lens, max_pages):
        return position_scores(seq_lens, self.geometry.block_size, self.geometry.num_kv_heads, max_pages)
