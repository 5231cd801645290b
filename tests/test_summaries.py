"""Page summaries stay right through vLLM's own CPU KV writes: chunked prefill into a partial
block, prefix-shared blocks, and a block freed and reused by another request. Checked against
brute force over the tokens each block really holds."""

import pytest
import torch

pytest.importorskip("vllm")

from vllm_sparsekv.backend.compat import check_cpu_cache_layout  # noqa: E402
from vllm_sparsekv.config import SparseKVConfig  # noqa: E402
from vllm_sparsekv.methods import get_method  # noqa: E402
from vllm_sparsekv.methods.base import LayerGeometry  # noqa: E402


class CpuCache:
    """A layer's CPU KV cache written with vLLM's own op, plus a shadow of what each slot holds."""

    def __init__(self, num_blocks, heads, bs, d, isa):
        from vllm_sparsekv.backend import compat

        self.kv = torch.full((num_blocks, heads, bs, 2 * d), float("nan"))  # poison: unwritten slots
        self.bs, self.d, self.isa = bs, d, isa
        self.key_cache, _ = compat.split_kv_cache(self.kv, d)
        self.shadow = {}

    def write(self, key, value, slots):
        from vllm import _custom_ops as ops

        packed = self.kv.view(self.kv.shape[0], self.kv.shape[1], 2 * self.bs, self.d)
        ops.cpu_attn_reshape_and_cache(key, value, packed[:, :, : self.bs], packed[:, :, self.bs :],
                                       slots, self.isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
        for t, s in enumerate(slots.tolist()):
            if s >= 0:
                self.shadow[s] = key[t]

    def block_keys(self, b, length):
        return torch.stack([self.shadow[b * self.bs + o] for o in range(length)])  # [len, H, D]


@pytest.mark.parametrize("isa, d", [("vec", 64), ("vec16", 80)])
def test_quest_bounds_and_hash_codes_follow_every_write(isa, d):
    torch.manual_seed(0)
    H, bs, nb = 3, 32, 8
    check_cpu_cache_layout(isa, torch.float32, d, bs)
    cache = CpuCache(nb, H, bs, d, isa)
    geo = LayerGeometry(num_heads=3 * H, num_kv_heads=H, head_size=d, block_size=bs, layer=5)
    quest = get_method("quest")(SparseKVConfig(method="quest"), geo)
    hashm = get_method("hash")(SparseKVConfig(method="hash", hash={"bits": 64}), geo)
    for m in (quest, hashm):
        m.allocate(nb, torch.float32, torch.device("cpu"))
    quest.bounds.fill_(float("nan"))

    def write(slots):
        slots = torch.tensor(slots, dtype=torch.int64)
        key, value = torch.randn(len(slots), H, d), torch.randn(len(slots), H, d)
        cache.write(key, value, slots)
        for m in (quest, hashm):
            m.on_kv_write(key, cache.key_cache, slots)

    def check(block, length):
        keys = cache.block_keys(block, length)
        torch.testing.assert_close(quest.bounds[block, :, 0], keys.amin(0), rtol=0, atol=0)
        torch.testing.assert_close(quest.bounds[block, :, 1], keys.amax(0), rtol=0, atol=0)
        from vllm_sparsekv import kernels

        want = kernels.hash_codes_update_ref(keys, torch.arange(length), hashm.projection,
                                             torch.zeros(1, bs, H, 2, dtype=torch.int32))[0, :length]
        assert torch.equal(hashm.codes[block, :length], want)

    # request A, chunked prefill: 40 tokens (block 1 full, block 2 partial), then 20 more, then a
    # decode token, all into blocks 1-2; padding slots (-1) are ignored
    write(list(range(32, 72)) + [-1, -1])
    check(1, 32), check(2, 8)
    write(list(range(72, 92)))
    check(2, 28)
    write([92])
    check(2, 29)
    # request B shares block 1 through the prefix cache and writes its own block 5 only
    write(list(range(160, 170)))
    check(1, 32), check(5, 10)
    # block 2 is freed and reused by request C, which writes 5 tokens: older content must not count
    before = cache.block_keys(2, 29)
    write(list(range(64, 69)))
    check(2, 5)
    assert not torch.equal(quest.bounds[2, :, 1], before.amax(0))
    # a mixed step: decode rows of two requests and a prefill chunk into fresh blocks 6-7
    write([69, 170] + list(range(192, 250)))
    check(2, 6), check(5, 11), check(6, 32), check(7, 26)
