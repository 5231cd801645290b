"""The SPARSEKV attention backend: a thin backend class, a builder that prepares each step once,
and an impl whose forward only launches ops.

Prefill tokens and the KV-cache write go through the platform's best dense backend (CPU attention
on CPU; FlashAttention-3 on Hopper, else vLLM's Triton backend, on CUDA), unchanged in layout. Decode tokens of sparse layers are
scored per (request, KV head) by the configured method, the top pages within the budget are
selected (sink and recent pages always), and attention reads only those pages.
The glue names no method: `methods.get_method(config.method)` supplies the selector.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from vllm_sparsekv import budgets, kernels, stats
from vllm_sparsekv.backend import compat
from vllm_sparsekv.config import load_config
from vllm_sparsekv.methods import get_method
from vllm_sparsekv.methods.base import LayerGeometry
from vllm_sparsekv.offload import store as offload_store

logger = logging.getLogger("vllm.sparsekv")


class SparseKVBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    # Summaries are computed from the keys as stored; quantized caches are not supported yet.
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        # Must be an existing enum member: spawned children unpickle the config before plugins
        # load, and only CUSTOM (value None) survives that. "sparsekv" is an alias of CUSTOM.
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[SparseKVImpl]:
        return SparseKVImpl

    @staticmethod
    def get_builder_cls() -> type[SparseKVMetadataBuilder]:
        return SparseKVMetadataBuilder

    # (config, num query heads) of the model being served, set when its attention layers are built
    # (vLLM asks for the KV spec afterwards, outside any config context)
    served: ClassVar[tuple | None] = None

    @classmethod
    def customize_spec(cls, spec):
        """Pad each KV page by the method's per-block side state (CUDA, vLLM 0.33), so vLLM's KV-cache
        sizing counts the page summaries and they live in the page's tail (`compat.page_tail_views`)."""
        dense = compat.dense_backend_cls()
        spec = dense.customize_spec(spec) if hasattr(dense, "customize_spec") else spec
        if cls.served is None or not compat.pads_pages():
            return spec
        config, num_heads = cls.served
        geometry = LayerGeometry(num_heads, spec.num_kv_heads, spec.head_size, spec.block_size, 0)
        side = get_method(config.method)(config, geometry).side_bytes_per_block(spec.dtype)
        return compat.pad_spec_for_side_state(spec, side)

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return compat.dense_backend_cls().get_supported_kernel_block_sizes(kv_cache_spec)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return compat.dense_backend_cls().get_supported_head_sizes()

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return compat.dense_backend_cls().supports_head_size(head_size)

    @classmethod
    def supported_kv_cache_layouts(cls):
        return compat.dense_backend_cls().supported_kv_cache_layouts()

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


@dataclass
class SparseKVMetadata:
    num_actual_tokens: int
    num_decode_tokens: int
    dense_all: Any  # the dense backend's metadata of the whole batch (dense layers)
    dense_prefill: Any  # the dense backend's metadata of the prefill sub-batch, or None
    decode_seq_lens: torch.Tensor  # [num_decodes] int32
    decode_block_table: torch.Tensor  # [num_decodes, max_blocks] int32
    num_pages: torch.Tensor  # [num_decodes] int32
    budget_pages: torch.Tensor  # [num_decodes, Hkv] int32
    max_pages: int  # static columns of the score tensor
    k_max: int  # static columns of the selection
    # per-(layer, KV head) budgets of non-uniform allocations, planned once per step:
    # [num_sparse_layers, num_decodes, Hkv] int32, indexed by the impl's `sparse_index`; else None
    layer_budget_pages: torch.Tensor | None = None
    # methods that select every page (`selects_all`): the page list, built once per step instead of
    # scoring and selecting in every layer; [num_decodes, Hkv, max_pages] int32, -1 past the end
    all_pages: torch.Tensor | None = None
    all_pages_count: torch.Tensor | None = None  # [num_decodes, Hkv] view of num_pages: the decode's loop bound
    # prefill rows, for methods that score pages from prefill attention (host lists; eager only)
    prefill_query_start: list[int] | None = None  # [num_prefills + 1], offsets into the prefill tokens
    prefill_seq_lens: list[int] | None = None
    prefill_block_table: torch.Tensor | None = None
    # passive store: decode_block_table has ids past the KV cache (host slots) that the decode
    # reads from the host pool; and whether the impl reports its selection (LRU policy)
    reads_host: bool = False
    reports_selection: bool = False


