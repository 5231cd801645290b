"""`hash`: training-free linear hashing (Spotlight's baseline). Keys and queries are projected by a
fixed random matrix per (layer, KV head) and reduced to sign bits; a token's score is the Hamming
similarity of its code to the GQA group's query codes, a page's score the max (or sum) over its
tokens. Codes are kept per token and KV head — `bits` / 8 bytes each, an eighth of a bf16 key
at 128 bits and d=128 — in a side tensor indexed by physical block, like Quest's bounds.

`HashSelector` is the code path shared with the trained hash (`spotlight.py`): a hash is
`sign(features(x) @ projection)`, where `features` is the identity here and the hidden layer of a
small MLP there; the last (linear) step, the sign, the packing and the scatter into the side tensor
are always the kernels' `hash_codes_update` / `hash_query`."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import field_validator

from vllm_sparsekv import kernels
from vllm_sparsekv.methods.base import MethodOptions, PageSelector, register


def check_bits(v: int | None) -> int | None:
    if v is not None and (v % 32 or not 32 <= v <= 256):
        raise ValueError(f"must be a multiple of 32 in [32, 256], got {v}")
    return v


class HashOptions(MethodOptions):
    bits: int = 128
    """Code length per (token, KV head), a multiple of 32 in [32, 256]."""
    page_reduce: Literal["max", "sum"] = "max"
    """Page score = `max` or `sum` of its tokens' Hamming similarities."""
    seed: int = 0
    """Seed of the fixed random projections (per layer and KV head)."""

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        return check_bits(v)


def linear_projection(num_kv_heads: int, head_size: int, bits: int, seed: int, layer: int) -> torch.Tensor:
    """The fixed projection [Hkv, D, bits]; the same in every process for the same arguments."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    return torch.randn(num_kv_heads, head_size, bits, generator=gen, dtype=torch.float32)


class HashSelector(PageSelector):
    """Per-token sign codes per KV head, scored by Hamming similarity (hash_page_scores).

    Subclasses provide `make_projections(device) -> (key_projection [Hkv, F, bits],
    query_projection [Hkv, F, bits])` and may override `key_features` ([T, Hkv, D] -> [T, Hkv, F])
    and `query_features` ([N, Hq, D] -> [N, Hq, F]); both default to the identity (F = D)."""

    codes: torch.Tensor | None = None
    key_projection: torch.Tensor | None = None
    query_projection: torch.Tensor | None = None

    @property
    def bits(self) -> int:
        return self.options.bits

    def make_projections(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def key_features(self, key: torch.Tensor) -> torch.Tensor:
        return key

    def query_features(self, query: torch.Tensor) -> torch.Tensor:
        return query

    def side_state(self, cache_dtype):
        g = self.geometry
        return {"codes": ((g.block_size, g.num_kv_heads, self.bits // 32), torch.int32)}

    def prepare(self, device):
        self.key_projection, self.query_projection = self.make_projections(device)

    def on_kv_write(self, key, key_cache, slot_mapping):
        kernels.hash_codes_update(self.key_features(key), slot_mapping, self.key_projection, self.codes)

    def score_pages(self, query, key_cache, block_table, seq_lens, max_pages):
        q_codes = kernels.hash_query(self.query_features(query), self.query_projection)
        return kernels.hash_page_scores(q_codes, self.codes, block_table, seq_lens, max_pages,
                                        self.options.page_reduce)


@register("hash")
class LinearHashSelector(HashSelector):
    summary = ("training-free linear hashing (Spotlight's baseline): sign bits of a fixed random projection "
               "of keys and queries; a page scores the max (or sum) of its tokens' Hamming similarities to "
               "the group's queries.")
    options_model = HashOptions
    deprecated_keys = {"hash_bits": "bits", "hash_page_reduce": "page_reduce", "hash_seed": "seed"}

    def make_projections(self, device):
        g = self.geometry
        p = linear_projection(g.num_kv_heads, g.head_size, self.bits, self.options.seed, g.layer).to(device)
        return p, p

    @property
    def projection(self) -> torch.Tensor | None:  # the name earlier code and tests use
        return self.key_projection
