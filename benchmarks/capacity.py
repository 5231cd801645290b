"""Capacity at a fixed KV memory (issue 11): how many requests run at once, and at what decode speed,
with dense attention, sparsekv, and sparsekv with the passive store (offload).

    python benchmarks/capacity.py [--model DIR | --llama8b-dummy] [--configs dense,sparsekv,sparsekv_offload]
        [--requests 8] [--context 1024] [--output 32] [--kv-blocks 72 | --kv-memory-bytes N]
        [--budget 128] [--resident-fraction 0.25] [--out benchmarks/results]

Every configuration gets the same KV memory (`num_gpu_blocks_override`, which the CPU engine honours
too) and the same `--requests` prompts of `--context` random token ids, all submitted at once, each
generating `--output` tokens (`ignore_eos`). Each configuration runs in its own process
(tests/engine/harness.py's `run_engine`), with vLLM's engine core in that process so the script can
read the scheduler after every step: `running_max` is the most requests in vLLM's running queue at
once. Per request, vLLM's RequestOutput metrics give TPOT (last minus first token time over
output - 1); `decode_tok_s` is every request's decode tokens over the span from the first first token
to the last token (so later waves' prefills fall inside it: that is what a capacity limit costs).
`host_bytes_per_step` (pages copied to the host pool and back by recalls, plus passive pages the decode
read from it) and
`recalls_per_step` (host page reads: one layer's page of one KV head) divide the passive store's
counters by the engine steps that decoded. Rows (`ROW_KEYS`, plus the raw counters) go to
benchmarks/results/capacity_<device>.json with command, device, versions and commit; a table is
printed. The dense config is named for the device: `dense_fa3` (FlashAttention on CUDA) or `dense`
(vLLM's CPU attention).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "eval"), str(ROOT / "benchmarks")]

import e2e_decode  # noqa: E402  (write_llama8b: the Llama-3-8B shape for the GPU run)
import quality  # noqa: E402  (commit)
import serve  # noqa: E402  (environment, percentiles)

ROW_KEYS = ("config", "device", "model", "method", "budget", "context", "kv_memory_bytes", "requests",
            "running_max", "preemptions", "decode_tok_s", "tpot_p50_ms", "tpot_p99_ms", "host_bytes_per_step",
            "recalls_per_step")
# counters of the passive store (stats.snapshot()) kept in each row as they came
COUNTERS = ("max_decode_rows", "offloaded_pages", "offloaded_bytes", "host_page_reads", "host_read_bytes",
            "recalled_pages", "recalled_bytes", "passive_pages_max", "offload_pool_full_pages",
            "preempted_with_passive_pages")


def config_names(cuda: bool) -> list[str]:
    return ["dense_fa3" if cuda else "dense", "sparsekv", "sparsekv_offload", "sparsekv_offload_recall"]


OFFLOAD_VARIANTS = {"atskv": {"policy": "atskv"}, "recall": {"read_back": "recall"}}
"""`sparsekv_offload_<variant>[_<variant>]` configs: the passive store with these settings changed."""


def sparse_config(name: str, a) -> dict | None:
    """The `sparsekv` section of a configuration (None: the device's stock dense backend)."""
    if name.startswith("dense"):
        return None
    cfg = {"method": "quest", "token_budget": a.budget, "sink_tokens": a.sink_tokens,
           "recent_tokens": a.recent_tokens, "dense_layers": []}
    if name.startswith("sparsekv_offload"):
        cfg["offload"] = {"enabled": True, "cpu_bytes": a.cpu_bytes, "resident_fraction": a.resident_fraction}
        for variant in filter(None, name.removeprefix("sparsekv_offload").split("_")):
            if variant not in OFFLOAD_VARIANTS:
                raise SystemExit(f"unknown config {name!r}: offload variants are {', '.join(OFFLOAD_VARIANTS)}")
            cfg["offload"].update(OFFLOAD_VARIANTS[variant])
    return cfg


def kv_blocks(a, model_dir: str, cuda: bool) -> int:
    """`--kv-blocks`, or the blocks of `--block-size` tokens that `--kv-memory-bytes` holds for this
    model (K and V of every layer, float32 on CPU, bfloat16 on CUDA)."""
    if not a.kv_memory_bytes:
        return a.kv_blocks
    c = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    per_token = 2 * c["num_hidden_layers"] * c.get("num_key_value_heads", c["num_attention_heads"]) * head_dim
    return a.kv_memory_bytes // (per_token * (2 if cuda else 4) * a.block_size)


# ----------------------------------------------------------------------------- child: one engine
def prompt_ids(spec: dict, tokenizer, vocab: int) -> list[list[int]]:
    """The requests' prompts as token ids: essay text (serve.build_prompts) with a tokenizer, so
    greedy outputs are not the near-ties of random text and offload's tokens can be compared with
    sparsekv's; random ids with dummy weights (no tokenizer, and nothing to compare)."""
    n, ctx = spec["requests"], spec["context"]
    if tokenizer is None:
        rng = random.Random(0)
        return [[rng.randrange(100, min(30000, vocab)) for _ in range(ctx)] for _ in range(n)]
    return [tokenizer.encode(t) for t in serve.build_prompts(n, ctx, tokenizer, seed=0)]


def run_config(spec: dict) -> dict:
    """In the child process: one engine, every request submitted at once, stepped to the end."""
    cuda = spec["cuda"]
    if not cuda:
        import quality_vllm

        for k, v in quality_vllm.CPU_ENV.items():
            os.environ.setdefault(k, v)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler and the counters are read here
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_sparsekv import stats

    kw = dict(model=spec["model"], dtype="bfloat16" if cuda else "float32", enforce_eager=not cuda,
              gpu_memory_utilization=0.9 if cuda else 0.5, distributed_executor_backend="uni",
              max_model_len=spec["context"] + spec["output"], max_num_seqs=spec["requests"],
              block_size=spec["block_size"], num_gpu_blocks_override=spec["kv_blocks"],
              enable_prefix_caching=False, disable_log_stats=False, seed=0, skip_tokenizer_init=spec["dummy"])
    if spec["dummy"]:
        kw["load_format"] = "dummy"
    if cuda:  # sync scheduling in every configuration: the passive store refuses async scheduling
        kw["compilation_config"] = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY",
                                    "cudagraph_capture_sizes": sorted({1, 2, 4, 8, spec["requests"]})}
        kw["async_scheduling"] = False
    if spec["sparsekv"] is not None:
        kw.update(attention_backend="sparsekv", additional_config={"sparsekv": spec["sparsekv"]})
    elif cuda:
        kw["attention_backend"] = "FLASH_ATTN"
    llm = LLM(**kw)
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    llm.generate([TokensPrompt(prompt_token_ids=[5] * 64)], SamplingParams(max_tokens=4), use_tqdm=False)
    stats.reset()  # counters of the timed run only
    sp = SamplingParams(temperature=0.0, max_tokens=spec["output"], ignore_eos=True, detokenize=False)
    for i, ids in enumerate(prompt_ids(spec, None if spec["dummy"] else llm.get_tokenizer(),
                                       engine.model_config.get_vocab_size())):
        engine.add_request(str(i), TokensPrompt(prompt_token_ids=ids), sp)
    done, steps, decode_steps, running_max, decoding_max = {}, 0, 0, 0, 0
    t0 = time.monotonic()
    while engine.has_unfinished_requests():
        decoding = sum(1 for r in scheduler.running if r.num_output_tokens > 0)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        steps += 1
        decode_steps += decoding > 0
        decoding_max = max(decoding_max, decoding)
        running_max = max(running_max, len(scheduler.running))
    wall = time.monotonic() - t0
    kvc = scheduler.kv_cache_config
    kv_bytes = kvc.num_blocks * sum(g.kv_cache_spec.page_size_bytes * len(g.layer_names)
                                    for g in kvc.kv_cache_groups)
    outs = [done[k] for k in sorted(done, key=int)]
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    m = [o.metrics for o in outs]
    return {"wall_s": wall, "steps": steps, "decode_steps": decode_steps, "running_max": running_max,
            "decoding_max": decoding_max, "kv_memory_bytes": kv_bytes, "kv_blocks": kvc.num_blocks,
            "block_size": kvc.kv_cache_groups[0].kv_cache_spec.block_size,
            "finished": len(outs), "output_tokens": [len(t) for t in tokens],
            "tokens_sha1": [hashlib.sha1(json.dumps(t).encode()).hexdigest() for t in tokens],
            "first_token_ts": [x.first_token_ts for x in m], "last_token_ts": [x.last_token_ts for x in m],
            "preemptions": sum(x.num_preemptions for x in m), "stats": stats.snapshot()}


