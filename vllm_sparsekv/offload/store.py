"""The worker side of the passive store: the host pool, the residency map and the step's plan.

One per worker process (`current()`), created by our connector's worker side. The metadata
builder asks it where each decode row's pages live (`plan_decode`), the impl reads passive pages
through `host_views` and reports what it selected (`note_selected`) for the policies.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from vllm_sparsekv import stats
from vllm_sparsekv.backend import compat
from vllm_sparsekv.offload.pool import HostPool, num_slots, store_side_state

logger = logging.getLogger("vllm.sparsekv")

_current: OffloadStore | None = None


def current() -> OffloadStore | None:
    """This worker's store once its KV cache is registered; None without offload."""
    return _current if _current is not None and _current.pool is not None else None


def host_rows() -> int:
    """Extra rows the page-summary tensors need (one per host slot), 0 without offload."""
    store = current()
    return store.pool.slots if store is not None else 0


class OffloadStore:
    def __init__(self, cfg, vllm_config):
        global _current
        self.cfg = cfg
        self.vllm_config = vllm_config
        self.pool: HostPool | None = None
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.num_blocks = 0
        self.passive: dict[str, dict[int, int]] = {}  # residency: request -> logical page -> host slot
        self.recalled: dict[str, dict[int, int]] = {}  # request -> logical page -> its block since a recall
        self.rows: dict[int, str] = {}  # this step: block being written -> request
        self.step = 0
        self.row_reqs: list[str | None] = []  # this step's decode rows, in batch order
        # Per-step state the decode writes, in buffers allocated once (CUDA graphs capture their
        # addresses); views of this step's rows: per page, how many (layer, KV head) pairs selected
        # it [rows, max_pages + 1] int32 (the last column takes the padding), which pages are
        # passive, and the host reads.
        self._selected_buf: torch.Tensor | None = None
        self._on_host_buf: torch.Tensor | None = None
        self._host_reads: torch.Tensor | None = None
        self._selected: torch.Tensor | None = None
        self._on_host: torch.Tensor | None = None
        self._kv_heads = 1
        _current = self

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.kv_caches = {name: compat.kv_cache_tensor(kv) for name, kv in kv_caches.items()}
        first = next(iter(self.kv_caches.values()))
        self.num_blocks = first.shape[0]
        page_bytes = first[0].numel() * first.element_size()
        slots = num_slots(self.cfg.offload.cpu_bytes, page_bytes, len(self.kv_caches))
        self.pool = HostPool(self.kv_caches, slots)
        logger.info("sparsekv: offload host pool of %d pages (%.1f MiB) beside a KV cache of %d blocks",
                    slots, slots * page_bytes * len(self.kv_caches) / 2**20, self.num_blocks)

    def apply(self, meta) -> None:
        """The step's plan from the scheduler, before any KV write of the step: forget finished
        requests, copy the pages it made passive (their blocks are free from now on), then copy
        recalled pages back into their new blocks. Stores go first: a recall's new block may be a
        block this plan freed (the scheduler keeps a recalled page's slot until the next plan)."""
        if self.pool is None or meta.num_slots != self.pool.slots:
            raise RuntimeError(f"sparsekv offload: scheduler and worker disagree on the host pool "
                               f"({meta.num_slots} vs {None if self.pool is None else self.pool.slots} slots)")
        for rid in meta.drop:
            self.passive.pop(rid, None)
            self.recalled.pop(rid, None)
        for rid in meta.preempted:
            self.recalled.pop(rid, None)
            if self.passive.pop(rid, None):
                stats.bump("preempted_with_passive_pages")
        if meta.store:
            rids, pages, blocks, slots = zip(*meta.store)
            self._copy_pages(blocks, slots, to_host=True)
            for rid, page, slot in zip(rids, pages, slots):
                self.passive.setdefault(rid, {})[page] = slot
                self.recalled.get(rid, {}).pop(page, None)
            stats.bump("offloaded_pages", len(meta.store))
            stats.bump("offloaded_bytes", len(meta.store) * self._page_bytes())
        if meta.load:
            rids, pages, slots, blocks = zip(*meta.load)
            self._copy_pages(blocks, slots, to_host=False)
            for rid, page, block in zip(rids, pages, blocks):
                del self.passive[rid][page]
                self.recalled.setdefault(rid, {})[page] = block
            stats.bump("recalled_pages", len(meta.load))
            stats.bump("recalled_bytes", len(meta.load) * self._page_bytes())
        if meta.kept_for_lack_of_slots:
            stats.bump("offload_pool_full_pages", meta.kept_for_lack_of_slots)
        stats.peak("passive_pages_max", sum(len(p) for p in self.passive.values()))
        self.rows = meta.rows
        self.step = meta.step

    def _copy_pages(self, blocks, slots, to_host: bool) -> None:
        """K/V of every layer and each sparse layer's summaries (host slot s is summary row
        num_blocks + s) from KV `blocks` to host `slots`, or back (a recall)."""
        blocks_t = torch.tensor(blocks, dtype=torch.long)
        slots_t = torch.tensor(slots, dtype=torch.long)
        rows = slots_t + self.num_blocks
        if to_host:
            self.pool.store(self.kv_caches, blocks_t, slots_t)
        else:
            self.pool.load(self.kv_caches, slots_t, blocks_t)
        for side in self._side_states():
            store_side_state(side, *((blocks_t, rows) if to_host else (rows, blocks_t)))

    def _page_bytes(self) -> int:
        """K/V bytes of one page of every layer: what a store or a recall copies."""
        return sum(p[0].numel() * p.element_size() for p in self.pool.pages.values())

    def _side_states(self):
        """Each sparse layer's page summaries (side tensors with a row per block and host slot)."""
        context = self.vllm_config.compilation_config.static_forward_context
        for name in self.kv_caches:
            selector = getattr(context[name].impl, "selector", None)
            if selector is None:
                continue
            side = {n: getattr(selector, n) for n in selector.side_state(self.kv_caches[name].dtype)}
            for t in side.values():
                if t.shape[0] < self.num_blocks + self.pool.slots:
                    raise RuntimeError("sparsekv offload: page summaries have no rows for the host pool")
            yield side

    def plan_decode(self, block_table: torch.Tensor, slot_mapping: torch.Tensor, block_size: int,
                    max_pages: int, table_out: torch.Tensor, max_rows: int, max_cols: int) -> tuple[torch.Tensor, bool]:
        """The decode rows' block table, written into `table_out` (the builder's buffer), with each
        passive page's entry pointing at its host slot (num_blocks + slot: ids past the KV cache
        index the host pool) and each recalled page's at its new block, and whether any row reads
        the host. The worker's block table is append-only and still holds the freed ids, so every
        decode row must be known: a row this step's plan does not name is an error, not a guess
        (padded rows of a CUDA-graph batch write no slot). `max_rows` x `max_cols` sizes the
        per-step buffers once."""
        nd = block_table.shape[0]
        blocks = (slot_mapping[:nd] // block_size).tolist()
        self.row_reqs = [self.rows.get(b) for b in blocks]
        missing = [b for b, r in zip(blocks, self.row_reqs) if r is None and b >= 0]
        if (self.passive or self.recalled) and missing:
            raise RuntimeError(f"sparsekv offload: decode rows writing blocks {missing} are not in the step's plan")
        if self._selected_buf is None:
            dev = block_table.device
            self._selected_buf = torch.zeros(max_rows, max_cols + 1, dtype=torch.int32, device=dev)
            self._on_host_buf = torch.zeros(max_rows, max_cols + 1, dtype=torch.bool, device=dev)
            self._host_reads = torch.zeros(1, dtype=torch.int64, device=dev)
        self._selected = self._selected_buf[:nd, : max_pages + 1]
        self._on_host = self._on_host_buf[:nd, : max_pages + 1]
        self._selected.zero_()
        self._on_host.zero_()
        table = table_out[:nd]
        table.copy_(block_table)
        reads_host = False
        for i, r in enumerate(self.row_reqs):
            if self.recalled.get(r):
                _point(table[i], self.recalled[r], 0)
            if self.passive.get(r):
                self._on_host[i, _point(table[i], self.passive[r], self.num_blocks)] = True
                reads_host = True
        return table, reads_host

    def host_views(self, layer_name: str, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's host pages as key/value views [slots, block_size, Hkv, D], like the KV cache's."""
        return compat.split_kv_cache(self.pool.pages[layer_name], head_size)

    def note_selected(self, page_idx: torch.Tensor, num_selected: torch.Tensor | None = None) -> None:
        """A layer's selection [rows, Hkv, K] (-1 padded; only the first num_selected [rows, Hkv]
        count): added to the step's per-row count of (layer, KV head) selections of each page, whose
        nonzero entries are the union the policies see and whose values are one of atskv's features;
        its passive pages are counted as host reads. Device ops only, into the step's buffers
        (graph-safe)."""
        sel = self._selected
        if sel is None or page_idx.shape[0] != sel.shape[0]:
            return
        idx = page_idx.long()
        if num_selected is not None:
            idx = idx.masked_fill(torch.arange(idx.shape[2], device=idx.device) >= num_selected[..., None], -1)
        self._kv_heads = idx.shape[1]
        idx = torch.where(idx >= 0, idx, sel.shape[1] - 1).reshape(idx.shape[0], -1)
        sel.scatter_add_(1, idx, torch.ones_like(idx, dtype=sel.dtype))
        self._host_reads += self._on_host.gather(1, idx).sum()

    def _count_host_reads(self) -> None:
        """The decode reads passive pages from the host at every step they are selected (until a
        recall brings one back), so these counters and `recalled_bytes` are the host traffic the
        capacity benchmark reports: `host_page_reads` counts (layer, KV head, page) reads,
        `host_read_bytes` their K and V bytes. Only selected pages count: a config that selects
        every page reports no selection, so nothing of it goes passive."""
        reads = int(self._host_reads.item())
        if reads:
            self._host_reads.zero_()
            pages = next(iter(self.pool.pages.values()))
            stats.bump("host_page_reads", reads)
            stats.bump("host_read_bytes", reads * pages[0].numel() * pages.element_size() // self._kv_heads)

    def take_selection(self) -> tuple[int, list[str], np.ndarray]:
        """(step, the decoding requests, their per-page (layer, KV head) selection counts [requests,
        pages]) of the step just run (after its decode), then cleared."""
        sel, self._selected = self._selected, None
        if sel is None:
            return self.step, [], np.zeros((0, 0), dtype=np.int32)
        self._count_host_reads()
        rows = [i for i, r in enumerate(self.row_reqs) if r is not None]
        counts = sel[:, :-1].cpu().numpy()[rows]
        return self.step, [self.row_reqs[i] for i in rows], counts


def _point(row: torch.Tensor, where: dict[int, int], offset: int) -> torch.Tensor:
    """Point a block-table row's logical pages at `where[page] + offset` (a recalled page's new
    block, or a passive page's host slot past the cache); returns the pages."""
    pages = torch.tensor(list(where), dtype=torch.long, device=row.device)
    row[pages] = torch.tensor(list(where.values()), dtype=row.dtype, device=row.device) + offset
    return pages