def _slice_prefills(cam: CommonAttentionMetadata, first: int, first_token: int) -> CommonAttentionMetadata:
    """The metadata of requests [first:] of a decode-first batch (tokens [first_token:])."""

    def rows(t):
        return None if t is None else t[first:]

    qsl = cam.query_start_loc[first:] - first_token
    qsl_cpu = cam.query_start_loc_cpu[first:] - first_token
    query_lens = qsl_cpu[1:] - qsl_cpu[:-1]
    num_tokens = cam.num_actual_tokens - first_token
    replace = dict(
        query_start_loc=qsl,
        query_start_loc_cpu=qsl_cpu,
        seq_lens=cam.seq_lens[first:],
        num_reqs=cam.num_reqs - first,
        num_actual_tokens=num_tokens,
        max_query_len=int(query_lens.max()),
        block_table_tensor=cam.block_table_tensor[first:],
        slot_mapping=cam.slot_mapping[first_token : first_token + num_tokens],
    )
    for name in ("is_prefilling", "seq_lens_cpu_upper_bound", "positions", "req_idx"):
        if getattr(cam, name, None) is not None:
            replace[name] = cam.positions[first_token:] if name == "positions" else rows(getattr(cam, name))
    if getattr(cam, "_token_to_req_indices_cache", None) is not None:  # a whole-batch cache (0.33)
        replace["_token_to_req_indices_cache"] = None
    return dataclasses.replace(cam, **replace)


def split_decodes(cam: CommonAttentionMetadata) -> tuple[int, int, int]:
    """(num_decodes, num_prefills, num_decode_tokens) of a decode-first batch. A row decodes when
    it has at most one query token and is not still prefilling (a one-token chunk of a prompt
    stays dense when the runner says so). Padded rows of a FULL-graph batch (0 tokens, beyond
    `is_prefilling`'s length) are decodes, as the captured graph expects."""
    qsl = cam.query_start_loc_cpu
    is_prefill = (qsl[1:] - qsl[:-1]) > 1
    if cam.is_prefilling is not None:
        flags = cam.is_prefilling[: is_prefill.shape[0]].to(torch.bool)
        is_prefill[: flags.shape[0]] |= flags
    if not bool(is_prefill.any()):
        return cam.num_reqs, 0, cam.num_actual_tokens
    first = int(is_prefill.to(torch.int8).argmax())
    return first, cam.num_reqs - first, int(qsl[first])


