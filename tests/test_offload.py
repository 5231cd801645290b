"""The passive store without an engine: the host pool's copies are byte-exact, the decode reads a
passive page from the pool exactly as from the KV cache, and the scheduler side frees the right
pages (never sink/recent ones), keeps them when the pool is full and gives slots back on finish
and preemption. The engine tests (tests/engine/test_offload_engine.py) run it inside vLLM."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_sparsekv import kernels
from vllm_sparsekv.config import SparseKVConfig, SparseKVConfigError
from vllm_sparsekv.offload.policy import LRUPolicy
from vllm_sparsekv.offload.pool import HostPool, SlotAllocator, num_slots, store_side_state


def test_recalled_pages_are_byte_equal_to_what_was_offloaded(seed_gen):
    """>= 10^4 pages through store -> overwrite the blocks -> load, in random rounds; every page
    comes back bit for bit (NaN payloads, -0.0 and infinities included)."""
    gen = seed_gen
    layers, blocks, slots, page = 3, 96, 64, (2, 8, 16)
    kv = {f"l{i}": torch.empty(blocks, *page, dtype=torch.float32) for i in range(layers)}
    pool = HostPool(kv, slots)
    alloc = SlotAllocator(slots)
    held: dict[int, dict[str, torch.Tensor]] = {}  # slot -> the bytes offloaded there
    moved = recalled = 0
    while recalled < 10_000:
        for t in kv.values():  # fresh random bits, specials among them
            t.view(torch.int32).copy_(torch.randint(-2**31, 2**31 - 1, t.shape, generator=gen, dtype=torch.int32))
        n = int(torch.randint(1, min(32, alloc.num_free) + 1, (1,), generator=gen))
        src = torch.randperm(blocks, generator=gen)[:n]
        dst = torch.tensor([alloc.take() for _ in range(n)])
        pool.store(kv, src, dst)
        for s, b in zip(dst.tolist(), src.tolist()):
            held[s] = {name: t[b].clone() for name, t in kv.items()}
        moved += n
        # recall a random part of what is held into random (other) blocks
        back = list(held)[: int(torch.randint(1, len(held) + 1, (1,), generator=gen))]
        into = torch.randperm(blocks, generator=gen)[: len(back)]
        pool.load(kv, torch.tensor(back), into)
        for s, b in zip(back, into.tolist()):
            for name, t in kv.items():
                assert torch.equal(t[b].view(torch.int32), held[s][name].view(torch.int32)), (s, b, name)
            del held[s]
        alloc.give_back(back)
        recalled += len(back)
    assert moved >= recalled >= 10_000


def test_summaries_follow_their_page(seed_gen):
    side = {"bounds": torch.randn(10 + 4, 3, 2, 8, generator=seed_gen)}
    before = side["bounds"][[2, 7]].clone()
    store_side_state(side, torch.tensor([2, 7]), torch.tensor([10 + 3, 10 + 0]))
    assert torch.equal(side["bounds"][13], before[0]) and torch.equal(side["bounds"][10], before[1])


def test_decode_reads_a_passive_page_from_the_pool_exactly(seed_gen):
    """The same pages attended from the KV cache, or with some moved to the host pool and the block
    table pointing past the cache: identical outputs, bit for bit."""
    gen = seed_gen
    n, hq, hkv, d, bs, blocks, pages = 3, 6, 2, 16, 8, 40, 9
    k = torch.randn(blocks, bs, hkv, d, generator=gen)
    v = torch.randn(blocks, bs, hkv, d, generator=gen)
    q = torch.randn(n, hq, d, generator=gen)
    table = torch.randperm(blocks, generator=gen)[: n * pages].view(n, pages).int()  # a block has one owner
    seq_lens = torch.tensor([pages * bs - 3, pages * bs - 8 - 1, 5 * bs], dtype=torch.int32)
    page_idx = torch.stack([torch.randperm(pages, generator=gen)[:5] for _ in range(n * hkv)]).view(n, hkv, 5).int()
    ref = kernels.sparse_paged_decode(q, k, v, table, seq_lens, page_idx, 0.25)
    slots = 7
    hk, hv = torch.zeros(slots, bs, hkv, d), torch.zeros(slots, bs, hkv, d)
    moved = table.clone()
    for i, (row, p, s) in enumerate([(0, 1, 3), (0, 4, 0), (1, 2, 6), (2, 0, 1)]):
        b = int(table[row, p])
        hk[s], hv[s] = k[b], v[b]
        k[b], v[b] = float("nan"), float("nan")  # the block went back to vLLM and was reused
        moved[row, p] = blocks + s
    got = kernels.sparse_paged_decode(q, k, v, moved, seq_lens, page_idx, 0.25, host_pages=(hk, hv))
    assert torch.equal(got, ref)


# ---- the scheduler side, on a stand-in for vLLM's KV-cache manager --------------------------------
class _Manager:
    """vLLM's single-group manager as far as the connector uses it (compat.request_blocks,
    compat.free_request_page, compat.allocate_request_page); block 0 is the null block, new
    blocks come from 1000 on."""

    def __init__(self):
        self.req_to_blocks: dict[str, list] = {}
        self.freed: list[int] = []
        self.free_blocks = 10
        self.new_blocks: list[int] = []

    def _remove_blocks_in_range(self, rid, first, last):
        for i in range(first, last):
            self.freed.append(self.req_to_blocks[rid][i].block_id)
            self.req_to_blocks[rid][i] = SimpleNamespace(block_id=0, is_null=True)

    def get_num_free_blocks(self):
        return self.free_blocks

    def get_new_blocks(self, n):
        self.free_blocks -= n
        self.new_blocks += [1000 + len(self.new_blocks) + i for i in range(n)]
        return [SimpleNamespace(block_id=b, is_null=False) for b in self.new_blocks[-n:]]


def _side(slots=100, fraction=0.25, bs=16, sink=16, recent=32, usage=1.0, **offload):
    """The scheduler side on a stand-in manager whose KV pool is `usage` full (vLLM's get_usage)."""
    from vllm_sparsekv.offload.connector import _SchedulerSide

    cfg = SparseKVConfig(dense_layers=[], sink_tokens=sink, recent_tokens=recent,
                         offload={"enabled": True, "cpu_bytes": slots * 1000 * 2, "resident_fraction": fraction,
                                  **offload})
    spec = SimpleNamespace(block_size=bs, page_size_bytes=1000)
    side = _SchedulerSide(cfg, SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec,
                                                                                 layer_names=["a", "b"])]))
    mgr = _Manager()
    mgr.get_usage = lambda: usage
    return side, mgr, SimpleNamespace(coordinator=SimpleNamespace(single_type_managers=(mgr,)), block_pool=mgr)


