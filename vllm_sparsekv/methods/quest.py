"""Quest (Tang et al., 2024): per-page element-wise key min/max; a page's score is the upper bound
sum_d max(q_d * min_d, q_d * max_d) on any of its keys' logits, summed over the GQA group (or its
max over the group's query heads: `{"quest": {"group_reduce": "max"}}`)."""

from __future__ import annotations

from typing import Literal

import torch

from vllm_sparsekv import kernels
from vllm_sparsekv.methods.base import MethodOptions, PageSelector, register


class QuestOptions(MethodOptions):
    group_reduce: Literal["sum", "max"] = "sum"
    """Combine the GQA group's per-query-head bounds by `sum` (Quest's score; one fused Triton
    kernel) or `max` (a page that one query head needs wins; torch ops, no Triton kernel yet)."""


@register("quest")
class QuestSelector(PageSelector):
    summary = ("Quest page bounds (per-page key min/max; score Σ max(q·min, q·max), summed over the GQA "
               "group, or the max over it: `quest.group_reduce`).")
    options_model = QuestOptions
    deprecated_keys = {"quest_group_reduce": "group_reduce"}
    # Where the bounds live: a side tensor [num_blocks, Hkv, 2, D] indexed by the *physical*
    # block id. Bounds describe a block's content, so blocks shared through prefix caching share
    # them; they are recomputed from the cache for every block a write touches (offset 0 .. last
    # written), so a block reused after free, or filled over several chunked-prefill steps, is
    # always summarised from its current tokens only. Writes that bypass do_kv_cache_update
    # (copy-on-write of partial blocks, KV-connector loads) are refused at startup instead.
    bounds: torch.Tensor | None = None

    def side_state(self, cache_dtype):
        g = self.geometry
        return {"bounds": ((g.num_kv_heads, 2, g.head_size), cache_dtype)}

    def on_kv_write(self, key, key_cache, slot_mapping):
        kernels.page_bounds_update(key_cache, slot_mapping, self.bounds)

    def score_pages(self, query, key_cache, block_table, seq_lens, max_pages):
        if self.options.group_reduce == "max":
            return kernels.quest_page_scores_group_max(query, self.bounds, block_table, seq_lens, max_pages,
                                                       self.geometry.block_size)
        return kernels.quest_page_scores(query, self.bounds, block_table, seq_lens, max_pages, self.geometry.block_size)
