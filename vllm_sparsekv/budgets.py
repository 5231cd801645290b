"""Token budget -> pages per request, and per (layer, KV head).

`request_budget_pages` is the one place the per-request rules live (the backend's metadata
builder and the offline sweep both call it); `max_selected_pages` is the static k they imply.

`layer_head_weights` returns a [num_layers, num_kv_heads] float tensor of budget multipliers whose
mean over the sparse layers' heads is 1, so the total budget is preserved: head (l, h) of a request
whose uniform budget is B pages gets round(B * w[l, h]) pages. Allocations:

- ``uniform``: all ones.
- ``pyramid`` (PyramidKV-style): budgets fall linearly with depth.
- ``headkv`` (HeadKV, Fu et al.): from a head-score profile (``head_budgets``, written by
  ``sparsekv profile-heads``; its ``headkv_retrieval`` score). Scores are normalised to sum 1,
  sharpened by ``budget_temp`` (s ** temp, renormalised), then every head keeps a fixed share
  ``1 - 1/beta`` of the uniform budget and the remaining ``1/beta`` of the total is a global pool
  shared in proportion to the scores::

      w[l, h] = (1 - 1/beta) + N * s[l, h] / beta        (N = sparse heads, sum s = 1)

  which is HeadKV's ``round(s * (B // beta) * N + B - B // beta)`` divided by B.
- ``infscore`` (DiliLazyKV's collaborative layer-head allocation): from the profile's
  ``infscore`` (harmonic mean of DiliScore and LazyScore). With S = infscore ** temp, the layer's
  aggregate A_l = sum_h S[l, h] (inter-layer aggregation) and the head's share inside its layer
  d[l, h] = S[l, h] / A_l (intra-layer distribution), the pool is shared in proportion to
  ``(A_l + eps_L) * d[l, h]`` = ``S + eps_L * S / A_l``: layers get the pool their heads' scores add
  up to, smoothed by ``eps_L`` (``INFSCORE_LAYER_EPS``, 0.01 as in DiliLazyKV's release) so no
  layer's heads are starved by a low aggregate, and inside a layer the heads share it by their
  scores. The beta split is the same as HeadKV's. (The seed's README names "InfScore variance"
  without a formula; this is the formula of its released allocation code, minus its +0.5-token
  rounding offset, which has no meaning for multipliers.)

Floors and exactness: every head attends at least its sink and recent pages (the selection forces
them). Heads whose share would fall below that are raised to it and the others pay for it in
proportion to their excess, so the total stays the same (``apply_floor``). When the page size and a
fixed ``token_budget`` are known (``block_size=`` given), the multipliers are made exact page
counts: ``B * w`` are integers (largest-remainder rounding) summing to exactly ``B * N``.
"""

from __future__ import annotations

import json
import math
import os

import torch

from vllm_sparsekv.kernels import num_pages as kernel_num_pages

INFSCORE_LAYER_EPS = 0.01
SCORE_FIELD = {"infscore": "infscore", "headkv": "headkv_retrieval"}


class HeadBudgetsError(ValueError):
    """A missing or mismatched `head_budgets` profile; the message names the setting."""


# ---------------------------------------------------------------------------- per-request pages


def _selects_all(config, selects_all: bool | None) -> bool:
    if selects_all is not None:
        return selects_all
    from vllm_sparsekv.methods import get_method

    return get_method(config.method).selects_all


