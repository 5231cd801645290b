"""SnapKV (Li et al., 2024): the attention of the prompt's last `observation_window` queries,
max-pooled over neighbouring tokens (`pooling_kernel`), picks the prompt pages a request keeps.
PyramidKV is SnapKV with budgets shrinking with depth: `{"method": "snapkv",
"budget_allocation": "pyramid"}` (or `"method": "pyramidkv"`, which sets that allocation)."""

from __future__ import annotations

import torch

from vllm_sparsekv.methods.base import register
from vllm_sparsekv.methods.prefill_scored import PrefillScoredSelector, window_attention


@register("snapkv")
class SnapKVSelector(PrefillScoredSelector):
    def token_scores(self, queries, key_cache, block_row, seq_len, scale):
        window = queries[-self.config.observation_window :]
        attn = window_attention(window, key_cache, block_row, seq_len, scale)
        k = self.config.pooling_kernel
        if k > 1:
            attn = torch.nn.functional.max_pool1d(attn[:, None], k, stride=1, padding=k // 2)[:, 0, :seq_len]
        return attn


@register("pyramidkv")
class PyramidKVSelector(SnapKVSelector):
    """Selected by name for convenience; the config sets budget_allocation="pyramid" for it."""