def _add(side, mgr, rid, seq_len, bs=16, first_block=1):
    """A decoding request whose next token is at position seq_len - 1."""
    pages = math.ceil(seq_len / bs)
    mgr.req_to_blocks[rid] = [SimpleNamespace(block_id=first_block + i, is_null=False) for i in range(pages)]
    side.requests[rid] = SimpleNamespace(request_id=rid, num_computed_tokens=seq_len - 1)


def _step(side, kvm, rids, preempted=()):
    return side.plan(SimpleNamespace(num_scheduled_tokens=dict.fromkeys(rids, 1), preempted_req_ids=set(preempted)),
                     kvm)


def _report(side, step, selected, counts=None):
    """The worker's report of `selected` pages per request (each selected by `counts` pairs, 1 if not given)."""
    from vllm_sparsekv.offload.connector import SelectionReport, _stack_counts

    rows = []
    for rid, pages in selected.items():
        row = np.zeros(max(pages, default=-1) + 1, dtype=np.int64)
        row[pages] = (counts or {}).get(rid, 1)
        rows.append(row)
    side.observe(SelectionReport(step, list(selected), _stack_counts(rows)))


def test_scheduler_frees_down_to_the_target_share_and_never_sink_or_recent_pages():
    side, mgr, kvm = _side()
    _add(side, mgr, "a", 40 * 16 - 5)  # 40 pages, the last one being written
    meta = _step(side, kvm, ["a"])
    assert meta.store == [] and meta.rows == {40: "a"}  # not decoding (no report yet): nothing moves
    _report(side, meta.step, {"a": [0, 5, 39]})
    meta = _step(side, kvm, ["a"])
    pages = [p for _, p, _, _ in meta.store]
    assert len(pages) == 40 - math.ceil(0.25 * 40)
    assert min(pages) >= 1 and max(pages) < 40 - 2 - 1  # sink page 0; recent pages 38, 39 and page 37 stay
    assert 5 not in pages  # LRU: the selected page goes last
    assert sorted(mgr.freed) == sorted(b for _, _, b, _ in meta.store)  # their blocks went back to vLLM
    assert len({s for *_, s in meta.store}) == len(pages)
    assert _step(side, kvm, ["a"]).store == []  # at the target: nothing more


