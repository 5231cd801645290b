"""End-to-end decode throughput through vLLM's offline `LLM`: dense FlashAttention-3, dense Triton
and sparsekv configurations on the same model, prompts and settings, one configuration per process.

    python benchmarks/e2e_decode.py [--model DIR | --llama8b-dummy] [--configs fa3,triton,full,quest16,...]
        [--grid 8:32768,1:32768,16:8192,4:130944] [--out benchmarks/results] [--profile-steps 5]

Each configuration starts its own `LLM` (a fresh process: two engines in one process keep GPU
memory), with prefix caching off, bf16 and FULL CUDA graphs for decode (compilation off, so every
configuration starts in seconds and runs the same dense GEMM kernels). For each (batch, context)
it prefills `batch` random prompts of `context` tokens and decodes `--output` tokens with
`ignore_eos`; vLLM's per-request timestamps give the decode time (last token minus the slowest
first token, over output-1 steps) and the time to first token (the batch's prefill). Rows go to
benchmarks/results/e2e_decode_<device>.json (schema in `ROW_KEYS`), with command, device,
versions and commit; a table is printed and a PNG of speedup vs context is written.

Each row also records GPU memory (device memory in use after the point, NVML, and the KV cache
vLLM allocated). `--profile-steps N` adds "step_split": after the timed run of a point, the same
prompts run once more under vLLM's torch profiler (`profiler_config`), which records N decode
steps after prefill and 8 warm-up steps; the GPU kernel time per step is split into GEMMs, dense
attention, our score / select / attend / summary kernels, the KV write and the rest (`step_split`).
With CPU activity on (the default) vLLM's step annotations are checked too: `steps_with_prefill`
must be 0 and `decode_rows` the batch. The timed numbers never come from a profiled run.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import importlib
import json
import math
import os
import pkgutil
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = ("backend", "method", "page_size", "budget", "batch", "context", "cuda_graphs", "decode_tok_s",
            "ttft_s", "speedup_vs_fa3", "speedup_vs_triton", "step_ms", "step_split", "gpu_mem_used_gib",
            "kv_cache_tokens")

# name -> (attention backend, block size, sparsekv config or None)
CONFIGS = {
    "fa3": ("FLASH_ATTN", 16, None),
    "triton": ("TRITON_ATTN", 16, None),
    "full": ("sparsekv", 16, {"method": "full"}),
    "quest16": ("sparsekv", 16, {"method": "quest", "budget_fraction": 0.0625}),
    "quest2048": ("sparsekv", 16, {"method": "quest", "token_budget": 2048}),
    "quest16_p32": ("sparsekv", 32, {"method": "quest", "budget_fraction": 0.0625}),
    "quest2048_p32": ("sparsekv", 32, {"method": "quest", "token_budget": 2048}),
    "hash2_p32": ("sparsekv", 32, {"method": "hash", "budget_fraction": 0.02}),
    # the candidate default of the quality reports (SnapKV keep-set + Quest): its prefill side pass and per-step merge
    "snapquest16_p32": ("sparsekv", 32, {"method": "snapquest", "budget_fraction": 0.0625}),
    # every layer sparse: what the two dense layers of the default cost per step
    "quest16_p32_d0": ("sparsekv", 32, {"method": "quest", "budget_fraction": 0.0625, "dense_layers": []}),
    # A/B of the selection's four-way search (kernels/page_select.py SELECT_WAYS)
    "quest16_w4": ("sparsekv", 16, {"method": "quest", "budget_fraction": 0.0625}),
    "quest16_p32_w4": ("sparsekv", 32, {"method": "quest", "budget_fraction": 0.0625}),
}
CONFIG_ENV = {"quest16_w4": {"SPARSEKV_SELECT_WAYS": "4"}, "quest16_p32_w4": {"SPARSEKV_SELECT_WAYS": "4"}}

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
    "hidden_act": "silu", "torch_dtype": "bfloat16", "tie_word_embeddings": False, "bos_token_id": 128000,
    "eos_token_id": 128001,
}


def write_llama8b(path: Path, layers: int = 32) -> Path:
    """A Llama-3-8B-shaped config folder (no weights, no tokenizer: dummy load, token-id prompts)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**LLAMA3_8B, "num_hidden_layers": layers}))
    return path


