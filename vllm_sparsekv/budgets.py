"""Token budget -> pages per (layer, KV head).

`layer_head_weights` returns a [num_layers, num_kv_heads] float tensor of budget multipliers whose
mean over the sparse layers' heads is 1, so the total budget is preserved: head (l, h) of a request
whose uniform budget is B pages gets round(B * w[l, h]) pages (never fewer than its sink and recent
pages; the selection adds those). Allocations: `uniform` (all ones), `pyramid` (PyramidKV-style,
linearly shrinking with depth), and — from a profile file — `infscore` / `headkv`.
"""

from __future__ import annotations

import torch


def _normalise(w: torch.Tensor, sparse_layers: list[int]) -> torch.Tensor:
    w = w.clone()
    w[sparse_layers] = w[sparse_layers] / w[sparse_layers].mean()
    return w


def pyramid(num_layers: int, num_kv_heads: int, sparse_layers: list[int], ratio: float = 4.0) -> torch.Tensor:
    """Budgets fall linearly with depth from `ratio` times the last sparse layer's to it."""
    w = torch.ones(num_layers, num_kv_heads)
    if len(sparse_layers) > 1:
        steps = torch.linspace(ratio, 1.0, len(sparse_layers))
        w[sparse_layers] = steps[:, None].expand(-1, num_kv_heads)
    return _normalise(w, sparse_layers)


def layer_head_weights(config, num_layers: int, num_kv_heads: int) -> torch.Tensor:
    sparse = [i for i in range(num_layers) if i not in set(config.dense_layers)]
    kind = config.budget_allocation
    if kind == "uniform" or not sparse:
        return torch.ones(num_layers, num_kv_heads)
    if kind == "pyramid":
        return pyramid(num_layers, num_kv_heads, sparse)
    raise NotImplementedError(f"budget_allocation={kind!r} is not implemented yet")