def request_budget_pages(config, seq_lens: torch.Tensor, block_size: int, selects_all: bool | None = None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """Pages each decode request may attend per (layer, KV head), before the per-head multipliers
    of `layer_head_weights`. `seq_lens` [N] (int32 or int64, the decode token included) ->
    [N] int32, or written into `out` ([N], or [N, H]: the same value in every column) and returned.

    The rules, with num_pages = ceil(seq_len / block_size):
    - `selects_all` (the method reads every page, e.g. `full`): num_pages;
    - else `token_budget`: ceil(token_budget / block_size) (may exceed num_pages; the selection
      clamps it);
    - else `budget_fraction`: ceil(num_pages * budget_fraction), in float64 (= Python's math.ceil);
    - then `min_context`: requests with seq_len < min_context get num_pages (decode dense).

    `selects_all=None` looks the method up (`config.method`); the builder passes its cached flag.
    Device ops only: no host sync, shapes fixed by N, so CUDA-graph capturable (a few [N]
    temporaries are allocated)."""
    all_pages = _selects_all(config, selects_all)
    if out is None:
        out = torch.empty(seq_lens.shape[0], dtype=torch.int32, device=seq_lens.device)
    if out.dim() not in (1, 2) or out.shape[0] != seq_lens.shape[0]:
        raise ValueError(f"out must be [N] or [N, H] with N = {seq_lens.shape[0]}, got {list(out.shape)}")
    col = out if out.dim() == 1 else out[:, 0]
    num_pages = kernel_num_pages(seq_lens, block_size)
    if all_pages:
        col.copy_(num_pages)
    elif config.token_budget is not None:
        col.fill_(math.ceil(config.token_budget / block_size))
    else:
        col.copy_(torch.ceil(num_pages.to(torch.float64) * config.budget_fraction))
    if config.min_context and not all_pages:
        col.copy_(torch.where(seq_lens < config.min_context, num_pages, col))
    if out.dim() == 2 and out.shape[1] > 1:
        out[:, 1:].copy_(col[:, None].expand(-1, out.shape[1] - 1))
    return out


def served_decode_lens(seq_lens: torch.Tensor, query_lens: torch.Tensor) -> torch.Tensor:
    """The lengths of the decode rows that serve a request. A captured batch pads with rows of no
    query token (whose host lengths may be stale: a 48-request run counted 64 rows on the GPU),
    and vLLM's warm-up and capture batches decode dummy rows of a 1-token context; a served decode
    row has its query token and holds at least its prompt's first token and the new one."""
    return seq_lens[(query_lens >= 1) & (seq_lens >= 2)]


def decode_page_counts(config, seq_lens: torch.Tensor, block_size: int, num_kv_heads: int, num_layers: int,
                       k_max: int, selects_all: bool | None = None, weights: torch.Tensor | None = None,
                       layer_k_max: list[int] | None = None) -> tuple[int, int, int]:
    """(attended, held, rows) pages of one decode step over `num_layers` sparse layers, by the
    selection's own rule k = min(max(budget, sink + recent), pages, k_max) per (request, layer,
    KV head): what `select_pages` returns as num_selected, computed on the host from the host's
    sequence lengths (the sparsity counters: no device op, no sync). `weights` [num_layers, Hkv]
    float32 (non-uniform allocations) multiply the budget as the builder does, each layer capped
    by its `layer_k_max`. Rows with no page (padding of a captured batch) count nowhere."""
    lens = seq_lens.to(torch.int64)
    npg = kernel_num_pages(lens, block_size)
    lens, npg = lens[npg > 0], npg[npg > 0]
    if not npg.numel():
        return 0, 0, 0
    budget = request_budget_pages(config, lens, block_size, selects_all).to(torch.int64)
    forced = npg.clamp(max=config.sink_pages(block_size) + config.recent_pages(block_size))
    if weights is None:
        k = torch.minimum(torch.maximum(budget, forced), npg).clamp(max=k_max)
        attended = int(k.sum()) * num_kv_heads * num_layers
    else:
        per_head = torch.round(budget.to(torch.float32)[None, :, None] * weights[:, None, :]).to(torch.int64)
        k = torch.minimum(torch.maximum(per_head, forced[None, :, None]), npg[None, :, None])
        attended = int(torch.minimum(k, torch.tensor(layer_k_max)[:, None, None]).sum())
    return attended, int(npg.sum()) * num_kv_heads * num_layers, int(npg.numel()) * num_layers


def max_selected_pages(config, block_size: int, max_model_len: int, selects_all: bool | None = None) -> int:
    """Static k of the selection: the most pages any (request, KV head) can attend under
    `request_budget_pages` (before per-head multipliers), capped by max_model_len's pages; never
    below the forced sink + recent pages."""
    max_pages = math.ceil(max_model_len / block_size)
    if _selects_all(config, selects_all):
        return max_pages
    forced = config.sink_pages(block_size) + config.recent_pages(block_size)
    if config.token_budget is not None:
        budget = math.ceil(config.token_budget / block_size)
    else:
        budget = math.ceil(config.budget_fraction * max_pages)
    dense_short = math.ceil(config.min_context / block_size)
    return min(max_pages, max(budget, forced, dense_short))


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


# ---------------------------------------------------------------------------- profile file


def load_head_scores(path: str | None, num_layers: int, num_kv_heads: int, field: str) -> torch.Tensor:
    """[num_layers, num_kv_heads] float64 scores from a `sparsekv profile-heads` JSON file."""
    if not path:
        raise HeadBudgetsError("sparsekv.head_budgets: required by this budget_allocation; give the path of a "
                               "head-score profile (`sparsekv profile-heads MODEL --out FILE.json`)")
    if not os.path.isfile(path):
        raise HeadBudgetsError(f"sparsekv.head_budgets: file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise HeadBudgetsError(f"sparsekv.head_budgets: {path} is not a readable JSON profile ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("scores"), dict):
        raise HeadBudgetsError(f"sparsekv.head_budgets: {path} has no 'scores' object; "
                               "is it a `sparsekv profile-heads` output?")
    got_l, got_h = data.get("num_layers"), data.get("num_kv_heads")
    if (got_l, got_h) != (num_layers, num_kv_heads):
        raise HeadBudgetsError(
            f"sparsekv.head_budgets: {path} was profiled on {data.get('model', 'a model')} with {got_l} layers x "
            f"{got_h} KV heads, but this model has {num_layers} layers x {num_kv_heads} KV heads; "
            "profile this model with `sparsekv profile-heads`")
    if field not in data["scores"]:
        raise HeadBudgetsError(f"sparsekv.head_budgets: {path} has no '{field}' scores "
                               f"(has: {', '.join(sorted(data['scores']))})")
    try:
        s = torch.tensor(data["scores"][field], dtype=torch.float64)
    except (TypeError, ValueError) as e:
        raise HeadBudgetsError(f"sparsekv.head_budgets: {path}: '{field}' is not a numeric table ({e})") from None
    if tuple(s.shape) != (num_layers, num_kv_heads):
        raise HeadBudgetsError(f"sparsekv.head_budgets: {path}: '{field}' has shape {list(s.shape)}, "
                               f"expected [{num_layers}, {num_kv_heads}] (layers x KV heads)")
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise HeadBudgetsError(f"sparsekv.head_budgets: {path}: '{field}' scores must be finite and >= 0")
    return s


def check_profile(config, num_layers: int, num_kv_heads: int) -> None:
    """Startup check: raises HeadBudgetsError if the allocation's profile does not fit the model."""
    if config.budget_allocation in SCORE_FIELD:
        layer_head_weights(config, num_layers, num_kv_heads)


# ---------------------------------------------------------------------------- allocations


def _beta_split(share: torch.Tensor, beta: float) -> torch.Tensor:
    """share [n] summing to 1 -> multipliers (1 - 1/beta) + n * share / beta (mean exactly 1)."""
    n = share.numel()
    return (1.0 - 1.0 / beta) + n * share / beta


def _check_scores(s: torch.Tensor, what: str) -> None:
    if float(s.sum()) <= 0:
        raise HeadBudgetsError(f"sparsekv.head_budgets: every sparse layer's '{what}' score is 0; the profile "
                               "carries no signal to allocate by (profile with more or longer tests)")


def headkv(scores: torch.Tensor, beta: float, temp: float = 1.0) -> torch.Tensor:
    """HeadKV's allocation over the given heads' scores [..] -> multipliers, mean 1."""
    s = scores.double().flatten()
    _check_scores(s, "headkv_retrieval")
    s = s / s.sum()
    s = s.pow(temp)
    s = s / s.sum()
    return _beta_split(s, beta).reshape(scores.shape)


def infscore(scores: torch.Tensor, beta: float, temp: float = 1.0, layer_eps: float = INFSCORE_LAYER_EPS) -> torch.Tensor:
    """DiliLazyKV's collaborative layer-head allocation over [layers, heads] InfScores, mean 1."""
    S = scores.double().pow(temp)
    _check_scores(S, "infscore")
    A = S.sum(dim=1, keepdim=True)  # inter-layer aggregation
    d = torch.where(A > 0, S / A.clamp_min(1e-300), torch.full_like(S, 1.0 / S.shape[1]))  # intra-layer
    share = (A + layer_eps) * d
    share = share / share.sum()
    return _beta_split(share.flatten(), beta).reshape(scores.shape)


def apply_floor(w: torch.Tensor, min_w: float) -> torch.Tensor:
    """Raise multipliers below ``min_w`` to it; the others give up the difference in proportion to
    their excess over ``min_w``. Keeps the mean (1) exactly; ``min_w >= 1`` gives all ones."""
    w = w.double()
    if min_w <= 0 or bool((w >= min_w).all()):
        return w
    if min_w >= 1:
        return torch.ones_like(w)
    excess = (w - min_w).clamp_min(0)
    return min_w + excess * ((1.0 - min_w) / excess.mean())


def integer_pages(w: torch.Tensor, budget_pages: int, min_pages: int = 0) -> torch.Tensor:
    """Multipliers -> page counts summing to exactly ``budget_pages * w.numel()`` (largest remainder),
    each at least ``min_pages`` (``w`` must already respect the floor)."""
    total = budget_pages * w.numel()
    raw = (w.double() * budget_pages).flatten()
    pages = raw.floor().clamp_min(min_pages)
    short = int(total - pages.sum())
    if short > 0:
        order = torch.argsort(raw - raw.floor(), descending=True, stable=True)
        pages[order[:short]] += 1
    elif short < 0:  # only when the floor lifted some heads: take from the largest remainders' opposite
        order = torch.argsort(pages - raw, descending=False, stable=True)
        for i in order.tolist():
            if short == 0:
                break
            if pages[i] > min_pages:
                pages[i] -= 1
                short += 1
    return pages.reshape(w.shape)


def layer_head_weights(config, num_layers: int, num_kv_heads: int, block_size: int | None = None) -> torch.Tensor:
    """[num_layers, num_kv_heads] float32 multipliers; dense layers keep 1."""
    sparse = [i for i in range(num_layers) if i not in set(config.dense_layers)]
    kind = config.budget_allocation
    if kind == "uniform" or not sparse:
        if kind in SCORE_FIELD:  # still validate the file (startup check) even with no sparse layer
            load_head_scores(config.head_budgets, num_layers, num_kv_heads, SCORE_FIELD[kind])
        return torch.ones(num_layers, num_kv_heads)
    if kind == "pyramid":
        w = pyramid(num_layers, num_kv_heads, sparse).double()
    elif kind in SCORE_FIELD:
        scores = load_head_scores(config.head_budgets, num_layers, num_kv_heads, SCORE_FIELD[kind])
        beta, temp = config.budget_beta, config.budget_temp
        w = torch.ones(num_layers, num_kv_heads, dtype=torch.float64)
        sub = scores[sparse]
        w[sparse] = headkv(sub, beta, temp) if kind == "headkv" else infscore(sub, beta, temp)
    else:
        raise NotImplementedError(f"budget_allocation={kind!r} is not implemented")

    # every head keeps at least its forced (sink + recent) pages; the total stays the same
    if config.token_budget is not None:
        if block_size:
            forced = config.sink_pages(block_size) + config.recent_pages(block_size)
            b_pages = math.ceil(config.token_budget / block_size)
            min_w = forced / b_pages
        else:
            forced, b_pages = 0, 0
            min_w = (config.sink_tokens + max(1, config.recent_tokens)) / config.token_budget
        w[sparse] = apply_floor(w[sparse], min_w)
        if block_size:
            w[sparse] = integer_pages(w[sparse], b_pages, min(forced, b_pages)) / b_pages
    return w.float()
