"""Startup checks: the sparsekv config and what the model/engine asks of the backend.

Runs in the process that creates the engine config, before any worker starts, so a bad setting
stops `vllm serve` / `LLM(...)` with a message naming the option instead of failing mid-serve.
"""

from __future__ import annotations

import logging
import os

from vllm_sparsekv.backend import compat
from vllm_sparsekv.config import SparseKVConfigError, load_config
from vllm_sparsekv.methods import get_method

logger = logging.getLogger("vllm.sparsekv")
_LOGGED = "SPARSEKV_STARTUP_LINE"  # the line already logged, inherited by the processes vLLM spawns


def validate_engine_config(vllm_config, device_type: str | None = None) -> None:
    """Check the sparsekv config against the model and engine settings (raises SparseKVConfigError,
    whose first line names the field), adjust what must be adjusted (prefix caching for methods
    that score per request), and log one INFO line with the resolved settings. `device_type`
    ("cuda", "cpu", ...) is the platform's, for that line; None when unknown."""
    cfg = load_config(vllm_config.additional_config)  # raises SparseKVConfigError naming the field
    problems = []
    model = vllm_config.model_config
    method = get_method(cfg.method)
    num_layers = model.get_total_num_hidden_layers() if model is not None else None
    if num_layers is not None:
        out = [i for i in cfg.dense_layers if i >= num_layers]
        if out:
            raise SparseKVConfigError(
                f"sparsekv.dense_layers: layers {out} are out of range; this model has {num_layers} layers "
                f"(indices 0..{num_layers - 1})")
    _check_stats_file(cfg.stats_file)
    if model is not None:
        try:  # the method's own check of the model, e.g. a trained checkpoint's geometry
            method.validate_model(cfg, num_layers, model.get_total_num_kv_heads(), model.get_head_size())
        except ValueError as e:
            raise SparseKVConfigError(str(e)) from None
    tp = getattr(vllm_config.parallel_config, "tensor_parallel_size", 1)
    if method.whole_model_heads and tp != 1:
        problems.append(f"method {cfg.method!r} with tensor_parallel_size={tp} (its weights are per KV head of the whole model)")
    if model is not None:
        if getattr(model, "use_mla", False):
            problems.append("MLA attention (DeepSeek-style latent KV) is not supported")
        if getattr(model, "is_encoder_decoder", False):
            problems.append("encoder-decoder models are not supported")
        window = model.get_sliding_window() if hasattr(model, "get_sliding_window") else None
        if window:
            problems.append(f"sliding-window attention (window {window}) is not supported")
    if cfg.budget_allocation in ("infscore", "headkv") and tp != 1:
        problems.append(f"budget_allocation={cfg.budget_allocation!r} with tensor_parallel_size={tp} "
                        "(per-head budgets are indexed by the whole model's KV heads); use uniform or pyramid")
    cache = vllm_config.cache_config
    if cache is not None and method.needs_prefill_queries and cache.enable_prefix_caching:
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
    transfer = getattr(vllm_config, "kv_transfer_config", None)
    if cfg.offload.enabled:
        _check_offload(cfg, vllm_config)
        if transfer is None:  # our connector: frees passive pages' blocks, copies them to the host pool
            vllm_config.kv_transfer_config = compat.offload_transfer_config()
        elif not compat.is_offload_connector(transfer):
            problems.append("sparsekv.offload.enabled with a KV connector of your own (kv_transfer_config): the "
                            "passive store needs vLLM's one connector slot; drop kv_transfer_config or offload")
    elif compat.is_offload_connector(transfer):
        problems.append("kv_transfer_config names sparsekv's offload connector: set sparsekv.offload.enabled "
                        "instead (it adds the connector itself)")
    elif transfer is not None:
        problems.append("KV connectors / offloading (kv_transfer_config) write blocks the page summaries never see")
    if problems:
        raise SparseKVConfigError(
            "--attention-backend sparsekv cannot serve this configuration:\n  - " + "\n  - ".join(problems)
        )
    _check_head_budgets(vllm_config)
    line = startup_line(cfg, getattr(cache, "block_size", None), num_layers, device_type)
    if os.environ.get(_LOGGED) != line:  # once: vLLM's engine process, spawned later, runs this hook again
        logger.info("%s", line)
        os.environ[_LOGGED] = line


