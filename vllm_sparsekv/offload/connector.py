"""Our KV connector: vLLM's per-step channel between the scheduler and the workers, used to free
the KV blocks of passive pages (scheduler side) and to copy those pages to the host pool before
the blocks can be written again (worker side). README, "Passive store", has the whole design.

The plugin puts this connector in `kv_transfer_config` when `offload.enabled` (validate.py), so
vLLM builds both sides; foreign connectors stay refused.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from vllm_sparsekv.backend import compat
from vllm_sparsekv.config import load_config
from vllm_sparsekv.offload import store as store_mod
from vllm_sparsekv.offload.policy import RecallRule, candidates, make_policy
from vllm_sparsekv.offload.pool import SlotAllocator, num_slots

logger = logging.getLogger("vllm.sparsekv")


@dataclass
class OffloadStep(KVConnectorMetadata):
    """Scheduler -> worker, once per step, applied before anything of the step runs."""

    step: int
    num_slots: int
    drop: list[str] = field(default_factory=list)  # finished / aborted: forget their pages
    preempted: list[str] = field(default_factory=list)  # recompute from the prompt: forget their pages
    store: list[tuple[str, int, int, int]] = field(default_factory=list)  # (request, page, block, slot)
    load: list[tuple[str, int, int, int]] = field(default_factory=list)  # recalls: (request, page, slot, block)
    rows: dict[int, str] = field(default_factory=dict)  # block this step writes -> request (1-token rows)
    kept_for_lack_of_slots: int = 0


@dataclass
class SelectionReport(KVConnectorWorkerMetadata):
    """Worker -> scheduler, once per step: for each decoding request (`req_ids`), how many (layer,
    KV head) pairs selected each of its pages (`counts` [requests, pages] uint16, 0 = not selected,
    cut after the last selected page). One array per step, not a list per page: it crosses the
    process boundary at every step, on the step's critical path."""

    step: int
    req_ids: list[str]
    counts: np.ndarray

    def items(self):
        """(request, its selected pages ascending, their counts) for each request."""
        for rid, row in zip(self.req_ids, self.counts):
            pages = np.flatnonzero(row)
            yield rid, pages, row[pages]

    def aggregate(self, other: SelectionReport) -> SelectionReport:  # tensor-parallel workers: their heads add up
        rows: dict[str, np.ndarray] = {}
        for rep in (self, other):
            for rid, row in zip(rep.req_ids, rep.counts):
                acc = rows.get(rid, np.zeros(0, dtype=np.int64))
                out = np.zeros(max(len(acc), len(row)), dtype=np.int64)
                out[: len(acc)] += acc
                out[: len(row)] += row
                rows[rid] = out
        return SelectionReport(max(self.step, other.step), list(rows), _stack_counts(list(rows.values())))


def _stack_counts(rows: list[np.ndarray]) -> np.ndarray:
    """Rows of per-page counts (any lengths) as one [rows, pages] uint16 array, cut after the last
    nonzero column (counts saturate at 65535: more (layer, KV head) pairs than any model has)."""
    width = max((int(np.flatnonzero(r)[-1]) + 1 for r in rows if r.any()), default=0)
    out = np.zeros((len(rows), width), dtype=np.uint16)
    for i, r in enumerate(rows):
        n = min(width, len(r))
        out[i, :n] = np.minimum(r[:n], 65535)
    return out


class SparseKVOffloadConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        cfg = load_config(vllm_config.additional_config)
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler_side = _SchedulerSide(cfg, kv_cache_config)
        else:
            self.worker_side = store_mod.OffloadStore(cfg, vllm_config)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # we hand no KV off to anyone: a preempted request simply recomputes

    # ---- scheduler side ----------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        return 0, False  # we load nothing at admission: passive pages belong to running requests

    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        self.kv_cache_manager = kv_cache_manager  # ours to keep: the base's attribute name may move

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self.scheduler_side.admitted(request)

    def build_connector_meta(self, scheduler_output) -> OffloadStep:
        return self.scheduler_side.plan(scheduler_output, self.kv_cache_manager)

    def update_connector_output(self, connector_output) -> None:
        report = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(report, SelectionReport):
            self.scheduler_side.observe(report)

    def request_finished(self, request, block_ids) -> tuple[bool, dict[str, Any] | None]:
        self.scheduler_side.finished(request.request_id)
        return False, None

    # ---- worker side -------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker_side.register(kv_caches)

    def handle_preemptions(self, kv_connector_metadata) -> None:
        # the first thing of every step on the worker, before any KV write: the copies go here
        if isinstance(kv_connector_metadata, OffloadStep):
            self.worker_side.apply(kv_connector_metadata)

    def build_connector_worker_meta(self) -> SelectionReport | None:
        step, req_ids, counts = self.worker_side.take_selection()
        return SelectionReport(step, req_ids, _stack_counts(list(counts))) if req_ids else None

    def start_load_kv(self, forward_context, **kwargs) -> None:
        pass

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs) -> None:
        pass

    def wait_for_save(self) -> None:
        pass


