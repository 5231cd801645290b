"""Offload policies on recorded selection traces (issue 11): which policy makes the fewest recalls
(selected-while-passive pages) at the same resident share.

    python benchmarks/offload_policy.py record [--prompts 16] [--context 4096] [--output 128]
        [--budget 256] [--traces benchmarks/results/offload_traces_<device>.json.gz]
    python benchmarks/offload_policy.py replay [--traces ...] [--shares 0.25,0.5] [--horizon 1] [--recall 8,16]
        [--out benchmarks/results]

`record` runs SmolLM2 through vLLM (CPU here) with sparsekv quest, every prompt submitted at once
with `ignore_eos`, and keeps, per request and decode step, the pages the decode selected and how
many (layer, KV head) pairs selected each: the connector's own SelectionReport, read on the
scheduler side. The passive store is on with `resident_fraction: 1` so that the worker reports
selections and nothing goes passive (the decode is exactly sparsekv's). Prompts are essay text
(data/essays) behind one of a few instructions: the `train` split from the essays train-hash trains
on, the `test` split from its held-out essays (every 8th), so the trained predictor is evaluated on
text it never saw.

`replay` runs each trace through each policy at a fixed resident share with
`offload.replay.replay` (the connector's candidate rules, full memory pressure) and reports recalls
per decode step and host bytes per decode step (pages copied to the pool, plus the selected passive
pages read back at `read_back: host`: one (layer, KV head) page per selection, as the store's
`host_read_bytes` counts them). Policies: `lru`, `atskv` with its hand-set weights, and `atskv`
with weights `sparsekv train-relevance` fits on the train split (evaluated on the test split only).
Rows go to benchmarks/results/offload_policy_<device>.json with command, versions and commit; a
table is printed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "eval"), str(ROOT / "benchmarks")]

import quality  # noqa: E402  (commit)
import serve  # noqa: E402  (environment)

# what the decode is asked to do with the essay; varied so that attention patterns vary
INSTRUCTIONS = ("Summarize the following essay in detail.", "List the main arguments of the essay below, one by one.",
                "Continue the essay below in the same style.", "Write questions a reader could answer from this essay.")


def device_tag(device: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_")


def essay_prompts(tokenizer, n: int, context: int, split: str, seed: int) -> list[str]:
    """`n` prompts of about `context` tokens: an instruction, then essays of the split (train-hash's
    held-out essays for `test`) from a random one on, concatenated until long enough."""
    from sparsekv_eval.haystack import find_essays

    from vllm_sparsekv.tools.train_hash import heldout_essay_names

    essays = sorted(find_essays())
    held = set(heldout_essay_names([name for name, _ in essays]))
    texts = [t for name, t in essays if (name in held) == (split == "test")]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        first = rng.randrange(len(texts))
        body = "\n\n".join(texts[(first + k) % len(texts)] for k in range(len(texts)))
        ids = tokenizer.encode(body)[: context - 40]
        out.append(f"{INSTRUCTIONS[i % len(INSTRUCTIONS)]}\n\n{tokenizer.decode(ids)}\n\nAnswer:")
    return out


# ----------------------------------------------------------------------------- record (child)
def record_traces(spec: dict) -> dict:
    """In the child process: one engine, every prompt at once; the scheduler side's selection
    reports and each request's length at that step, per request."""
    import quality_vllm

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB: 16 SmolLM2 requests of 4K tokens at once
    for k, v in quality_vllm.CPU_ENV.items():
        os.environ.setdefault(k, v)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler is read here
    from vllm import LLM, SamplingParams

    sparse = {"method": "quest", "token_budget": spec["budget"], "sink_tokens": spec["sink_tokens"],
              "recent_tokens": spec["recent_tokens"], "dense_layers": [],
              "offload": {"enabled": True, "cpu_bytes": 1, "resident_fraction": 1.0}}
    llm = LLM(spec["model"], dtype="float32", enforce_eager=True, gpu_memory_utilization=0.5,
              distributed_executor_backend="uni", max_model_len=spec["context"] + spec["output"] + 64,
              max_num_seqs=len(spec["prompts"]), block_size=spec["block_size"], enable_prefix_caching=False,
              seed=0, attention_backend="sparsekv", additional_config={"sparsekv": sparse})
    engine = llm.llm_engine
    side = engine.engine_core.engine_core.scheduler.connector.scheduler_side
    steps: dict[str, list] = {}
    observe = side.observe

    def record(report) -> None:
        for rid, pages, counts in report.items():
            req = side.requests.get(rid)
            if req is not None:  # num_computed_tokens counts the token this step wrote
                steps.setdefault(rid, []).append([req.num_computed_tokens, pages.tolist(), counts.tolist()])
        observe(report)

    side.observe = record
    sp = SamplingParams(temperature=0.0, max_tokens=spec["output"], ignore_eos=True, detokenize=False)
    t0 = time.monotonic()
    for i, p in enumerate(spec["prompts"]):
        engine.add_request(str(i), p, sp)
    prompt_len = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            prompt_len[out.request_id] = len(out.prompt_token_ids)
    by_public = {rid.rsplit("-", 1)[0]: s for rid, s in steps.items()}  # vLLM's internal ids: "<id>-<suffix>"
    return {"wall_s": time.monotonic() - t0,
            "requests": [{"id": i, "prompt_tokens": prompt_len[i], "steps": by_public[i]}
                         for i in sorted(by_public, key=int)]}