class SparseKVMetadataBuilder(AttentionMetadataBuilder[SparseKVMetadata]):
    # Decode rows first, so the prefill rows are one contiguous tail for the dense backend.
    reorder_batch_threshold: int = 1
    # Uniform single-token decode batches can be captured (FULL graphs): every per-step tensor the
    # decode path reads lives in a buffer allocated here, and the ops have grids that depend on
    # the batch only. Mixed batches run eagerly (the dense prefill split is per step).
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        dense_builder = compat.dense_backend_cls().get_builder_cls()
        # Two dense builders: vLLM's builders own per-step buffers (FA3's scheduler metadata), so
        # the dense layers' whole-batch metadata and the prefill sub-batch's each need their own.
        self.dense = dense_builder(kv_cache_spec, layer_names, vllm_config, device)
        self.dense_prefill = dense_builder(kv_cache_spec, layer_names, vllm_config, device)
        self.vllm_config = vllm_config
        self.config = cfg = load_config(vllm_config.additional_config)
        self.block_size = bs = kv_cache_spec.block_size
        self.num_kv_heads = kv_cache_spec.num_kv_heads
        self.max_model_len = vllm_config.model_config.max_model_len
        # bytes of padding vLLM keeps after each KV page (customize_spec): the side state's home
        self.page_tail_bytes = kv_cache_spec.page_size_bytes - compat.kv_page_bytes(kv_cache_spec)
        # CUDA: shapes fixed by max_model_len and the budget (graph-safe). CPU: sized per batch,
        # unless SPARSEKV_STATIC_SHAPES=1 (how the tests exercise the CUDA sizing on CPU).
        self.static_shapes = device.type == "cuda" or os.environ.get("SPARSEKV_STATIC_SHAPES") == "1"
        dense = set(cfg.dense_layers)
        indices = [compat.layer_index(n) for n in layer_names]
        self.has_dense_layers = any(i in dense for i in indices)
        self.sparse_layers = sorted({i for i in indices if i not in dense})
        self.has_sparse_layers = bool(self.sparse_layers)
        self.offload = cfg.offload.enabled
        method = get_method(cfg.method)
        self.needs_prefill_queries = method.needs_prefill_queries
        self.selects_all = method.selects_all
        num_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        self.k_max = budgets.max_selected_pages(cfg, bs, self.max_model_len, self.selects_all)
        weights = budgets.layer_head_weights(cfg, num_layers, self.num_kv_heads, bs)
        sparse_w = weights[self.sparse_layers] if self.sparse_layers else torch.ones(0, self.num_kv_heads)
        uniform = self.selects_all or bool((sparse_w == 1).all())
        # per sparse layer: its budget multipliers and how much its selection's static k widens
        # for heads that get more than the uniform budget (never narrowed)
        self.layer_k_widen = [max(1.0, float(w.max())) for w in sparse_w]
        self.layer_k_max = [min(math.ceil(self.max_model_len / bs), math.ceil(self.k_max * widen))
                            for widen in self.layer_k_widen]
        self.layer_weights = None if uniform else sparse_w.to(device=device, dtype=torch.float32)
        self._host_weights = None if uniform else sparse_w.to(torch.float32)
        compilation = vllm_config.compilation_config
        max_reqs = max(vllm_config.scheduler_config.max_num_seqs, compilation.max_cudagraph_capture_size or 0)
        self._max_reqs = max_reqs
        self._offload_table: torch.Tensor | None = None  # passive store: the decode rows' block table
        self._seq_lens = torch.zeros(max_reqs, dtype=torch.int32, device=device)
        self._num_pages = torch.zeros(max_reqs, dtype=torch.int32, device=device)
        self._budget = torch.zeros(max_reqs, self.num_kv_heads, dtype=torch.int32, device=device)
        self._layer_budget = (None if uniform else
                              torch.zeros(len(self.sparse_layers), max_reqs, self.num_kv_heads, dtype=torch.int32,
                                          device=device))
        if self.selects_all:  # one row of page ids per request, shared by the KV heads (stride 0)
            cols = math.ceil(self.max_model_len / bs)
            self._page_cols = torch.arange(cols, dtype=torch.int32, device=device)
            self._all_pages = torch.full((max_reqs, cols), -1, dtype=torch.int32, device=device)
        self._bound = False
        stats.start_reporter(cfg.log_interval_s, cfg.stats_file,
                             getattr(vllm_config.parallel_config, "data_parallel_rank", 0))

    def _bind_layers(self) -> None:
        """Give every layer's impl this KV cache (once per builder: vLLM builds new builders for
        each KV cache it allocates, the profiling bootstrap's and the real one). Runs in build(),
        which is never inside a graph capture, so the side state is never allocated in one."""
        context = self.vllm_config.compilation_config.static_forward_context
        for name in self.layer_names:
            layer = context[name]
            layer.impl.bind_cache(layer, compat.layer_kv_cache(layer), self.page_tail_bytes)
            index = compat.layer_index(name)
            if index in self.sparse_layers:
                layer.impl.sparse_index = i = self.sparse_layers.index(index)
                layer.impl.k_widen = self.layer_k_widen[i]
        self._bound = True

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False):
        if not self._bound:
            self._bind_layers()
        cam = common_attn_metadata
        cfg = self.config
        nd, npf, ndt = split_decodes(cam)
        dense_all = self.dense.build(common_prefix_len, cam, fast_build) if self.has_dense_layers else None
        dense_prefill = None
        if npf and self.has_sparse_layers:
            dense_prefill = self.dense_prefill.build(common_prefix_len, _slice_prefills(cam, nd, ndt), fast_build)

        bs = self.block_size
        seq_lens = self._seq_lens[:nd]
        seq_lens.copy_(cam.seq_lens[:nd], non_blocking=True)
        num_pages = self._num_pages[:nd]
        torch.floor_divide(seq_lens + (bs - 1), bs, out=num_pages)
        budget = budgets.request_budget_pages(cfg, seq_lens, bs, self.selects_all, out=self._budget[:nd])
        layer_budget = None
        if self._layer_budget is not None and nd:
            layer_budget = self._layer_budget[:, :nd]
            layer_budget.copy_(torch.round(budget[None].to(torch.float32) * self.layer_weights[:, None, :]))
        if self.static_shapes:
            max_pages = math.ceil(self.max_model_len / bs)
            k_max = self.k_max
        else:
            max_pages = max(1, math.ceil(cam.max_seq_len / bs))
            k_max = min(self.k_max, max_pages)
        all_pages = self._fill_all_pages(num_pages, max_pages) if self.selects_all else None
        prefill_rows = {}
        if npf and self.needs_prefill_queries:
            qsl = cam.query_start_loc_cpu[nd:]
            lens = cam.seq_lens_cpu_upper_bound if cam.seq_lens_cpu_upper_bound is not None else cam.seq_lens
            prefill_rows = dict(
                prefill_query_start=(qsl - qsl[0]).tolist(),
                prefill_seq_lens=lens[nd : cam.num_reqs].tolist(),
                prefill_block_table=cam.block_table_tensor[nd : cam.num_reqs],
            )
        if nd and self.has_sparse_layers:
            self._count(cam, nd)
        decode_block_table, reads_host = cam.block_table_tensor[:nd], False
        store = offload_store.current() if self.offload and nd else None
        if self.offload and nd and store is None:  # a graph captured now could not read the pool later
            raise RuntimeError("sparsekv offload: a decode step before the host pool was registered "
                               "(vLLM did not build the plugin's KV connector)")
        if store is not None:
            if self._offload_table is None:  # in build(), never inside a graph capture
                self._offload_table = torch.empty((self._max_reqs, cam.block_table_tensor.shape[1]),
                                                  dtype=cam.block_table_tensor.dtype,
                                                  device=cam.block_table_tensor.device)
            decode_block_table, reads_host = store.plan_decode(
                decode_block_table, cam.slot_mapping, bs, max_pages, self._offload_table, self._max_reqs,
                math.ceil(self.max_model_len / bs))
            # a captured graph replays the launch it recorded: always the one that can read the pool
            reads_host = reads_host or self.static_shapes
        return SparseKVMetadata(
            **prefill_rows,
            num_actual_tokens=cam.num_actual_tokens,
            num_decode_tokens=ndt,
            dense_all=dense_all,
            dense_prefill=dense_prefill,
            decode_seq_lens=seq_lens,
            decode_block_table=decode_block_table,
            num_pages=num_pages,
            budget_pages=budget,
            max_pages=max_pages,
            k_max=k_max,
            layer_budget_pages=layer_budget,
            all_pages=all_pages,
            all_pages_count=None if all_pages is None else num_pages[:, None].expand(nd, self.num_kv_heads),
            reads_host=reads_host,
            reports_selection=store is not None,
        )

    def _count(self, cam: CommonAttentionMetadata, nd: int) -> None:
        """The step's sparsity counters, on the host (`budgets.decode_page_counts`), and the most
        requests decoding at once (what the passive store raises); served rows only."""
        lens = compat.host_seq_lens(cam)
        if lens is None:
            return
        qsl = cam.query_start_loc_cpu
        served = budgets.served_decode_lens(torch.as_tensor(lens[:nd]), qsl[1 : nd + 1] - qsl[:nd])
        stats.peak("max_decode_rows", served.numel())
        if served.numel():
            stats.add(*budgets.decode_page_counts(
                self.config, served, self.block_size, self.num_kv_heads,
                len(self.sparse_layers), self.k_max, self.selects_all, self._host_weights, self.layer_k_max))

    def _fill_all_pages(self, num_pages: torch.Tensor, max_pages: int) -> torch.Tensor:
        """Page ids 0..num_pages-1 per request (-1 after) in the persistent buffer, as a
        [num_decodes, Hkv, max_pages] view."""
        nd = num_pages.shape[0]
        cols = self._page_cols[:max_pages]
        rows = self._all_pages[:nd, :max_pages]
        rows.copy_(torch.where(cols[None, :] < num_pages[:, None], cols[None, :], -1))
        return rows[:, None, :].expand(nd, self.num_kv_heads, max_pages)

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> SparseKVMetadata:
        md = self.build(0, common_attn_metadata)
        if self.has_dense_layers:  # the dense backend's own capture preparation
            md.dense_all = self.dense.build_for_cudagraph_capture(common_attn_metadata)
        # As vLLM's Triton backend does: capture with 1-token contexts so capture is quick; the
        # captured kernels read the persistent buffers, which every later build() refills.
        common_attn_metadata.seq_lens.fill_(1)
        md.decode_seq_lens.fill_(1)
        md.num_pages.fill_(1)
        if md.all_pages is not None:
            self._fill_all_pages(md.num_pages, md.max_pages)
        return md


