"""H2O (Zhang et al., 2023): heavy hitters by attention accumulated over every prompt query, plus
the recent window. Accumulated over all prefill chunks; decode-time accumulation would need the
attention weights from the decode kernel, which it does not return, so the heavy hitters are fixed
at the end of prefill (pages written during decode are kept only while they are recent)."""

from __future__ import annotations

from vllm_sparsekv.methods.base import register
from vllm_sparsekv.methods.prefill_scored import PrefillScoredSelector, window_attention


@register("h2o")
class H2OSelector(PrefillScoredSelector):
    summary = ("prefill-time eviction (H2O): attention accumulated over every prompt query scores the "
               "prompt pages once; decode attends to the best within the budget plus sink/recent pages.")
    accumulate = True
    fresh_block_score = 0.0

    def token_scores(self, queries, key_cache, block_row, seq_len, scale):
        return window_attention(queries, key_cache, block_row, seq_len, scale)
