"""Startup checks: the sparsekv config and what the model/engine asks of the backend.

Runs in the process that creates the engine config, before any worker starts, so a bad setting
stops `vllm serve` / `LLM(...)` with a message naming the option instead of failing mid-serve.
"""

from __future__ import annotations

import logging

from vllm_sparsekv.config import SparseKVConfigError, load_config
from vllm_sparsekv.methods import get_method

logger = logging.getLogger("vllm.sparsekv")


def validate_engine_config(vllm_config) -> None:
    cfg = load_config(vllm_config.additional_config)  # raises SparseKVConfigError naming the field
    problems = []
    model = vllm_config.model_config
    check = getattr(get_method(cfg.method), "validate_model", None)  # e.g. a trained checkpoint's geometry
    if model is not None and check is not None:
        try:
            check(cfg, model.get_total_num_hidden_layers(), model.get_total_num_kv_heads(), model.get_head_size())
        except ValueError as e:
            raise SparseKVConfigError(str(e)) from None
        tp = getattr(vllm_config.parallel_config, "tensor_parallel_size", 1)
        if tp != 1:
            problems.append(f"method {cfg.method!r} with tensor_parallel_size={tp} (its weights are per KV head of the whole model)")
    if model is not None:
        if getattr(model, "use_mla", False):
            problems.append("MLA attention (DeepSeek-style latent KV) is not supported")
        if getattr(model, "is_encoder_decoder", False):
            problems.append("encoder-decoder models are not supported")
        window = model.get_sliding_window() if hasattr(model, "get_sliding_window") else None
        if window:
            problems.append(f"sliding-window attention (window {window}) is not supported")
    tp = getattr(vllm_config.parallel_config, "tensor_parallel_size", 1)
    if cfg.budget_allocation in ("infscore", "headkv") and tp != 1:
        problems.append(f"budget_allocation={cfg.budget_allocation!r} with tensor_parallel_size={tp} "
                        "(per-head budgets are indexed by the whole model's KV heads); use uniform or pyramid")
    cache = vllm_config.cache_config
    if cache is not None and get_method(cfg.method).needs_prefill_queries and cache.enable_prefix_caching:
        # page scores from one request's prefill would be served to another sharing the block
        logger.warning("sparsekv: method %r scores pages per request; prefix caching turned off", cfg.method)
        cache.enable_prefix_caching = False
    if cache is not None and str(cache.cache_dtype).startswith("fp8"):
        problems.append(f"kv_cache_dtype={cache.cache_dtype!r} is not supported; allowed: auto")
    unit = getattr(cache, "prefix_match_unit", None)
    if unit is not None and cache.block_size and unit != cache.block_size:
        problems.append(
            f"prefix_match_unit={unit} (finer than the block size) copies partial blocks behind the "
            "backend's back, which would leave page summaries stale; leave it unset"
        )
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        problems.append("KV connectors / offloading (kv_transfer_config) write blocks the page summaries never see")
    if problems:
        raise SparseKVConfigError(
            "--attention-backend sparsekv cannot serve this configuration:\n  - " + "\n  - ".join(problems)
        )
    _check_head_budgets(vllm_config)


def _check_head_budgets(vllm_config) -> None:
    """infscore/headkv: the head-score profile must describe this model (layers x KV heads)."""
    from vllm_sparsekv.budgets import check_profile

    cfg, model = load_config(vllm_config.additional_config), vllm_config.model_config
    if model is not None and cfg.budget_allocation in ("infscore", "headkv"):
        try:
            check_profile(cfg, model.get_total_num_hidden_layers(), model.get_total_num_kv_heads())
        except ValueError as e:
            raise SparseKVConfigError(str(e)) from None