def _check_offload(cfg, vllm_config) -> None:
    """What the passive store cannot serve yet; each error names the option to change."""
    if cfg.dense_layers:
        raise SparseKVConfigError(
            f"sparsekv.offload.enabled: needs dense_layers: [] (dense layers read every page with the "
            f"platform's kernel, which cannot read the host pool); got dense_layers={cfg.dense_layers}")
    if getattr(vllm_config, "speculative_config", None) is not None:
        raise SparseKVConfigError("sparsekv.offload.enabled: speculative decoding is not supported with the "
                                  "passive store (its multi-token decodes run dense); drop speculative_config")
    if getattr(getattr(vllm_config, "scheduler_config", None), "async_scheduling", False):
        raise SparseKVConfigError("sparsekv.offload.enabled: async scheduling is not supported with the passive "
                                  "store yet (the step plan names each decode row by the block it writes); "
                                  "run with --no-async-scheduling")


def _check_stats_file(path: str | None) -> None:
    """The stats file's directory must exist and be writable now: the worker thread that writes it
    starts much later, where a failure would only be logged."""
    if not path:
        return
    full = os.path.abspath(os.path.expanduser(path))
    folder = os.path.dirname(full)
    if os.path.isdir(full):
        raise SparseKVConfigError(f"sparsekv.stats_file: {path!r} is a directory; give a file path")
    if not os.path.isdir(folder):
        raise SparseKVConfigError(f"sparsekv.stats_file: the directory {folder!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(full) and not os.access(full, os.W_OK)):
        raise SparseKVConfigError(f"sparsekv.stats_file: {full!r} is not writable by this user")


def startup_line(cfg, block_size: int | None, num_layers: int | None, device_type: str | None) -> str:
    """One line with what will run: method, budget, page size, dense layers, kernels."""
    if get_method(cfg.method).selects_all:
        budget = "every page"
    elif cfg.token_budget is not None:
        budget = f"{cfg.token_budget} tokens"
        if block_size:
            budget += f" (= {-(-cfg.token_budget // block_size)} pages)"
    else:
        budget = f"{cfg.budget_fraction:g} of each request's pages"
    if cfg.budget_allocation != "uniform":
        budget += f", {cfg.budget_allocation} allocation"
    page = f"{block_size} tokens (block size)" if block_size else "the block size (chosen by the platform)"
    of = f" of {num_layers}" if num_layers is not None else ""
    if device_type is None:
        kernels = "triton on CUDA, torch reference elsewhere"
    elif device_type == "cuda":
        from vllm_sparsekv.kernels import HAS_TRITON

        forced_ref = os.environ.get("SPARSEKV_KERNELS") == "ref" or not HAS_TRITON
        kernels = "torch reference (SPARSEKV_KERNELS=ref or no Triton)" if forced_ref else "triton (CUDA)"
    else:
        kernels = f"torch reference ({device_type})"
    opts = cfg.options().model_dump()
    opts_text = f" {opts}" if opts else ""
    off = cfg.offload
    store = (f", passive store: {off.cpu_bytes / 2**30:.2f} GiB host pool, {off.resident_fraction:g} of each "
             f"decoding request's pages resident, policy {off.policy}" if off.enabled else "")
    return (f"sparsekv: method {cfg.method}{opts_text}, budget {budget} per (request, KV head) "
            f"+ sink {cfg.sink_tokens} / recent {cfg.recent_tokens} tokens, page size {page}, "
            f"dense layers {cfg.dense_layers}{of}, min_context {cfg.min_context}, kernels: {kernels}{store}")


def _check_head_budgets(vllm_config) -> None:
    """infscore/headkv: the head-score profile must describe this model (layers x KV heads)."""
    from vllm_sparsekv.budgets import check_profile

    cfg, model = load_config(vllm_config.additional_config), vllm_config.model_config
    if model is not None and cfg.budget_allocation in ("infscore", "headkv"):
        try:
            check_profile(cfg, model.get_total_num_hidden_layers(), model.get_total_num_kv_heads())
        except ValueError as e:
            raise SparseKVConfigError(str(e)) from None
