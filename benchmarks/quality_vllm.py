"""RULER-style quality through vLLM itself: dense (the stock backend, FA3 on Hopper) and sparsekv
configurations side by side, batched (every prompt of a configuration in one engine), each engine in
its own subprocess (two engines in one process keep GPU memory; a crash loses one configuration).

The offline sweep (``benchmarks/quality.py``) runs the backend's selectors in HF transformers at
70-90 ms per decoded token; this runs the real engine, CUDA graphs included, hundreds of prompts a
minute. Prompts come from ``sparsekv_eval.ruler`` (every task of the suite; the essay haystack or
Python sources, needle wordings varied), are generated once per (task, context) in parallel and cached
as token ids, so that configurations split over several calls see identical prompts.

    python benchmarks/quality_vllm.py run --model smollm2 --contexts 4k,8k --n 100 \\
        --methods quest,snapkv@headkv --budgets 1/8,1/16,2048 --configs 'dense,quest-*' \\
        --head-budgets benchmarks/results/head_scores_smollm2.json --out-dir /tmp/qres
    python benchmarks/quality_vllm.py plan   --model smollm2 ...            # counts + time estimate
    python benchmarks/quality_vllm.py report --model smollm2 --merge A/*.preds.jsonl B/*.preds.jsonl

Files (stem ``quality_<name>.vllm_<device>`` in --out-dir): ``.preds.jsonl`` one line per (config,
sample) with the generated text, appended as each context's batch finishes (resume: a rerun skips
what is there); ``.configs.jsonl`` what each configuration was and how it ran (backends the worker
really used, page size, attended share of pages, timings); ``.json`` / ``.md`` the report, rewritten
after every configuration. Rows have the schema of ``quality.py`` (scored by the same code) plus
``budget``, ``command``, ``device`` and ``commit``. The names avoid ``.records.jsonl`` and
``.meta.json``, which ``quality.py report`` would take for its own shards.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "eval"), str(ROOT / "benchmarks")]

import quality as Q  # noqa: E402  (benchmarks/quality.py: configs, report rows and tables)

from sparsekv_eval.tokenization import parse_length  # noqa: E402

CPU_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "2", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
# Rough prefill speed for `plan` (effective FLOP/s of a small model's prefill on an H200; the
# configs file records the measured tokens/s of every run, to replace this guess).
PLAN_TFLOPS = 150.0
# process start, import, weights, KV profiling, graph capture: gpu_e2e's agree part ran 6 SmolLM2
# engines x 32 prompts of 4-7.5K tokens in 274 s on the H200 (~45 s each, nearly all of it startup,
# with graphs for more batch sizes than the 9 captured here)
PLAN_STARTUP_S = 40.0
PLAN_DECODE_STEP_S = 0.006  # one decode step of the whole batch (small models, FULL graphs)


# ----------------------------------------------------------------------------- settings


def parse_budgets(text: str) -> tuple[list[float], list[int]]:
    """'1/8,1/16,0.05,2048' -> fractions [0.125, 0.0625, 0.05], token budgets [2048]."""
    fr, tok = [], []
    for x in filter(None, (v.strip() for v in text.split(","))):
        if "/" in x:
            a, b = x.split("/")
            fr.append(float(a) / float(b))
        elif "." in x:
            fr.append(float(x))
        else:
            tok.append(int(x))
    return fr, tok


def all_runs(a):
    """Dense plus every (method, budget) of the grid, as ``sweep.RunConfig``s, filtered by --configs."""
    from sparsekv_eval import sweep

    fr, tok = parse_budgets(a.budgets)
    runs = sweep.make_configs(a.methods, fr, tok, **Q._common(a))
    pats = [p.strip() for p in (a.configs or "*").split(",") if p.strip()]
    return [r for r in runs if any(fnmatch.fnmatchcase(r.label, p) for p in pats)]


def sparsekv_dict(cfg) -> dict:
    """The config as `additional_config["sparsekv"]` (every setting spelled out, None dropped)."""
    return {k: v for k, v in cfg.canonical().items() if v is not None}


def model_path(spec: str) -> Path:
    p = Path(spec).expanduser()
    if p.is_dir():
        return p
    from vllm_sparsekv.models import ensure_model

    return ensure_model(spec)


def max_len_of(model: Path) -> int:
    cfg = json.loads((model / "config.json").read_text())
    return int(cfg.get("max_position_embeddings") or 8192)


def device_tag() -> str:
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def stem(a) -> Path:
    name = a.name or Path(str(a.model)).name.split("-")[0].lower()
    return Path(a.out_dir) / f"quality_{name}.vllm_{a.device_tag}"


def contexts_for(a, max_len: int) -> list[int]:
    """The requested contexts up to the model's limit (RULER's length: prompt + generated tokens)."""
    out = [parse_length(x) for x in a.contexts.split(",") if x.strip()]
    return [L for L in out if L <= max_len]


def tasks_of(a) -> list[str]:
    from sparsekv_eval.ruler import TASKS

    if a.tasks in ("all", "*", ""):
        return list(TASKS)
    names = [t.strip() for t in a.tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    return names


# ----------------------------------------------------------------------------- prompts


def _group_key(model: Path, task: str, L: int, a) -> str:
    tok = (model / "tokenizer.json")
    tok_id = hashlib.sha256(tok.read_bytes()).hexdigest()[:10] if tok.exists() else model.name
    return f"{task}-{L}-n{a.n}-s{a.seed}-{a.corpus}{'-pv' if a.vary_needles else ''}-{tok_id}"


_W: dict = {}


def _worker_init(model: str, haystack: str | None, seed: int, corpus: str, vary: bool) -> None:
    from transformers import AutoTokenizer

    from sparsekv_eval.ruler import RulerGenerator
    from sparsekv_eval.tokenization import chat_template_tokens

    tok = AutoTokenizer.from_pretrained(model)
    _W["tok"] = tok
    _W["gen"] = RulerGenerator(tok, haystack, seed, chat_template_tokens(tok), corpus=corpus, vary_needles=vary)


def _worker_group(job: tuple[str, int, int]) -> tuple[str, int, list[dict], list[bytes]]:
    """One (task, context): samples and the token ids the engine gets (chat template + answer prefix)."""
    import numpy as np

    task, L, n = job
    tok = _W["tok"]
    metas, ids = [], []
    for s in _W["gen"].generate(task, L, n):
        text = tok.apply_chat_template([{"role": "user", "content": s.input}], tokenize=False,
                                       add_generation_prompt=True) + s.answer_prefix
        ids.append(np.asarray(tok.encode(text, add_special_tokens=False), dtype=np.int32).tobytes())
        metas.append({"id": s.id, "task": s.task, "target_length": L, "outputs": s.outputs,
                      "max_tokens": s.max_tokens, "meta": {k: v for k, v in s.meta.items()
                                                           if k in ("corpus", "phrasing", "token_depths")}})
    return task, L, metas, ids


def prepare_prompts(a, model: Path, tasks: list[str], contexts: list[int]) -> tuple[list[dict], Path]:
    """Generate (or load from the cache) every (task, context) group, in parallel over processes;
    write one ``.npz`` of token ids for the engines. Returns the samples (with their row index)."""
    import numpy as np

    cache = Path(a.prompt_cache or Path(a.out_dir) / "prompts") / model.name
    cache.mkdir(parents=True, exist_ok=True)
    todo, groups = [], {}
    for L in contexts:
        for t in tasks:
            f = cache / (_group_key(model, t, L, a) + ".npz")
            if f.exists():
                z = np.load(f)
                groups[(t, L)] = (json.loads(str(z["samples"])), z["ids"], z["offsets"])
            else:
                todo.append((t, L, a.n))
    t0 = time.time()
    if todo:
        init = (str(model), a.haystack, a.seed, a.corpus, a.vary_needles)
        workers = max(1, min(a.workers, len(todo)))
        if workers == 1:
            _worker_init(*init)
            results = map(_worker_group, todo)
        else:
            import multiprocessing as mp

            pool = mp.get_context("spawn").Pool(workers, _worker_init, init)
            results = pool.imap_unordered(_worker_group, todo)
        for t, L, metas, ids in results:
            arrs = [np.frombuffer(b, dtype=np.int32) for b in ids]
            offsets = np.cumsum([0] + [len(x) for x in arrs]).astype(np.int64)
            flat = np.concatenate(arrs) if arrs else np.zeros(0, np.int32)
            np.savez(cache / (_group_key(model, t, L, a) + ".npz"), ids=flat, offsets=offsets,
                     samples=np.array(json.dumps(metas)))
            groups[(t, L)] = (metas, flat, offsets)
        if workers > 1:
            pool.close()
        print(f"[quality_vllm] generated {len(todo)} (task, context) groups in {time.time() - t0:.0f} s "
              f"({workers} processes) -> {cache}", flush=True)
    samples, chunks, offs = [], [], [0]
    for L in contexts:  # interleave tasks within a context: a run cut short keeps balanced groups
        per = [groups[(t, L)] for t in tasks]
        for i in range(a.n):
            for metas, flat, off in per:
                if i < len(metas):
                    chunks.append(flat[off[i]:off[i + 1]])
                    offs.append(offs[-1] + len(chunks[-1]))
                    samples.append({**metas[i], "row": len(samples)})
    path = cache / f"{stem(a).name}.prompts.npz"  # beside the cache: the out dir is what comes back
    np.savez(path, ids=np.concatenate(chunks) if chunks else np.zeros(0, np.int32),
             offsets=np.asarray(offs, dtype=np.int64))
    return samples, path


# ----------------------------------------------------------------------------- engine (child)


def engine_kwargs(spec: dict) -> dict:
    """vLLM settings: on CUDA bf16/fp16 with FULL decode graphs and no torch.compile (starts in
    seconds), a few capture sizes; on CPU float32 eager (what vllm-cpu runs correctly)."""
    cuda = spec["cuda"]
    kw = dict(max_model_len=spec["max_model_len"], enable_prefix_caching=False, seed=0,
              distributed_executor_backend="uni", max_num_seqs=spec["max_num_seqs"],
              block_size=spec["block_size"], disable_log_stats=True)
    if cuda:
        sizes = sorted({s for s in (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256) if s < spec["max_num_seqs"]}
                       | {spec["max_num_seqs"]})
        kw.update(dtype=spec["dtype"], gpu_memory_utilization=spec["gpu_memory_utilization"])
        if spec.get("kv_cache_memory_bytes"):  # no memory profile: other engines may share the GPU
            kw["kv_cache_memory_bytes"] = spec["kv_cache_memory_bytes"]
        if spec.get("eager"):  # the fallback where graphs fail (gpu/README: 8B shape, 32K, sparsekv)
            kw["enforce_eager"] = True
        else:
            kw["compilation_config"] = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY",
                                        "cudagraph_capture_sizes": sizes}
    else:
        kw.update(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.5)
    if spec.get("max_num_batched_tokens"):
        kw["max_num_batched_tokens"] = spec["max_num_batched_tokens"]
    if spec["sparsekv"] is not None:
        kw.update(attention_backend="sparsekv", additional_config={"sparsekv": spec["sparsekv"]})
    return kw


def cmd_engine(spec_path: str) -> int:
    """Child process: one engine, the given prompt rows, grouped by context (one `generate` each);
    each group's lines are appended to the preds file as soon as it is done."""
    spec = json.loads(Path(spec_path).read_text())
    os.environ.update(spec["env"])
    import numpy as np
    from vllm import LLM, SamplingParams

    from tests.engine.runner import _backend_names, _block_sizes
    from vllm_sparsekv import stats

    t0 = time.time()
    llm = LLM(spec["model"], **engine_kwargs(spec))
    t_start = time.time() - t0
    z = np.load(spec["prompts"])
    ids, off = z["ids"], z["offsets"]
    rows = spec["rows"]
    by_ctx: dict[int, list[dict]] = {}
    for r in rows:
        by_ctx.setdefault(r["target_length"], []).append(r)
    gen_s, prompt_tokens, gen_tokens, per_ctx = 0.0, 0, 0, {}
    with open(spec["preds"], "a") as fh:
        for L, rs in sorted(by_ctx.items()):
            prompts = [{"prompt_token_ids": ids[off[r["row"]]:off[r["row"] + 1]].tolist()} for r in rs]
            sps = [SamplingParams(temperature=0.0, max_tokens=r["max_tokens"]) for r in rs]
            t1 = time.time()
            outs = llm.generate(prompts, sps, use_tqdm=False)
            dt = time.time() - t1
            gen_s += dt
            pt = sum(len(p["prompt_token_ids"]) for p in prompts)
            gt = sum(len(o.outputs[0].token_ids) for o in outs)
            prompt_tokens, gen_tokens = prompt_tokens + pt, gen_tokens + gt
            per_ctx[str(L)] = {"prompts": len(rs), "prompt_tokens": pt, "gen_tokens": gt, "generate_s": round(dt, 2)}
            for r, o in zip(rs, outs):
                fh.write(json.dumps({"run": spec["label"], "id": r["id"], "task": r["task"], "target_length": L,
                                     "outputs": r["outputs"], "pred": o.outputs[0].text,
                                     "prompt_tokens": len(o.prompt_token_ids),
                                     "gen_tokens": len(o.outputs[0].token_ids), "meta": r.get("meta", {})}) + "\n")
            fh.flush()
            print(f"[engine {spec['label']}] context {L}: {len(rs)} prompts, {pt} prompt + {gt} generated tokens "
                  f"in {dt:.1f} s", flush=True)
    import torch
    import vllm

    done = {"run": spec["label"], "done": True, "startup_s": round(t_start, 1), "generate_s": round(gen_s, 1),
            "prompts": len(rows), "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "contexts": per_ctx,
            "eager": bool(spec.get("eager")),
            "vllm": vllm.__version__, "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name() if spec["cuda"] else "cpu"}
    try:  # what the worker really ran (logs do not say on CPU); the predictions are already written
        done["backends"] = sorted(set(llm.collective_rpc(_backend_names)[0]))
        done["block_sizes"] = sorted(set(llm.collective_rpc(_block_sizes)[0]))
        if spec["sparsekv"] is not None:
            done["stats"] = stats.collect(llm)[0]
    except Exception as e:  # noqa: BLE001
        done["rpc_error"] = f"{type(e).__name__}: {e}"[:300]
    with open(spec["configs"], "a") as fh:
        fh.write(json.dumps(done) + "\n")
    return 0


# ----------------------------------------------------------------------------- run (parent)


def _read_jsonl(paths) -> list[dict]:
    out = []
    for p in paths:
        p = Path(p)
        if p.exists():
            for line in p.read_text().splitlines():
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except ValueError:  # a line cut by a kill
                        pass
    return out


def cmd_run(a) -> int:
    import torch

    model = model_path(a.model)
    a.model = str(model)
    cuda = torch.cuda.is_available() and not a.cpu
    base = stem(a)
    base.parent.mkdir(parents=True, exist_ok=True)
    max_len = max_len_of(model)
    contexts, tasks = contexts_for(a, max_len), tasks_of(a)
    runs = all_runs(a)
    samples, prompts = prepare_prompts(a, model, tasks, contexts)
    preds, configs = Path(f"{base}.preds.jsonl"), Path(f"{base}.configs.jsonl")
    command = " ".join([Path(sys.executable).name, *sys.argv])
    t_all = time.time()
    last = 0.0
    for run in runs:
        done = {(r["run"], r["id"]) for r in _read_jsonl([preds])}
        rows = [s for s in samples if (run.label, s["id"]) not in done]
        if not rows:
            print(f"[quality_vllm] {run.label}: all {len(samples)} samples already there", flush=True)
            continue
        if a.deadline_s and time.time() - t_all + max(last, 1.0) > a.deadline_s:
            print(f"[quality_vllm] {run.label}: not started (deadline {a.deadline_s} s; the last run took "
                  f"{last:.0f} s)", flush=True)
            continue
        cfg = None if run.dense else sparsekv_dict(run.config)
        with open(configs, "a") as fh:
            fh.write(json.dumps({"run": run.label, "row_fields": run.row_fields(), "sparsekv": cfg,
                                 "model": model.name, "device": a.device_tag, "command": command,
                                 "commit": Q.commit(), "planned": {f"{t}@{L}": a.n for t in tasks for L in contexts},
                                 "started": time.time()}) + "\n")
        spec = {"label": run.label, "model": str(model), "sparsekv": cfg, "cuda": cuda, "rows": rows,
                "prompts": str(prompts), "preds": str(preds), "configs": str(configs),
                "max_model_len": min(max_len, max(contexts)), "max_num_seqs": a.max_num_seqs,
                "block_size": a.block_size or 32, "dtype": a.dtype,
                "gpu_memory_utilization": a.gpu_memory_utilization,
                "kv_cache_memory_bytes": a.kv_cache_memory_bytes,
                "max_num_batched_tokens": a.max_num_batched_tokens,
                "eager": a.eager,
                "env": ({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
                        if cuda else CPU_ENV)}
        if a.max_tokens:
            for r in rows:
                r["max_tokens"] = min(r["max_tokens"], a.max_tokens)
        spec_path = Path(f"{base}.spec-{re.sub(r'[^A-Za-z0-9.@-]+', '_', run.label)}.json")
        spec_path.write_text(json.dumps(spec))
        t0 = time.time()
        print(f"[quality_vllm] {run.label}: {len(rows)} prompts, engine starting", flush=True)
        rc = subprocess.run([sys.executable, __file__, "engine", str(spec_path)], cwd=ROOT).returncode
        last = time.time() - t0
        spec_path.unlink(missing_ok=True)
        print(f"[quality_vllm] {run.label}: exit {rc} after {last:.0f} s", flush=True)
        report(a, [preds], [configs])
    return report(a, [preds], [configs])


# ----------------------------------------------------------------------------- report


class _Run:
    """What `quality.build_rows` needs of a run: its label and row fields."""

    def __init__(self, label: str, fields: dict):
        self.label, self.fields = label, fields

    def row_fields(self) -> dict:
        return dict(self.fields)


def build_report(preds: list[dict], configs: list[dict], name: str) -> dict:
    """Rows (quality.build_rows: paired with dense on the same samples) and the document."""
    from sparsekv_eval.ruler import score_prediction

    conf: dict[str, dict] = {}
    for c in configs:  # a run's start line, then its done line (several calls: the last wins)
        conf.setdefault(c["run"], {}).update(c)
    per_id: dict[str, dict] = {}
    for p in preds:
        rec = per_id.setdefault(p["id"], {"id": p["id"], "task": p["task"], "target_length": p["target_length"],
                                          "runs": {}})
        st = conf.get(p["run"], {}).get("stats") or {}
        rec["runs"][p["run"]] = {"score": score_prediction(p["pred"] or "", p["outputs"]),
                                 "attended_fraction": st.get("attended_fraction")}
    recs = [r for r in per_id.values() if "dense" in r["runs"]]  # ratios need the dense answer
    labels = ["dense"] + sorted({lab for r in recs for lab in r["runs"]} - {"dense"})
    runs = [_Run(lab, conf.get(lab, {}).get("row_fields") or {"method": lab}) for lab in labels]
    # quality.build_rows drops a run missing on any sample of a group, and calls may run dense on
    # more samples than a method: pair each run with dense on the samples that run has
    rows = [r for r in Q.build_rows(recs, runs[:1], name, {})]
    for run in runs[1:]:
        sub = [r for r in recs if run.label in r["runs"]]
        rows += [r for r in Q.build_rows(sub, [runs[0], run], name, {}) if r["method"] != "dense"]
    # cut short = fewer samples than that run's own call planned (calls may plan different n)
    planned = {Q._key(r.row_fields()): (conf.get(r.label) or {}).get("planned") or {} for r in runs}
    for r in rows:
        if r["task"] != "average":
            r["partial"] = r["n"] < planned.get(Q._key(r), {}).get(f"{r['task']}@{r['context']}", 0)
    for r in rows:
        if r["task"] == "average":
            r["partial"] = any(x["partial"] for x in rows if x["task"] in r["tasks"] and x["context"] == r["context"]
                               and Q._key(x) == Q._key(r))
    cmds = sorted({c.get("command", "") for c in conf.values()} - {""})
    commits = sorted({c.get("commit", "") for c in conf.values()} - {""})
    devices = sorted({c.get("device_name", "") for c in conf.values()} - {""}) or \
        sorted({c.get("device", "") for c in conf.values()} - {""})
    for r in rows:
        r["budget"] = Q._label_value(r)
        r.update(command=" ; ".join(cmds), device=", ".join(devices), commit=", ".join(commits))
    done = [c for c in conf.values() if c.get("done")]
    bs = sorted({b for c in done for b in c.get("block_sizes") or []})
    sparse = next((c["sparsekv"] for c in conf.values() if c.get("sparsekv")), {})
    return {"model": name, "suite": "ruler", "driver": "vllm", "partial": any(r.get("partial") for r in rows),
            "missing_runs": sorted(set(conf) - {c["run"] for c in done}),
            "command": " ; ".join(cmds), "commit": ", ".join(commits), "device": ", ".join(devices),
            "settings": {"block_size": bs, "sink_tokens": sparse.get("sink_tokens"),
                         "recent_tokens": sparse.get("recent_tokens"), "dense_layers": sparse.get("dense_layers"),
                         "greedy": True, "chat_template": True},
            "runs": {lab: {k: v for k, v in c.items() if k not in ("planned",)} for lab, c in conf.items()},
            "samples": len(recs), "rows": rows}


def summary_md(rows: list[dict]) -> str:
    """Method x budget: mean over tasks and contexts, and its share of dense on the same samples."""
    avg = [r for r in rows if r["task"] == "average"]
    ctxs = sorted({r["context"] for r in avg})
    budgets = []
    for r in avg:
        if r["method"] != "dense" and r["budget"] not in budgets:
            budgets.append(r["budget"])
    methods = []
    for r in avg:
        if Q._method_label(r) not in methods:
            methods.append(Q._method_label(r))
    lines = ["## Summary: mean over tasks and contexts " + ", ".join(str(L) for L in ctxs), "",
             "Cell: score (share of dense on the same samples). A context counts only where the run has it.", "",
             "| method | " + " | ".join(budgets or ["-"]) + " |", "|---|" + "---|" * max(len(budgets), 1)]
    for m in methods:
        cells = []
        for b in budgets or ["-"]:
            sel = [r for r in avg if Q._method_label(r) == m and (m == "dense" or r["budget"] == b)]
            if not sel:
                cells.append("")
                continue
            s = sum(r["score"] for r in sel) / len(sel)
            d = sum(r["dense_score"] for r in sel) / len(sel)
            cells.append(f"{s:.1f} ({100 * s / d:.0f}%)" if d > 0 else f"{s:.1f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def runs_md(doc: dict) -> str:
    lines = ["## Engines", "", "| run | backends | page | attended | prompts | prompt tok | gen tok | start s "
             "| generate s | prefill+decode tok/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for lab, c in doc["runs"].items():
        if not c.get("done"):
            lines.append(f"| {lab} | (not finished) | | | | | | | | |")
            continue
        af = (c.get("stats") or {}).get("attended_fraction")
        tps = (c["prompt_tokens"] + c["gen_tokens"]) / max(c["generate_s"], 1e-9)
        lines.append(f"| {lab} | {', '.join(c.get('backends', ['?']))}{' (eager)' if c.get('eager') else ''} | "
                     f"{c.get('block_sizes', '?')} | "
                     f"{'' if af is None else f'{100 * af:.1f}%'} | {c['prompts']} | {c['prompt_tokens']} | "
                     f"{c['gen_tokens']} | {c['startup_s']} | {c['generate_s']} | {tps:.0f} |")
    return "\n".join(lines) + "\n"


def report(a, pred_files, config_files) -> int:
    preds, configs = _read_jsonl(pred_files), _read_jsonl(config_files)
    seen, uniq = set(), []
    for p in preds:  # merged files may overlap
        if (p["run"], p["id"]) not in seen:
            seen.add((p["run"], p["id"]))
            uniq.append(p)
    if not uniq:
        print("[quality_vllm] no predictions yet")
        return 1
    name = a.name or next((c["model"] for c in configs if c.get("model")), "model")
    doc = build_report(uniq, configs, name)
    if not doc["samples"]:
        print("[quality_vllm] no sample has a dense answer yet: merge with the files of the call that ran dense")
    base = stem(a)
    base.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{base}.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = Q.markdown(doc["rows"], [], {**doc, "driver_title": "through vLLM",
                                      "driver_note": "every configuration is its own vLLM engine (the dense one "
                                                     "is vLLM's stock backend) on the same token ids"},
                    doc["partial"], doc["settings"]["block_size"])
    head, _, rest = md.partition("## Targets")
    md = head + summary_md(doc["rows"]) + "\n" + runs_md(doc) + "\n## Targets" + rest
    Path(f"{base}.md").write_text(md)
    print(f"[quality_vllm] report: {len(doc['rows'])} rows from {doc['samples']} samples -> {base}.json/.md",
          flush=True)
    return 0


def cmd_report(a) -> int:
    base = stem(a)
    preds = a.merge or [f"{base}.preds.jsonl"]
    configs = [re.sub(r"\.preds\.jsonl$", ".configs.jsonl", p) for p in preds]
    return report(a, preds, configs)


# ----------------------------------------------------------------------------- plan


def prefill_flops(model: Path, L: int) -> float:
    """FLOPs of one L-token causal prefill: 2 x non-embedding parameters x L, plus attention's
    QK^T and PV (2 x 2 x L^2/2 x head_dim per query head and layer)."""
    c = json.loads((model / "config.json").read_text())
    h, layers, heads = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]
    kv, inter = c.get("num_key_value_heads", heads), c["intermediate_size"]
    hd = c.get("head_dim") or h // heads
    params = layers * (h * hd * (heads + 2 * kv) + heads * hd * h + 3 * h * inter)
    return 2 * params * L + layers * heads * hd * 2 * L * L


def calibrate(model: Path, configs: list[dict], default: float) -> tuple[float, float]:
    """(effective TFLOP/s, startup s) measured by earlier runs of the same model (their
    .configs.jsonl): FLOPs of every context's prompts over its generate time (decode included, so
    a low estimate of prefill speed), and the mean engine startup. H2O runs are left out (their
    side pass is not the engine's prefill)."""
    flops, secs, starts = 0.0, 0.0, []
    for c in configs:
        if not c.get("done") or c["run"].startswith("h2o"):
            continue
        starts.append(c["startup_s"] + 10.0)  # + process start and imports, not in startup_s
        for L, d in (c.get("contexts") or {}).items():
            if d["prompts"]:
                flops += d["prompts"] * prefill_flops(model, d["prompt_tokens"] / d["prompts"])
                secs += d["generate_s"]
    if not secs:
        return default, PLAN_STARTUP_S
    return flops / secs / 1e12, sum(starts) / len(starts)


def cmd_plan(a) -> int:
    """Counts and a time estimate per configuration, from a FLOP model of prefill plus decode steps
    (guesses to replace by the measured numbers of the first call: the report's Engines table)."""
    model = model_path(a.model)
    contexts, tasks = contexts_for(a, max_len_of(model)), tasks_of(a)
    from sparsekv_eval.ruler import TASKS, TOKENS_TO_GENERATE

    runs = all_runs(a)
    startup = PLAN_STARTUP_S
    if a.calibrate:
        a.tflops, startup = calibrate(model, _read_jsonl(a.calibrate), a.tflops)
    gen = [min(TOKENS_TO_GENERATE[TASKS[t]["kind"]], a.max_tokens or 10**9) for t in tasks]
    total = 0.0
    print(f"{model.name}: {len(tasks)} tasks x {contexts} x n={a.n}; {len(runs)} runs; assumed "
          f"{a.tflops:.0f} TFLOP/s prefill, {startup:.0f} s startup, {1000 * PLAN_DECODE_STEP_S:g} ms/decode "
          f"step of {a.max_num_seqs}")
    pre = sum(a.n * len(tasks) * prefill_flops(model, L) for L in contexts) / (a.tflops * 1e12)
    steps = sum(a.n * len(contexts) * g * 0.5 for g in gen) / a.max_num_seqs  # half of max_tokens, on average
    per = startup + pre + steps * PLAN_DECODE_STEP_S
    for r in runs:
        extra = 0.0
        if not r.dense and r.config.method == "h2o":  # its side pass: every prompt query in float32 torch
            extra = 4 * pre
        print(f"  {r.label:28s} {per + extra:7.0f} s  (prefill {pre:.0f} s, decode ~{steps * PLAN_DECODE_STEP_S:.0f} s"
              + (f", H2O scoring ~{extra:.0f} s" if extra else "") + ")")
        total += per + extra
    print(f"  total {total:.0f} s")
    return 0


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["engine"]:
        return cmd_engine(argv[1])

    def csv(x):
        return [v.strip() for v in x.split(",") if v.strip()]

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=["run", "report", "plan"])
    p.add_argument("--model", default="smollm2", help="a converted HF folder, or a name ensure_model knows")
    p.add_argument("--name", default=None, help="file stem quality_<name>.vllm_<device> (default: model's first word)")
    p.add_argument("--contexts", default="4k,8k,16k,32k", help="RULER lengths; those above the model's limit are dropped")
    p.add_argument("--tasks", default="all", help="comma list of sparsekv_eval.ruler.TASKS, or all")
    p.add_argument("--n", type=int, default=100, help="samples per (task, context)")
    p.add_argument("--methods", type=csv, default=["quest", "hash", "snapkv", "pyramidkv", "h2o", "streaming"],
                   help="registered methods or all; METHOD@ALLOC for per-head budgets (quest@headkv, needs --head-budgets)")
    p.add_argument("--budgets", default="1/8,1/16,2048", help="fractions (1/8 or 0.125) and token budgets (2048)")
    p.add_argument("--configs", default=None,
                   help="run labels to keep, comma-separated fnmatch patterns, e.g. 'dense,quest-f0.125' (default all)")
    p.add_argument("--sink-tokens", type=int, default=None)
    p.add_argument("--recent-tokens", type=int, default=None)
    p.add_argument("--head-budgets", default=None, help="head-score profile for @headkv / @infscore")
    p.add_argument("--hash-checkpoint", default=None, help="spotlight's trained hash checkpoint")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="another SparseKVConfig setting for every run")
    p.add_argument("--corpus", default="mixed", choices=["essay", "code", "mixed"],
                   help="haystack of the essay-haystack tasks (mixed: essays or Python sources per sample)")
    p.add_argument("--no-vary-needles", dest="vary_needles", action="store_false",
                   help="RULER's needle wording only (default: varied per sample)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--haystack", default=None, help="essays (default: haystack.find_essays's search)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="prompt-generation processes")
    p.add_argument("--prompt-cache", default=None, help="default: OUT_DIR/prompts")
    p.add_argument("--max-tokens", type=int, default=None, help="cap on each task's tokens to generate")
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None, help="default: 32 (sparsekv's own default)")
    p.add_argument("--dtype", default="bfloat16", help="CUDA dtype (CPU runs float32)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="CUDA: a fixed KV size instead of vLLM's memory profile (when other engines share the GPU; "
                        "then --gpu-memory-utilization is only vLLM's startup check of free memory)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even where CUDA is there")
    p.add_argument("--eager", action="store_true", help="CUDA: no CUDA graphs (a fallback; the Engines table says which ran)")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="start no configuration when this many seconds minus the last run's time have passed")
    p.add_argument("--device-tag", default=None, help="file-name tag (default: the CUDA device name, or cpu)")
    p.add_argument("--merge", nargs="+", default=None, help="report: .preds.jsonl files of several calls")
    p.add_argument("--tflops", type=float, default=PLAN_TFLOPS, help="plan: effective prefill TFLOP/s")
    p.add_argument("--calibrate", nargs="+", default=None,
                   help="plan: .configs.jsonl files of earlier runs of this model (measured speed and startup)")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks/results"))
    a = p.parse_args(argv)
    if a.device_tag is None:
        a.device_tag = "cpu" if a.cpu else device_tag()
    return {"run": cmd_run, "report": cmd_report, "plan": cmd_plan}[a.cmd](a)


if __name__ == "__main__":
    raise SystemExit(main())