# --- per-step time split from a torch-profiler trace -------------------------------------------

# our kernels: the module of vllm_sparsekv.kernels that defines a Triton kernel -> its category.
# `_hash_kernel` serves both the key codes (KV write) and the query codes (scoring): one name in a
# trace, counted as summaries.
OUR_MODULES = {"page_scores": "sparsekv_score", "page_select": "sparsekv_select",
               "sparse_decode": "sparsekv_attend", "page_bounds": "sparsekv_summaries",
               "hash_codes": "sparsekv_summaries"}
# everything else, by kernel name, first match wins: the KV write (`reshape_and_cache_flash`) before
# dense attention, and FA3 (CUTLASS templates) before the GEMM patterns.
NAME_RULES = (
    ("kv_write", re.compile(r"reshape_and_cache|concat_and_cache", re.I)),
    ("dense_attn", re.compile(r"flash|FlashAttn|fmha|kernel_unified_attention|reduce_segments|"
                              r"paged_attention|attention_kernel", re.I)),
    ("gemm", re.compile(r"gemm|gemv|nvjet|cublas|cutlass|xmma|matmul|splitKreduce", re.I)),
)
# vLLM's worker names each profiled iteration (host annotation, with CPU activity on):
# execute_context_<prefill requests>(<tokens>)_generation_<decode requests>(<tokens>)
STEP_RX = re.compile(r"execute_context_(\d+)\((\d+)\)_generation_(\d+)\((\d+)\)")
SPLIT_KEYS = ("gemm", "dense_attn", "sparsekv_score", "sparsekv_select", "sparsekv_attend",
              "sparsekv_summaries", "sparsekv_other", "kv_write", "memcpy", "other")


def our_kernels() -> dict[str, str]:
    """{Triton kernel name: category} for every @triton.jit function in vllm_sparsekv.kernels, read
    from the package itself so that a renamed or new kernel is not silently counted as "other"."""
    import vllm_sparsekv.kernels as pkg

    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return {}
    out = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction):
                out[name] = OUR_MODULES.get(info.name, "sparsekv_other")
    return out


def kernel_category(name: str, ours: dict[str, str]) -> str:
    """Category of one GPU kernel by its trace name (C++ names included: `void ns::kern<...>(...)`)."""
    base = re.sub(r"^void\s+", "", name).split("(")[0].split("<")[0].split("::")[-1].strip()
    if base in ours:
        return ours[base]
    for cat, rx in NAME_RULES:
        if rx.search(name):
            return cat
    return "other"


def trace_events(paths) -> list[dict]:
    """The traceEvents of torch-profiler chrome traces (.json or .json.gz)."""
    events = []
    for path in paths:
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rt") as f:
            events += json.load(f).get("traceEvents", [])
    return events


def step_split(events: list[dict], steps: int, ours: dict[str, str], top: int = 6,
               cats=("kernel", "gpu_memcpy", "gpu_memset")) -> dict:
    """GPU time per decode step by category (ms), from the complete events of a trace that covers
    `steps` steps. Also the busy span per step (first start to last end over steps: launch gaps and
    host waits included) and the largest "other" kernels, to show what the split leaves out."""
    per = dict.fromkeys(SPLIT_KEYS, 0.0)
    other: dict[str, float] = {}
    n, t0, t1 = 0, math.inf, -math.inf
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in cats:
            continue
        dur = float(e.get("dur", 0.0))
        cat = "memcpy" if e["cat"] in ("gpu_memcpy", "gpu_memset") else kernel_category(e.get("name", ""), ours)
        per[cat] += dur
        if cat == "other":
            other[e.get("name", "")] = other.get(e.get("name", ""), 0.0) + dur
        n += 1
        t0, t1 = min(t0, float(e["ts"])), max(t1, float(e["ts"]) + dur)
    ms = {k: round(v / 1000 / steps, 4) for k, v in per.items()}
    out = {"steps": steps, "kernels_per_step": round(n / steps, 1), "gpu_ms": ms,
           "gpu_busy_ms": round(sum(per.values()) / 1000 / steps, 4),
           "span_ms": round((t1 - t0) / 1000 / steps, 4) if n else None,
           "top_other": [[k[:120], round(v / 1000 / steps, 4)]
                         for k, v in sorted(other.items(), key=lambda kv: -kv[1])[:top]]}
    its = [m.groups() for e in events if e.get("cat") == "user_annotation" and (m := STEP_RX.match(e.get("name", "")))]
    if its:  # the check that the window held decode steps only, each with the whole batch
        out["annotated_steps"] = len(its)
        out["steps_with_prefill"] = sum(int(c) > 0 for c, _, _, _ in its)
        out["decode_rows"] = sorted({int(g) for _, _, g, _ in its})
    return out