def test_recall_promotes_a_page_read_from_the_host_k_of_n_steps_and_keeps_the_share():
    side, mgr, kvm = _side(read_back="recall", recall_k=2, recall_window=3)
    _add(side, mgr, "a", 40 * 16 - 5)
    _report(side, 1, {"a": [0, 5, 39]})
    meta = _step(side, kvm, ["a"])  # step 2: 30 pages go passive, page 5 (selected) not among them
    passive = dict(side.passive["a"])
    assert len(passive) == 30 and 5 not in passive and 6 in passive
    _report(side, 2, {"a": [0, 6, 39]})
    assert _step(side, kvm, ["a"]).load == []  # step 3: one host read of page 6 so far
    _report(side, 3, {"a": [0, 6, 39]})
    meta = _step(side, kvm, ["a"])  # step 4: read at 2 of the last 3 steps -> back into a block
    assert meta.load == [("a", 6, passive[6], 1000)]
    assert mgr.req_to_blocks["a"][6].block_id == 1000 and 6 not in side.passive["a"]
    # the share is kept: another page went passive instead. The resident candidates were 5
    # (selected at step 1) and 32-36 (never selected): lru takes 32. Page 6's slot stays taken
    # until the next plan (the worker stores before it loads)
    assert [p for _, p, _, _ in meta.store] == [32] and meta.store[0][3] != passive[6]
    assert len(side.passive["a"]) == 30 and side.slots.num_free == side.slots.capacity - 31
    _step(side, kvm, [])
    assert side.slots.num_free == side.slots.capacity - 30
    mgr.free_blocks = 0  # no free block: nothing comes back
    _report(side, 4, {"a": [0, 7, 39]})
    _report(side, 5, {"a": [0, 7, 39]})
    assert _step(side, kvm, ["a"]).load == [] and 7 in side.passive["a"]
    side.finished("a")  # vLLM frees the promoted block with the request's others; the slots come back
    assert side.slots.num_free == side.slots.capacity and "a" not in side.recall.hits


def test_the_worker_copies_a_recalled_page_back_and_points_the_table_at_its_new_block(seed_gen):
    """Offload a page, let its block be reused, recall it into a block the same plan frees: the
    stored page and the recalled one both keep their bytes and summaries, and the decode table
    points at the new block."""
    from types import SimpleNamespace as NS

    from vllm_sparsekv import stats
    from vllm_sparsekv.offload import store as store_mod
    from vllm_sparsekv.offload.connector import OffloadStep

    bs, hkv, d, blocks = 4, 2, 8, 20
    cfg = SparseKVConfig(dense_layers=[], offload={"enabled": True, "cpu_bytes": 10 ** 6})
    old = store_mod._current
    try:
        store = store_mod.OffloadStore(cfg, None)
        kv = torch.randn(blocks, 2, bs, hkv, d, generator=seed_gen)
        store.register({"l0": kv})
        slots = store.pool.slots
        summaries = torch.randn(blocks + slots, 3, generator=seed_gen)
        store._side_states = lambda: iter([{"bounds": summaries}])
        page, summary = kv[7].clone(), summaries[7].clone()
        stats.reset()
        store.apply(OffloadStep(1, slots, store=[("a", 2, 7, 3)], rows={5: "a"}))
        kv[7] = float("nan")  # block 7 went back to vLLM and was written again
        summaries[7] = float("nan")
        page1, summary1 = kv[6].clone(), summaries[6].clone()
        store.apply(OffloadStep(2, slots, load=[("a", 2, 3, 6)], store=[("a", 1, 6, 4)], rows={5: "a"}))
        assert torch.equal(kv[6], page) and torch.equal(summaries[6], summary)
        assert torch.equal(store.pool.pages["l0"][4], page1) and torch.equal(summaries[blocks + 4], summary1)
        assert store.passive == {"a": {1: 4}} and store.recalled == {"a": {2: 6}}
        table = torch.tensor([[4, 6, 7, 5]], dtype=torch.int32)
        got, reads_host = store.plan_decode(table, torch.tensor([5 * bs + 1]), bs, 4, torch.empty_like(table), 1, 4)
        assert reads_host and got.tolist() == [[4, blocks + 4, 6, 5]]
        store.apply(OffloadStep(3, slots, store=[("a", 2, 6, 0)], rows={5: "a"}))  # passive again
        assert store.recalled == {"a": {}} and store.passive == {"a": {1: 4, 2: 0}}
        store.apply(OffloadStep(4, slots, preempted=["a"]))
        assert store.passive == {} and store.recalled == {}
        snap = stats.snapshot()
        assert snap["recalled_pages"] == 1 and snap["recalled_bytes"] == kv[0].numel() * 4
    finally:
        store_mod._current = old
        stats.reset()


