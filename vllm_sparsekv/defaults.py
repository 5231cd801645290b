"""Startup defaults and warnings that keep sparse decode worth its name (issue 13).

- `apply_block_size(vllm_config)`: sparsekv's page size when --block-size is unset (32 tokens,
  where vLLM would pick 128 on CPU and 16 on CUDA), said in the startup log.
- `budget_warning(cfg, block_size, max_model_len)`: the warning for a budget that leaves no page to
  choose by score beyond the always-attended sink and recent pages (decode is then StreamingLLM
  whatever the method); `warn_budget(vllm_config)` logs it.
"""

from __future__ import annotations

import logging
import math

logger = logging.getLogger("vllm.sparsekv")

WARN_SHARE = 0.25  # budget_fraction: warn when contexts up to this share of max_model_len select nothing
_said: set[str] = set()  # check_and_update_config reruns on every VllmConfig: say each thing once


def _once(level: int, msg: str) -> None:
    if msg not in _said:
        _said.add(msg)
        logger.log(level, msg)


def apply_block_size(vllm_config) -> int | None:
    """Set sparsekv's default page size if the user left --block-size unset; log it. Returns the
    size set, or None when the user's choice stands."""
    from vllm_sparsekv.backend import compat

    size = compat.apply_default_block_size(vllm_config)
    if size is not None:
        _once(logging.INFO, f"sparsekv: block size {size} (sparsekv's default where --block-size is unset; "
                            f"vLLM's would be {compat.vllm_default_block_size()}, README 'Configuration' says why; "
                            "set --block-size to override)")
    return size


def _scores_pages(cfg) -> bool:
    """Whether the method chooses pages by a score (full reads all; streaming is sink + recent by
    design, so a budget of exactly those pages is what it means)."""
    from vllm_sparsekv.methods import get_method

    return not getattr(get_method(cfg.method), "selects_all", False) and cfg.method != "streaming"


def unselective_context(cfg, block_size: int, max_model_len: int) -> int:
    """The longest context, in tokens, at which decode drops pages but chooses none by score: the
    budget is no more than the forced sink + recent pages. 0 when there is none.

    The backend's own rules: the budget is `budgets.request_budget_pages` (min_context included:
    a shorter request is attended in full), and a request of n pages attends
    k = min(max(budget, forced), n) pages, forced ones first, so pages are chosen by score only
    when budget > forced. A token budget is the same for every context; a fraction only grows with
    n, so it is the contexts below some length that select nothing. Each page count n is checked
    at its shortest context, (n - 1) * block_size + 1 tokens. With per-head allocations (pyramid,
    headkv, infscore) this is the average head's budget."""
    import torch

    from vllm_sparsekv.budgets import request_budget_pages

    forced = cfg.sink_pages(block_size) + cfg.recent_pages(block_size)
    max_pages = math.ceil(max_model_len / block_size)
    if max_pages <= forced:
        return 0
    n = torch.arange(forced + 1, max_pages + 1)  # contexts that drop pages at a budget of `forced`
    budget = request_budget_pages(cfg, (n - 1) * block_size + 1, block_size, selects_all=False)
    bad = n[budget <= forced]
    return min(int(bad.max()) * block_size, max_model_len) if bad.numel() else 0


def budget_warning(cfg, block_size: int, max_model_len: int) -> str | None:
    """The warning text, or None when the budget leaves pages to choose for most contexts."""
    if not _scores_pages(cfg):
        return None
    upto = unselective_context(cfg, block_size, max_model_len)
    if upto == 0 or (cfg.token_budget is None and upto < WARN_SHARE * max_model_len):
        return None
    sink, recent = cfg.sink_pages(block_size), cfg.recent_pages(block_size)
    setting = (f"token_budget={cfg.token_budget}" if cfg.token_budget is not None
               else f"budget_fraction={cfg.budget_fraction}")
    if cfg.token_budget is not None:
        where = f"for every context of {max((sink + recent) * block_size + 1, cfg.min_context)} tokens or more"
    else:
        where = f"for contexts up to {upto} tokens ({100 * upto / max_model_len:.0f}% of max_model_len={max_model_len})"
    return (f"sparsekv.{setting} leaves no selectable page beyond sink ({cfg.sink_tokens} tokens = {_pages(sink)}) "
            f"and recent ({cfg.recent_tokens} tokens = {_pages(recent)}) at block size {block_size} "
            f"{where}: decode there reads only those pages, whatever method={cfg.method!r} scores. "
            "Raise the budget, or lower --block-size, sink_tokens or recent_tokens")


def _pages(n: int) -> str:
    return f"{n} page" if n == 1 else f"{n} pages"


def warn_budget(vllm_config) -> str | None:
    from vllm_sparsekv.config import load_config

    cache, model = vllm_config.cache_config, vllm_config.model_config
    if cache is None or model is None or not cache.block_size:
        return None
    msg = budget_warning(load_config(vllm_config.additional_config), cache.block_size, model.max_model_len)
    if msg:
        _once(logging.WARNING, msg)
    return msg