@functools.cache
def _log_placement(in_page: bool, side_bytes: int, num_blocks: int) -> None:
    """Once per process and cache size: where the page summaries live, so a server log shows it."""
    if side_bytes:
        where = ("in the padded tail of each KV page (counted by vLLM's KV-cache sizing)" if in_page else
                 "in tensors of their own, beside the KV cache (not counted by vLLM's KV-cache sizing)")
        logger.info("sparsekv: page summaries, %d bytes per block and layer for %d blocks, %s",
                    side_bytes, num_blocks, where)


class SparseKVImpl(AttentionImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **kwargs,
    ) -> None:
        unsupported = {
            "ALiBi slopes": alibi_slopes is not None,
            "sliding-window attention": sliding_window is not None,
            "logits soft-capping": bool(logits_soft_cap),
            "attention sinks": kwargs.get("sinks") is not None,
            f"attention type {attn_type!r}": attn_type != AttentionType.DECODER,
            "KV-sharing layers": kv_sharing_target_layer_name is not None,
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(
                f"--attention-backend sparsekv does not support {', '.join(bad)} (this model uses them); "
                "serve it with the default attention backend"
            )
        self.dense = compat.dense_backend_cls().get_impl_cls()(
            num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
            logits_soft_cap, attn_type, kv_sharing_target_layer_name, **kwargs,
        )
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        vllm_config = get_current_vllm_config()
        self.config = load_config(vllm_config.additional_config)
        SparseKVBackend.served = (self.config, num_heads)
        self.selector = None  # bound to the KV cache by the builder (`bind_cache`)
        self.is_dense_layer: bool | None = None
        # this layer's row in the builder's per-layer plans and its static-k widening (set by it)
        self.sparse_index = -1
        self.k_widen = 1.0
        self.bound_cache: tuple | None = None  # (data_ptr, num_blocks) of the cache bound to

    def bind_cache(self, layer, kv_cache: torch.Tensor, page_tail_bytes: int = 0) -> None:
        """Bind this layer to `kv_cache` (again when vLLM allocated a new one): prove the cache
        layout, create the method's selector and place its per-block side state, in the pages'
        padded tail where vLLM reserved it (CUDA), else in tensors of its own (CPU)."""
        key = (kv_cache.data_ptr(), kv_cache.shape[0])
        if key == self.bound_cache:
            return
        index = compat.layer_index(layer.layer_name)
        self.is_dense_layer = index in self.config.dense_layers
        if kv_cache.device.type == "cpu":
            compat.check_cpu_cache_layout(layer.isa, kv_cache.dtype, self.head_size, kv_cache.shape[2])
        else:
            compat.check_cache_layout(self.dense, layer, kv_cache, self.head_size)
        self.bound_cache = key
        if self.is_dense_layer:
            return
        geometry = LayerGeometry(self.num_heads, self.num_kv_heads, self.head_size, kv_cache.shape[2], index)
        self.selector = get_method(self.config.method)(self.config, geometry)
        # the passive store needs a summary row per host slot too: tensors of their own then
        side = None if self.config.offload.enabled else compat.page_tail_views(
            kv_cache, self.selector.side_state(kv_cache.dtype), page_tail_bytes)
        if side is None:
            rows = kv_cache.shape[0] + (offload_store.host_rows() if self.config.offload.enabled else 0)
            self.selector.allocate(rows, kv_cache.dtype, kv_cache.device)
        else:
            self.selector.bind(side, kv_cache.device)
        _log_placement(side is not None, self.selector.side_bytes_per_block(kv_cache.dtype), kv_cache.shape[0])

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        self.dense.do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if self.bound_cache is None:  # a runner that wrote before any build() (not vLLM's own)
            self.bind_cache(layer, kv_cache)
        if self.selector is not None:
            key_cache, _ = compat.split_kv_cache(kv_cache, self.head_size)
            self.selector.on_kv_write(key, key_cache, slot_mapping)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("sparsekv: fused output quantization is not supported")
        md: SparseKVMetadata | None = attn_metadata
        if md is None:  # memory profiling run
            return output
        if self.bound_cache is None:
            self.bind_cache(layer, kv_cache)
        if self.is_dense_layer:
            return self.dense.forward(layer, query, key, value, kv_cache, md.dense_all, output)

        nd, n = md.num_decode_tokens, md.num_actual_tokens
        if md.dense_prefill is not None:
            self.dense.forward(
                layer, query[nd:n], None if key is None else key[nd:n], None if value is None else value[nd:n],
                kv_cache, md.dense_prefill, output[nd:n],
            )
            if md.prefill_query_start is not None:
                self._observe_prefill(query[nd:n], kv_cache, md)
        if nd:
            self._sparse_decode(layer, query[:nd], kv_cache, md, output[:nd])
        return output

    def _observe_prefill(self, query, kv_cache, md: SparseKVMetadata) -> None:
        key_cache, _ = compat.split_kv_cache(kv_cache, self.head_size)
        starts = md.prefill_query_start
        for i, seq_len in enumerate(md.prefill_seq_lens):
            self.selector.observe_prefill(query[starts[i] : starts[i + 1]], key_cache,
                                          md.prefill_block_table[i], seq_len, self.scale)

    def _sparse_decode(self, layer, query, kv_cache, md: SparseKVMetadata, out) -> None:
        """Score, select, attend: three launches plus the method's scoring (the builder planned
        budgets, page counts and counters for the step)."""
        key_cache, value_cache = compat.split_kv_cache(kv_cache, self.head_size)
        seq_lens, block_table = md.decode_seq_lens, md.decode_block_table
        store = offload_store.current() if md.reports_selection else None
        host = store.host_views(layer.layer_name, self.head_size) if md.reads_host else None
        if md.all_pages is not None:  # `selects_all`: the builder's page list, no scoring or top-k
            kernels.sparse_paged_decode(query, key_cache, value_cache, block_table, seq_lens, md.all_pages,
                                        self.scale, out=out, num_selected=md.all_pages_count, host_pages=host)
            return
        scores = self.selector.score_pages(query, key_cache, block_table, seq_lens, md.max_pages)
        if md.layer_budget_pages is not None:
            budget = md.layer_budget_pages[self.sparse_index]
            k_max = min(md.max_pages, math.ceil(md.k_max * self.k_widen))
        else:
            budget, k_max = md.budget_pages, md.k_max
        bs = key_cache.shape[1]
        page_idx, num_selected = kernels.select_pages(
            scores, seq_lens, bs, budget, self.config.sink_pages(bs), self.config.recent_pages(bs), k_max,
        )
        if store is not None:
            store.note_selected(page_idx, num_selected)
        kernels.sparse_paged_decode(query, key_cache, value_cache, block_table, seq_lens, page_idx, self.scale,
                                    out=out, num_selected=num_selected, host_pages=host)