def test_lru_policy_takes_the_least_recently_selected_first():
    lru = LRUPolicy()
    lru.observe("r", [3, 4], step=1)
    lru.observe("r", [4], step=2)
    assert lru.choose("r", [1, 2, 3, 4], 3) == [1, 2, 3]
    lru.forget("r")
    assert lru.choose("r", [4, 3], 1) == [3]


def test_a_full_pool_keeps_pages_resident_and_finish_gives_slots_back(sparsekv_records):
    side, mgr, kvm = _side(slots=5)
    _add(side, mgr, "a", 40 * 16)
    _report(side, 1, {"a": []})  # steps count from 1
    meta = _step(side, kvm, ["a"])
    assert len(meta.store) == 5 and meta.kept_for_lack_of_slots == 30 - 5
    assert sum("host pool is full" in r.getMessage() for r in sparsekv_records) == 1
    assert _step(side, kvm, ["a"]).kept_for_lack_of_slots == 30 - 5  # still full: counted, not logged again
    assert sum("host pool is full" in r.getMessage() for r in sparsekv_records) == 1
    side.finished("a")
    assert side.slots.num_free == 5
    _add(side, mgr, "b", 40 * 16, first_block=100)
    _report(side, 2, {"b": []})
    meta = _step(side, kvm, ["b"])
    assert meta.drop == ["a"] and len(meta.store) == 5  # the worker forgets "a"; its slots serve "b"


def test_preemption_drops_the_pages_and_ignores_stale_reports():
    side, mgr, kvm = _side()
    _add(side, mgr, "a", 40 * 16)
    _report(side, 1, {"a": []})
    assert _step(side, kvm, ["a"]).store
    free = side.slots.num_free
    meta = _step(side, kvm, [], preempted=["a"])  # vLLM freed its blocks; it will recompute
    assert meta.preempted == ["a"] and side.slots.num_free == side.slots.capacity > free
    _report(side, meta.step - 1, {"a": [1]})  # a report from before the preemption
    _add(side, mgr, "a", 40 * 16)  # recomputed and decoding again (fresh blocks)
    assert _step(side, kvm, ["a"]).store == []  # not offloaded until a report after its restart


def test_a_request_admitted_again_was_preempted():
    """vLLM 0.32 names preempted requests in the step's output; a request that gets blocks again is
    the same signal, should a version not name them."""
    side, mgr, kvm = _side()
    _add(side, mgr, "a", 40 * 16)
    _report(side, 1, {"a": []})
    assert _step(side, kvm, ["a"]).store
    side.admitted(side.requests["a"])  # got blocks again: resumed, recomputes from the prompt
    assert side.slots.num_free == side.slots.capacity and "a" not in side.decoding
    assert _step(side, kvm, []).preempted == ["a"]


def test_offload_config_is_checked_at_startup(sparsekv_records):
    from tests.test_validate import engine
    from vllm_sparsekv.backend import compat
    from vllm_sparsekv.validate import validate_engine_config

    with pytest.raises(SparseKVConfigError, match="sparsekv.offload.enabled: needs dense_layers"):
        validate_engine_config(engine(sparsekv={"offload": {"enabled": True}}), "cpu")
    ok = {"dense_layers": [], "offload": {"enabled": True}}
    validate_engine_config(engine(sparsekv=ok), "cuda")  # CUDA too (pinned host pool, zero-copy reads)
    with pytest.raises(SparseKVConfigError, match="KV connector of your own"):
        validate_engine_config(engine(sparsekv=ok, kv_transfer=SimpleNamespace(kv_connector="Nixl")), "cpu")
    cfg = engine(sparsekv=ok)
    validate_engine_config(cfg, "cpu")
    assert compat.is_offload_connector(cfg.kv_transfer_config)  # the plugin adds its connector
    line = [r.getMessage() for r in sparsekv_records if r.getMessage().startswith("sparsekv: method")][-1]
    assert line.endswith("passive store: 1.00 GiB host pool, 0.5 of each decoding request's pages resident, "
                         "policy lru"), line
    validate_engine_config(cfg, "cpu")  # vLLM reruns the hook: ours is accepted
    with pytest.raises(SparseKVConfigError, match="offload.enabled instead"):
        validate_engine_config(engine(kv_transfer=cfg.kv_transfer_config), "cpu")
    with pytest.raises(SparseKVConfigError, match="sparsekv.offload.resident_fraction: must be in"):
        validate_engine_config(engine(sparsekv={**ok, "offload": {"resident_fraction": 1.5}}), "cpu")
    assert num_slots(10_000, 1000, 3) == 3


