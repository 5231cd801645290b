"""Which pages go passive: one small protocol, one class per policy (README, "Passive store").

The scheduler side calls `observe` with the pages each decode step selected (the worker reports
them, the union over layers and KV heads, with how many (layer, KV head) pairs selected each) and
`choose` when a request holds more resident pages than its target. `lru` is the baseline; `atskv`
ranks pages by a learned relevance and moves fewer of them while vLLM has free blocks to spare.
`offload.replay` runs both on recorded traces; `sparsekv train-relevance` fits atskv's weights.
"""

from __future__ import annotations

import json
import math
from typing import Iterable, Protocol, Sequence

import numpy as np

WEIGHTS_FORMAT = "sparsekv-relevance/1"


def candidates(num_pages: int, passive: set[int] | dict, sink: int, recent: int) -> list[int]:
    """The pages of a request that may go passive: not a sink page, not a recent page, not the page
    before the recent ones (written a step ago), not passive already. The connector and the
    trace replay share this rule."""
    return [p for p in range(sink, num_pages - recent - 1) if p not in passive]


class OffloadPolicy(Protocol):
    def observe(self, req_id: str, pages: Iterable[int], step: int, counts: Sequence[int] | None = None) -> None:
        """Pages of `req_id` that the decode selected at `step`; `counts[i]`: the (layer, KV head)
        pairs that selected `pages[i]` (None: unknown)."""

    def choose(self, req_id: str, candidates: list[int], count: int, num_pages: int, free_share: float) -> list[int]:
        """At most `count` of the resident `candidates` (logical pages, ascending) to make passive;
        the request has `num_pages` pages, vLLM's KV pool has `free_share` of its blocks free."""

    def forget(self, req_id: str) -> None:
        """The request finished, was aborted or preempted."""


class LRUPolicy:
    """Least recently selected first; never-selected pages count as selected at step -1, ties go
    to the older page. Always moves `count` pages (memory pressure plays no part)."""

    def __init__(self) -> None:
        self.last: dict[str, np.ndarray] = {}  # request -> per page, the last step it was selected

    @classmethod
    def from_config(cls, offload) -> LRUPolicy:
        return cls()

    def _steps(self, req_id: str, pages: int) -> np.ndarray:
        last = self.last.get(req_id, np.zeros(0, dtype=np.int64))
        if len(last) < pages:
            last = self.last[req_id] = np.concatenate([last, np.full(pages - len(last), -1, dtype=np.int64)])
        return last

    def observe(self, req_id: str, pages: Iterable[int], step: int, counts: Sequence[int] | None = None) -> None:
        pages = np.asarray(pages, dtype=np.int64)
        if len(pages):
            self._steps(req_id, int(pages.max()) + 1)[pages] = step

    def choose(self, req_id: str, candidates: list[int], count: int, num_pages: int = 0,
               free_share: float = 0.0) -> list[int]:
        cand = np.asarray(candidates, dtype=np.int64)
        last = self._steps(req_id, int(cand.max()) + 1 if len(cand) else 0)[cand]
        return cand[np.lexsort((cand, last))][: max(0, count)].tolist()

    def forget(self, req_id: str) -> None:
        self.last.pop(req_id, None)


# ---- atskv: relevance r = sigmoid(w . features + b) ---------------------------------------------
FEATURES = ("selected_ema", "share_ema", "recency", "frequency", "position", "distance")
"""Per page, from the request's reports: `selected_ema` (selected or not, averaged over recent steps
with decay EMA_DECAY), `share_ema` (the share of (layer, KV head) pairs that selected it, same
average), `recency` (exp(-steps since last selected / RECENCY_STEPS); steps since the page was
first reported if never), `frequency` (steps selected / steps reported since it appeared),
`position` (page / pages), `distance` (log1p of the pages written after it)."""
EMA_DECAY = 0.8
RECENCY_STEPS = 8.0
# Hand-set: how many layers and heads keep picking a page (share_ema) says most; being picked at
# all, lately or often breaks the ties among pages few heads pick. Chosen on the train split of an
# earlier 2K-token recording (benchmarks/offload_policy.py); the test splits are held out.
DEFAULT_WEIGHTS = {"selected_ema": 1.0, "share_ema": 8.0, "recency": 1.0, "frequency": 1.0,
                   "position": 0.0, "distance": 0.0}
