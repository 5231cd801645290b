"""Quality at equal total budget: uniform vs pyramid vs infscore vs headkv budget allocation, all
with Quest page selection, on RULER-style samples through the offline sweep (eval/sweep.py: one
dense prefill per prompt, then each configuration decodes greedily through the backend's own
selectors, budget weights and kernels).

    python benchmarks/budgets.py --model data/models/SmolLM2-135M-Instruct \\
        --head-budgets benchmarks/results/head_scores_smollm2.json --length 1024 --num-samples 4 \\
        --token-budgets 96,128 --out benchmarks/results/budgets_smollm2

Writes OUT.jsonl (per-sample records, resumable), OUT.json (rows) and OUT.md (table).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ALLOCATIONS = ("uniform", "pyramid", "infscore", "headkv")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--head-budgets", required=True)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--tasks", default="niah_single_1,niah_single_2,niah_multikey_1,vt")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--token-budgets", default="128")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--sink-tokens", type=int, default=16)
    p.add_argument("--recent-tokens", type=int, default=16)
    p.add_argument("--beta", type=float, default=1.351)
    p.add_argument("--temp", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--chat", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", required=True, help="path prefix: OUT.jsonl, OUT.json, OUT.md")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from vllm_sparsekv import budgets
    from vllm_sparsekv.config import SparseKVConfig
    from sparsekv_eval import sweep
    from sparsekv_eval.metrics import mean_ci95
    from sparsekv_eval.ruler import RulerGenerator
    from sparsekv_eval.tokenization import chat_template_tokens

    runs = [sweep.RunConfig("dense")]
    for b in [int(x) for x in a.token_budgets.split(",") if x]:
        for alloc in ALLOCATIONS:
            extra = {"head_budgets": a.head_budgets} if alloc in ("infscore", "headkv") else {}
            cfg = SparseKVConfig(method="quest", token_budget=b, sink_tokens=a.sink_tokens,
                                 recent_tokens=a.recent_tokens, budget_allocation=alloc, budget_beta=a.beta,
                                 budget_temp=a.temp, **extra)
            runs.append(sweep.RunConfig(f"quest-{b}-{alloc}", cfg))
    model, tok = sweep.load_model(a.model)
    nl, hkv = model.config.num_hidden_layers, model.config.num_key_value_heads
    weights = {r.label: budgets.layer_head_weights(r.config, nl, hkv) for r in runs[1:]}
    tmpl = 0
    if a.chat and getattr(tok, "chat_template", None):
        tmpl = chat_template_tokens(tok)
    g = RulerGenerator(tok, None, a.seed, tmpl)
    samples = [s for t in a.tasks.split(",") for s in g.generate(t, a.length, a.num_samples)]
    t0 = time.time()
    recs = sweep.ruler_sweep(model, tok, samples, runs, a.out + ".jsonl", a.block_size, True, a.chat,
                             max_new_tokens=a.max_new_tokens)
    rows = []
    for r in runs:
        per_task = {}
        for t in a.tasks.split(","):
            sc = [x["runs"][r.label]["score"] for x in recs if x["task"] == t]
            per_task[t] = round(100 * sum(sc) / max(1, len(sc)), 1)
        allsc = [x["runs"][r.label]["score"] for x in recs]
        m, hw, n = mean_ci95(allsc)
        agree = [float(x["runs"][r.label]["pred"].strip() == x["runs"]["dense"]["pred"].strip()) for x in recs]
        ious = [x["runs"][r.label]["iou"] for x in recs if x["runs"][r.label].get("iou")]
        att = [x["runs"][r.label]["attended_fraction"] for x in recs if x["runs"][r.label].get("attended_fraction") is not None]
        row = {"run": r.label, "allocation": None if r.dense else r.config.budget_allocation,
               "token_budget": None if r.dense else r.config.token_budget, "score": round(100 * m, 1),
               "ci95": round(100 * hw, 1), "n": n, "per_task": per_task,
               "same_as_dense": round(100 * sum(agree) / len(agree), 1),
               "attended_fraction": round(sum(att) / len(att), 4) if att else None,
               "iou": round(sum(i["iou_mean"] for i in ious) / len(ious), 4) if ious else None,
               "attention_recall": round(sum(i["recall_mean"] for i in ious) / len(ious), 4) if ious else None}
        if not r.dense:
            w = weights[r.label][[i for i in range(nl) if i not in r.config.dense_layers]]
            row["weights_min_max"] = [round(float(w.min()), 3), round(float(w.max()), 3)]
        rows.append(row)
    out = {"model": Path(a.model).name, "length": a.length, "tasks": a.tasks.split(","), "samples_per_task": a.num_samples,
           "block_size": a.block_size, "sink_tokens": a.sink_tokens, "recent_tokens": a.recent_tokens,
           "beta": a.beta, "temp": a.temp, "head_budgets": a.head_budgets, "max_new_tokens": a.max_new_tokens,
           "chat": a.chat, "rows": rows, "argv": sys.argv[1:] if argv is None else argv,
           "elapsed_s": round(time.time() - t0, 1),
           "note": f"SMALL SAMPLE: {len(recs)} prompts in all; differences of a few points are noise (see ci95)"}
    Path(a.out + ".json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [f"# Budget allocation at equal total budget — {out['model']}, Quest, {a.length} tokens",
             "", f"**Small sample: {len(recs)} prompts ({a.num_samples} per task); treat gaps under the CI as noise.**",
             f"Pages of {a.block_size} tokens, sink {a.sink_tokens} + recent {a.recent_tokens} tokens, beta {a.beta}, "
             f"temp {a.temp}, greedy, at most {a.max_new_tokens} new tokens, offline sweep (HF + the backend's selectors).",
             "", "| run | score | ±ci95 | " + " | ".join(a.tasks.split(",")) + " | same as dense % | attended | IoU | attn recall | w min-max |",
             "|" + "---|" * (8 + len(a.tasks.split(",")))]
    for r in rows:
        lines.append(f"| {r['run']} | {r['score']} | {r['ci95']} | " + " | ".join(str(r['per_task'][t]) for t in a.tasks.split(","))
                     + f" | {r['same_as_dense']} | {r['attended_fraction']} | {r['iou']} | {r['attention_recall']} | "
                     + f"{r.get('weights_min_max', '')} |")
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