def profile_point(llm, prompts, a, batch: int, ctx: int, trace_dir: Path) -> dict:
    """Run the point's prompts once more with vLLM's profiler on for `a.profile_steps` decode steps:
    it starts after every prompt's prefill (chunks of `a.chunk` tokens) and 8 warm-up steps, and the
    requests generate long enough that the batch stays full while it records."""
    from vllm import SamplingParams

    prefill_steps = math.ceil(batch * ctx / a.chunk) + 1
    delay = prefill_steps + 8
    sp = SamplingParams(temperature=0.0, max_tokens=delay + a.profile_steps + 8, ignore_eos=True, detokenize=False)
    prefix = f"b{batch}_c{ctx}"
    llm.start_profile(prefix, delay_iterations=delay, max_iterations=a.profile_steps)
    llm.generate(prompts, sp, use_tqdm=False)
    llm.stop_profile()
    for _ in range(120):  # the worker writes the trace when it stops; allow for a slow gzip
        paths = sorted(glob.glob(str(trace_dir / f"{prefix}_*.pt.trace.json*")))
        if paths:
            break
        time.sleep(1)
    else:
        return {"error": f"no trace file for {prefix} in {trace_dir}"}
    time.sleep(2)  # a file that just appeared may still be written
    split = step_split(trace_events(paths), a.profile_steps, our_kernels())
    split["trace"] = [Path(p).name for p in paths]
    return split


def gpu_memory(llm, block: int) -> dict:
    """Device memory in use (NVML: every process, so the engine's weights, KV cache and graphs) and
    the KV cache vLLM sized for this configuration."""
    out = {"gpu_mem_used_gib": None, "kv_cache_tokens": None}
    try:
        blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
        out["kv_cache_tokens"] = None if blocks is None else int(blocks) * block
    except AttributeError:
        pass
    try:
        from vllm.third_party import pynvml

        pynvml.nvmlInit()
        dev = int((os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0])
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(dev))
        out["gpu_mem_used_gib"] = round(info.used / 2**30, 2)
    except Exception:  # noqa: BLE001 - no NVML (CPU host): memory stays unrecorded
        pass
    return out