DEFAULT_BIAS = -4.0


class PageHistory:
    """The features of each request's pages, updated from its selection reports (steps count the
    request's own reports, so batching does not change them)."""

    def __init__(self) -> None:
        self.reqs: dict[str, dict[str, np.ndarray | int]] = {}

    def _state(self, req_id: str, pages: int) -> dict:
        st = self.reqs.setdefault(req_id, {"t": 0, **{k: np.zeros(0) for k in ("sel", "share", "last", "first", "n")}})
        grow = pages - len(st["sel"])
        if grow > 0:
            for k in ("sel", "share", "n"):
                st[k] = np.concatenate([st[k], np.zeros(grow)])
            st["first"] = np.concatenate([st["first"], np.full(grow, float(st["t"]))])  # appeared now
            st["last"] = np.concatenate([st["last"], np.full(grow, np.nan)])  # never selected
        return st

    def observe(self, req_id: str, pages: Sequence[int], counts: Sequence[int] | None = None) -> None:
        pages = np.asarray(pages, dtype=np.int64)
        st = self._state(req_id, int(pages.max()) + 1 if len(pages) else 0)
        sel = np.zeros(len(st["sel"]))
        share = np.zeros(len(st["sel"]))
        sel[pages] = 1.0
        if len(pages):
            c = np.asarray(counts, dtype=np.float64) if counts is not None else np.ones(len(pages))
            share[pages] = c / max(1.0, c.max())
        st["sel"] = EMA_DECAY * st["sel"] + (1 - EMA_DECAY) * sel
        st["share"] = EMA_DECAY * st["share"] + (1 - EMA_DECAY) * share
        st["n"] += sel
        st["last"][pages] = st["t"]
        st["t"] += 1

    def features(self, req_id: str, pages: Sequence[int], num_pages: int) -> np.ndarray:
        """[len(pages), len(FEATURES)] for `pages` of a request with `num_pages` pages."""
        idx = np.asarray(list(pages), dtype=np.int64)
        st = self._state(req_id, max(num_pages, int(idx.max()) + 1 if len(idx) else 0))
        t = st["t"]
        last = st["last"][idx]
        since = np.where(np.isnan(last), t - st["first"][idx], t - 1 - np.nan_to_num(last))
        seen = np.maximum(1.0, t - st["first"][idx])
        return np.stack([st["sel"][idx], st["share"][idx], np.exp(-since / RECENCY_STEPS), st["n"][idx] / seen,
                         idx / max(1, num_pages), np.log1p(np.maximum(0, num_pages - 1 - idx))], axis=1)

    def forget(self, req_id: str) -> None:
        self.reqs.pop(req_id, None)


