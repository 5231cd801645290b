"""SnapKV (Li et al., 2024): the attention of the prompt's last `observation_window` queries,
max-pooled over neighbouring tokens (`pooling_kernel`), picks the prompt pages a request keeps.
PyramidKV is SnapKV with budgets shrinking with depth: `{"method": "snapkv",
"budget_allocation": "pyramid"}` (or `"method": "pyramidkv"`, whose default allocation that is)."""

from __future__ import annotations

import torch
from pydantic import Field

from vllm_sparsekv.methods.base import MethodOptions, register
from vllm_sparsekv.methods.prefill_scored import PrefillScoredSelector, window_attention


class SnapKVOptions(MethodOptions):
    observation_window: int = Field(32, ge=1)
    """The last prompt queries whose attention scores the pages."""
    pooling_kernel: int = Field(7, ge=1)
    """Max-pool width over tokens of that attention (1 = none)."""


@register("snapkv")
class SnapKVSelector(PrefillScoredSelector):
    summary = ("prefill-time eviction (SnapKV): the prompt's last queries score the prompt pages once; "
               "decode attends to the best within the budget, the sink/recent pages and every page "
               "written since prefill.")
    options_model = SnapKVOptions
    deprecated_keys = {"observation_window": "observation_window", "pooling_kernel": "pooling_kernel"}

    def token_scores(self, queries, key_cache, block_row, seq_len, scale):
        window = queries[-self.options.observation_window :]
        attn = window_attention(window, key_cache, block_row, seq_len, scale)
        k = self.options.pooling_kernel
        if k > 1:
            attn = torch.nn.functional.max_pool1d(attn[:, None], k, stride=1, padding=k // 2)[:, 0, :seq_len]
        return attn


@register("pyramidkv")
class PyramidKVSelector(SnapKVSelector):
    """SnapKV with pyramid budgets unless `budget_allocation` is set; options: `pyramidkv.*`
    (SnapKV's)."""

    summary = "PyramidKV: SnapKV with budgets shrinking with depth (default `budget_allocation`: `pyramid`)."
    default_allocation = "pyramid"