def record(a) -> int:
    from transformers import AutoTokenizer

    from tests.engine.harness import run_engine
    from vllm_sparsekv.models import ensure_model

    model = str(ensure_model("smollm2"))
    tok = AutoTokenizer.from_pretrained(model)
    env = serve.environment()
    doc = {"command": " ".join(["benchmarks/offload_policy.py", *a.argv]), **env, "commit": quality.commit(),
           "model": "SmolLM2-135M-Instruct", "method": "quest", "budget": a.budget, "block_size": a.block_size,
           "sink_tokens": a.sink_tokens, "recent_tokens": a.recent_tokens, "context": a.context,
           "output": a.output, "requests": []}
    for split, seed in (("train", 0), ("test", 1)):
        spec = {"model": model, "prompts": essay_prompts(tok, a.prompts, a.context, split, seed), **{
            k: getattr(a, k) for k in ("context", "output", "budget", "block_size", "sink_tokens", "recent_tokens")}}
        raw = run_engine(spec, timeout=a.timeout, script=__file__)
        print(f"{split}: {len(raw['requests'])} requests recorded in {raw['wall_s']:.0f} s", flush=True)
        doc["requests"] += [{**r, "id": f"{split}-{r['id']}", "split": split} for r in raw["requests"]]
    out = Path(a.traces or default_traces(env["device"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(out, "wt") as f:
        json.dump(doc, f)
    print(f"-> {out}")
    return 0


# ----------------------------------------------------------------------------- replay
class FuturePolicy:
    """A reference, not a deployable policy: knows each request's whole trace and moves the pages
    the rest of it selects least often (greedy)."""

    def __init__(self, traces: dict):
        self.traces, self.step = traces, {}

    def observe(self, req_id, pages, step, counts=None) -> None:
        self.step[req_id] = step

    def choose(self, req_id, candidates, count, num_pages, free_share) -> list[int]:
        future: dict[int, int] = {}
        for _, pages, _ in self.traces[req_id][self.step[req_id] + 1:]:
            for p in pages:
                future[p] = future.get(p, 0) + 1
        return sorted(candidates, key=lambda p: (future.get(p, 0), p))[:count]

    def forget(self, req_id) -> None:
        self.step.pop(req_id, None)


def page_bytes(model_dir: str, block_size: int, dtype_bytes: int = 4) -> tuple[int, int]:
    """(bytes of one (layer, KV head) page, K and V; (layer, KV head) pairs) of the model."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    pairs = c["num_hidden_layers"] * c.get("num_key_value_heads", c["num_attention_heads"])
    return 2 * block_size * head_dim * dtype_bytes, pairs


def replay_rows(doc: dict, policies: dict, shares: list[float], split: str, pair_bytes: int, pairs: int) -> list[dict]:
    """One row per (share, policy) on the `split` requests; `policies`: (name, make(traces), (k, window)
    of `read_back: recall` or None for `host`), the first one the baseline of the ratios. Host bytes: whole pages (every layer
    and KV head) copied to the pool and back, plus one (layer, KV head) page per host read."""
    from vllm_sparsekv.offload.policy import RecallRule
    from vllm_sparsekv.offload.replay import replay

    traces = {r["id"]: r["steps"] for r in doc["requests"] if r["split"] == split}
    rows = []
    for share in shares:
        base = None
        for name, make, recall in policies:
            res = replay(traces, make(traces), share, doc["block_size"], doc["sink_pages"], doc["recent_pages"],
                         RecallRule(*recall) if recall else None)
            row = {"split": split, "resident_fraction": share, "policy": name,
                   "read_back": f"recall {recall[0]} of {recall[1]}" if recall else "host", "requests": len(traces),
                   "steps": res.steps, "resident_share": round(res.resident_pages / res.pages, 4),
                   "recalls_per_step": round(res.recalls / res.steps, 3),
                   "host_reads_per_step": round(res.host_reads / res.steps, 2),
                   "promoted_per_step": round(res.promoted / res.steps, 3),
                   "host_bytes_per_step": round(((res.offloaded + res.promoted) * pairs + res.host_reads)
                                                * pair_bytes / res.steps),
                   "offloaded_pages": res.offloaded}
            base = base or row
            row["recalls_vs_lru"] = round(row["recalls_per_step"] / base["recalls_per_step"], 3)
            row["host_bytes_vs_lru"] = round(row["host_bytes_per_step"] / base["host_bytes_per_step"], 3)
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'split':6} {'share':>5} {'policy':14} {'read_back':14} {'resident':>8} {'recalls/step':>12} "
             f"{'x lru':>6} {'host reads/step':>15} {'promoted/step':>13} {'host MiB/step':>13} {'x lru':>6}"]
    for r in rows:
        lines.append(f"{r['split']:6} {r['resident_fraction']:>5} {r['policy']:14} {r['read_back']:14} "
                     f"{r['resident_share']:>8.3f} {r['recalls_per_step']:>12.2f} {r['recalls_vs_lru']:>6.3f} "
                     f"{r['host_reads_per_step']:>15.1f} {r['promoted_per_step']:>13.2f} "
                     f"{r['host_bytes_per_step'] / 2**20:>13.2f} {r['host_bytes_vs_lru']:>6.3f}")
    return "\n".join(lines)


def replay_main(a) -> int:
    import numpy as np

    from vllm_sparsekv.models import ensure_model
    from vllm_sparsekv.offload.policy import ATSKVPolicy, LRUPolicy
    from vllm_sparsekv.offload.replay import load_traces
    from vllm_sparsekv.tools.train_relevance import train

    env = serve.environment()
    path = Path(a.traces or default_traces(env["device"]))
    doc = load_traces(str(path))
    weights = train(doc, "train", a.horizon)
    tag = device_tag(env["device"])
    wpath = Path(a.out) / f"relevance_weights_{tag}.json"
    wpath.parent.mkdir(parents=True, exist_ok=True)
    wpath.write_text(json.dumps({**weights, "command": f"benchmarks/offload_policy.py {' '.join(a.argv)}"}, indent=1) + "\n")
    w, b = np.asarray(weights["weights"]), weights["bias"]
    recall = tuple(int(x) for x in a.recall.split(",")) if a.recall else None
    policies = [("lru", lambda t: LRUPolicy(), None), ("atskv-hand", lambda t: ATSKVPolicy(), None),
                ("atskv-trained", lambda t: ATSKVPolicy(w, b), None), ("future (ref.)", FuturePolicy, None)]
    if recall:
        policies += [("lru", lambda t: LRUPolicy(), recall), ("atskv-hand", lambda t: ATSKVPolicy(), recall)]
    pair_bytes, pairs = page_bytes(str(ensure_model("smollm2")), doc["block_size"])
    shares = [float(x) for x in a.shares.split(",")]
    rows = replay_rows(doc, policies, shares, "test", pair_bytes, pairs)
    out = Path(a.out) / f"offload_policy_{tag}.json"
    trace_keys = ("model", "method", "budget", "block_size", "sink_tokens", "recent_tokens", "context", "output")
    out.write_text(json.dumps({
        "command": " ".join(["benchmarks/offload_policy.py", *a.argv]), **env, "commit": quality.commit(),
        "traces": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path), "trace_commit": doc["commit"],
        **{f"trace_{k}": doc[k] for k in trace_keys}, "train_requests": weights["requests"],
        "weights": str(wpath.relative_to(ROOT) if wpath.is_relative_to(ROOT) else wpath), "horizon": a.horizon,
        "rows": rows}, indent=1))
    print(f"traces: {doc['model']}, {doc['method']} budget {doc['budget']}, {doc['context']}-token prompts, "
          f"{doc['output']} decode steps, pages of {doc['block_size']}; trained on {weights['requests']} train "
          f"requests (horizon {a.horizon}), evaluated on the test requests")
    print(format_table(rows))
    print(f"-> {out}\n-> {wpath}")
    return 0


def default_traces(device: str) -> Path:
    return ROOT / "benchmarks" / "results" / f"offload_traces_{device_tag(device)}.json.gz"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("record", help="record selection traces of SmolLM2 through vLLM")
    r.add_argument("--prompts", type=int, default=16, help="prompts per split (train, test)")
    r.add_argument("--context", type=int, default=4096, help="prompt tokens")
    r.add_argument("--output", type=int, default=128, help="decode steps per request (ignore_eos)")
    r.add_argument("--budget", type=int, default=256, help="quest token budget")
    r.add_argument("--block-size", type=int, default=32)
    r.add_argument("--sink-tokens", type=int, default=32)
    r.add_argument("--recent-tokens", type=int, default=32)
    r.add_argument("--timeout", type=int, default=3600)
    r.add_argument("--traces", default=None, help="output (default: benchmarks/results/offload_traces_<device>.json.gz)")
    p = sub.add_parser("replay", help="replay the traces through lru and atskv")
    p.add_argument("--traces", default=None, help="default: benchmarks/results/offload_traces_<device>.json.gz")
    p.add_argument("--shares", default="0.25,0.5", help="resident fractions")
    p.add_argument("--horizon", type=int, default=1, help="train-relevance's label horizon")
    p.add_argument("--recall", default="8,16", help="K,N: also replay read_back recall (K of the last N steps); '' skips")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    a.argv = argv
    return record(a) if a.mode == "record" else replay_main(a)


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("@"):  # a child of run_engine: @SPEC_FILE
        print("RESULT " + json.dumps(record_traces(json.loads(Path(sys.argv[1][1:]).read_text()))), flush=True)
        sys.exit(0)
    sys.exit(main())
