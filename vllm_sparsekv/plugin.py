"""vLLM general plugin: makes `--attention-backend sparsekv` work, in every process vLLM starts.

How (see README, "How the plugin hooks into vLLM"):
1. The backend is registered in vLLM's existing `CUSTOM` slot and `SPARSEKV` is made an alias of
   that member. A new enum member would not survive vLLM's spawned processes: the config is
   unpickled there before plugins load and enum members pickle by value; CUSTOM (value None)
   does, and this function re-installs the class path in each child.
2. The platform's `check_and_update_config` is wrapped to validate the sparsekv settings and the
   model when the engine config is created, so bad settings stop startup with a clear message
   (logged as an ERROR line naming the field before vLLM's traceback), and to warn when sparsekv
   settings are given but another attention backend is selected.
3. On CPU, whose platform ignores the selected backend, `get_attn_backend_cls` is wrapped to return
   ours when (and only when) it was selected; every other selection is left to vLLM.
The same `check_and_update_config` hook, in the front end, sets up the sparsity metrics on vLLM's
/metrics (metrics.py).
"""

from __future__ import annotations

import logging
import os

from vllm_sparsekv import metrics
from vllm_sparsekv.backend import compat
from vllm_sparsekv.config import ENV_VAR

logger = logging.getLogger("vllm.sparsekv")
_registered = False


def register() -> None:
    """Entry point of the `vllm.general_plugins` group. Idempotent."""
    global _registered
    if _registered:
        return
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import register_backend

    enum = compat.attention_enum()
    register_backend(enum.CUSTOM, compat.BACKEND_PATH)
    enum._member_map_[compat.ALIAS] = enum.CUSTOM  # `--attention-backend sparsekv` -> CUSTOM
    _wrap_platform(type(current_platform))
    _registered = True


def _wrap_platform(platform_cls) -> None:
    if getattr(platform_cls, "_sparsekv_wrapped", False):
        return
    check = platform_cls.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config) -> None:
        check(cls, vllm_config)
        backend = vllm_config.attention_config.backend
        if compat.is_selected(backend):
            from vllm_sparsekv.config import SparseKVConfigError
            from vllm_sparsekv.defaults import apply_block_size, warn_budget
            from vllm_sparsekv.validate import validate_engine_config

            apply_block_size(vllm_config)  # before the checks, which read the block size
            try:
                validate_engine_config(vllm_config, getattr(cls, "device_type", None))
            except SparseKVConfigError as e:
                # vLLM prints a long traceback before the exception's own line: say it first
                logger.error("%s", e)
                raise
            warn_budget(vllm_config)
            metrics.setup(vllm_config)  # before the engine processes start: they inherit its directory
            return
        chosen = f"--attention-backend {getattr(backend, 'name', backend)}" if backend else "the platform's default backend"
        if isinstance(vllm_config.additional_config, dict) and "sparsekv" in vllm_config.additional_config:
            logger.warning("additional_config['sparsekv'] is set but --attention-backend sparsekv is not "
                           "(serving with %s, dense): the sparsekv settings are ignored", chosen)
        if os.environ.get(ENV_VAR):
            logger.warning("%s is set but --attention-backend sparsekv is not (serving with %s, dense): "
                           "the sparsekv settings are ignored; add --attention-backend sparsekv or unset %s",
                           ENV_VAR, chosen, ENV_VAR)

    platform_cls.check_and_update_config = classmethod(check_and_update_config)

    if _is_cpu(platform_cls):
        select = platform_cls.get_attn_backend_cls.__func__

        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
            if compat.is_selected(selected_backend):
                if attn_selector_config.use_mla or attn_selector_config.use_sparse:
                    raise ValueError("--attention-backend sparsekv supports GQA/MHA models, not MLA or sparse-MLA")
                return compat.BACKEND_PATH
            return select(cls, selected_backend, attn_selector_config, num_heads)

        platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    platform_cls._sparsekv_wrapped = True


def _is_cpu(platform_cls) -> bool:
    from vllm.platforms.interface import PlatformEnum

    return getattr(platform_cls, "_enum", None) == PlatformEnum.CPU
