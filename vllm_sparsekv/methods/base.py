"""The protocol every page-selection method implements.

One instance per attention layer. It owns the method's per-block side state (allocated once the
layer's KV cache exists), keeps it current at every KV write, and scores a decode batch's pages.
Selection (budget, sink and recent pages, top-k) and the sparse attention itself are shared by all
methods and live in the backend and the kernels.

A method owns its knobs: `options_model`, a `MethodOptions` subclass, is the section of the config
named after the method (`{"method": "quest", "quest": {"group_reduce": "max"}}`); the config
validates it through this registry and the selector reads it as `self.options`. A new method with
knobs is one file (selector + options model) plus its tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict

registry: dict[str, type[PageSelector]] = {}


class MethodOptions(BaseModel):
    """A method's own settings (the config section named after the method). Subclasses declare
    fields with a docstring each: the README's configuration table is generated from them."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def register(name: str):
    def deco(cls: type[PageSelector]) -> type[PageSelector]:
        fields = cls.options_model.model_fields
        bad = [k for k, f in cls.deprecated_keys.items() if f not in fields]
        if bad:
            raise TypeError(f"method {name!r}: deprecated_keys {bad} name no field of {cls.options_model.__name__}")
        cls.name = name
        registry[name] = cls
        return cls

    return deco


@dataclass(frozen=True)
class LayerGeometry:
    num_heads: int
    num_kv_heads: int
    head_size: int
    block_size: int
    layer: int = 0

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


class PageSelector:
    """Base class; subclasses override what they need."""

    name: str = ""
    summary: ClassVar[str] = ""
    """One line for the README's configuration table (what the method selects)."""
    options_model: ClassVar[type[MethodOptions]] = MethodOptions
    """The method's settings (`config.<name>`); the base model has none."""
    deprecated_keys: ClassVar[dict[str, str]] = {}
    """Old flat config keys -> fields of `options_model` (accepted with a deprecation warning)."""
    default_allocation: ClassVar[str | None] = None
    """`budget_allocation` used when the config does not set one (e.g. PyramidKV: "pyramid")."""
    selects_all: bool = False
    """True for methods that attend to every page (no scoring, no side state)."""
    needs_prefill_queries: bool = False
    """True for methods that score pages from prefill attention (`observe_prefill` is called)."""
    whole_model_heads: bool = False
    """True for methods whose state is indexed by the whole model's KV heads (e.g. trained weights
    per head), which tensor parallelism would split: refused with tensor_parallel_size > 1."""
    evicts: bool = False
    """True for eviction methods: a page's score never rises after it is written (fixed at
    prefill, or by position). With a fixed `token_budget`, a page left out at one decode step is
    then never selected again for that request (`final_eviction`)."""

    @classmethod
    def final_eviction(cls, config) -> bool:
        """Whether pages this method leaves out are gone for good (see `evicted_pages`). Fraction
        budgets grow with the context, so a left-out page may come back; token budgets do not."""
        return cls.evicts and config.token_budget is not None and config.budget_fraction is None

    def __init__(self, config, geometry: LayerGeometry):
        self.config = config
        self.geometry = geometry
        self.options = config.options(self.name)
        """This method's validated settings (an instance of `options_model`)."""

    @classmethod
    def validate_model(cls, config, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        """Engine-config-time check of the method against the model (validate.py calls it in the
        front-end process, before any worker starts). Raise ValueError with a message that starts
        with the config field (`sparsekv.<method>.<field>: ...`) when the settings cannot serve
        this model, e.g. a trained checkpoint whose geometry does not match. Default: nothing to check."""

    def side_state(self, cache_dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The method's per-block side tensors: attribute name -> (shape of one block's entry, dtype).
        The backend places them (on CUDA in the padded tail of each KV page, so vLLM's KV-cache
        sizing counts them) and `bind`s them before the first write."""
        return {}

    def side_bytes_per_block(self, cache_dtype: torch.dtype) -> int:
        """Bytes of side state per physical block (the KV page padding on CUDA)."""
        return sum(math.prod(shape) * torch.empty(0, dtype=dt).element_size()
                   for shape, dt in self.side_state(cache_dtype).values())

    def allocate(self, num_blocks: int, dtype: torch.dtype, device: torch.device) -> None:
        """Side state in tensors of its own, for `num_blocks` physical blocks (CPU, tests, sweep)."""
        self.bind({name: torch.zeros(num_blocks, *shape, dtype=dt, device=device)
                   for name, (shape, dt) in self.side_state(dtype).items()}, device)

    def bind(self, side: dict[str, torch.Tensor], device: torch.device) -> None:
        """Take the side tensors ([num_blocks, *shape] each, as `side_state` says) and prepare."""
        for name, tensor in side.items():
            setattr(self, name, tensor)
        self.prepare(device)

    def prepare(self, device: torch.device) -> None:
        """Per-layer state that is not per block (projections, MLP weights), on `device`."""

    def on_kv_write(self, key: torch.Tensor, key_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Called after the dense backend wrote `key` at `slot_mapping` into `key_cache`."""

    def observe_prefill(self, queries: torch.Tensor, key_cache: torch.Tensor, block_row: torch.Tensor,
                        seq_len: int, scale: float) -> None:
        """One request's prefill chunk: `queries` [q, Hq, D] are its last q positions of seq_len."""

    def score_pages(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        max_pages: int,
    ) -> torch.Tensor:
        """[N, Hq, D] decode queries -> [N, Hkv, max_pages] float32 scores, -inf past the end."""
        raise NotImplementedError


def evicted_pages(page_idx: torch.Tensor, num_pages: torch.Tensor, max_pages: int) -> torch.Tensor:
    """[N, Hkv, max_pages] bool: the written pages a decode step's selection (`page_idx`
    [N, Hkv, K], -1 padded) left out. For a method with `final_eviction`, these are the pages a
    free/offload step may take for that (layer, KV head); a vLLM block holds every layer and head,
    so it is free once all of them have left it out. This is the hook the passive store will call."""
    n, h, _ = page_idx.shape
    chosen = torch.zeros(n, h, max_pages + 1, dtype=torch.bool, device=page_idx.device)
    idx = torch.where(page_idx >= 0, page_idx.long(), max_pages)
    chosen.scatter_(2, idx, True)
    written = torch.arange(max_pages, device=page_idx.device)[None, :] < num_pages.to(page_idx.device)[:, None]
    return written[:, None, :] & ~chosen[..., :max_pages]
