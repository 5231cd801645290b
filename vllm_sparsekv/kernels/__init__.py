"""Sparse-KV kernels: torch references (`*_ref`, any device) and Triton kernels (`*_triton`).

The public names dispatch: Triton when the tensors are on CUDA and Triton imports, the reference
otherwise (SPARSEKV_KERNELS=ref|triton overrides). See README.md in this folder for the contract.
This package never imports vLLM."""

from __future__ import annotations

from ._common import HAS_TRITON, mask_past_pages, num_pages, use_triton
from .hash_codes import hash_codes_update_ref, hash_query_ref
from .page_bounds import page_bounds_update_ref
from .page_scores import hash_page_scores_ref, quest_page_scores_group_max_ref, quest_page_scores_ref
from .page_select import select_pages_ref
from .sparse_decode import sparse_paged_decode_ref

if HAS_TRITON:
    from .hash_codes import hash_codes_update_triton, hash_query_triton
    from .page_bounds import page_bounds_update_triton
    from .page_scores import hash_page_scores_triton, quest_page_scores_triton
    from .page_select import select_pages_triton
    from .sparse_decode import sparse_paged_decode_triton


def page_bounds_update(key_cache, slot_mapping, bounds):
    if use_triton(key_cache, bounds):
        return page_bounds_update_triton(key_cache, slot_mapping, bounds)
    return page_bounds_update_ref(key_cache, slot_mapping, bounds)


def hash_codes_update(key, slot_mapping, projection, codes):
    if use_triton(key, codes):
        return hash_codes_update_triton(key, slot_mapping, projection, codes)
    return hash_codes_update_ref(key, slot_mapping, projection, codes)


def hash_query(q, projection):
    if use_triton(q, projection):
        return hash_query_triton(q, projection)
    return hash_query_ref(q, projection)


def quest_page_scores(q, bounds, block_table, seq_lens, max_pages, block_size):
    if use_triton(q, bounds):
        return quest_page_scores_triton(q, bounds, block_table, seq_lens, max_pages, block_size)
    return quest_page_scores_ref(q, bounds, block_table, seq_lens, max_pages, block_size)


def quest_page_scores_group_max(q, bounds, block_table, seq_lens, max_pages, block_size):
    """Quest scores with the max over the GQA group instead of the sum; torch ops on every device
    (no Triton kernel yet), so the dispatch has one branch."""
    return quest_page_scores_group_max_ref(q, bounds, block_table, seq_lens, max_pages, block_size)


def hash_page_scores(q_codes, codes, block_table, seq_lens, max_pages, reduce="max"):
    if use_triton(q_codes, codes):
        return hash_page_scores_triton(q_codes, codes, block_table, seq_lens, max_pages, reduce)
    return hash_page_scores_ref(q_codes, codes, block_table, seq_lens, max_pages, reduce)


def select_pages(scores, seq_lens, block_size, budget_pages, sink_pages, recent_pages, k_max):
    if use_triton(scores):
        return select_pages_triton(scores, seq_lens, block_size, budget_pages, sink_pages, recent_pages, k_max)
    return select_pages_ref(scores, seq_lens, block_size, budget_pages, sink_pages, recent_pages, k_max)


def sparse_paged_decode(q, key_cache, value_cache, block_table, seq_lens, page_idx, scale, out=None,
                        num_selected=None, host_pages=None):
    """host_pages: the passive store's (key, value) pages, read for block ids past the cache."""
    if use_triton(q, key_cache):
        return sparse_paged_decode_triton(q, key_cache, value_cache, block_table, seq_lens, page_idx, scale, out,
                                          num_selected, host_pages)
    return sparse_paged_decode_ref(q, key_cache, value_cache, block_table, seq_lens, page_idx, scale, out,
                                   num_selected, host_pages)


__all__ = [
    "HAS_TRITON",
    "page_bounds_update", "hash_codes_update", "hash_query", "quest_page_scores", "quest_page_scores_group_max",
    "hash_page_scores", "select_pages", "sparse_paged_decode", "mask_past_pages", "num_pages",
    "page_bounds_update_ref", "hash_codes_update_ref", "hash_query_ref", "quest_page_scores_ref",
    "quest_page_scores_group_max_ref", "hash_page_scores_ref", "select_pages_ref", "sparse_paged_decode_ref",
]
