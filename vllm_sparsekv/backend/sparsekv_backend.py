"""The SPARSEKV attention backend: a thin backend class, a builder that prepares each step once,
and an impl whose forward only launches ops.

Prefill tokens and the KV-cache write go through the platform's own dense backend (CPU attention
on CPU, vLLM's Triton backend on CUDA), unchanged in layout. Decode tokens of sparse layers are
scored per (request, KV head) by the configured method, the top pages within the budget are
selected (sink and recent pages always), and attention reads only those pages.
The glue names no method: `methods.get_method(config.method)` supplies the selector.
"""

from __future__ import annotations

import dataclasses
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
    num_decodes: int
    num_prefills: int
    num_decode_tokens: int
    dense_all: Any  # the dense backend's metadata of the whole batch (dense layers)
    dense_prefill: Any  # the dense backend's metadata of the prefill sub-batch, or None
    decode_seq_lens: torch.Tensor  # [num_decodes] int32
    decode_block_table: torch.Tensor  # [num_decodes, max_blocks] int32
    num_pages: torch.Tensor  # [num_decodes] int32
    budget_pages: torch.Tensor  # [num_decodes, Hkv] int32
    max_pages: int  # static columns of the score tensor
    k_max: int  # static columns of the selection
    # methods that select every page (`selects_all`): the page list, built once per step instead of
    # scoring and selecting in every layer; [num_decodes, Hkv, max_pages] int32, -1 past the end
    all_pages: torch.Tensor | None = None
    # prefill rows, for methods that score pages from prefill attention (host lists; eager only)
    prefill_query_start: list[int] | None = None  # [num_prefills + 1], offsets into the prefill tokens
    prefill_seq_lens: list[int] | None = None
    prefill_block_table: torch.Tensor | None = None


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
    return dataclasses.replace(cam, **replace)


