"""IoU between what a sparse method selects and the oracle top-k of exact attention (Spotlight).

Pure functions over tensors. Conventions follow ``vllm_sparsekv/kernels`` (README there): one decode
step, ``Hq`` query heads, ``Hkv`` KV heads, ``G = Hq // Hkv``; query head h reads KV head h // G;
pages are ``page_size`` consecutive tokens; a selection is ``page_idx`` ``[..., Hkv, k_max]`` with
``-1`` padding (the output of ``select_pages``), or a boolean mask over pages or tokens.

Oracle, per KV head, at the same budget as the method: the softmax attention of every query head of
the group over the ``L`` keys, summed over the group (the GQA group shares one selection) and, for
pages, summed over each page's tokens; then the top-k. ``forced`` sink/recent pages can be given to
both sides, so that the comparison is about the pages the scores chose.

Also: ``attention_recall`` — the share of the exact attention mass that the selection covers, which
says more about output error than IoU when attention is flat.
"""

from __future__ import annotations

import math

import torch


def indices_to_mask(idx: torch.Tensor, num_items: int) -> torch.Tensor:
    """``[..., k]`` integer indices (entries < 0 ignored) -> ``[..., num_items]`` bool mask."""
    idx = idx.long()
    valid = (idx >= 0) & (idx < num_items)
    mask = torch.zeros(*idx.shape[:-1], num_items + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, torch.where(valid, idx, torch.full_like(idx, num_items)), True)
    return mask[..., :num_items]


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of two boolean masks over the last dim -> ``[...]`` float; 1.0 where both are empty."""
    a, b = a.bool(), b.bool()
    inter = (a & b).sum(-1).float()
    union = (a | b).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def exact_attention(q: torch.Tensor, k: torch.Tensor, scale: float | None = None,
                    seq_len: int | None = None) -> torch.Tensor:
    """Softmax attention probabilities of one decode query over its keys.

    ``q`` ``[Hq, D]``, ``k`` ``[L, Hkv, D]`` -> ``[Hq, L]`` (float32). Keys at positions >= seq_len
    are masked out.
    """
    hq, d = q.shape
    L, hkv, _ = k.shape
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kk = k.float().repeat_interleave(g, dim=1).permute(1, 0, 2)  # [Hq, L, D]
    logits = torch.einsum("hd,hld->hl", q.float(), kk) * scale
    if seq_len is not None and seq_len < L:
        logits[:, seq_len:] = float("-inf")
    return torch.softmax(logits, dim=-1)


def group_attention(attn: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[Hq, L]`` -> ``[Hkv, L]``: attention summed over each KV head's query group."""
    hq, L = attn.shape
    return attn.view(num_kv_heads, hq // num_kv_heads, L).sum(1)


def page_mass(attn_kv: torch.Tensor, page_size: int) -> torch.Tensor:
    """``[Hkv, L]`` -> ``[Hkv, ceil(L / page_size)]``: attention mass per page."""
    h, L = attn_kv.shape
    P = -(-L // page_size)
    pad = P * page_size - L
    if pad:
        attn_kv = torch.nn.functional.pad(attn_kv, (0, pad))
    return attn_kv.view(h, P, page_size).sum(-1)


def forced_pages(num_pages: int, sink_pages: int = 0, recent_pages: int = 0,
                 device=None) -> torch.Tensor:
    m = torch.zeros(num_pages, dtype=torch.bool, device=device)
    m[: min(sink_pages, num_pages)] = True
    if recent_pages:
        m[max(num_pages - recent_pages, 0):] = True
    return m


def topk_mask(scores: torch.Tensor, k: int | torch.Tensor, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the top-``k`` entries of ``scores`` ``[..., N]`` per row, ties to the lower
    index (as ``select_pages``). ``forced`` entries (bool ``[N]`` or ``[..., N]``) are always in and
    count toward k. ``k`` may be a tensor ``[...]`` (per-head budgets)."""
    s = scores.float().clone()
    N = s.shape[-1]
    if forced is not None:
        s = torch.where(forced.expand_as(s), torch.full_like(s, float("inf")), s)
    # stable tie-breaking toward lower indices: sort descending by (score, -index)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(N, device=s.device).expand_as(order))
    kk = torch.as_tensor(k, device=s.device)
    if forced is not None:
        kk = torch.maximum(kk, forced.expand_as(s).sum(-1))
    kk = kk.clamp(max=N)
    while kk.dim() < ranks.dim():
        kk = kk.unsqueeze(-1)
    return (ranks < kk) & torch.isfinite(scores.float()) | (
        forced.expand_as(s) if forced is not None else torch.zeros_like(ranks, dtype=torch.bool))


def oracle_pages(attn: torch.Tensor, num_kv_heads: int, page_size: int, budget_pages: int,
                 sink_pages: int = 0, recent_pages: int = 0) -> torch.Tensor:
    """``[Hq, L]`` exact attention -> ``[Hkv, P]`` bool: top-``budget_pages`` pages by group mass."""
    pm = page_mass(group_attention(attn, num_kv_heads), page_size)
    f = forced_pages(pm.shape[-1], sink_pages, recent_pages, pm.device) if (sink_pages or recent_pages) else None
    return topk_mask(pm, budget_pages, f)


def oracle_tokens(attn: torch.Tensor, num_kv_heads: int | None, budget_tokens: int) -> torch.Tensor:
    """Token-level oracle: ``[Hq, L]`` -> top-k tokens per query head (``num_kv_heads=None``) or per
    KV head by group mass."""
    a = attn if num_kv_heads is None else group_attention(attn, num_kv_heads)
    return topk_mask(a, budget_tokens)


def pages_to_tokens(page_mask: torch.Tensor, page_size: int, seq_len: int) -> torch.Tensor:
    """``[..., P]`` page mask -> ``[..., seq_len]`` token mask."""
    return page_mask.repeat_interleave(page_size, dim=-1)[..., :seq_len]


def attention_recall(attn_kv: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Share of each head's attention mass inside the selected tokens: ``[H, L]`` x ``[H, L]`` -> ``[H]``."""
    tot = attn_kv.sum(-1)
    return (attn_kv * token_mask.float()).sum(-1) / tot.clamp(min=1e-30)


def page_iou(page_idx: torch.Tensor, attn: torch.Tensor, page_size: int, sink_pages: int = 0,
             recent_pages: int = 0) -> dict[str, torch.Tensor]:
    """IoU and recall of one decode step's page selection vs the oracle at the same budget.

    ``page_idx`` ``[Hkv, k_max]`` (-1 padded, the method's selection), ``attn`` ``[Hq, L]`` exact
    attention. The budget per head is the number of pages the method selected for that head.
    Returns ``{"iou": [Hkv], "recall": [Hkv], "oracle_recall": [Hkv]}``.
    """
    hkv = page_idx.shape[0]
    L = attn.shape[-1]
    P = -(-L // page_size)
    sel = indices_to_mask(page_idx, P)
    k = sel.sum(-1)
    pm = page_mass(group_attention(attn, hkv), page_size)
    f = forced_pages(P, sink_pages, recent_pages, attn.device) if (sink_pages or recent_pages) else None
    orc = topk_mask(pm, k, f)
    ga = group_attention(attn, hkv)
    return {"iou": iou(sel, orc),
            "recall": attention_recall(ga, pages_to_tokens(sel, page_size, L)),
            "oracle_recall": attention_recall(ga, pages_to_tokens(orc, page_size, L))}


def summarize(per_layer_head: torch.Tensor) -> dict:
    """Mean / min / per-layer means of a ``[layers, heads]`` (or ``[steps, layers, heads]``) array."""
    x = per_layer_head.float()
    while x.dim() > 2:
        x = x.mean(0)
    return {"mean": x.mean().item(), "min": x.min().item(),
            "per_layer": [round(v, 4) for v in x.mean(-1).tolist()]}