def test_host_reads_count_the_selected_passive_pages_and_their_bytes():
    """What the capacity benchmark reports as host traffic: a selected passive page is one host
    read per (layer, KV head); resident and unselected passive pages are not."""
    from vllm_sparsekv import stats
    from vllm_sparsekv.offload import store as store_mod

    bs, hkv, d, blocks = 4, 2, 8, 20
    cfg = SparseKVConfig(dense_layers=[], offload={"enabled": True, "cpu_bytes": 10 ** 6})
    old = store_mod._current
    try:
        store = store_mod.OffloadStore(cfg, None)
        store.register({"l0": torch.zeros(blocks, 2, bs, hkv, d)})
        store.passive = {"a": {1: 0, 3: 2}, "b": {0: 1}}
        store.rows = {5: "a", 9: "b"}
        table = torch.tensor([[4, 0, 6, 0, 5], [0, 8, 9, 0, 0]], dtype=torch.int32)
        out = torch.full((4, 5), -7, dtype=torch.int32)
        got, on_host = store.plan_decode(table, torch.tensor([5 * bs + 1, 9 * bs + 2]), bs, 5, out, 4, 6)
        assert on_host
        assert got.data_ptr() == out.data_ptr()  # the builder's buffer (CUDA graphs read it)
        assert got.tolist() == [[4, blocks + 0, 6, blocks + 2, 5], [blocks + 1, 8, 9, 0, 0]]
        stats.reset()
        # row a, head 0: pages 1 (host), 2; head 1: 3 (host), 0 and a padded entry; row b: 2 | 0 (host)
        page_idx = torch.tensor([[[1, 2, -1], [3, 0, 4]], [[2, -1, -1], [0, 1, -1]]])
        store.note_selected(page_idx, num_selected=torch.tensor([[2, 2], [1, 2]]))
        # a second layer (row a: page 1, host, in both heads): the report counts (layer, KV head)
        # selections per page, and the host reads add up
        store.note_selected(torch.tensor([[[1, -1, -1], [1, 2, -1]], [[4, -1, -1], [-1, -1, -1]]]))
        step, req_ids, counts = store.take_selection()
        assert (step, req_ids) == (0, ["a", "b"])
        assert counts.tolist() == [[1, 3, 2, 1, 0], [1, 1, 1, 0, 1]]  # per page, up to max_pages
        snap = stats.snapshot()
        assert snap["host_page_reads"] == 5
        assert snap["host_read_bytes"] == 5 * 2 * bs * d * 4  # K and V of one head, float32
        assert store.take_selection()[1] == []  # cleared
    finally:
        store_mod._current = old
        stats.reset()


def test_scheduler_and_worker_count_the_same_host_slots_when_vllm_pads_the_pages():
    """On CUDA vLLM pads each KV page (the page summaries' tail); the worker's pool holds K/V only.
    Both sides must count slots from the unpadded page, or the first plan is refused (as it was on
    the GPU: 15420 vs 16384 slots)."""
    from vllm_sparsekv.offload import store as store_mod
    from vllm_sparsekv.offload.connector import _SchedulerSide

    cfg = SparseKVConfig(dense_layers=[], offload={"enabled": True, "cpu_bytes": 64 * 1024 * 2})
    spec = SimpleNamespace(block_size=16, page_size_bytes=1088, unpadded_page_size_bytes=1024)
    side = _SchedulerSide(cfg, SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec,
                                                                                 layer_names=["a", "b"])]))
    old = store_mod._current
    try:
        store = store_mod.OffloadStore(cfg, None)
        store.register({name: torch.zeros(10, 2, 16, 1, 8) for name in ("a", "b")})  # 1024-byte pages
        assert side.slots.capacity == store.pool.slots == 64
    finally:
        store_mod._current = old
