"""H2O (Zhang et al., 2023): heavy hitters by attention accumulated over every prompt query, plus
the recent window. Accumulated over all prefill chunks; decode-time accumulation would need the
attention weights from the decode kernel, which it does not return, so the heavy hitters are fixed
at the end of prefill (pages written during decode are kept only while they are recent).

The paper splits the KV budget in two halves, heavy hitters and the most recent tokens
(``recent_ratio`` 0.5, the default). ``recent_ratio`` 0 is the variant of the SnapKV/PyramidKV
baselines (KVCache-Factory): a fixed window, here ``recent_tokens``. Accumulated attention favours
early tokens (a token is summed over every query after it) and local text, so a needle in the middle
of a long prompt is rarely a heavy hitter, and with a 32-64-token window the question at the end of a
chat prompt is not either (benchmarks/results/quality_smollm2_methods_notes.md: where H2O loses the
needle tasks).
"""

from __future__ import annotations

import torch
from pydantic import Field

from vllm_sparsekv.budgets import request_budget_pages
from vllm_sparsekv.kernels import num_pages
from vllm_sparsekv.methods.base import MethodOptions, register
from vllm_sparsekv.methods.prefill_scored import PrefillScoredSelector, window_attention

# Score of a page in the recent window: above any accumulated attention mass (at most the number of
# prompt queries times the group size), rising with position so that the newest pages win a tie.
WINDOW_SCORE = 1e30


class H2OOptions(MethodOptions):
    recent_ratio: float = Field(0.5, ge=0.0, lt=1.0)
    """Share of each request's budget given to its most recent pages (H2O's protocol: half); the heavy hitters get the rest. 0: only `recent_tokens`."""


@register("h2o")
class H2OSelector(PrefillScoredSelector):
    summary = ("prefill-time eviction (H2O): attention accumulated over every prompt query scores the "
               "prompt pages once; decode attends to the best of them within the budget, the sink pages and "
               "the most recent pages (`h2o.recent_ratio` of the budget, half as in the paper).")
    options_model = H2OOptions
    accumulate = True
    fresh_block_score = 0.0

    def token_scores(self, queries, key_cache, block_row, seq_len, scale):
        return window_attention(queries, key_cache, block_row, seq_len, scale)

    def score_pages(self, query, key_cache, block_table, seq_lens, max_pages):
        """Heavy-hitter scores, with the last ceil(recent_ratio x budget) pages of each request
        raised above them (the request's uniform budget; per-head allocations scale the rest).
        Device ops only, no host sync (CUDA-graph capturable)."""
        scores = super().score_pages(query, key_cache, block_table, seq_lens, max_pages)
        ratio = self.options.recent_ratio
        if ratio <= 0.0:
            return scores
        bs = self.geometry.block_size
        budget = request_budget_pages(self.config, seq_lens, bs, selects_all=False)
        window = torch.ceil(budget.to(torch.float64) * ratio).long()
        npg = num_pages(seq_lens, bs).to(scores.device)
        p = torch.arange(max_pages, device=scores.device)
        recent = (p[None, :] >= (npg - window.to(scores.device))[:, None]) & (p[None, :] < npg[:, None])
        boost = WINDOW_SCORE * (1.0 + p.to(torch.float32) / max(max_pages, 1))
        return torch.where(recent[:, None, :], boost[None, None, :], scores)
