"""End-to-end decode throughput through vLLM's offline `LLM`: dense FlashAttention-3, dense Triton
and sparsekv configurations on the same model, prompts and settings, one configuration per process.

    python benchmarks/e2e_decode.py [--model DIR | --llama8b-dummy] [--configs fa3,triton,full,quest16,...]
        [--grid 8:32768,1:32768,16:8192,4:131072] [--out benchmarks/results]

Each configuration starts its own `LLM` (a fresh process: two engines in one process keep GPU
memory), with prefix caching off, bf16 and FULL CUDA graphs for decode (compilation off, so every
configuration starts in seconds and runs the same dense GEMM kernels). For each (batch, context)
it prefills `batch` random prompts of `context` tokens and decodes `--output` tokens with
`ignore_eos`; vLLM's per-request timestamps give the decode time (last token minus the slowest
first token, over output-1 steps) and the time to first token (the batch's prefill). Rows go to
benchmarks/results/e2e_decode_<device>.json (schema in `ROW_KEYS`), with command, device,
versions and commit; a table is printed and a PNG of speedup vs context is written.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = ("backend", "method", "page_size", "budget", "batch", "context", "cuda_graphs", "decode_tok_s",
            "ttft_s", "speedup_vs_fa3", "speedup_vs_triton", "step_ms", "step_split")

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
}

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


def run_config(a) -> None:
    """In the child: one engine, every grid point, one JSON line per point on stdout."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    backend, block, sparse = CONFIGS[a.run]
    grid = [tuple(map(int, g.split(":"))) for g in a.grid.split(",")]
    max_ctx = max(c for _, c in grid)
    kw = dict(model=a.model, dtype="bfloat16", max_model_len=max_ctx + a.output, enable_prefix_caching=False,
              skip_tokenizer_init=True, gpu_memory_utilization=0.9, max_num_seqs=max(b for b, _ in grid),
              max_num_batched_tokens=a.chunk, block_size=block, disable_log_stats=False, seed=0,
              attention_backend=backend,
              compilation_config={"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY",
                                  "cudagraph_capture_sizes": sorted({1, 2, 4, 8, 16, *[b for b, _ in grid]})})
    if a.dummy:
        kw["load_format"] = "dummy"
    if sparse is not None:
        kw["additional_config"] = {"sparsekv": sparse}
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
        print("ROW " + json.dumps({
            "config": a.run, "batch": batch, "context": ctx, "decode_tok_s": batch * steps / decode_s,
            "step_ms": 1000 * decode_s / steps, "ttft_s": first - start, "wall_s": wall,
            "preemptions": sum(x.num_preemptions for x in m),
        }), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--llama8b-dummy", action="store_true", help="a Llama-3-8B-shaped config, dummy weights")
    ap.add_argument("--configs", default="fa3,triton,full,quest16,quest2048,quest16_p32,hash2_p32")
    ap.add_argument("--grid", default="1:32768,8:32768,16:8192,4:131072")
    ap.add_argument("--grid-for", action="append", default=[], help="NAME=GRID: a smaller grid for one config")
    ap.add_argument("--output", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=16384, help="max_num_batched_tokens (prefill chunk)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--commit", default=os.environ.get("SPARSEKV_COMMIT", "unknown"))
    ap.add_argument("--timeout", type=int, default=900)
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
               "--output", str(a.output), "--chunk", str(a.chunk)] + (["--dummy"] if a.llama8b_dummy else [])
        t0 = time.time()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
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
           "output_tokens": a.output, "rows": table, "failures": failures}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
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
            "backend": backend, "method": None if sparse is None else sparse["method"], "page_size": block,
            "budget": budget, "batch": r["batch"], "context": r["context"], "cuda_graphs": "FULL decode",
            "decode_tok_s": round(r["decode_tok_s"], 1), "ttft_s": round(r["ttft_s"], 3),
            "step_ms": round(r["step_ms"], 3), "step_split": None, "preemptions": r["preemptions"],
        })
    return rescore(rows)


def print_table(rows: list[dict]) -> None:
    print(f"{'backend':12} {'method':6} {'page':>4} {'budget':>7} {'B':>3} {'ctx':>7} {'tok/s':>8} {'step ms':>8} "
          f"{'xFA3':>6} {'xTriton':>7} {'TTFT s':>7} {'TTFT/FA3':>8}")
    for r in sorted(rows, key=lambda r: (r["context"], r["batch"], r["backend"], str(r["method"]), str(r["budget"]))):
        print(f"{r['backend']:12} {str(r['method'] or '-'):6} {r['page_size']:>4} {str(r['budget'] or '-'):>7} "
              f"{r['batch']:>3} {r['context']:>7} {r['decode_tok_s']:>8.1f} {r['step_ms']:>8.2f} "
              f"{r['speedup_vs_fa3'] or 0:>6.2f} {r['speedup_vs_triton'] or 0:>7.2f} {r['ttft_s']:>7.2f} "
              f"{r['ttft_vs_fa3'] or 0:>8.3f}")


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
                key = f"{r['backend']} {r['method'] or ''} p{r['page_size']} {r['budget'] or ''}".strip()
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
