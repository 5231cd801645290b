"""`hash`: training-free linear hashing (Spotlight's baseline). Keys and queries are projected by a
fixed random matrix per (layer, KV head) and reduced to sign bits; a token's score is the Hamming
similarity of its code to the GQA group's query codes, a page's score the max (or sum) over its
tokens. Codes are kept per token and KV head — `hash_bits` / 8 bytes each, an eighth of a bf16 key
at 128 bits and d=128 — in a side tensor indexed by physical block, like Quest's bounds."""

from __future__ import annotations

import torch

from vllm_sparsekv import kernels
from vllm_sparsekv.methods.base import PageSelector, register


def linear_projection(num_kv_heads: int, head_size: int, bits: int, seed: int, layer: int) -> torch.Tensor:
    """The fixed projection [Hkv, D, bits]; the same in every process for the same arguments."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    return torch.randn(num_kv_heads, head_size, bits, generator=gen, dtype=torch.float32)


@register("hash")
class LinearHashSelector(PageSelector):
    codes: torch.Tensor | None = None
    projection: torch.Tensor | None = None

    def allocate(self, num_blocks, dtype, device):
        g = self.geometry
        words = self.config.hash_bits // 32
        self.codes = torch.zeros(num_blocks, g.block_size, g.num_kv_heads, words, dtype=torch.int32, device=device)
        self.projection = linear_projection(
            g.num_kv_heads, g.head_size, self.config.hash_bits, self.config.hash_seed, g.layer
        ).to(device)

    def side_bytes_per_block(self, dtype):
        g = self.geometry
        return g.block_size * g.num_kv_heads * self.config.hash_bits // 8

    def on_kv_write(self, key, key_cache, slot_mapping):
        kernels.hash_codes_update(key, slot_mapping, self.projection, self.codes)

    def score_pages(self, query, key_cache, block_table, seq_lens, max_pages):
        q_codes = kernels.hash_query(query, self.projection)
        return kernels.hash_page_scores(q_codes, self.codes, block_table, seq_lens, max_pages,
                                        self.config.hash_page_reduce)
