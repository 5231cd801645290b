"""Host time per engine step of the passive store's bookkeeping (issue 11), at the shape of the GPU
capacity run: with vLLM's async scheduling off (the passive store needs it off), every millisecond
of it adds to the decode step, which on the GPU is some 10-20 ms at that shape.

    python benchmarks/offload_host.py [--requests 16] [--context 32768] [--block-size 16]
        [--selected-share 0.7] [--steps 64] [--policies lru,atskv] [--out benchmarks/results]

Per step, the three host parts, each on the real code: the scheduler's plan (`_SchedulerSide.plan`:
which pages go passive; vLLM's KV-cache manager is the unit tests' stand-in), the worker's
selection report (`OffloadStore.take_selection` on a count tensor as the decode leaves it, the
`SelectionReport` built, then a pickle round trip, as it crosses from the worker to the engine
core), and the scheduler's `observe` of it. Every request decodes a token per step; each reports a
random `--selected-share` of its pages as selected (the union over layers and KV heads at a 1/16
budget covers most pages). The plan that moves every request down to its resident share (the
second step: a request goes passive once it has reported a decode) is reported apart, as
`burst_plan_ms`; the other columns are means over the steps after it. Rows go to benchmarks/results/offload_host_<device>.json with command,
versions and commit; a table is printed. Host time only: no GPU is needed, and the numbers are the
CPU's that runs it (compare policies within one run). `resident_share` (the requests' resident pages at the end, over
their pages) shows the plans did their work: 0.25, the target, for lru; atskv moves fewer pages
while vLLM has free blocks.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import quality  # noqa: E402  (commit)
import serve  # noqa: E402  (environment)
from tests.test_offload import _add, _side, _step  # noqa: E402  (the scheduler side on a stand-in manager)


def _store(requests: int, max_pages: int):
    """A worker-side store whose step has `requests` decode rows (its KV cache is a stand-in)."""
    from vllm_sparsekv.config import SparseKVConfig
    from vllm_sparsekv.offload import store as store_mod

    cfg = SparseKVConfig(dense_layers=[], offload={"enabled": True, "cpu_bytes": 1 << 20})
    store = store_mod.OffloadStore(cfg, None)
    store.register({"l0": torch.zeros(4, 2, 1, 1, 8)})
    store._selected_buf = torch.zeros(requests, max_pages + 1, dtype=torch.int32)
    store._host_reads = torch.zeros(1, dtype=torch.int64)
    return store


def run(policy: str, a) -> dict:
    from vllm_sparsekv.offload.connector import SelectionReport, _stack_counts

    rng = np.random.default_rng(a.seed)
    side, mgr, kvm = _side(slots=10 * a.requests * math.ceil(a.context / a.block_size), fraction=0.25,
                           bs=a.block_size, sink=64, recent=256, usage=0.95, policy=policy)
    rids = [f"r{i}" for i in range(a.requests)]
    for i, r in enumerate(rids):
        _add(side, mgr, r, a.context, bs=a.block_size, first_block=1 + i * 100_000)
    max_pages = math.ceil((a.context + a.steps) / a.block_size)
    store = _store(a.requests, max_pages)
    plan, report, observe, report_bytes = [], [], [], []
    for step in range(1, a.steps + 1):
        t0 = time.perf_counter()
        _step(side, kvm, rids)
        t1 = time.perf_counter()
        # the decode's counts: per row, (layer, KV head) pairs per selected page
        counts = torch.zeros(a.requests, max_pages + 1, dtype=torch.int32)
        for i, r in enumerate(rids):
            n = math.ceil((side.requests[r].num_computed_tokens + 1) / a.block_size)
            pages = rng.choice(n, int(a.selected_share * n), replace=False)
            counts[i, torch.from_numpy(pages)] = torch.from_numpy(rng.integers(1, 256, len(pages), dtype=np.int32))
        store._selected, store.row_reqs, store.step = counts, list(rids), step
        t2 = time.perf_counter()
        s, req_ids, rows = store.take_selection()
        blob = pickle.dumps(SelectionReport(s, req_ids, _stack_counts(list(rows))))
        rep = pickle.loads(blob)
        t3 = time.perf_counter()
        side.observe(rep)
        t4 = time.perf_counter()
        plan.append(t1 - t0)
        report.append(t3 - t2)
        observe.append(t4 - t3)
        report_bytes.append(len(blob))
        for r in rids:  # each request wrote one token; a new page gets a fresh block
            req = side.requests[r]
            req.num_computed_tokens += 1
            blocks = mgr.req_to_blocks[r]
            if req.num_computed_tokens // a.block_size >= len(blocks):
                blocks += mgr.get_new_blocks(1)
    ms = lambda xs: round(float(np.mean(xs)) * 1e3, 3)  # noqa: E731
    pages = [math.ceil((side.requests[r].num_computed_tokens + 1) / a.block_size) for r in rids]
    resident = float(np.mean([(n - len(side.passive.get(r, {}))) / n for r, n in zip(rids, pages)]))
    return {"policy": policy, "requests": a.requests, "context": a.context, "block_size": a.block_size,
            "selected_share": a.selected_share, "steps": a.steps, "burst_plan_ms": round(plan[1] * 1e3, 3),
            "plan_ms": ms(plan[2:]), "report_ms": ms(report[2:]), "observe_ms": ms(observe[2:]),
            "host_ms_per_step": round(ms(plan[2:]) + ms(report[2:]) + ms(observe[2:]), 3),
            "report_bytes": int(np.mean(report_bytes)), "resident_share": round(resident, 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--selected-share", type=float, default=0.7)
    ap.add_argument("--steps", type=int, default=64, help="at least 3")
    ap.add_argument("--policies", default="lru,atskv")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    policies = a.policies.split(",")
    run(policies[0], argparse.Namespace(**{**vars(a), "requests": 2, "context": 4096, "steps": 3}))  # warm-up: imports
    gc.collect()
    gc.freeze()  # as vLLM's engine does after startup: the imports' objects are no garbage collector's work
    rows = [run(p, a) for p in policies]
    gc.unfreeze()
    keys = ("policy", "burst_plan_ms", "plan_ms", "report_ms", "observe_ms", "host_ms_per_step", "report_bytes",
            "resident_share")
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(str(r[k]) for k in keys))
    env = serve.environment()
    doc = {"command": "offload_host.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "device": f"{env['device']} (host time)", "vllm": env["vllm"], "torch": env["torch"],
           "commit": quality.commit(), "rows": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "offload_host_cpu.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
