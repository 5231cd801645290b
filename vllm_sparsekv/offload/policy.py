"""Which pages of a request go passive: one small protocol, one class per policy.

The scheduler side calls `observe` with the pages each decode step selected (the worker reports
them, the union over layers and KV heads) and `choose` when a request holds more resident pages
than its target. `lru` is the baseline; the ATSKV predictor (relevance r = sigmoid(w . features
+ b), an adaptive per-layer threshold) is meant to be a second class here.
"""

from __future__ import annotations

from typing import Iterable, Protocol


class OffloadPolicy(Protocol):
    def observe(self, req_id: str, pages: Iterable[int], step: int) -> None:
        """Pages of `req_id` that the decode selected at `step`."""

    def choose(self, req_id: str, candidates: list[int], count: int) -> list[int]:
        """At most `count` of the resident `candidates` (logical pages, ascending) to make passive."""

    def forget(self, req_id: str) -> None:
        """The request finished, was aborted or preempted."""


class LRUPolicy:
    """Least recently selected first; never-selected pages count as selected at step -1, ties go
    to the older page."""

    def __init__(self) -> None:
        self.last: dict[str, dict[int, int]] = {}

    def observe(self, req_id: str, pages: Iterable[int], step: int) -> None:
        seen = self.last.setdefault(req_id, {})
        for p in pages:
            seen[p] = step

    def choose(self, req_id: str, candidates: list[int], count: int) -> list[int]:
        seen = self.last.get(req_id, {})
        return sorted(candidates, key=lambda p: (seen.get(p, -1), p))[:max(0, count)]

    def forget(self, req_id: str) -> None:
        self.last.pop(req_id, None)


POLICIES = {"lru": LRUPolicy}


def make_policy(name: str) -> OffloadPolicy:
    return POLICIES[name]()