def load_relevance_weights(path: str) -> tuple[np.ndarray, float]:
    """(w, b) from a `sparsekv train-relevance` file; ValueError says what is wrong with it."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read relevance weights {path!r}: {e}") from None
    if not isinstance(data, dict) or data.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path!r} is not a `sparsekv train-relevance` file (format {WEIGHTS_FORMAT!r})")
    if data.get("features") != list(FEATURES):
        raise ValueError(f"{path!r} has features {data.get('features')}, this version uses {list(FEATURES)}; "
                         "rerun `sparsekv train-relevance`")
    try:
        w = np.asarray(data.get("weights"), dtype=np.float64)
        b = float(data.get("bias", math.nan))
    except (TypeError, ValueError):
        w, b = np.zeros(0), math.nan
    if w.shape != (len(FEATURES),) or not (np.isfinite(w).all() and math.isfinite(b)):
        raise ValueError(f"{path!r}: weights must be {len(FEATURES)} finite numbers and a finite bias")
    return w, b


def pressure(free_share: float, free_target: float) -> float:
    """Memory pressure in [0, 1] from the share of vLLM's KV blocks that are free: 1 while at most
    `free_target` of them are free (always, for free_target 0), falling linearly to 0 at twice
    that."""
    if free_target <= 0:
        return 1.0
    return min(1.0, max(0.0, (2 * free_target - free_share) / free_target))


class ATSKVPolicy:
    """Lowest relevance first, below an adaptive threshold: tau(t) = beta * quantile(r, q(t)) over
    the candidates, q(t) = pressure(t) * count / candidates, so that at full pressure (and beta >= 1)
    the `count` least relevant pages go, bringing the request to its target resident share, and
    with free blocks to spare fewer go (none at pressure 0)."""

    def __init__(self, weights: np.ndarray | None = None, bias: float | None = None, beta: float = 1.0,
                 free_target: float = 0.0) -> None:
        self.w = np.array([DEFAULT_WEIGHTS[f] for f in FEATURES]) if weights is None else np.asarray(weights)
        self.b = DEFAULT_BIAS if bias is None else bias
        self.beta, self.free_target = beta, free_target
        self.history = PageHistory()

    @classmethod
    def from_config(cls, offload) -> ATSKVPolicy:
        w, b = load_relevance_weights(offload.relevance_weights) if offload.relevance_weights else (None, None)
        return cls(w, b, offload.threshold_beta, offload.free_target)

    def observe(self, req_id: str, pages: Iterable[int], step: int, counts: Sequence[int] | None = None) -> None:
        self.history.observe(req_id, pages, counts)

    def relevance(self, req_id: str, pages: Sequence[int], num_pages: int) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(self.history.features(req_id, pages, num_pages) @ self.w + self.b)))

    def choose(self, req_id: str, candidates: list[int], count: int, num_pages: int, free_share: float) -> list[int]:
        q = pressure(free_share, self.free_target) * count / max(1, len(candidates))
        if count <= 0 or q <= 0:
            return []
        r = self.relevance(req_id, candidates, num_pages)
        tau = self.beta * np.quantile(r, min(1.0, q))
        order = np.lexsort((np.asarray(candidates), r))  # lowest relevance first, ties to the older page
        return [candidates[i] for i in order if r[i] <= tau][:count]

    def forget(self, req_id: str) -> None:
        self.history.forget(req_id)


class RecallRule:
    """`read_back: recall`: a passive page that the decode selected (read from the host) at `k` or
    more of the last `window` steps goes back into a KV block. Steps count the request's reports."""

    def __init__(self, k: int, window: int) -> None:
        self.k, self.window = k, window
        self.hits: dict[str, dict[int, list[int]]] = {}  # request -> passive page -> steps it was read

    def note(self, req_id: str, passive_selected: Iterable[int], step: int) -> None:
        pages = self.hits.setdefault(req_id, {})
        for p in passive_selected:
            pages.setdefault(p, []).append(step)

    def due(self, req_id: str, step: int) -> list[int]:
        """Pages to promote before `step` (ascending), the reads before step - window dropped."""
        out = []
        for p, steps in self.hits.get(req_id, {}).items():
            steps[:] = [s for s in steps if s >= step - self.window]
            if len(steps) >= self.k:
                out.append(p)
        return sorted(out)

    def promoted(self, req_id: str, pages: Iterable[int]) -> None:
        for p in pages:
            self.hits.get(req_id, {}).pop(p, None)

    def forget(self, req_id: str) -> None:
        self.hits.pop(req_id, None)


POLICIES = {"lru": LRUPolicy, "atskv": ATSKVPolicy}


def make_policy(offload) -> OffloadPolicy:
    """The policy `offload.policy` names, with its knobs from the offload config."""
    return POLICIES[offload.policy].from_config(offload)
