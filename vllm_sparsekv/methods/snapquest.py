"""A hybrid of a prefill keep-set and per-step selection: SnapKV's prefill attention picks a share
of each request's budget once (`keep_share`), and Quest's page bounds fill the rest at every decode
step with the pages the current query needs. SnapKV alone cannot bring back a page the prompt's
last queries overlooked; Quest alone ranks by a loose upper bound on small models (the quality
reports): each covers the other's miss."""

from __future__ import annotations

import torch
from pydantic import Field

from vllm_sparsekv import budgets, kernels
from vllm_sparsekv.methods.base import register
from vllm_sparsekv.methods.snapkv import SnapKVOptions, SnapKVSelector

KEEP = 1e30  # a kept page's score: above any Quest bound, below the selection's forced pages


class SnapQuestOptions(SnapKVOptions):
    keep_share: float = Field(0.5, ge=0.0, le=1.0)
    """Share of the budget (beyond the sink and recent pages) that SnapKV's prefill keep-set takes;
    Quest picks the rest at every step (0 = Quest's ranking only, 1 = SnapKV's)."""


@register("snapquest")
class SnapQuestSelector(SnapKVSelector):
    summary = ("hybrid: SnapKV's prefill keep-set for `snapquest.keep_share` of the budget, Quest's page "
               "bounds for the rest at every decode step.")
    options_model = SnapQuestOptions
    deprecated_keys = {}
    evicts = False  # Quest can bring back any page
    bounds: torch.Tensor | None = None

    def side_state(self, cache_dtype):
        g = self.geometry
        return {**super().side_state(cache_dtype), "bounds": ((g.num_kv_heads, 2, g.head_size), cache_dtype)}

    def on_kv_write(self, key, key_cache, slot_mapping):
        super().on_kv_write(key, key_cache, slot_mapping)
        kernels.page_bounds_update(key_cache, slot_mapping, self.bounds)

    def score_pages(self, query, key_cache, block_table, seq_lens, max_pages):
        bs = self.geometry.block_size
        quest = kernels.quest_page_scores(query, self.bounds, block_table, seq_lens, max_pages, bs)
        snap = super().score_pages(query, key_cache, block_table, seq_lens, max_pages)  # -inf past the end
        sink, recent = self.config.sink_pages(bs), self.config.recent_pages(bs)
        budget = budgets.request_budget_pages(self.config, seq_lens, bs, False).long()
        keep = (self.options.keep_share * (budget - sink - recent).clamp(min=0)).floor().long()  # [N]
        # the sink/recent pages are selected anyway: the keep-set ranks the others
        pages = torch.arange(max_pages, device=snap.device)
        npg = budgets.kernel_num_pages(seq_lens, bs).long()[:, None]
        is_forced = (pages[None, :] < sink) | (pages[None, :] >= npg - recent)
        snap = snap.masked_fill(is_forced[:, None, :], float("-inf"))
        rank = torch.empty_like(pages.expand_as(snap))
        rank.scatter_(2, snap.argsort(dim=2, descending=True, stable=True), pages.expand_as(snap))
        kept = (rank < keep[:, None, None]) & (snap > float("-inf"))
        return torch.where(kept, torch.full_like(quest, KEEP), quest)