# ----------------------------------------------------------------------------- parent: rows, table
def build_row(name: str, raw: dict, meta: dict) -> dict:
    """One result row (`ROW_KEYS` first) from a child's raw measurements."""
    n = raw["output_tokens"]
    tpot = sorted(1000 * (b - a) / (k - 1) for a, b, k in zip(raw["first_token_ts"], raw["last_token_ts"], n) if k > 1)
    span = max(raw["last_token_ts"]) - min(raw["first_token_ts"])
    s = raw["stats"]
    steps = raw["decode_steps"] or 1
    host_bytes = s.get("offloaded_bytes", 0) + s.get("host_read_bytes", 0) + s.get("recalled_bytes", 0)
    sparse = meta["sparsekv"].get(name)
    row = {
        "config": name, "device": meta["device"], "model": meta["model"],
        "method": sparse["method"] if sparse else None, "budget": sparse["token_budget"] if sparse else None,
        "context": meta["context"], "kv_memory_bytes": raw["kv_memory_bytes"], "requests": meta["requests"],
        "running_max": raw["running_max"], "preemptions": raw["preemptions"],
        "decode_tok_s": round(sum(k - 1 for k in n) / span, 2) if span > 0 else None,
        "tpot_p50_ms": round(serve._pct(tpot, 50), 2), "tpot_p99_ms": round(serve._pct(tpot, 99), 2),
        "host_bytes_per_step": round(host_bytes / steps), "recalls_per_step": round(s.get("host_page_reads", 0) / steps, 1),
    }
    row.update({k: raw[k] for k in ("decoding_max", "kv_blocks", "block_size", "steps", "decode_steps", "finished",
                                    "tokens_sha1")},
               wall_s=round(raw["wall_s"], 1), **{k: s[k] for k in COUNTERS if k in s})
    return row


