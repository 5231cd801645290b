"""Replay recorded selection traces through an offload policy, offline (benchmarks/offload_policy.py,
`sparsekv train-relevance`, tests): how many selected pages were passive (recalls) at a fixed
resident share, with the connector's rules.

A trace is one request's decode steps, each `(seq_len, pages, counts)`: the request's length at
that step (the token it writes included) and what its SelectionReport said. As in
`connector._SchedulerSide`, a request goes passive from its second reported step on (the first
report makes it `decoding`), before each step's decode, down to ceil(resident_fraction * pages)
resident pages, choosing among the candidates: not a sink page, not a recent page, not the page
before the recent ones, not passive already. Memory pressure is full (free share 0) and the pool
unbounded, so every policy holds the same resident share and only its choice of pages differs.
Passive pages stay passive (`read_back: host`).
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from typing import Sequence

from vllm_sparsekv.offload.policy import candidates

Step = tuple[int, Sequence[int], Sequence[int]]


@dataclass
class ReplayResult:
    steps: int = 0  # decode steps (request-steps) replayed
    recalls: int = 0  # selected pages that were passive at their step
    host_reads: int = 0  # (layer, KV head) selections of passive pages: what `read_back: host` reads
    offloaded: int = 0  # pages made passive
    promoted: int = 0  # passive pages copied back into a KV block (`read_back: recall`)
    resident_pages: int = 0  # summed over steps, at decode
    pages: int = 0  # summed over steps

    def add(self, other: ReplayResult) -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))


def replay_request(req_id: str, steps: Sequence[Step], policy, fraction: float, block_size: int, sink: int,
                   recent: int, log: list | None = None, recall=None) -> ReplayResult:
    """One request's trace through `policy` (its state for `req_id` is forgotten at the end);
    `log` gets (step, pages made passive) for each step that moved some. With a `recall` rule
    (`policy.RecallRule`), the pages it names go back first, and the move to the target share
    does not take them again in that step."""
    res = ReplayResult()
    passive: set[int] = set()
    for i, (seq_len, pages, counts) in enumerate(steps):
        n = math.ceil(seq_len / block_size)
        if i > 0:
            back = recall.due(req_id, i) if recall is not None else []
            passive.difference_update(back)
            res.promoted += len(back)
            if recall is not None:
                recall.promoted(req_id, back)
            cand = [p for p in candidates(n, passive, sink, recent) if p not in back]
            want = min(len(cand), n - len(passive) - math.ceil(fraction * n))
            if want > 0:
                chosen = policy.choose(req_id, cand, want, n, 0.0)
                passive.update(chosen)
                res.offloaded += len(chosen)
                if log is not None:
                    log.append((i, list(chosen)))
        res.steps += 1
        res.pages += n
        res.resident_pages += n - len(passive)
        res.recalls += sum(p in passive for p in pages)
        res.host_reads += sum(c for p, c in zip(pages, counts) if p in passive)
        policy.observe(req_id, pages, i, counts)
        if recall is not None:
            recall.note(req_id, [p for p in pages if p in passive], i)
    policy.forget(req_id)
    if recall is not None:
        recall.forget(req_id)
    return res


def replay(traces: dict[str, Sequence[Step]], policy, fraction: float, block_size: int, sink: int,
           recent: int, recall=None) -> ReplayResult:
    """Every request's trace through one policy (and recall rule); the counts summed."""
    total = ReplayResult()
    for rid, steps in traces.items():
        total.add(replay_request(rid, steps, policy, fraction, block_size, sink, recent, recall=recall))
    return total


def load_traces(path: str) -> dict:
    """A trace document (`benchmarks/offload_policy.py record`, .json or .json.gz), with its sink
    and recent page counts derived as the config derives them."""
    with (gzip.open(path, "rt") if str(path).endswith(".gz") else open(path)) as f:
        doc = json.load(f)
    bs = doc["block_size"]
    doc["sink_pages"] = math.ceil(doc["sink_tokens"] / bs)
    doc["recent_pages"] = max(1, math.ceil(doc["recent_tokens"] / bs))
    return doc
