"""Offload policies on recorded selection traces (issue 11): which policy makes the fewest recalls
(selected-while-passive pages) at the same resident share.

    python benchmarks/offload_policy.py record [--prompts 8] [--context 2048] [--output 128]
        [--budget 256] [--traces benchmarks/results/offload_traces_<device>.json.gz]
    python benchmarks/offload_policy.py replay [--traces ...] [--shares 0.25,0.5] [--horizon 32]
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
        for rid in report.selected:
            req = side.requests.get(rid)
            if req is not None:  # num_computed_tokens counts the token this step wrote
                steps.setdefault(rid, []).append([req.num_computed_tokens, report.selected[rid], report.counts[rid]])
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


def default_traces(device: str) -> Path:
    return ROOT / "benchmarks" / "results" / f"offload_traces_{device_tag(device)}.json.gz"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("record", help="record selection traces of SmolLM2 through vLLM")
    r.add_argument("--prompts", type=int, default=8, help="prompts per split (train, test)")
    r.add_argument("--context", type=int, default=2048, help="prompt tokens")
    r.add_argument("--output", type=int, default=128, help="decode steps per request (ignore_eos)")
    r.add_argument("--budget", type=int, default=256, help="quest token budget")
    r.add_argument("--block-size", type=int, default=32)
    r.add_argument("--sink-tokens", type=int, default=32)
    r.add_argument("--recent-tokens", type=int, default=32)
    r.add_argument("--timeout", type=int, default=3600)
    r.add_argument("--traces", default=None, help="output (default: benchmarks/results/offload_traces_<device>.json.gz)")
    a = ap.parse_args(argv)
    a.argv = argv
    return record(a)


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("@"):  # a child of run_engine: @SPEC_FILE
        print("RESULT " + json.dumps(record_traces(json.loads(Path(sys.argv[1][1:]).read_text()))), flush=True)
        sys.exit(0)
    sys.exit(main())