def compare(rows: list[dict]) -> list[dict]:
    """Ratios against the dense row, and how many requests kept sparsekv's tokens with offload."""
    dense = next((r for r in rows if r["config"].startswith("dense")), None)
    sparse = next((r for r in rows if r["config"] == "sparsekv"), None)
    for r in rows:
        if dense and dense["running_max"]:
            r["running_vs_dense"] = round(r["running_max"] / dense["running_max"], 2)
        if dense and dense["decode_tok_s"] and r["decode_tok_s"]:
            r["decode_vs_dense"] = round(r["decode_tok_s"] / dense["decode_tok_s"], 2)
        if r["config"].startswith("sparsekv_offload") and sparse:
            r["same_tokens_as_sparsekv"] = sum(a == b for a, b in zip(r["tokens_sha1"], sparse["tokens_sha1"]))
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'config':28} {'budget':>6} {'ctx':>6} {'KV MiB':>7} {'req':>4} {'running':>7} {'xdense':>6} "
            f"{'preempt':>7} {'dec tok/s':>9} {'xdense':>6} {'TPOT p50':>8} {'p99 ms':>7} {'host B/step':>11} "
            f"{'reads/step':>10}")
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['config']:28} {r['budget'] or '-':>6} {r['context']:>6} {r['kv_memory_bytes'] / 2**20:>7.1f} "
            f"{r['requests']:>4} {r['running_max']:>7} {r.get('running_vs_dense', 0):>6.2f} {r['preemptions']:>7} "
            f"{r['decode_tok_s'] or 0:>9.1f} {r.get('decode_vs_dense', 0):>6.2f} {r['tpot_p50_ms']:>8.1f} "
            f"{r['tpot_p99_ms']:>7.1f} {r['host_bytes_per_step']:>11} {r['recalls_per_step']:>10}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: SmolLM2, vllm_sparsekv.models)")
    ap.add_argument("--llama8b-dummy", action="store_true", help="a Llama-3-8B-shaped config, dummy weights")
    ap.add_argument("--configs", default=None, help="default: the device's dense, sparsekv, sparsekv_offload, "
                    "sparsekv_offload_recall; also sparsekv_offload_atskv, sparsekv_offload_atskv_recall")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--context", type=int, default=1024, help="prompt tokens per request")
    ap.add_argument("--output", type=int, default=32, help="tokens generated per request")
    ap.add_argument("--kv-blocks", type=int, default=72, help="KV blocks of every configuration")
    ap.add_argument("--kv-memory-bytes", type=int, default=0, help="instead of --kv-blocks: KV memory in bytes")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--budget", type=int, default=128, help="quest token budget")
    ap.add_argument("--sink-tokens", type=int, default=32)
    ap.add_argument("--recent-tokens", type=int, default=32)
    ap.add_argument("--resident-fraction", type=float, default=0.25)
    ap.add_argument("--cpu-bytes", type=int, default=2**30, help="host pool of the offload config")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per configuration")
    a = ap.parse_args(argv)
    from tests.engine.harness import run_engine

    env = serve.environment()
    cuda = env["device"] != "cpu"
    if a.llama8b_dummy:
        a.model, model_name = str(e2e_decode.write_llama8b(Path("/tmp/llama3-8b-shape"))), "Llama-3-8B shape, dummy weights"
    elif a.model is None:
        from vllm_sparsekv.models import ensure_model

        a.model, model_name = str(ensure_model("smollm2")), "SmolLM2-135M-Instruct"
    else:
        model_name = Path(a.model).name
    names = a.configs.split(",") if a.configs else config_names(cuda)
    meta = {"device": env["device"], "model": model_name, "context": a.context, "requests": a.requests,
            "sparsekv": {n: sparse_config(n, a) for n in names}}
    doc = {"command": " ".join(["benchmarks/capacity.py", *(argv if argv is not None else sys.argv[1:])]),
           **env, "commit": quality.commit(), "rows": [], "failures": {}}
    out = Path(a.out) / f"capacity_{re.sub(r'[^A-Za-z0-9]+', '_', env['device']).strip('_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        spec = {"cuda": cuda, "model": a.model, "dummy": a.llama8b_dummy, "context": a.context, "output": a.output,
                "requests": a.requests, "block_size": a.block_size, "kv_blocks": kv_blocks(a, a.model, cuda),
                "sparsekv": meta["sparsekv"][name]}
        t0 = time.time()
        try:
            raw = run_engine(spec, timeout=a.timeout, script=__file__)
        except Exception as e:  # noqa: BLE001 - a failed configuration must not lose the others
            doc["failures"][name] = str(e)[-3000:]
            print(f"{name}: FAILED\n{doc['failures'][name]}", flush=True)
            continue
        doc["rows"] = compare([*doc["rows"], build_row(name, raw, meta)])
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)
        out.write_text(json.dumps(doc, indent=1))  # after every configuration: a cut-short run keeps the rest
    print(format_table(doc["rows"]))
    print(f"-> {out}")
    return 0 if not doc["failures"] else 1


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("@"):  # a child of run_engine: @SPEC_FILE
        print("RESULT " + json.dumps(run_config(json.loads(Path(sys.argv[1][1:]).read_text()))), flush=True)
        sys.exit(0)
    sys.exit(main())