class _SchedulerSide:
    """Decides which pages go passive, frees their blocks and hands out host slots."""

    def __init__(self, cfg, kv_cache_config):
        group = kv_cache_config.kv_cache_groups[0]
        spec = group.kv_cache_spec
        self.block_size = bs = spec.block_size
        self.fraction = cfg.offload.resident_fraction
        self.sink = cfg.sink_pages(bs)
        self.recent = cfg.recent_pages(bs)
        # the worker sizes the pool by the same unpadded page (its copies leave the tail out)
        self.slots = SlotAllocator(num_slots(cfg.offload.cpu_bytes, compat.kv_page_bytes(spec),
                                             len(group.layer_names)))
        self.policy = make_policy(cfg.offload)
        off = cfg.offload
        self.recall = RecallRule(off.recall_k, off.recall_window) if off.read_back == "recall" else None
        self.requests: dict[str, Any] = {}
        self.passive: dict[str, dict[int, int]] = {}  # request -> logical page -> host slot
        self.decoding: set[str] = set()  # requests whose sparse decode has reported since their (re)start
        self.restart: dict[str, int] = {}  # request -> step of its last preemption (older reports are stale)
        self.pending_drop: list[str] = []
        self.pending_preempted: list[str] = []
        self.recalled_slots: list[int] = []  # slots of the last plan's recalls: free once the worker loaded them
        self.step = 0
        self.full_logged = False

    def plan(self, so, kv_cache_manager) -> OffloadStep:
        self.step += 1
        meta = OffloadStep(self.step, self.slots.capacity, drop=self.pending_drop, preempted=self.pending_preempted)
        self.pending_drop, self.pending_preempted = [], []
        self.slots.give_back(self.recalled_slots)  # the worker ran the last plan's loads
        self.recalled_slots = []
        for rid in getattr(so, "preempted_req_ids", None) or ():
            self._preempted(rid)
            meta.preempted.append(rid)
        bs = self.block_size
        free_share = compat.free_block_share(kv_cache_manager)  # after this step's allocations
        for rid, n in so.num_scheduled_tokens.items():
            req = self.requests.get(rid)
            if n != 1 or req is None:
                continue
            pos = req.num_computed_tokens  # the position this step writes
            blocks = compat.request_blocks(kv_cache_manager, rid)
            if pos // bs >= len(blocks):
                continue
            meta.rows[blocks[pos // bs].block_id] = rid
            if rid in self.decoding:
                back = self._promote(rid, kv_cache_manager, meta)
                self._offload(rid, pos + 1, kv_cache_manager, meta, free_share, back)
        return meta

    def _promote(self, rid: str, kv_cache_manager, meta: OffloadStep) -> list[int]:
        """`read_back: recall`: the passive pages of `rid` the rule names get a fresh block (while
        vLLM has one free) and leave the host pool. The worker copies them back before the step's
        decode and after the step's stores, since the fresh block may be one that a store of this
        plan freed; for the same reason their slots are given back only at the next plan."""
        if self.recall is None:
            return []
        passive = self.passive.get(rid, {})
        back = []
        for p in self.recall.due(rid, self.step):
            block = compat.allocate_request_page(kv_cache_manager, rid, p)
            if block is None:
                break
            slot = passive.pop(p)
            meta.load.append((rid, p, slot, block))
            self.recalled_slots.append(slot)
            back.append(p)
        self.recall.promoted(rid, back)
        return back

    def _offload(self, rid: str, seq_len: int, kv_cache_manager, meta: OffloadStep, free_share: float,
                 promoted: list[int]) -> None:
        """Free blocks of `rid` until it holds its target share: never sink or recent pages, nor the
        page before the recent ones (it was written a step ago), nor a page promoted this step.
        A request at its share (most steps: it gains a page every block_size tokens) costs no scan
        of its pages."""
        pages = math.ceil(seq_len / self.block_size)
        passive = self.passive.setdefault(rid, {})
        over = pages - len(passive) - math.ceil(self.fraction * pages)
        if over <= 0:
            return
        blocks = compat.request_blocks(kv_cache_manager, rid)
        choices = [p for p in candidates(pages, passive, self.sink, self.recent)
                   if blocks[p].block_id != 0 and p not in promoted]
        want = min(len(choices), over)
        if want <= 0:
            return
        if self.slots.num_free < want:
            meta.kept_for_lack_of_slots += want - self.slots.num_free
            if not self.full_logged:
                logger.warning("sparsekv: the offload host pool is full (%d pages, offload.cpu_bytes); pages "
                               "stay in the KV cache until requests finish", self.slots.capacity)
                self.full_logged = True
            want = self.slots.num_free
        for p in self.policy.choose(rid, choices, want, pages, free_share):
            slot = self.slots.take()
            meta.store.append((rid, p, blocks[p].block_id, slot))
            passive[p] = slot
            compat.free_request_page(kv_cache_manager, rid, p)

    def admitted(self, request) -> None:
        """A request got its blocks: a new one, or one resumed after a preemption (known already),
        which recomputes from the prompt. Either signal of a preemption suffices (this one and
        `preempted_req_ids`); handling it twice is harmless."""
        rid = request.request_id
        if rid in self.requests:
            self._preempted(rid)
            self.pending_preempted.append(rid)
        self.requests[rid] = request

    def _preempted(self, rid: str) -> None:
        self._release(rid)  # vLLM freed its blocks; it recomputes from the prompt
        self.restart[rid] = self.step + 1  # reports up to the step being scheduled are stale

    def observe(self, report: SelectionReport) -> None:
        for rid, pages, counts in report.items():
            if rid in self.requests and report.step > self.restart.get(rid, 0):
                self.decoding.add(rid)
                self.policy.observe(rid, pages, report.step, counts)
                if self.recall is not None:
                    self.recall.note(rid, self.passive.get(rid, {}).keys() & pages.tolist(), report.step)

    def finished(self, rid: str) -> None:
        self._release(rid)
        self.requests.pop(rid, None)
        self.restart.pop(rid, None)
        self.pending_drop.append(rid)

    def _release(self, rid: str) -> None:
        self.slots.give_back(self.passive.pop(rid, {}).values())
        self.decoding.discard(rid)
        self.policy.forget(rid)
        if self.recall is not None:
            self.recall.forget(rid)