def run_config(a) -> None:
    """In the child: one engine, every grid point, one JSON line per point on stdout."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    backend, block, sparse = CONFIGS[a.run]
    grid = [tuple(map(int, g.split(":"))) for g in a.grid.split(",")]
    max_ctx = max(c for _, c in grid)
    kw = dict(model=a.model, dtype="bfloat16", max_model_len=a.max_model_len or max_ctx + a.output,
              enable_prefix_caching=False,
              skip_tokenizer_init=True, gpu_memory_utilization=0.9, max_num_seqs=max(b for b, _ in grid),
              max_num_batched_tokens=a.chunk, block_size=block, disable_log_stats=False, seed=0,
              attention_backend=backend,
              compilation_config={"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY",
                                  "cudagraph_capture_sizes": sorted({1, 2, 4, 8, 16, *[b for b, _ in grid]})})
    if a.dummy:
        kw["load_format"] = "dummy"
    if sparse is not None:
        kw["additional_config"] = {"sparsekv": sparse}
    trace_dir = Path(a.trace_dir or f"/tmp/e2e_traces/{a.run}")
    if a.profile_steps:
        trace_dir.mkdir(parents=True, exist_ok=True)
        kw["profiler_config"] = {"profiler": "torch", "torch_profiler_dir": str(trace_dir),
                                 "torch_profiler_activities": a.profile_activities.split(","),
                                 "torch_profiler_with_stack": False,
                                 "ignore_frontend": True}
    llm = LLM(**kw)
    rng = random.Random(0)
    sp = SamplingParams(temperature=0.0, max_tokens=a.output, ignore_eos=True, detokenize=False)
    llm.generate([TokensPrompt(prompt_token_ids=[5] * 64)], sp, use_tqdm=False)  # warm up
    for batch, ctx in grid:
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(100, 30000) for _ in range(ctx)]) for _ in range(batch)]
        t0 = time.time()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        wall = time.time() - t0
        m = [o.metrics for o in outs]
        first = max(x.first_token_ts for x in m)
        last = max(x.last_token_ts for x in m)
        start = min(x.scheduled_ts for x in m)
        steps = a.output - 1
        decode_s = last - first
        row = {"config": a.run, "batch": batch, "context": ctx, "decode_tok_s": batch * steps / decode_s,
               "step_ms": 1000 * decode_s / steps, "ttft_s": first - start, "wall_s": wall,
               "preemptions": sum(x.num_preemptions for x in m), **gpu_memory(llm, block)}
        if a.profile_steps:
            try:
                row["step_split"] = profile_point(llm, prompts, a, batch, ctx, trace_dir)
            except Exception as e:  # noqa: BLE001 - a failed profile must not lose the timed row
                row["step_split"] = {"error": repr(e)[:500]}
        print("ROW " + json.dumps(row), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--llama8b-dummy", action="store_true", help="a Llama-3-8B-shaped config, dummy weights")
    ap.add_argument("--configs", default="fa3,triton,full,quest16,quest2048,quest16_p32,hash2_p32")
    ap.add_argument("--grid", default="1:32768,8:32768,16:8192,4:131072")
    ap.add_argument("--grid-for", action="append", default=[], help="NAME=GRID: a smaller grid for one config")
    ap.add_argument("--output", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="default: the grid's largest context + --output (the kernels' static shapes follow it)")
    ap.add_argument("--chunk", type=int, default=16384, help="max_num_batched_tokens (prefill chunk)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--commit", default=os.environ.get("SPARSEKV_COMMIT", "unknown"))
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="profile this many decode steps per point (after the timed run) -> step_split")
    ap.add_argument("--profile-activities", default="CPU,CUDA",
                    help="torch profiler activities: CUDA for the kernels, CPU for vLLM's step annotations")
    ap.add_argument("--trace-dir", default=None, help="where the profiler writes traces (default /tmp/e2e_traces/NAME)")
    ap.add_argument("--merge", nargs="+", default=None,
                    help="combine the rows of earlier result files (runs of disjoint configurations on the "
                         "same machine) into one file, ratios recomputed")
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dummy", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.run:
        run_config(a)
        return 0
    if a.merge:
        return merge(a)
    import torch
    import vllm

    if a.llama8b_dummy:
        a.model = str(write_llama8b(Path("/tmp/llama3-8b-shape")))
    per_config = dict(g.split("=", 1) for g in a.grid_for)
    rows, failures = [], {}
    for name in a.configs.split(","):
        grid = per_config.get(name, a.grid)
        cmd = [sys.executable, __file__, "--run", name, "--model", a.model, "--grid", grid,
               "--output", str(a.output), "--chunk", str(a.chunk), "--profile-steps", str(a.profile_steps),
               *(["--max-model-len", str(a.max_model_len)] if a.max_model_len else []),
               "--profile-activities", a.profile_activities]
        cmd += (["--dummy"] if a.llama8b_dummy else []) + (["--trace-dir", f"{a.trace_dir}/{name}"] if a.trace_dir else [])
        t0 = time.time()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout,
                               env={**os.environ, **CONFIG_ENV.get(name, {})})
            out, rc, err = r.stdout, r.returncode, r.stderr
        except subprocess.TimeoutExpired as e:
            out, rc, err = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), -9, "timeout"
        got = [json.loads(ln[4:]) for ln in out.splitlines() if ln.startswith("ROW ")]
        print(f"{name}: rc={rc}, {len(got)} rows, {time.time() - t0:.0f} s", flush=True)
        if rc != 0:
            failures[name] = (err or "")[-3000:]
            print(failures[name], flush=True)
        rows += got
        table = build_rows(rows)
        dev = torch.cuda.get_device_name()
        tag = re.sub(r"[^A-Za-z0-9]+", "_", dev).strip("_")
        doc = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "device": dev,
               "vllm": vllm.__version__, "torch": torch.__version__, "commit": a.commit,
               "model": "Llama-3-8B shape, dummy weights" if a.llama8b_dummy else a.model,
               "output_tokens": a.output, "max_model_len": a.max_model_len, "rows": table, "failures": failures}
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        # after every configuration: a device call cut short keeps the configurations it finished
        (out / f"e2e_decode_{tag}.json").write_text(json.dumps(doc, indent=1))
    print_table(table)
    plot(table, out / f"e2e_decode_{tag}.png")
    return 0 if not failures else 1


def merge(a) -> int:
    docs = [json.loads(Path(f).read_text()) for f in a.merge]
    rows = rescore([r for d in docs for r in d["rows"]])
    tag = re.sub(r"[^A-Za-z0-9]+", "_", docs[0]["device"]).strip("_")
    doc = {**docs[0], "rows": rows, "failures": {},
           "runs": [{k: d.get(k) for k in ("command", "commit", "vllm", "torch", "failures")} for d in docs]}
    doc["command"] = " + ".join(d["command"] for d in docs)
    out = Path(a.out)
    (out / f"e2e_decode_{tag}.json").write_text(json.dumps(doc, indent=1))
    print_table(rows)
    plot(rows, out / f"e2e_decode_{tag}.png")
    return 0


def rescore(rows: list[dict]) -> list[dict]:
    """Ratios of every row against the dense rows of the same (batch, context)."""
    dense = {(r["backend"], r["batch"], r["context"]): r for r in rows if r["method"] is None}
    for r in rows:
        fa3 = dense.get(("FLASH_ATTN", r["batch"], r["context"]))
        tri = dense.get(("TRITON_ATTN", r["batch"], r["context"]))
        r["speedup_vs_fa3"] = round(r["decode_tok_s"] / fa3["decode_tok_s"], 3) if fa3 else None
        r["speedup_vs_triton"] = round(r["decode_tok_s"] / tri["decode_tok_s"], 3) if tri else None
        r["ttft_vs_fa3"] = round(r["ttft_s"] / fa3["ttft_s"], 3) if fa3 else None
    return rows


def build_rows(raw: list[dict]) -> list[dict]:
    """The child processes' raw rows in the result schema, with the ratios of `rescore`."""
    rows = []
    for r in raw:
        backend, block, sparse = CONFIGS[r["config"]]
        budget = None if sparse is None else sparse.get("token_budget", sparse.get("budget_fraction", 1.0))
        rows.append({
            "config": r["config"], "env": CONFIG_ENV.get(r["config"]),
            "backend": backend, "method": None if sparse is None else sparse["method"], "page_size": block,
            "budget": budget, "batch": r["batch"], "context": r["context"], "cuda_graphs": "FULL decode",
            "decode_tok_s": round(r["decode_tok_s"], 1), "ttft_s": round(r["ttft_s"], 3),
            "step_ms": round(r["step_ms"], 3), "step_split": r.get("step_split"), "preemptions": r["preemptions"],
            "gpu_mem_used_gib": r.get("gpu_mem_used_gib"), "kv_cache_tokens": r.get("kv_cache_tokens"),
        })
    return rescore(rows)


