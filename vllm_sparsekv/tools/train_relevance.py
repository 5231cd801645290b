"""`sparsekv train-relevance TRACES --out WEIGHTS`: fit the `atskv` offload policy's relevance
predictor r = sigmoid(w . features + b) (offload/policy.py) on recorded selection traces.

TRACES comes from `benchmarks/offload_policy.py record` (a real model's decode selections through
vLLM). Each request is replayed through `PageHistory`, the policy's own feature code; at every
step whose next `--horizon` steps are in the trace, each page the connector could make passive
(`policy.candidates`, passive or not) is one sample: its features before the step, label 1 if the
decode selects it in that step or the `--horizon - 1` after. Logistic regression by Newton's
method (numpy, float64, a small L2 penalty on w). The file is what `offload.relevance_weights`
reads, with the training set's size, label balance and log-loss; `--split` picks the requests
(`train` by default, so that the benchmark's `test` requests stay held out).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from vllm_sparsekv.offload.policy import FEATURES, WEIGHTS_FORMAT, PageHistory, candidates
from vllm_sparsekv.offload.replay import load_traces


def samples(steps, block_size: int, sink: int, recent: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, F], labels [N]) of one request's trace."""
    hist, xs, ys = PageHistory(), [], []
    for i, (seq_len, pages, counts) in enumerate(steps):
        if 0 < i and i + horizon <= len(steps):
            n = math.ceil(seq_len / block_size)
            cand = candidates(n, (), sink, recent)
            if cand:
                future = set().union(*(steps[j][1] for j in range(i, i + horizon)))
                xs.append(hist.features("r", cand, n))
                ys.append(np.array([p in future for p in cand], dtype=np.float64))
        hist.observe("r", pages, counts)
    if not xs:
        return np.zeros((0, len(FEATURES))), np.zeros(0)
    return np.concatenate(xs), np.concatenate(ys)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-4, iters: int = 50) -> tuple[np.ndarray, float]:
    """(w, b) minimising mean log-loss + l2/2 |w|^2, by Newton's method (a handful of features:
    the Hessian is tiny, and it converges in a few steps without a learning rate)."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    theta = np.zeros(xb.shape[1])
    reg = np.full(xb.shape[1], l2)
    reg[-1] = 0.0  # the bias is not penalised
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(xb @ theta)))
        grad = xb.T @ (p - y) / len(y) + reg * theta
        hess = (xb * (p * (1 - p))[:, None]).T @ xb / len(y) + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return theta[:-1], float(theta[-1])


def log_loss(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: float) -> float:
    z = x @ w + b
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def train(doc: dict, split: str = "train", horizon: int = 1, l2: float = 1e-4) -> dict:
    """The weights file's content, from the `split` requests of a trace document."""
    bs, sink, recent = doc["block_size"], doc["sink_pages"], doc["recent_pages"]
    reqs = [r for r in doc["requests"] if r["split"] == split]
    if not reqs:
        raise ValueError(f"no {split!r} requests in the traces (splits: {sorted({r['split'] for r in doc['requests']})})")
    parts = [samples(r["steps"], bs, sink, recent, horizon) for r in reqs]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if len(y) == 0 or y.min() == y.max():
        raise ValueError(f"the {split!r} traces give {len(y)} samples, all labelled alike: nothing to learn")
    w, b = fit_logistic(x, y, l2)
    return {"format": WEIGHTS_FORMAT, "features": list(FEATURES), "weights": [round(float(v), 6) for v in w],
            "bias": round(b, 6), "horizon": horizon, "l2": l2, "split": split, "requests": len(reqs),
            "samples": len(y), "positive_share": round(float(y.mean()), 4), "log_loss": round(log_loss(x, y, w, b), 5),
            "trace_model": doc.get("model"), "trace_method": doc.get("method"), "trace_budget": doc.get("budget")}


def add_parser(sub) -> None:
    p = sub.add_parser("train-relevance", help="fit the atskv offload policy's relevance weights on selection traces",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("traces", help="traces from `benchmarks/offload_policy.py record` (.json or .json.gz)")
    p.add_argument("--out", required=True, help="weights file (JSON) for offload.relevance_weights")
    p.add_argument("--split", default="train", help="which requests of the traces to train on")
    p.add_argument("--horizon", type=int, default=1,
                   help="label: selected within this many steps (1 did best on the train split; README)")
    p.add_argument("--l2", type=float, default=1e-4, help="L2 penalty on the weights")
    p.set_defaults(func=main)


def main(a) -> int:
    if a.horizon < 1:
        raise SystemExit("--horizon must be >= 1")
    out = train(load_traces(a.traces), a.split, a.horizon, a.l2)
    out["command"] = " ".join(["sparsekv", *getattr(a, "_argv", [])])
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("weights", "bias", "samples", "positive_share", "log_loss")}))
    print(f"-> {a.out} (offload.relevance_weights)")
    return 0
