"""Shared machinery of the prefill-time eviction baselines (SnapKV, PyramidKV, H2O).

They decide from prefill attention which prompt pages a request keeps; decode then attends to the
kept pages (top by score within the budget) plus the sink and recent pages. The per-page score
lives in a side tensor [num_blocks, Hkv] indexed by physical block, and is computed in a side pass
over the paged cache, one KV head at a time and in key chunks, so long prompts never materialise a
full attention matrix. Scores are specific to the request that wrote them, so these methods refuse
prefix caching at startup (a shared block would carry another request's scores).
"""

from __future__ import annotations

import torch

from vllm_sparsekv.kernels import mask_past_pages
from vllm_sparsekv.methods.base import PageSelector

KEY_CHUNK = 4096  # keys per step of the side pass
QUERY_CHUNK = 256  # queries per step (H2O scores every prompt query)


def window_attention(queries: torch.Tensor, key_cache: torch.Tensor, block_row: torch.Tensor,
                     seq_len: int, scale: float) -> torch.Tensor:
    """Causal softmax attention of the request's last `w` query tokens (positions seq_len-w ..
    seq_len-1) over its keys, summed over the queries: [Hq, seq_len] float32.

    queries [w, Hq, D]; key_cache [B, bs, Hkv, D] (strided view); block_row [max_blocks] int.
    Two passes over the keys, KEY_CHUNK at a time, for each QUERY_CHUNK of queries: the softmax's
    row max and sum, then the probabilities. Nothing of the prompt's length is held but the output,
    so a 128K prompt's side pass takes tens of MB, not the GBs of a [heads, queries, keys] matrix."""
    w, hq, d = queries.shape
    bs, hkv = key_cache.shape[1], key_cache.shape[2]
    g = hq // hkv
    dev = queries.device
    total = torch.zeros(hkv, g, seq_len, dtype=torch.float32, device=dev)
    starts = range(0, seq_len, KEY_CHUNK)
    for q0 in range(0, w, QUERY_CHUNK):
        q1 = min(w, q0 + QUERY_CHUNK)
        q = queries[q0:q1].float().permute(1, 0, 2).reshape(hkv, g * (q1 - q0), d)  # rows (g, i)
        qpos = torch.arange(seq_len - w + q0, seq_len - w + q1, device=dev).repeat(g)

        def logits(k0: int) -> torch.Tensor:  # [Hkv, rows, keys of the chunk], masked causally
            pos = torch.arange(k0, min(seq_len, k0 + KEY_CHUNK), device=dev)
            k = key_cache[block_row[pos // bs].long(), pos % bs].float().transpose(0, 1)  # [Hkv, c, D]
            x = torch.bmm(q, k.transpose(1, 2)) * scale
            return x.masked_fill_(pos[None, None, :] > qpos[None, :, None], float("-inf"))

        # every row sees key 0, so the first chunk makes its max finite
        m = torch.full((hkv, q.shape[1], 1), float("-inf"), device=dev)
        l = torch.zeros_like(m)
        for k0 in starts:
            x = logits(k0)
            m_new = torch.maximum(m, x.amax(-1, keepdim=True))
            l = l * torch.exp(m - m_new) + torch.exp(x - m_new).sum(-1, keepdim=True)
            m = m_new
        for k0 in starts:
            p = torch.exp(logits(k0) - m) / l
            total[:, :, k0 : k0 + p.shape[-1]] += p.view(hkv, g, q1 - q0, -1).sum(2)
    return total.reshape(hq, seq_len)


def pages_of(token_scores: torch.Tensor, block_size: int) -> torch.Tensor:
    """[H, L] per-token scores -> [H, ceil(L / bs)] per-page sums."""
    h, length = token_scores.shape
    pad = (-length) % block_size
    return torch.nn.functional.pad(token_scores, (0, pad)).view(h, -1, block_size).sum(-1)


class PrefillScoredSelector(PageSelector):
    """Subclasses define `token_scores` (per query head, per token) and whether chunk scores
    replace earlier ones (SnapKV: the last observation window decides) or add up (H2O)."""

    needs_prefill_queries = True
    evicts = True
    accumulate = False
    fresh_block_score = float("inf")  # a block not yet scored by a prefill (decode pages) is kept
    page_scores: torch.Tensor | None = None

    def side_state(self, cache_dtype):
        return {"page_scores": ((self.geometry.num_kv_heads,), torch.float32)}

    def on_kv_write(self, key, key_cache, slot_mapping):
        """A block whose offset 0 is written in this step is fresh: its score is reset. Graph-safe
        (no host sync): every token of such a block writes the same value, found by looking back
        `offset` entries (a block's tokens in one step are consecutive in slot_mapping); padding
        (-1, or past the cache) writes block 0's own value back (vLLM's null block, never used)."""
        bs = self.geometry.block_size
        slots = slot_mapping.reshape(-1).long()
        num_blocks = self.page_scores.shape[0]
        valid = (slots >= 0) & (slots < num_blocks * bs)
        blk = torch.where(valid, slots // bs, 0)
        first = torch.arange(slots.numel(), device=slots.device) - slots % bs
        fresh = valid & (first >= 0) & (slots[first.clamp(min=0)] == blk * bs)
        self.page_scores[blk] = torch.where(fresh[:, None], self.fresh_block_score, self.page_scores[blk])

    def token_scores(self, queries, key_cache, block_row, seq_len, scale) -> torch.Tensor:
        raise NotImplementedError

    def observe_prefill(self, queries, key_cache, block_row, seq_len: int, scale: float) -> None:
        """One request's prefill chunk: `queries` [q, Hq, D] are its last q prompt positions."""
        g = self.geometry
        per_token = self.token_scores(queries, key_cache, block_row, seq_len, scale)  # [Hq, L]
        per_head = per_token.view(g.num_kv_heads, g.group_size, seq_len).sum(1)
        pages = pages_of(per_head, g.block_size).transpose(0, 1)  # [P, Hkv]
        blocks = block_row[: pages.shape[0]].long()
        if self.accumulate:
            self.page_scores.index_add_(0, blocks, pages)
        else:
            self.page_scores[blocks] = pages

    def score_pages(self, query, key_cache, block_table, seq_lens, max_pages):
        bt = block_table[:, :max_pages].long().clamp(min=0)
        if bt.shape[1] < max_pages:
            bt = torch.nn.functional.pad(bt, (0, max_pages - bt.shape[1]))
        scores = self.page_scores[bt].transpose(1, 2)  # [N, Hkv, P]
        return mask_past_pages(scores, seq_lens, self.geometry.block_size)
