"""Quality report: sparse decode (quest, hash, ...) vs dense on the RULER-style suite, offline.

Runs the offline sweep driver (``sparsekv_eval.sweep``: HF transformers + an attention hook
that calls the backend's own selectors, ``select_pages`` and ``sparse_paged_decode``) with one dense
prefill per prompt shared by every method and budget, and writes

    benchmarks/results/quality_<model>.records.jsonl   one record per sample (resumable)
    benchmarks/results/quality_<model>.json            rows {suite, task, model, method, context,
                                                       budget_fraction | token_budget, score,
                                                       dense_score, n, ci95, ...} + command, commit
    benchmarks/results/quality_<model>.md              tables: per task, averaged, ratio to dense,
                                                       targets, IoU (probe) table
    benchmarks/results/quality_<model>_iou.png         IoU per layer (if matplotlib)

Usage (CPU; run it in the background, it resumes where it stopped)::

    nohup nice -n 10 python benchmarks/quality.py run --model data/models/SmolLM2-135M-Instruct &
    python benchmarks/quality.py report --model data/models/SmolLM2-135M-Instruct   # any time

``run`` works through phases in order (default: 4K, then 2K, then 8K with fewer samples), the
samples of a phase interleaved across tasks, so a run cut short still has balanced groups; the
report marks groups below the planned sample count as partial.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "eval")]  # vllm_sparsekv, sparsekv_eval from this checkout

from sparsekv_eval.tokenization import chat_template_tokens, parse_length  # noqa: E402

DEFAULT_PHASES = "4096:niah_single_1,niah_single_2:30;2048:niah_single_1,niah_single_2:30;8192:niah_single_2:10"
TARGETS = {0.125: 98.0, 0.0625: 95.0}  # quest at 1/8 >= 98% of dense, at 1/16 >= 95% (4K and 8K)
TARGET_CONTEXTS = (4096, 8192)


def parse_phases(text: str) -> list[tuple[int, list[str], int]]:
    out = []
    for part in text.split(";"):
        if not part.strip():
            continue
        L, tasks, n = part.split(":")
        L = parse_length(L)
        out.append((L, [t for t in tasks.split(",") if t], int(n)))
    return out


def model_name(path: str) -> str:
    return Path(path).name


def out_base(a) -> Path:
    short = a.name or model_name(a.model).split("-")[0].lower()
    return Path(a.out_dir) / f"quality_{short}"


def commit() -> str:
    """HEAD of the checkout, or $SPARSEKV_COMMIT (a copied tree, e.g. on a lent GPU, may carry stale git metadata)."""
    if os.environ.get("SPARSEKV_COMMIT"):
        return os.environ["SPARSEKV_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except Exception:  # pragma: no cover
        return "unknown"


def _common(a) -> dict:
    """SparseKVConfig settings shared by every run (None = the config's default)."""
    c = {"sink_tokens": a.sink_tokens, "recent_tokens": a.recent_tokens, "head_budgets": a.head_budgets,
         "spotlight": {"checkpoint": a.hash_checkpoint} if a.hash_checkpoint else None}
    for item in a.set or []:  # --set KEY=VALUE: any other SparseKVConfig field (JSON value or string);
        key, _, val = item.partition("=")  # METHOD.FIELD=VALUE sets a method's option (quest.group_reduce=max)
        try:
            v = json.loads(val)
        except ValueError:
            v = val
        section, dot, field = key.partition(".")
        if dot:
            c[section] = {**(c.get(section) or {}), field: v}
        else:
            c[key] = v
    return {k: v for k, v in c.items() if v is not None}


def _runs(a):
    from sparsekv_eval import sweep

    return sweep.make_configs(a.methods, a.budget_fractions, a.token_budgets, **_common(a))


def _device_name(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def plan(a, tok, tmpl):
    from sparsekv_eval.ruler import RulerGenerator

    g = RulerGenerator(tok, a.haystack, a.seed, tmpl)
    samples = []
    for L, tasks, n in parse_phases(a.phases):
        per_task = {t: g.generate(t, L, n) for t in tasks}
        for i in range(n):  # interleave tasks: a cut-short run keeps balanced groups
            samples.extend(per_task[t][i] for t in tasks)
    return samples


def cmd_run(a) -> int:
    import torch

    from vllm_sparsekv.config import SparseKVConfig
    from sparsekv_eval import sweep

    torch.set_num_threads(a.threads)
    base = out_base(a)
    base.parent.mkdir(parents=True, exist_ok=True)
    shard = Path(f"{base}.{a.shard}" if a.shard else str(base))
    model, tok = sweep.load_model(a.model, device=a.device)
    tmpl = chat_template_tokens(tok)
    samples = plan(a, tok, tmpl)[a.skip:]
    cfg = SparseKVConfig(**_common(a))
    probe = None
    if a.iou_methods:
        probe = sweep.IouProbe(sweep.resolve_methods(a.iou_methods), a.iou_fractions, a.iou_steps, cfg)
    meta = {"command": " ".join([sys.executable, *sys.argv]), "commit": commit(), "started": time.time(),
            "device": _device_name(a.device), "phases": a.phases, "block_size": a.block_size,
            "max_new_tokens": a.max_new_tokens, "sink_tokens": cfg.sink_tokens,
            "recent_tokens": cfg.recent_tokens, "dense_layers": list(cfg.dense_layers)}
    Path(str(shard) + ".meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{len(samples)} samples, {len(_runs(a))} runs each -> {shard}.records.jsonl", flush=True)
    sweep.ruler_sweep(model, tok, samples, _runs(a), str(shard) + ".records.jsonl", a.block_size,
                      collect_iou=False, chat=True, progress=True, max_new_tokens=a.max_new_tokens,
                      iou_probe=probe)
    return cmd_report(a)


# ------------------------------------------------------------------------------- needle grid


def cmd_needle(a) -> int:
    """Needle grid (context x depth, eval/niah.py) through the sweep: one heatmap PNG per run
    (dense and each method/budget), rows in quality_<name>_needle.json, records resumable."""
    from sparsekv_eval import niah, sweep

    import torch

    torch.set_num_threads(a.threads)
    base = Path(str(out_base(a)) + "_needle")
    base.parent.mkdir(parents=True, exist_ok=True)
    model, tok = sweep.load_model(a.model, device=a.device)
    tmpl = chat_template_tokens(tok)
    lengths = [parse_length(x) for x in a.needle_lengths.split(",")]
    depths = [float(x) for x in a.needle_depths.split(",")]
    samples = niah.grid_samples(tok, lengths, depths, a.needle_samples, haystack_path=a.haystack, seed=a.seed,
                                model_template_tokens=tmpl, tokens_to_generate=a.max_new_tokens)
    runs = _runs(a)
    recs = sweep.ruler_sweep(model, tok, samples, runs, str(base) + ".records.jsonl", a.block_size,
                             collect_iou=False, chat=True, max_new_tokens=a.max_new_tokens)
    return needle_report(a, recs, runs, base)


def needle_report(a, recs, runs, base) -> int:
    from sparsekv_eval import niah

    doc = {"model": model_name(a.model), "command": " ".join([sys.executable, *sys.argv]), "commit": commit(),
           "device": _device_name(a.device), "block_size": a.block_size, "runs": {}}
    for run in runs:
        grid = niah.score_grid([{"target_length": r["target_length"], "meta": r["meta"], "outputs": r["outputs"],
                                 "pred": r["runs"][run.label]["pred"]} for r in recs if run.label in r["runs"]])
        doc["runs"][run.label] = {**run.row_fields(), "cells": grid,
                                  "mean": sum(c["score"] for c in grid) / max(len(grid), 1)}
        title = f"{model_name(a.model)}: {run.label}"
        niah.plot_heatmap(grid, f"{base}_{run.label.replace('.', '_')}.png", title)
    Path(str(base) + ".json").write_text(json.dumps(doc, indent=1) + "\n")
    for label, d in doc["runs"].items():
        print(f"{label:>20}: mean {100 * d['mean']:.1f} over {len(d['cells'])} cells")
    return 0


# ------------------------------------------------------------------------------- needle rank


def cmd_needle_rank(a) -> int:
    """Diagnostic: where each method ranks the needle's page, per sparse layer and KV head, at the
    first decode step of one niah_single_2 sample (dense decode; ranks among the pages that are not
    sink/recent; the oracle ranks by exact attention mass). Explains which layers/heads lose it."""
    import torch

    from vllm_sparsekv.config import SparseKVConfig
    from sparsekv_eval import iou as I
    from sparsekv_eval import sweep
    from sparsekv_eval.ruler import RulerGenerator
    from vllm_sparsekv.methods import get_method
    from vllm_sparsekv.methods.base import LayerGeometry

    torch.set_num_threads(a.threads)
    model, tok = sweep.load_model(a.model)
    tmpl = chat_template_tokens(tok)
    L = parse_phases(a.phases)[0][0]
    s = RulerGenerator(tok, a.haystack, a.seed, tmpl).generate("niah_single_2", L, a.sample + 1)[a.sample]
    text = tok.apply_chat_template([{"role": "user", "content": s.input}], tokenize=False,
                                   add_generation_prompt=True) + s.answer_prefix
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    val = s.outputs[0]
    ci = text.index(val)
    span = [i for i, (x, y) in enumerate(enc["offset_mapping"]) if x < ci + len(val) and y > ci]
    bs = a.block_size
    cfg0 = SparseKVConfig()
    sink, recent = cfg0.sink_pages(bs), cfg0.recent_pages(bs)
    needle_pages = sorted({i // bs for i in span})
    methods = sweep.resolve_methods(a.methods)
    out = {}

    def probe(layer, query, key, scaling):
        if layer in cfg0.dense_layers or layer in out:
            return
        hq, d = query.shape[1], query.shape[3]
        hkv, n = key.shape[1], key.shape[2]
        P = -(-n // bs)
        st = sweep._STATE
        kc = sweep._paged_cached(layer, key, 0)
        q = query[:, :, 0, :]
        bt = torch.arange(st.capacity_pages, dtype=torch.int32)[None]
        sl = torch.tensor([n], dtype=torch.int32)
        attn = I.exact_attention(q[0], key[0].transpose(0, 1), scaling)
        pm = I.page_mass(I.group_attention(attn, hkv), bs)
        scores = {"oracle": pm}
        for m in methods:
            sel = get_method(m)(SparseKVConfig(method=m), LayerGeometry(hq, hkv, d, bs, layer))
            sel.allocate(st.capacity_pages, key.dtype, key.device)
            sel.on_kv_write(key[0].transpose(0, 1), kc, torch.arange(n))
            scores[m] = sel.score_pages(q, kc, bt, sl, P)[0]
        r = {}
        for k, sc in scores.items():
            sc = sc.clone().float()
            sc[:, :sink] = -1e30
            sc[:, P - recent:] = -1e30
            order = torch.argsort(sc, dim=-1, descending=True)
            r[k] = [min(int((order[h] == p).nonzero()[0]) for p in needle_pages) for h in range(hkv)]
        r["needle_mass"] = [round(float(pm[h, needle_pages].sum()), 3) for h in range(hkv)]
        out[layer] = r

    sweep._probe = probe
    sweep.sweep_prompt(model, ids, [sweep.RunConfig("dense")], 2, {tok.eos_token_id}, bs,
                       iou_probe=sweep.IouProbe(methods[:1], [0.1], 1, cfg0))
    P = -(-len(ids) // bs)
    free = {f"1/{round(1 / f)}": math.ceil(P * f) - sink - recent for f in a.budget_fractions}
    doc = {"sample": s.id, "tokens": len(ids), "block_size": bs, "needle_tokens": [span[0], span[-1]],
           "needle_pages": needle_pages, "pages": P, "chosen_pages_per_budget": free,
           "note": "rank of the needle page among non-sink/recent pages (0 = best); needle_mass = exact "
                   "attention mass on it summed over the GQA group (max 3 for 3 query heads)",
           "layers": {str(k): v for k, v in sorted(out.items())}}
    path = Path(f"{out_base(a)}_needle_rank_{L}.json")
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))
    return 0


# ------------------------------------------------------------------------------------ report


def _label_value(r):
    if r["method"] == "dense":
        return "-"
    if r.get("budget_fraction") is not None:
        return f"1/{round(1 / r['budget_fraction'])}"
    return f"{r['token_budget']} tok"


def build_rows(records, runs, name, planned):
    from sparsekv_eval.metrics import mean_ci95, wilson_interval

    groups = {}
    for r in records:
        groups.setdefault((r["task"], r["target_length"]), []).append(r)
    rows = []
    for (task, L), rs in sorted(groups.items(), key=lambda x: (x[0][1], x[0][0])):
        dense = [r["runs"]["dense"]["score"] for r in rs]
        dm = mean_ci95(dense)[0]
        for run in runs:
            if any(run.label not in r["runs"] for r in rs):
                continue
            sc = [r["runs"][run.label]["score"] for r in rs]
            m, hw, n = mean_ci95(sc)
            deltas = [s - d for s, d in zip(sc, dense)]
            dm_, dhw, _ = mean_ci95(deltas)
            if n > 1 and dhw == 0.0 and all(x in (-1.0, 0.0, 1.0) for x in deltas) and abs(dm_) in (0.0, 1.0):
                # every sample moved the same way: the normal interval collapses; use Wilson's
                lo, hi = wilson_interval(abs(dm_), n)
                dhw = max(abs(dm_) - lo, hi - abs(dm_))
            af = [r["runs"][run.label].get("attended_fraction") for r in rs]
            af = [x for x in af if x is not None]
            rows.append({"suite": "ruler", "task": task, "model": name, **run.row_fields(), "context": L,
                         "score": round(100 * m, 2), "dense_score": round(100 * dm, 2), "n": n,
                         "ci95": round(100 * hw, 2),
                         "delta": round(100 * dm_, 2), "delta_ci95": round(100 * dhw, 2) if n > 1 else None,
                         "ratio": round(m / dm, 4) if dm > 0 else None,
                         "attended_fraction": round(sum(af) / len(af), 4) if af else None,
                         "partial": n < planned.get((task, L), n)})
    # averaged over the tasks of a context (mean of task means; CI from the per-sample average of
    # the tasks is not defined when tasks differ in n, so it is the mean of the task CIs / sqrt(T))
    for L in sorted({r["context"] for r in rows}):
        for run in runs:
            sel = [r for r in rows if r["context"] == L and r["task"] != "average" and _key(r) == _key(run.row_fields())]
            if not sel:
                continue
            T = len(sel)
            s = sum(r["score"] for r in sel) / T
            d = sum(r["dense_score"] for r in sel) / T
            ci = math.sqrt(sum(r["ci95"] ** 2 for r in sel)) / T
            rows.append({"suite": "ruler", "task": "average", "model": name, **run.row_fields(), "context": L,
                         "score": round(s, 2), "dense_score": round(d, 2), "n": sum(r["n"] for r in sel),
                         "ci95": round(ci, 2), "ratio": round(s / d, 4) if d > 0 else None,
                         "tasks": [r["task"] for r in sel], "partial": any(r["partial"] for r in sel)})
    return rows


def iou_rows(records, name):
    """Probe IoU (dense trajectory) per (context, method, fraction): mean over samples/steps/layers/heads."""
    acc = {}
    for r in records:
        pr = (r["runs"].get("dense") or {}).get("probe") or {}
        for key, v in pr.items():
            m, f = key.split("@")
            a = acc.setdefault((r["target_length"], m, float(f)), {"iou": [], "recall": [], "oracle_recall": [],
                                                                   "layers": {}})
            a["iou"].append(v["iou_mean"])
            a["recall"].append(v["recall_mean"])
            a["oracle_recall"].append(v["oracle_recall_mean"])
            for l, heads in v["iou_per_layer_head"].items():
                a["layers"].setdefault(int(l), []).append(heads)
    out = []
    for (L, m, f), a in sorted(acc.items()):
        per_layer_head = {l: [round(sum(h[i] for h in hs) / len(hs), 4) for i in range(len(hs[0]))]
                          for l, hs in sorted(a["layers"].items())}
        mean = lambda x: round(sum(x) / len(x), 4)  # noqa: E731
        out.append({"suite": "iou_probe", "model": name, "context": L, "method": m, "budget_fraction": f,
                    "iou": mean(a["iou"]), "recall": mean(a["recall"]), "oracle_recall": mean(a["oracle_recall"]),
                    "n": len(a["iou"]), "iou_per_layer_head": per_layer_head})
    return out


def _key(r):
    return (r["method"], r.get("budget_allocation"), r.get("budget_fraction"), r.get("token_budget"))


def _method_label(r):
    return r["method"] + (f"@{r['budget_allocation']}" if r.get("budget_allocation") not in (None, "pyramid") else "")


def markdown(rows, irows, meta, partial, block_size):
    name = rows[0]["model"] if rows else "?"
    st = meta.get("settings", {})
    lines = [f"# Quality report: {name} (RULER-style suite, {meta.get('driver_title', 'offline sweep')})", ""]
    if partial:
        lines += ["**PARTIAL**: the run was cut short; groups marked `*` have fewer samples than planned.", ""]
    lines += [f"- command: `{meta.get('command', '')}`", f"- commit: `{meta.get('commit', '')}`",
              f"- device: {meta.get('device', 'CPU')}",
              f"- page (block) size {block_size} tokens; sink {st.get('sink_tokens')} + recent "
              f"{st.get('recent_tokens')} tokens always attended; dense layers {st.get('dense_layers')}; "
              f"greedy decoding, chat template; {meta.get('driver_note', 'one dense prefill per prompt shared by all runs')}; "
              "scores: RULER string_match_all x 100; ci95 = normal-approx half-width (Wilson for all-0/1).",
              ""]
    ctxs = sorted({r["context"] for r in rows})
    # targets
    lines += ["## Targets (quest, average over tasks, ratio to dense)", "",
              "| context | budget | quest / dense | target | met |", "|---|---|---|---|---|"]
    for L in ctxs:
        for f, tgt in TARGETS.items():
            r = next((r for r in rows if r["task"] == "average" and r["context"] == L and r["method"] == "quest"
                      and not r.get("budget_allocation") and r.get("budget_fraction") == f), None)
            if r is None or r["ratio"] is None:
                continue
            met = "yes" if 100 * r["ratio"] >= tgt else "**no**"
            scope = "" if L in TARGET_CONTEXTS else " (not a target context)"
            lines.append(f"| {L} | 1/{round(1 / f)} | {100 * r['ratio']:.1f}% ({r['score']:.1f} vs {r['dense_score']:.1f})"
                         f" | >= {tgt:.0f}%{scope} | {met} |")
    lines.append("")
    for L in ctxs:
        here = [r for r in rows if r["context"] == L]
        avg = [r for r in here if r["task"] == "average"]
        tasks = sorted({r["task"] for r in here if r["task"] != "average"})
        budgets = []
        for r in avg:
            if r["method"] != "dense" and _label_value(r) not in budgets:
                budgets.append(_label_value(r))
        methods = []
        for r in avg:
            if _method_label(r) not in methods:
                methods.append(_method_label(r))
        n = max((r["n"] for r in here if r["task"] != "average"), default=0)
        lines += [f"## Context {L}", "",
                  f"Mean score over the tasks ({', '.join(tasks)}; n = {n} per task), by method and budget "
                  "(budget = fraction of the context's pages, or tokens, per KV head; sink/recent included).", "",
                  "| method | " + " | ".join(budgets) + " |", "|---|" + "---|" * len(budgets)]
        for m in methods:
            cells = []
            for b in budgets:
                r = next((r for r in avg if _method_label(r) == m and (m == "dense" or _label_value(r) == b)), None)
                cells.append("" if r is None else f"{r['score']:.1f}" + ("*" if r.get("partial") else ""))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += ["", "Per task: score ± ci95; ratio of the task mean to dense; share of pages attended "
                  "in the sparse layers.", "",
                  "| method | budget | " + " | ".join(f"{t} (n)" for t in tasks) + " | mean | ratio | pages |",
                  "|---|---|" + "---|" * (len(tasks) + 3)]
        keys = []
        for r in here:
            if _key(r) not in keys:
                keys.append(_key(r))
        for k in keys:
            rs = {r["task"]: r for r in here if _key(r) == k}
            a_ = rs.get("average")
            any_r = next(iter(rs.values()))
            cells = [(f"{rs[t]['score']:.1f} ±{rs[t]['ci95']:.1f} ({rs[t]['n']}{'*' if rs[t].get('partial') else ''})"
                      if t in rs else "") for t in tasks]
            af = [rs[t]["attended_fraction"] for t in tasks if t in rs and rs[t].get("attended_fraction")]
            mean = "" if a_ is None else f"{a_['score']:.1f}"
            ratio = "" if a_ is None or a_["ratio"] is None else f"{100 * a_['ratio']:.1f}%"
            pages = f"{100 * sum(af) / len(af):.1f}%" if af else ""
            lines.append(f"| {_method_label(any_r)} | {_label_value(any_r)} | " + " | ".join(cells)
                         + f" | {mean} | {ratio} | {pages} |")
        lines.append("")
        drops = [r for r in here if r["task"] != "average" and r["method"] != "dense"
                 and r.get("delta_ci95") is not None and r["delta"] + r["delta_ci95"] < 0]
        if drops:
            lines.append("Paired drops vs dense whose 95% interval excludes 0 (delta ± ci95, points): " + "; ".join(
                f"{r['task']} {_method_label(r)} {_label_value(r)}: {r['delta']:+.1f} ±{r['delta_ci95']:.1f}"
                for r in drops))
            lines.append("")
    if irows:
        lines += ["## IoU with the oracle (Spotlight's metric)", "",
                  "Along the dense decode (first steps of each sample), every sparse layer's query is scored "
                  "by each method (the backend's selector code); its top ceil(P*f) pages are compared with "
                  "the top pages by exact attention mass (GQA group sum), no sink/recent pages forced on "
                  "either side. IoU: mean over samples, steps, layers 2-29 and KV heads. Recall: share of the "
                  "exact attention mass the selected pages hold (the oracle's is the best possible).", "",
                  "| context | budget | " + " | ".join(f"{m} IoU" for m in sorted({r['method'] for r in irows}))
                  + " | " + " | ".join(f"{m} recall" for m in sorted({r['method'] for r in irows}))
                  + " | oracle recall | n |",
                  "|---|---|" + "---|" * (2 * len({r['method'] for r in irows}) + 2)]
        for L in sorted({r["context"] for r in irows}):
            for f in sorted({r["budget_fraction"] for r in irows}):
                rs = {r["method"]: r for r in irows if r["context"] == L and r["budget_fraction"] == f}
                ms = sorted(rs)
                orc = sum(r["oracle_recall"] for r in rs.values()) / len(rs)
                lines.append(f"| {L} | {100 * f:g}% | " + " | ".join(f"{rs[m]['iou']:.3f}" for m in ms) + " | "
                             + " | ".join(f"{rs[m]['recall']:.3f}" for m in ms) + f" | {orc:.3f} | "
                             f"{min(r['n'] for r in rs.values())} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def needle_md(d, stem) -> str:
    """The needle grid (``quality.py needle``): mean score per context and run, and the heatmaps."""
    runs = d["runs"]
    ctxs = sorted({c["context"] for v in runs.values() for c in v["cells"]})
    depths = sorted({c["depth"] for v in runs.values() for c in v["cells"]})
    n = max((c["n"] for v in runs.values() for c in v["cells"]), default=0)
    lines = ["", f"## Needle grid ({len(ctxs)} contexts x {len(depths)} depths, {n} sample(s) per cell)", "",
             f"`{d['command']}` at `{d['commit']}` on {d['device']}. Mean score (x 100) over the depths of "
             "each context; heatmaps (depth x context) below.", "",
             "| run | " + " | ".join(str(L) for L in ctxs) + " | all |", "|---|" + "---|" * (len(ctxs) + 1)]
    for label, v in runs.items():
        per = [[c["score"] for c in v["cells"] if c["context"] == L] for L in ctxs]
        lines.append(f"| {label} | " + " | ".join(f"{100 * sum(x) / len(x):.0f}" if x else "" for x in per)
                     + f" | {100 * v['mean']:.1f} |")
    lines.append("")
    lines += [f"![{label}]({stem}_needle_{label.replace('.', '_')}.png)" for label in runs]
    return "\n".join(lines) + "\n"


def needle_rank_md(d) -> str:
    methods = [k for k in next(iter(d["layers"].values())) if k not in ("needle_mass",)]
    lines = ["", f"## Where the needle is lost (diagnostic, sample {d['sample']}, {d['tokens']} tokens, "
             f"{d['pages']} pages of {d['block_size']})", "",
             "Rank of the needle's page among the non-sink/recent pages at the first decode step (0 = best), "
             "per KV head, for the layers/heads where the needle holds >= 0.1 of the group's exact attention "
             f"mass (the retrieval heads). Pages chosen beyond sink/recent: {d['chosen_pages_per_budget']}; "
             "a rank >= that number means the needle page is not attended at that budget.", "",
             "| layer | head | needle mass | " + " | ".join(methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]
    for l, r in d["layers"].items():
        for h, mass in enumerate(r["needle_mass"]):
            if mass >= 0.1:
                lines.append(f"| {l} | {h} | {mass:.2f} | " + " | ".join(str(r[m][h]) for m in methods) + " |")
    return "\n".join(lines) + "\n"


def plot_iou(irows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ctxs = sorted({r["context"] for r in irows})
    fig, axes = plt.subplots(1, len(ctxs), figsize=(6 * len(ctxs), 4), squeeze=False)
    for ax, L in zip(axes[0], ctxs):
        for r in irows:
            if r["context"] != L:
                continue
            ls = sorted(r["iou_per_layer_head"], key=int)
            ax.plot([int(l) for l in ls], [sum(r["iou_per_layer_head"][l]) / len(r["iou_per_layer_head"][l]) for l in ls],
                    label=f"{r['method']} {100 * r['budget_fraction']:g}%",
                    linestyle="-" if r["method"] == "quest" else "--")
        ax.set_title(f"IoU with oracle top pages, context {L}")
        ax.set_xlabel("layer")
        ax.set_ylabel("IoU (mean over KV heads)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _stem_files(base: Path, suffix: str) -> list[Path]:
    """BASE.SUFFIX and the shards' BASE.<shard>.SUFFIX; not the files of other stems that merely
    start with BASE's name (quality_smollm2_methods.* is not part of quality_smollm2)."""
    return sorted({*base.parent.glob(f"{base.name}.{suffix}"), *base.parent.glob(f"{base.name}.*.{suffix}")})


def cmd_report(a) -> int:
    from sparsekv_eval.client import load_results

    base = out_base(a)
    recs = []
    seen = set()
    for f in _stem_files(base, "records.jsonl"):  # one file per shard
        for r in load_results(f).values():
            if r["id"] not in seen:  # shards may overlap
                seen.add(r["id"])
                recs.append(r)
    if not recs:
        print("no records yet")
        return 1
    metas = [json.loads(f.read_text()) for f in _stem_files(base, "meta.json")]
    meta = dict(metas[0]) if metas else {}
    if len(metas) > 1:
        meta["command"] = " ; ".join(m["command"] for m in metas)
        meta["phases"] = ";".join(m["phases"] for m in metas)
    planned = {}
    for L, tasks, n in parse_phases(meta.get("phases", a.phases)):
        for t in tasks:
            planned[(t, L)] = n
    runs = _runs(a)
    name = model_name(a.model)
    rows = build_rows(recs, runs, name, planned)
    irows = iou_rows(recs, name)
    done = {(r["task"], r["target_length"]) for r in recs}
    missing = [f"{t}@{L}" for (t, L) in planned if (t, L) not in done]
    partial = any(r.get("partial") for r in rows) or bool(missing)
    bs = meta.get("block_size", a.block_size)
    doc = {"model": name, "suite": "ruler", "partial": partial, "missing_groups": missing,
           "command": meta.get("command", " ".join(sys.argv)), "commit": meta.get("commit", commit()),
           "device": meta.get("device", "CPU"),
           "settings": {"block_size": bs, "sink_tokens": meta.get("sink_tokens", 64),
                        "recent_tokens": meta.get("recent_tokens", 64),
                        "dense_layers": meta.get("dense_layers", [0, 1]),
                        "chat_template": True, "greedy": True, "max_new_tokens": meta.get("max_new_tokens"),
                        "phases": meta.get("phases", a.phases), "driver": "sparsekv_eval.sweep (HF + backend selectors/kernels)"},
           "samples": len(recs), "rows": rows, "iou_rows": irows}
    Path(str(base) + ".json").write_text(json.dumps(doc, indent=1) + "\n")
    md = markdown(rows, irows, doc, partial, bs)
    notes = Path(f"{base}_notes.md")  # hand-written findings, kept across re-runs of the report
    if notes.exists():
        md += "\n" + notes.read_text()
    needle = Path(f"{base}_needle.json")
    if needle.exists():
        md += needle_md(json.loads(needle.read_text()), base.name)
    for nr in sorted(base.parent.glob(base.name + "_needle_rank_*.json")):
        md += needle_rank_md(json.loads(nr.read_text()))
    png = plot_iou(irows, str(base) + "_iou.png") if irows else None
    if png:
        md += f"\n![IoU per layer]({Path(png).name})\n"
    Path(str(base) + ".md").write_text(md)
    print(md)
    return 0


def main(argv=None) -> int:
    def csv(x):
        return [v.strip() for v in x.split(",") if v.strip()]

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=["run", "report", "needle", "needle-rank"])
    p.add_argument("--needle-lengths", default="1k,2k,4k,8k", help="needle: context lengths")
    p.add_argument("--needle-depths", default="0,10,20,30,40,50,60,70,80,90,100", help="needle: depths (%%)")
    p.add_argument("--needle-samples", type=int, default=2, help="needle: samples per cell")
    p.add_argument("--sample", type=int, default=0, help="needle-rank: which sample of the first phase")
    p.add_argument("--model", default=str(ROOT / "data/models/SmolLM2-135M-Instruct"))
    p.add_argument("--name", default=None, help="report file stem: quality_<name> (default: model's first word)")
    p.add_argument("--phases", default=DEFAULT_PHASES, help="'LEN:task,task:N;LEN:...' run in order")
    p.add_argument("--methods", type=csv, default=["quest", "hash"],
                   help="registered methods (vllm_sparsekv.methods.available()) or 'all'; METHOD@ALLOC picks a "
                        "budget allocation (e.g. snapkv@headkv, needs --head-budgets)")
    p.add_argument("--iou-methods", type=csv, default=["quest", "hash"],
                   help="methods of the IoU probe along the dense decode (page scorers; empty: no probe)")
    p.add_argument("--sink-tokens", type=int, default=None, help="default: the config's")
    p.add_argument("--recent-tokens", type=int, default=None, help="default: the config's")
    p.add_argument("--head-budgets", default=None, help="head-score profile for @infscore / @headkv")
    p.add_argument("--hash-checkpoint", default=None, help="`sparsekv train-hash` checkpoint for spotlight")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="another SparseKVConfig setting for every run (repeatable), e.g. quest.group_reduce=max")
    p.add_argument("--device", default="cpu", help="cpu or cuda (HF model + the kernels' Triton versions)")
    p.add_argument("--budget-fractions", type=lambda x: [float(v) for v in csv(x)], default=[0.25, 0.125, 0.0625])
    p.add_argument("--token-budgets", type=lambda x: [int(v) for v in csv(x)], default=[256, 1024])
    p.add_argument("--iou-fractions", type=lambda x: [float(v) for v in csv(x)], default=[0.02, 0.05, 0.10])
    p.add_argument("--iou-steps", type=int, default=4)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="cap on tokens generated per answer (a UUID needle, as niah_single_3 and niah_multikey_3 "
                        "hide, takes up to about 40 tokens with its lead-in: SmolLM2 spells digits one token each; "
                        "the cap was 12, then 32, and both cut those answers short for dense and sparse alike)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                   help="torch threads; 1 is ~10x faster than 2 for the decode steps on a shared 2-core box")
    p.add_argument("--haystack", default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--skip", type=int, default=0, help="start at this sample of the plan (another shard did the first)")
    p.add_argument("--shard", default=None, help="records/meta file suffix, so several runs can write in parallel")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks/results"))
    a = p.parse_args(argv)
    return {"run": cmd_run, "report": cmd_report, "needle": cmd_needle, "needle-rank": cmd_needle_rank}[a.cmd](a)


if __name__ == "__main__":
    raise SystemExit(main())