class SparseKVMetadataBuilder(AttentionMetadataBuilder[SparseKVMetadata]):
    # Decode rows first, so the prefill rows are one contiguous tail for the dense backend.
    reorder_batch_threshold: int = 1
    # Uniform single-token decode batches can be captured: in static-shape mode every per-step
    # tensor the decode path reads lives in a buffer allocated here, and the ops have grids that
    # depend on the batch only. Mixed batches run eagerly (the dense prefill split is per step).
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.dense = compat.dense_backend_cls().get_builder_cls()(kv_cache_spec, layer_names, vllm_config, device)
        self.config = load_config(vllm_config.additional_config)
        self.block_size = kv_cache_spec.block_size
        self.num_kv_heads = kv_cache_spec.num_kv_heads
        self.max_model_len = vllm_config.model_config.max_model_len
        # CUDA: shapes fixed by max_model_len and the budget (graph-safe). CPU: sized per batch,
        # unless SPARSEKV_STATIC_SHAPES=1 (how the tests exercise the CUDA sizing on CPU).
        self.static_shapes = device.type == "cuda" or os.environ.get("SPARSEKV_STATIC_SHAPES") == "1"
        dense = set(self.config.dense_layers)
        self.has_dense_layers = any(compat.layer_index(n) in dense for n in layer_names)
        self.has_sparse_layers = not all(compat.layer_index(n) in dense for n in layer_names)
        self.k_max = self.config.max_selected_pages(self.block_size, self.max_model_len)
        method = get_method(self.config.method)
        self.needs_prefill_queries = method.needs_prefill_queries
        self.selects_all = method.selects_all
        max_seqs = vllm_config.scheduler_config.max_num_seqs
        self._seq_lens = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        self._num_pages = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        self._budget = torch.zeros(max_seqs, self.num_kv_heads, dtype=torch.int32, device=device)
        if self.selects_all:  # one row of page ids per request, shared by the KV heads (stride 0)
            cols = math.ceil(self.max_model_len / self.block_size)
            self._page_cols = torch.arange(cols, dtype=torch.int32, device=device)
            self._all_pages = torch.full((max_seqs, cols), -1, dtype=torch.int32, device=device)
        stats.start_reporter(self.config.log_interval_s, self.config.stats_file)

    def _split(self, cam: CommonAttentionMetadata) -> tuple[int, int, int]:
        # Chunked-prefill rows of one token stay prefills (dense) when the runner says which
        # rows are still prefilling; without that flag they decode sparsely, like any decode.
        exact = cam.is_prefilling is not None
        nd, npf, ndt, _ = split_decodes_and_prefills(cam, decode_threshold=1, treat_short_extends_as_decodes=not exact)
        return nd, npf, ndt

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False):
        cam = common_attn_metadata
        cfg = self.config
        nd, npf, ndt = self._split(cam)
        dense_all = self.dense.build(common_prefix_len, cam, fast_build) if self.has_dense_layers else None
        dense_prefill = None
        if npf and self.has_sparse_layers:
            dense_prefill = self.dense.build(common_prefix_len, _slice_prefills(cam, nd, ndt), fast_build)

        bs = self.block_size
        seq_lens = self._seq_lens[:nd]
        seq_lens.copy_(cam.seq_lens[:nd])
        num_pages = self._num_pages[:nd]
        torch.floor_divide(seq_lens + (bs - 1), bs, out=num_pages)
        budget = self._budget[:nd]
        if self.selects_all:
            budget.copy_(num_pages[:, None])
        elif cfg.token_budget is not None:
            budget.fill_(math.ceil(cfg.token_budget / bs))
        else:
            budget.copy_(torch.ceil(num_pages.to(torch.float32) * cfg.budget_fraction)[:, None])
        if cfg.min_context:
            budget.copy_(torch.where((seq_lens < cfg.min_context)[:, None], num_pages[:, None], budget))
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
        return SparseKVMetadata(
            **prefill_rows,
            num_actual_tokens=cam.num_actual_tokens,
            num_decodes=nd,
            num_prefills=npf,
            num_decode_tokens=ndt,
            dense_all=dense_all,
            dense_prefill=dense_prefill,
            decode_seq_lens=seq_lens,
            decode_block_table=cam.block_table_tensor[:nd],
            num_pages=num_pages,
            budget_pages=budget,
            max_pages=max_pages,
            k_max=k_max,
            all_pages=all_pages,
        )

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
        # As vLLM's Triton backend does: capture with 1-token contexts so capture is quick; the
        # captured kernels read the persistent buffers, which every later build() refills.
        common_attn_metadata.seq_lens.fill_(1)
        md.decode_seq_lens.fill_(1)
        md.num_pages.fill_(1)
        if md.all_pages is not None:
            self._fill_all_pages(md.num_pages, md.max_pages)
        return md


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
        self.num_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        self.selector = None  # created at the first KV write, when the layer name and cache exist
        self.is_dense_layer: bool | None = None
        self.budget_weights: torch.Tensor | None = None  # [Hkv] multipliers of this layer's budget

    def _setup(self, layer, kv_cache: torch.Tensor) -> None:
        index = compat.layer_index(layer.layer_name)
        self.is_dense_layer = index in self.config.dense_layers
        if kv_cache.device.type == "cpu":
            compat.check_cpu_cache_layout(layer.isa, kv_cache.dtype, self.head_size, kv_cache.shape[2])
        if self.is_dense_layer:
            return
        w = budgets.layer_head_weights(self.config, self.num_layers, self.num_kv_heads, kv_cache.shape[2])[index]
        # None when uniform: the builder's per-request budget is used as is
        self.budget_weights = None if bool((w == 1).all()) else w.to(kv_cache.device)
        self.budget_weight_max = float(w.max())  # sizes this layer's static k
        geometry = LayerGeometry(self.num_heads, self.num_kv_heads, self.head_size, kv_cache.shape[2], index)
        self.selector = get_method(self.config.method)(self.config, geometry)
        self.selector.allocate(kv_cache.shape[0], kv_cache.dtype, kv_cache.device)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        self.dense.do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if self.is_dense_layer is None:
            self._setup(layer, kv_cache)
        if self.selector is not None:
            key_cache, _ = compat.split_kv_cache(kv_cache, self.head_size)
            self.selector.on_kv_write(key, key_cache, slot_mapping)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("sparsekv: fused output quantization is not supported")
        md: SparseKVMetadata | None = attn_metadata
        if md is None:  # memory profiling run
            return output
        if self.is_dense_layer is None:
            self._setup(layer, kv_cache)
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
            self._sparse_decode(query[:nd], kv_cache, md, output[:nd])
        return output

    def _observe_prefill(self, query, kv_cache, md: SparseKVMetadata) -> None:
        key_cache, _ = compat.split_kv_cache(kv_cache, self.head_size)
        starts = md.prefill_query_start
        for i, seq_len in enumerate(md.prefill_seq_lens):
            self.selector.observe_prefill(query[starts[i] : starts[i + 1]], key_cache,
                                          md.prefill_block_table[i], seq_len, self.scale)

    def _sparse_decode(self, query, kv_cache, md: SparseKVMetadata, out) -> None:
        key_cache, value_cache = compat.split_kv_cache(kv_cache, self.head_size)
        seq_lens, block_table = md.decode_seq_lens, md.decode_block_table
        held = md.num_pages.sum() * self.num_kv_heads
        if md.all_pages is not None:  # `selects_all`: the builder's page list, no scoring or top-k
            kernels.sparse_paged_decode(query, key_cache, value_cache, block_table, seq_lens, md.all_pages,
                                        self.scale, out=out)
            stats.record(held, held, (md.num_pages > 0).sum())
            return
        scores = self.selector.score_pages(query, key_cache, block_table, seq_lens, md.max_pages)
        k_max = md.k_max
        budget = md.budget_pages
        if self.budget_weights is not None:
            budget = torch.round(budget * self.budget_weights).to(torch.int32)
            # widen k for layers whose heads get more than the uniform budget; never narrow it
            # (k is the cap of the selection, and a CPU batch's k is already clamped to its pages)
            k_max = min(md.max_pages, math.ceil(k_max * max(1.0, self.budget_weight_max)))
        bs = key_cache.shape[1]
        page_idx, num_selected = kernels.select_pages(
            scores, seq_lens, bs, budget,
            self.config.sink_pages(bs), self.config.recent_pages(bs), k_max,
        )
        kernels.sparse_paged_decode(query, key_cache, value_cache, block_table, seq_lens, page_idx, self.scale, out=out)
        stats.record(num_selected.sum(), held, (md.num_pages > 0).sum())