def print_table(rows: list[dict]) -> None:
    print(f"{'config':15} {'backend':12} {'method':6} {'page':>4} {'budget':>7} {'B':>3} {'ctx':>7} {'tok/s':>8} {'step ms':>8} "
          f"{'xFA3':>6} {'xTriton':>7} {'TTFT s':>7} {'TTFT/FA3':>8}")
    for r in sorted(rows, key=lambda r: (r["context"], r["batch"], r["backend"], str(r["method"]), str(r["budget"]))):
        print(f"{str(r.get('config', '-')):15} {r['backend']:12} {str(r['method'] or '-'):6} {r['page_size']:>4} "
              f"{str(r['budget'] or '-'):>7} {r['batch']:>3} {r['context']:>7} {r['decode_tok_s']:>8.1f} {r['step_ms']:>8.2f} "
              f"{r['speedup_vs_fa3'] or 0:>6.2f} {r['speedup_vs_triton'] or 0:>7.2f} {r['ttft_s']:>7.2f} "
              f"{r['ttft_vs_fa3'] or 0:>8.3f}")
    split_rows = [r for r in rows if isinstance(r.get("step_split"), dict) and "gpu_ms" in r["step_split"]]
    if split_rows:
        short = {"sparsekv_score": "score", "sparsekv_select": "select", "sparsekv_attend": "attend",
                 "sparsekv_summaries": "summ", "sparsekv_other": "ours_other", "dense_attn": "dense_attn"}
        keys = [k for k in SPLIT_KEYS if any(r["step_split"]["gpu_ms"].get(k) for r in split_rows)]
        print("\nGPU ms per decode step (profiled run; busy = sum of kernels, span = first start to last end)")
        print(f"{'backend':12} {'method':6} {'page':>4} {'budget':>7} {'B':>3} {'ctx':>7} {'step':>7} "
              + " ".join(f"{short.get(k, k):>10}" for k in keys) + f" {'busy':>7} {'span':>7} {'kern':>6}")
        for r in split_rows:
            sp = r["step_split"]
            print(f"{r['backend']:12} {str(r['method'] or '-'):6} {r['page_size']:>4} {str(r['budget'] or '-'):>7} "
                  f"{r['batch']:>3} {r['context']:>7} {r['step_ms']:>7.2f} "
                  + " ".join(f"{sp['gpu_ms'].get(k, 0):>10.3f}" for k in keys)
                  + f" {sp['gpu_busy_ms']:>7.2f} {sp['span_ms'] or 0:>7.2f} {sp['kernels_per_step']:>6.0f}")
    for r in split_rows:
        sp = r["step_split"]
        if sp.get("steps_with_prefill") or sp.get("annotated_steps", sp["steps"]) != sp["steps"] or (
                sp.get("decode_rows") and sp["decode_rows"] != [r["batch"]]):
            print(f"WARNING: the profiled steps of {r['backend']} {r['method']} B={r['batch']} ctx={r['context']} "
                  f"were not {sp['steps']} full decode steps: {sp.get('annotated_steps')} steps, "
                  f"{sp.get('steps_with_prefill')} with prefill, decode rows {sp.get('decode_rows')}")
    for r in rows:
        if isinstance(r.get("step_split"), dict) and "error" in r["step_split"]:
            print(f"profile failed for {r['backend']} {r['method']} B={r['batch']} ctx={r['context']}: "
                  f"{r['step_split']['error'][:200]}")


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        series = {}
        for r in rows:
            if r["batch"] == b and r["speedup_vs_fa3"] is not None:
                key = r.get('config') or f"{r['backend']} {r['method'] or ''} p{r['page_size']} {r['budget'] or ''}".strip()
                series.setdefault(key, []).append((r["context"], r["speedup_vs_fa3"]))
        for key, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
        ax.set_xscale("log", base=2)
        ax.set_title(f"batch {b}")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode speedup vs FA3")
        ax.axhline(1.0, color="grey", lw=0.5)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
