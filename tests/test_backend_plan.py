"""The backend's per-step planning pieces that the CUDA path depends on, checked on CPU:
host-side sparsity counts against the selection itself, the decode/prefill split of padded
FULL-graph batches, and the page summaries carved out of padded KV pages."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from vllm_sparsekv import budgets, kernels
from vllm_sparsekv.backend import compat
from vllm_sparsekv.backend.sparsekv_backend import split_decodes
from vllm_sparsekv.config import SparseKVConfig
from vllm_sparsekv.methods import get_method
from vllm_sparsekv.methods.base import LayerGeometry


@pytest.mark.parametrize("cfg", [
    {"method": "quest", "token_budget": 96, "sink_tokens": 16, "recent_tokens": 16},
    {"method": "quest", "budget_fraction": 0.07, "sink_tokens": 16, "recent_tokens": 32},
    {"method": "quest", "budget_fraction": 0.3, "min_context": 200},
    {"method": "full"},
    {"method": "quest", "budget_fraction": 0.125, "budget_allocation": "pyramid"},
], ids=["tokens", "fraction", "min-context", "full", "pyramid"])
def test_host_counts_equal_what_the_selection_selects(cfg, seed_gen):
    """decode_page_counts (host, from lengths) == the sum of select_pages' num_selected (device
    rule) over layers and heads, with per-layer budgets as the builder plans them."""
    config = SparseKVConfig(**cfg)
    bs, hkv, layers, max_len = 16, 4, 6, 4096
    selects_all = get_method(config.method).selects_all
    lens = torch.randint(0, max_len, (23,), generator=seed_gen)
    lens[[2, 9]] = 0  # padded rows of a captured batch
    k_max = budgets.max_selected_pages(config, bs, max_len, selects_all)
    w = budgets.layer_head_weights(config, layers + 2, hkv, bs)[2:].to(torch.float32)  # dense_layers [0, 1]
    uniform = selects_all or bool((w == 1).all())
    layer_k = [min(-(-max_len // bs), math.ceil(k_max * max(1.0, float(x.max())))) for x in w]  # as the builder
    got = budgets.decode_page_counts(config, lens, bs, hkv, layers, k_max, selects_all,
                                     None if uniform else w, None if uniform else layer_k)
    max_pages = -(-max_len // bs)
    budget = budgets.request_budget_pages(config, lens, bs, selects_all)[:, None].expand(-1, hkv)
    attended = 0
    for layer in range(layers):
        b = budget if uniform else torch.round(budget.to(torch.float32) * w[layer]).to(torch.int32)
        scores = torch.randn(len(lens), hkv, max_pages, generator=seed_gen)
        _, num = kernels.select_pages_ref(scores, lens, bs, b, config.sink_pages(bs), config.recent_pages(bs),
                                          k_max if uniform else layer_k[layer])
        attended += int(num.sum())
    npg = (lens + bs - 1) // bs
    assert got == (attended, int(npg.sum()) * hkv * layers, int((npg > 0).sum()) * layers)
    assert got[0] < got[1] or selects_all


def test_warm_up_and_padding_rows_count_nowhere(seed_gen):
    """vLLM's warm-up/capture batches decode 1-token dummy contexts, and a captured batch pads with
    rows of no query token whose host lengths may be stale (any value): the counters (and
    max_decode_rows) see only served rows, in their order."""
    served = torch.randint(2, 5000, (9,), generator=seed_gen)
    stale = torch.randint(2, 5000, (3,), generator=seed_gen)
    lens = torch.cat([served[:4], torch.tensor([1, 0, 1]), served[4:], stale])
    query = torch.tensor([1] * 4 + [1, 0, 1] + [1] * 5 + [0] * 3)
    assert torch.equal(budgets.served_decode_lens(lens, query), served)
    assert budgets.served_decode_lens(torch.tensor([1, 1, 0]), torch.tensor([1, 1, 0])).numel() == 0


def _cam(query_lens, is_prefilling=None):
    qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()])
    return SimpleNamespace(query_start_loc_cpu=qsl, num_reqs=len(query_lens), num_actual_tokens=int(qsl[-1]),
                           is_prefilling=None if is_prefilling is None else torch.tensor(is_prefilling))


def test_split_decodes():
    # a FULL-graph batch padded from 3 to 8 rows: is_prefilling covers the 3 real rows only
    assert split_decodes(_cam([1, 1, 1, 0, 0, 0, 0, 0], [False, False, False])) == (8, 0, 3)
    # decodes, a one-token chunk of a prompt (stays dense when the runner says so), prefills
    assert split_decodes(_cam([1, 1, 1, 5, 9], [False, False, True, True, True])) == (2, 3, 2)
    # without the runner's flag a one-token row decodes
    assert split_decodes(_cam([1, 1, 1, 5, 9])) == (3, 2, 3)
    assert split_decodes(_cam([7, 1])) == (0, 2, 0)


def _padded_cache(num_blocks, heads, block, head_size, dtype, tail_bytes):
    """A KV view like vLLM 0.33's for one layer with padded pages: [B, H, N, 2D] over an int8
    buffer whose block stride is the padded page (NHD inside the page)."""
    esize = torch.empty(0, dtype=dtype).element_size()
    page = block * heads * 2 * head_size * esize
    raw = torch.zeros(num_blocks * (page + tail_bytes) + 64, dtype=torch.int8)
    base = raw[64:]  # a storage offset, as layers sharing a buffer have
    stride = ((page + tail_bytes) // esize, 2 * head_size, heads * 2 * head_size, 1)
    return raw, base.view(dtype).as_strided((num_blocks, heads, block, 2 * head_size), stride)


@pytest.mark.parametrize("method,cfg", [("quest", {}), ("hash", {"hash": {"bits": 64}}), ("snapkv", {})])
def test_side_state_lives_in_the_page_tail_and_never_touches_kv(method, cfg, seed_gen):
    config = SparseKVConfig(method=method, **cfg)
    geometry = LayerGeometry(8, 2, 64, 16, 3)
    sel = get_method(method)(config, geometry)
    side = sel.side_state(torch.bfloat16)
    need = sel.side_bytes_per_block(torch.bfloat16)
    tail = -(-need // 16) * 16 + 16 * len(side)
    raw, kv = _padded_cache(5, 2, 16, 64, torch.bfloat16, tail)
    kv.copy_(torch.randn(kv.shape, generator=seed_gen).to(torch.bfloat16))
    before = kv.clone()
    views = compat.page_tail_views(kv, side, tail)
    assert views is not None and set(views) == set(side)
    for name, v in views.items():
        assert v.shape == (5, *side[name][0]) and v.dtype == side[name][1]
        assert v.untyped_storage().data_ptr() == kv.untyped_storage().data_ptr()
        v.copy_(torch.randint(-100, 100, v.shape, generator=seed_gen).to(v.dtype))
    assert torch.equal(kv, before), "a side tensor overlaps the K/V bytes"
    written = {name: v.clone() for name, v in views.items()}
    for name, v in views.items():  # the side tensors do not overlap each other either
        assert torch.equal(v, written[name])
    sel.bind(views, torch.device("cpu"))
    assert compat.page_tail_views(kv, side, 0) is None  # no padding: the backend allocates instead


def test_padded_spec_counts_the_side_state():
    @dataclasses.dataclass(frozen=True)
    class Spec:
        page_size_bytes: int = 65536
        page_size_padded: int | None = None

    assert compat.pad_spec_for_side_state(Spec(), 4096).page_size_padded == 65536 + 4096
    assert compat.pad_spec_for_side_state(Spec(), 100).page_size_padded == 65536 + 112
    assert compat.pad_spec_for_side_state(Spec(), 0).page_size_padded is None
