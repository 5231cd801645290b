"""Stress one engine configuration on the GPU: many requests of mixed lengths, chunked prefill
mixing with decodes, shared prefixes (prefix caching), a KV cache small enough to force
preemption, and requests aborted mid-decode, for at least --min-steps engine steps. Prints one
`RESULT {json}` line; exits non-zero on any error or any lost request.

    python benchmarks/gpu_stress.py --model DIR --sparsekv '{"method": "quest", "budget_fraction": 0.0625}'
        [--eager] [--kv-bytes N] [--requests 160] [--min-steps 1000] [--seed S]

DIR is any HF folder; with --dummy the weights are random (`load_format="dummy"`), which is what
crash hunting needs (the layout, lengths and schedule matter, not the values).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dummy", action="store_true")
    ap.add_argument("--sparsekv", default=None, help="JSON config; omit for dense vLLM (FA3)")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--kv-bytes", type=int, default=512 << 20, help="small enough to force preemption")
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--min-len", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=12288)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--min-steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--prefix-caching", action="store_true")
    ap.add_argument("--abort-prob", type=float, default=0.02, help="chance per step of aborting a request")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                    help="only vLLM's startup check of free memory: the KV size is --kv-bytes")
    a = ap.parse_args()
    seed = a.seed if a.seed is not None else int(time.time()) % 100000
    print(f"seed {seed}", flush=True)
    rng = random.Random(seed)

    from vllm import EngineArgs, LLMEngine, SamplingParams
    from vllm.inputs import TokensPrompt

    kw = dict(model=a.model, dtype="bfloat16", max_model_len=a.max_len + a.max_tokens + 64, seed=seed,
              enforce_eager=a.eager, max_num_seqs=64, max_num_batched_tokens=2048, enable_chunked_prefill=True,
              enable_prefix_caching=a.prefix_caching, kv_cache_memory_bytes=a.kv_bytes, gpu_memory_utilization=a.gpu_memory_utilization,
              skip_tokenizer_init=True,
              disable_log_stats=False)
    if a.dummy:
        kw["load_format"] = "dummy"
    if not a.eager:
        kw["compilation_config"] = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY",
                                    "cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64]}
    if a.sparsekv is not None:
        sparse = json.loads(a.sparsekv)
        kw.update(attention_backend="sparsekv", additional_config={"sparsekv": sparse})
        if sparse.get("offload", {}).get("enabled"):
            kw["async_scheduling"] = False  # the passive store refuses async scheduling
    engine = LLMEngine.from_engine_args(EngineArgs(**kw))
    vocab = 1000
    prefixes = [[rng.randrange(10, vocab) for _ in range(rng.randrange(a.min_len, a.max_len // 2))] for _ in range(4)]
    want: dict[str, int] = {}
    pending = []
    for i in range(a.requests):
        n = rng.randrange(a.min_len, a.max_len)
        ids = [rng.randrange(10, vocab) for _ in range(n)]
        if i % 3 == 0:  # a shared prefix: prefix-cache hits when caching is on
            p = prefixes[i % len(prefixes)]
            ids = (p + ids)[: max(n, min(len(p) + 16, a.max_len))]
        pending.append((f"r{i}", ids))
    sp = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True, detokenize=False)
    steps, done, aborted, preemptions, errors = 0, {}, set(), 0, []
    t0 = time.time()
    max_in_flight = 0
    while pending or engine.has_unfinished_requests():
        # keep feeding requests over time so prefill chunks mix with running decodes
        for _ in range(min(len(pending), rng.randrange(0, 4))):
            rid, ids = pending.pop(0)
            engine.add_request(rid, TokensPrompt(prompt_token_ids=ids), sp)
            want[rid] = a.max_tokens
        try:
            outs = engine.step()
        except Exception as e:  # noqa: BLE001 - reported, then the run fails
            errors.append(repr(e))
            break
        steps += 1
        for o in outs:
            if o.finished:
                done[o.request_id] = len(o.outputs[0].token_ids)
                if o.metrics is not None:
                    preemptions += o.metrics.num_preemptions
        running = [r for r in want if r not in done and r not in aborted]  # added, not finished
        max_in_flight = max(max_in_flight, len(running))
        if running and rng.random() < a.abort_prob:  # abort one request mid-flight
            victim = rng.choice(running)
            engine.abort_request([victim])
            aborted.add(victim)
        if not pending and steps < a.min_steps and not engine.has_unfinished_requests():
            # keep the engine busy until the step count is reached
            for j in range(8):
                pending.append((f"x{steps}_{j}", [rng.randrange(10, vocab)
                                                  for _ in range(rng.randrange(a.min_len, max(a.min_len + 1, min(4096, a.max_len))))]))
    lost = [r for r in want if r not in aborted and done.get(r) != want[r]]
    from vllm.compilation.counter import compilation_counter

    result = {
        "config": json.loads(a.sparsekv) if a.sparsekv else "dense", "eager": a.eager, "seed": seed, "steps": steps,
        "requests": len(want), "finished": len(done), "aborted": len(aborted), "lost": lost[:10],
        "num_lost": len(lost), "preemptions": preemptions, "max_in_flight": max_in_flight, "errors": errors,
        "cudagraphs_captured": compilation_counter.num_cudagraph_captured, "wall_s": round(time.time() - t0, 1),
    }
    if a.sparsekv is not None:
        from vllm_sparsekv import stats

        result["stats"] = stats.snapshot()
    print("RESULT " + json.dumps(result), flush=True)
    return 0 if not errors and not lost and steps >= a.min_steps else 1


if __name__ == "__main__":
    sys.exit(main())
