"""The GPU end-to-end suite, one command on the GPU machine (vLLM 0.33 installed):

    python benchmarks/gpu_e2e.py [--parts kernels,engine,agree,stress,sanitizer] [--out benchmarks/results]

- kernels: every kernel test, compiled Triton at real sizes, CUDA-graph capture/replay (tests/kernels);
- engine: the engine tests CI runs on CPU (batching, chunked prefill, prefix sharing, eviction
  methods, streaming, bad config), on CUDA in float16 with FULL decode graphs (tests/engine);
- agree: SmolLM2 (4K-8K) and Qwen2.5-Coder-0.5B (4K-16K), real weights, 32 prompts x 64 tokens: dense FA3 vs sparsekv `full` and
  quest with a covering budget (greedy tokens up to the first near-tie, logprobs within the stated
  tolerance, or within what dense TRITON_ATTN differs from dense FA3 by on the same prompts: both
  verdicts are reported), and quest at 1/8 and 1/16 beside dense (token agreement, passkeys found);
- stress: Llama-3-8B-shaped layers (dummy weights) through `gpu_stress.py`, every configuration with
  FULL decode graphs and eagerly: 1,000+ engine steps each, mixed prefill+decode, chunked prefill,
  shared prefixes, preemption (a small KV cache), aborts; 0 errors and 0 lost requests required;
- sanitizer: compute-sanitizer memcheck over a short stress run with graphs.
With --lanes N the parts run as N processes side by side on the GPU (--share-gpu each), one summary.
Writes gpu_e2e_<device>.json and .txt (summary, commands, seeds) under --out; exit 1 on a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "eval")]

OFFLOAD = {"method": "quest", "budget_fraction": 0.0625, "dense_layers": [],
           "offload": {"enabled": True, "cpu_bytes": 4 << 30, "resident_fraction": 0.25}}
STRESS = [  # (name, sparsekv config or None, extra args)
    ("dense-fa3", None, []),
    ("quest-1/16", {"method": "quest", "budget_fraction": 0.0625}, ["--prefix-caching"]),
    ("quest-2048-p32-max", {"method": "quest", "token_budget": 2048, "quest_group_reduce": "max"}, ["--prefix-caching"]),
    ("hash-2%", {"method": "hash", "budget_fraction": 0.02}, ["--prefix-caching"]),
    ("full", {"method": "full"}, ["--prefix-caching"]),
    ("snapkv-1024", {"method": "snapkv", "token_budget": 1024}, []),
    ("quest-pyramid", {"method": "quest", "budget_fraction": 0.125, "budget_allocation": "pyramid"}, ["--prefix-caching"]),
    # long prompts decoding far into a KV cache too small for all of them: the scheduler must preempt
    ("quest-preempt", {"method": "quest", "budget_fraction": 0.0625},
     ["--kv-bytes", str(256 << 20), "--requests", "48", "--min-len", "2048", "--max-len", "6144", "--max-tokens", "768",
      "--abort-prob", "0"]),
    # 16K-127K prompts (the default runs stop at 12K)
    ("quest-long", {"method": "quest", "budget_fraction": 0.0625},
     ["--kv-bytes", str(6 << 30), "--requests", "40", "--min-len", "16384", "--max-len", "130000", "--max-tokens", "64"]),
    # the passive store: pages of decoding requests to pinned host memory, their blocks back to vLLM
    # (a KV cache this small preempts too), prefix caching on
    ("quest-offload", OFFLOAD,
     ["--kv-bytes", str(256 << 20), "--requests", "48", "--min-len", "2048", "--max-len", "6144", "--max-tokens", "512",
      "--prefix-caching"]),
    # up to 64 requests decoding in one step (FULL graph of size 64)
    ("quest-batch64", {"method": "quest", "budget_fraction": 0.0625},
     ["--kv-bytes", str(8 << 30), "--requests", "160", "--min-len", "1024", "--max-len", "8192", "--max-tokens", "256"]),
]


def sh(cmd: list[str], env: dict | None = None, timeout: int = 1800) -> tuple[int, str, float]:
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                           timeout=timeout)
        return r.returncode, r.stdout + r.stderr, time.time() - t0
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return -9, out + "\nTIMEOUT", time.time() - t0


def pytest_summary(text: str) -> str:
    m = re.findall(r"^=*\s*(.*(?:passed|failed|error).*?)\s*=*$", text, re.M)
    return m[-1] if m else text[-300:]


def part_kernels(report, out_dir: str, commit: str):
    """gpu_check.py: tests/kernels compiled at real sizes, and its summary file beside ours."""
    rc, out, dt = sh([sys.executable, "benchmarks/gpu_check.py", "--out", out_dir, "--commit", commit])
    report("kernels", rc == 0, pytest_summary(out), dt, out[-6000:])


ENGINE_FILES = sorted(p.name for p in (ROOT / "tests" / "engine").glob("test_*.py"))


def part_engine(report, files: list[str]):
    """tests/engine on CUDA: every file, or `files` of it (a lane's share)."""
    env = {"SPARSEKV_TEST_DEVICE": "cuda", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    paths = [f"tests/engine/{f}" for f in files] or ["tests/engine/"]
    rc, out, dt = sh([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *paths], env)
    which = "tests/engine" if not files else ", ".join(paths)
    report(f"engine ({which} on CUDA, fp16, FULL graphs)", rc == 0, pytest_summary(out), dt, out[-8000:])


AGREE_MODELS = {  # model -> (prompt lengths, cycled; max_model_len)
    "smollm2": ((4096, 7680), 8192),
    "qwen-coder-0.5b": ((4096, 8192, 12288, 16000), 16448),
}


def agreement(dense: dict, got: dict, tol: float) -> dict:
    """How a run's greedy outputs compare with dense, prompt by prompt: identical token lists, where
    the others first differ (and the dense top-2 gap there: a tie or not), and the largest logprob
    difference up to that point (with how many prompts exceed `tol`)."""
    identical, diverged, worst = 0, [], []
    for i, (r, g) in enumerate(zip(dense["results"], got["results"])):
        a, b = r["token_ids"], g["token_ids"]
        n = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if n is None and len(a) == len(b):
            identical += 1
        elif n is not None:
            diverged.append({"prompt": i, "token": n, "dense_top2_gap": round(r["top2_gap"][n], 4)})
        upto = len(a) if n is None else n
        worst.append(max((abs(x - y) for x, y in zip(r["logprobs"][:upto], g["logprobs"][:upto])), default=0.0))
    worst.sort()
    return {"prompts": len(worst), "identical": identical, "diverged": diverged,
            "max_dlogprob": round(worst[-1], 4), "median_dlogprob": round(worst[len(worst) // 2], 4),
            "over_tol": sum(w > tol for w in worst), "tol": tol}


def same_as_dense(dense: dict, got: dict, name: str, stats: dict, calibrated_tol: float) -> str:
    """The verdict for a run that must equal dense: tokens up to a near-tie, logprobs within the
    harness's fixed tolerance, or else within what two correct dense backends (FA3 and vLLM's
    Triton attention) differ by on the same prompts; "DIFFERS ..." when neither holds."""
    from tests.engine.harness import LOGPROB_TOL, NEAR_TIE, assert_same_greedy

    try:
        assert_same_greedy(dense, got, name)
        return f"same as dense (near-tie {NEAR_TIE}, logprob tol {LOGPROB_TOL})"
    except AssertionError as fixed:
        try:
            assert_same_greedy(dense, got, name, tol=calibrated_tol)
            return (f"same as dense within the dense-vs-dense spread (logprob tol {calibrated_tol:.4f}; "
                    f"{stats['over_tol']} prompts over the fixed {LOGPROB_TOL})")
        except AssertionError as e:
            return (f"DIFFERS ({stats['over_tol']} prompts over logprob tol {LOGPROB_TOL}, dense-vs-dense spread "
                    f"{calibrated_tol:.4f}, divergences {stats['diverged']}): {str(e)[:300]} / {str(fixed)[:150]}")


def part_agree(report, model_key: str, out_dir: Path):
    """Real weights, 32 passkey prompts x 64 greedy tokens: dense FA3 vs sparsekv `full` and quest at a
    covering budget (token for token up to a near-tie, logprobs within the tolerance), then small
    budgets beside dense (token agreement and passkeys found). Raw outputs: agree_<model>.json."""
    from transformers import AutoTokenizer

    from tests.engine.harness import LOGPROB_TOL, run_engine
    from sparsekv_eval.passkey import passkey_prompt
    from vllm_sparsekv.models import ensure_model

    lengths, max_len = AGREE_MODELS[model_key]
    model = str(ensure_model(model_key))
    tok = AutoTokenizer.from_pretrained(model)
    env = {"SPARSEKV_TEST_DEVICE": "cuda"}
    keys = [f"{10000 + 7919 * i % 89999}" for i in range(32)]
    prompts = [passkey_prompt(tok, lengths[i % len(lengths)], k, (i % 8 + 0.5) / 8) for i, k in enumerate(keys)]
    base = {"model": model, "prompts": prompts, "max_tokens": 64, "max_model_len": max_len, "env": env}
    t0 = time.time()
    runs = {"dense": run_engine({**base, "backend": "stock"}),
            # calibration: another correct dense backend on the same prompts (vLLM's Triton attention)
            "dense triton": run_engine({**base, "backend": "TRITON_ATTN"})}
    found = lambda res: sum(k in r["text"] for k, r in zip(keys, res["results"]))  # noqa: E731
    calib = agreement(runs["dense"], runs["dense triton"], LOGPROB_TOL)
    calibrated_tol = max(LOGPROB_TOL, calib["max_dlogprob"])
    lines = [f"dense FA3: passkeys {found(runs['dense'])}/32",
             f"dense TRITON_ATTN vs dense FA3 (calibration): {calib['identical']}/32 token-identical, |dlogprob| "
             f"before divergence median {calib['median_dlogprob']} max {calib['max_dlogprob']}, divergences "
             f"{calib['diverged']}"]
    ok = True
    for name, cfg in (("full", {"method": "full"}),
                      ("quest covering", {"method": "quest", "token_budget": max_len, "dense_layers": []}),
                      ("quest 1/8", {"method": "quest", "budget_fraction": 0.125}),
                      ("quest 1/8 group max", {"method": "quest", "budget_fraction": 0.125, "quest_group_reduce": "max"}),
                      ("quest 1/16", {"method": "quest", "budget_fraction": 0.0625})):
        runs[name] = got = run_engine({**base, "backend": "sparsekv", "sparsekv": cfg})
        (out_dir / f"agree_{model_key}.json").write_text(json.dumps(runs))
        stats = agreement(runs["dense"], got, LOGPROB_TOL)
        line = (f"{name}: {stats['identical']}/32 token-identical, passkeys {found(got)}/32, attended "
                f"{got['stats']['attended_fraction']:.3f} of held pages, |dlogprob| before divergence "
                f"median {stats['median_dlogprob']} max {stats['max_dlogprob']}")
        if "covering" in name or name == "full":  # must equal dense up to near-ties
            line += "; " + same_as_dense(runs["dense"], got, name, stats, calibrated_tol)
            ok = ok and "DIFFERS" not in line
        lines.append(line)
    report(f"agree ({model_key} real weights, {min(lengths)}-{max(lengths)} tokens, 32 prompts x 64 tokens)", ok,
           "; ".join(lines), time.time() - t0, "\n".join(lines))


def device_tag(device: str) -> str:
    """The device name as it stands in result file names (gpu_e2e_<tag>.json)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_")


def stress_only(a) -> set[str]:
    """--stress-only as a set of labels (empty: every stress run)."""
    return set(filter(None, a.stress_only.split(",")))


def stress_runs(only: set[str] | None) -> list[tuple[str, dict | None, list[str], bool]]:
    """(label NAME:graphs|eager, config, extra args, eager) of the stress runs, `only` picking labels."""
    runs = []
    for name, cfg, extra in STRESS:
        for eager in (False, True):
            label = f"{name}:{'eager' if eager else 'graphs'}"
            if (eager and name in ("dense-fa3", "quest-pyramid")) or (only and label not in only):
                continue
            runs.append((label, cfg, extra, eager))
    return runs


def part_stress(report, layers: int, min_steps: int, only: set[str] | None, share_gpu: bool):
    from benchmarks.e2e_decode import write_llama8b

    model = str(write_llama8b(Path("/tmp/llama8b-layers"), layers=layers))
    for label, cfg, extra, eager in stress_runs(only):
        cmd = [sys.executable, "benchmarks/gpu_stress.py", "--model", model, "--dummy",
               "--min-steps", str(min_steps), *extra] + (["--eager"] if eager else []) \
            + (["--gpu-memory-utilization", "0.3"] if share_gpu else [])
        if cfg is not None:
            cmd += ["--sparsekv", json.dumps(cfg)]
        rc, out, dt = sh(cmd, timeout=900)
        res = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        summary = res[-1][7:] if res else out[-1500:]
        name = label.split(":")[0]
        report(f"stress {name} {'eager' if eager else 'FULL graphs'}", rc == 0, summary[:600], dt,
               out[-3000:] if rc else summary)


def part_sanitizer(report, layers: int, share_gpu: bool):
    """compute-sanitizer memcheck over a short stress run: quest, and quest with the passive store
    (its copies to pinned memory and the decode's zero-copy reads), FULL graphs."""
    from benchmarks.e2e_decode import write_llama8b

    model = str(write_llama8b(Path("/tmp/llama8b-sanitize"), layers=layers))
    quest = {"method": "quest", "token_budget": 256, "sink_tokens": 16, "recent_tokens": 16}
    for name, cfg in (("quest", quest), ("quest + passive store",
                                         {**quest, "dense_layers": [], "offload": {**OFFLOAD["offload"],
                                                                                    "cpu_bytes": 1 << 30}})):
        cmd = ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "3", sys.executable,
               "benchmarks/gpu_stress.py", "--model", model, "--dummy", "--sparsekv", json.dumps(cfg), "--requests",
               "12", "--min-len", "64", "--max-len", "1536", "--max-tokens", "24", "--min-steps", "60",
               "--kv-bytes", str(64 << 20)] + (["--gpu-memory-utilization", "0.3"] if share_gpu else [])
        rc, out, dt = sh(cmd, timeout=480)
        errs = re.findall(r"ERROR SUMMARY: (\d+) error", out)
        report(f"sanitizer (memcheck, {name}, FULL graphs, 60+ steps)", rc == 0 and errs and errs[-1] == "0",
               f"rc={rc}, error summary: {errs[-1] if errs else 'none printed'}", dt, out[-4000:])


# rough seconds of each unit of work on an H100 (this suite's runs there), for splitting into lanes
UNIT_SECONDS = {"kernels": 270, "engine": 240, "agree": 300, "stress": 90, "sanitizer": 150}  # engine: per file


def plan_lanes(parts: list[str], lanes: int, agree_models: list[str], stress_labels: list[str]) -> list[list[tuple]]:
    """Units of work ("kernels",), ("engine", test file), ("agree", model), ("stress", label),
    ("sanitizer",) shared over `lanes` lanes, longest first onto the least-loaded lane; lanes left
    empty dropped. The engine tests go file by file: together they were the longest lane."""
    units = []
    for part in parts:
        if part == "engine":
            units += [("engine", f) for f in ENGINE_FILES]
        elif part == "agree":
            units += [("agree", m) for m in agree_models]
        elif part == "stress":
            units += [("stress", label) for label in stress_labels]
        else:
            units.append((part,))
    load, plan = [0] * lanes, [[] for _ in range(lanes)]
    for u in sorted(units, key=lambda u: -UNIT_SECONDS[u[0]]):
        i = load.index(min(load))
        plan[i].append(u)
        load[i] += UNIT_SECONDS[u[0]]
    return [lane for lane in plan if lane]


def lane_args(lane: list[tuple]) -> list[str]:
    """The command-line arguments that run one lane's units (with --share-gpu)."""
    parts = list(dict.fromkeys(u[0] for u in lane))
    args = ["--parts", ",".join(parts), "--share-gpu"]
    if "engine" in parts:
        args += ["--engine-files", ",".join(u[1] for u in lane if u[0] == "engine")]
    if "agree" in parts:
        args += ["--agree-models", ",".join(u[1] for u in lane if u[0] == "agree")]
    if "stress" in parts:
        args += ["--stress-only", ",".join(u[1] for u in lane if u[0] == "stress")]
    return args


def run_lanes(a, passthrough: list[str]) -> int:
    """Run the suite as several processes side by side on the one GPU (--share-gpu each), then one
    summary of all of them; each lane's files are moved up into --out."""
    parts = a.parts.split(",")
    labels = [r[0] for r in stress_runs(stress_only(a))]
    plan = plan_lanes(parts, a.lanes, a.agree_models.split(","), labels)
    out = Path(a.out)
    procs = []
    for i, lane in enumerate(plan):
        d = out / f"lane{i}"
        d.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, *passthrough, *lane_args(lane), "--out", str(d)]
        print(f"lane {i}: {' '.join(cmd[2:])}", flush=True)
        procs.append((d, subprocess.Popen(cmd, cwd=ROOT, stdout=open(d / "lane.log", "w"), stderr=subprocess.STDOUT)))
    rcs = [p.wait() for _, p in procs]
    docs = []
    for d, _ in procs:
        for f in sorted(d.glob("gpu_e2e_*.json")):
            docs.append(json.loads(f.read_text()))
        for f in d.iterdir():
            if not f.name.startswith("gpu_e2e_") and f.name != "lane.log":
                f.replace(out / f.name)
    if not docs:
        print("no lane wrote a result", flush=True)
        return 1
    doc = merge_lane_docs(docs, " ".join(["gpu_e2e.py", *sys.argv[1:]]))
    tag = device_tag(doc["device"])
    (out / f"gpu_e2e_{tag}.json").write_text(json.dumps(doc, indent=1))
    (out / f"gpu_e2e_{tag}.txt").write_text(summary_text(doc))
    print(summary_text(doc))
    return 0 if all(rc == 0 for rc in rcs) and all(r["ok"] for r in doc["results"]) else 1


def merge_lane_docs(docs: list[dict], command: str) -> dict:
    """One result document from the lanes' documents (same device and versions), results in lane order."""
    first = docs[0]
    return {"command": command, "device": first["device"], "vllm": first["vllm"], "torch": first["torch"],
            "commit": first["commit"], "lanes": [d["command"] for d in docs],
            "results": [r for d in docs for r in d["results"]]}


def summary_text(doc: dict) -> str:
    lines = [f"device: {doc['device']}", f"vllm {doc['vllm']}, torch {doc['torch']}", f"commit: {doc['commit']}",
             f"command: python benchmarks/{doc['command']}"]
    lines += [f"  lane: {c}" for c in doc.get("lanes", [])] + [""]
    lines += [f"[{'PASS' if r['ok'] else 'FAIL'}] {r['part']} ({r['seconds']} s): {r['summary']}" for r in doc["results"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="kernels,engine,agree,stress,sanitizer")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--commit", default=os.environ.get("SPARSEKV_COMMIT", "unknown"))
    ap.add_argument("--stress-layers", type=int, default=4)
    ap.add_argument("--min-steps", type=int, default=1000)
    ap.add_argument("--agree-models", default="smollm2,qwen-coder-0.5b", help=f"of {sorted(AGREE_MODELS)}")
    ap.add_argument("--stress-only", default="", help="NAME:graphs|eager,... (default: all)")
    ap.add_argument("--engine-files", default="", help=f"of {ENGINE_FILES} (default: all)")
    ap.add_argument("--share-gpu", action="store_true",
                    help="another suite runs on the GPU at the same time: engines take a fixed KV size "
                         "(no memory profile, which would count the other's memory) and a low startup check")
    ap.add_argument("--lanes", type=int, default=1,
                    help="run the parts as this many processes side by side on the GPU (each with --share-gpu; "
                         "correctness only, never timings) and write one summary")
    a = ap.parse_args()
    if a.lanes > 1:
        keep = ["--commit", a.commit, "--stress-layers", str(a.stress_layers), "--min-steps", str(a.min_steps)]
        return run_lanes(a, keep)
    if a.share_gpu:
        os.environ.setdefault("SPARSEKV_TEST_KV_BYTES", str(8 << 30))
    # before tests.engine.harness is imported: its tolerances are then the CUDA (fp16) ones
    os.environ.setdefault("SPARSEKV_TEST_DEVICE", "cuda")
    import torch
    import vllm

    dev = torch.cuda.get_device_name()
    tag = device_tag(dev)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    doc = {"command": " ".join(["gpu_e2e.py", *sys.argv[1:]]), "device": dev, "vllm": vllm.__version__,
           "torch": torch.__version__, "commit": a.commit, "results": results}

    def report(name, ok, summary, seconds, detail):
        results.append({"part": name, "ok": bool(ok), "summary": summary, "seconds": round(seconds, 1)})
        print(f"[{'PASS' if ok else 'FAIL'}] {name} ({seconds:.0f} s): {summary}", flush=True)
        if not ok:
            print(detail, flush=True)
        (out / f"gpu_e2e_{tag}.json").write_text(json.dumps(doc, indent=1))

    parts = a.parts.split(",")
    if "kernels" in parts:
        part_kernels(report, a.out, a.commit)
    if "engine" in parts:
        part_engine(report, [f for f in a.engine_files.split(",") if f])
    if "agree" in parts:
        for model_key in a.agree_models.split(","):
            part_agree(report, model_key, out)
    if "stress" in parts:
        part_stress(report, a.stress_layers, a.min_steps, stress_only(a), a.share_gpu)
    if "sanitizer" in parts:
        part_sanitizer(report, 2, a.share_gpu)
    text = summary_text(doc)
    (out / f"gpu_e2e_{tag}.txt").write_text(text)
    print(text)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
