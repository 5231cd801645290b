"""IoU vs the oracle top-k for linear hashing (`hash`), trained hashing (`spotlight`) and Quest, on
held-out text (the essays that `sparsekv train-hash` never trains on, listed in the checkpoint).

Two measurements, both with no forced sink/recent pages or tokens on either side:

- **page IoU** (what the backend selects): the sweep's IoU probe (`eval/sweep.py`, `IouProbe`)
  along the dense greedy decode of each prompt: at every decode step and sparse layer, each method's
  selector scores the pages (the same code as the backend), its top ceil(P * f) pages are compared
  with the top pages by exact attention mass (summed over the GQA group).
- **token IoU** (Spotlight's own metric; Quest has none: it scores pages): for sampled query
  positions inside each prompt (the trainer's validation code), the hash's top-k tokens among
  positions [sink, t - recent] vs the oracle top-k, k = f x candidates; linear = the untrained
  start of the same MLP (exactly the `hash` method's codes), trained = the checkpoint.

    python benchmarks/spotlight_iou.py --model data/models/SmolLM2-135M-Instruct \\
        --ckpt data/spotlight/smollm2-135m.pt --out benchmarks/results/spotlight_iou_smollm2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

FRACTIONS = (0.02, 0.05, 0.10)
METHODS = ("hash", "spotlight", "quest")
SUM_VARIANTS = ("hash-sum", "spotlight-sum")  # hash_page_reduce="sum" (middle-page IoU only)


def heldout_windows(tok, names: list[str], length: int, n: int) -> list[list[int]]:
    from sparsekv_eval.haystack import find_essays
    from vllm_sparsekv.models import ensure_essays

    try:
        essays = dict(find_essays())
    except Exception:  # noqa: BLE001
        essays = dict(find_essays(str(ensure_essays())))
    text = "\n\n".join(essays[x] for x in names)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    wins = [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)]
    if len(wins) < n:
        raise SystemExit(f"held-out essays give {len(wins)} windows of {length} tokens, need {n}")
    step = len(wins) / n
    return [wins[int(i * step)] for i in range(n)]


@torch.no_grad()
def middle_page_iou(model, prompts, cfg, sparse_layers, block_size: int, queries: int,
                    sink_pages: int = 1, recent_pages: int = 1) -> dict:
    """Page IoU over the pages the backend's scores choose: the first `sink_pages` and last
    `recent_pages` pages (always attended) are left out of both sides. One dense forward per prompt;
    `queries` positions evenly spread over its second half act as decode queries (seq_len t + 1);
    every method's selector writes the prompt's keys once and scores the pages. k = ceil(f x the
    candidate pages), the oracle = the top-k candidate pages by exact attention mass (GQA group sum).
    Returns {method: {fraction: {"iou": [...], "recall": [...], "oracle_recall": [...]}}} per
    (prompt, layer, query, head) values averaged per layer."""
    import math

    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from sparsekv_eval import iou as I
    from vllm_sparsekv.methods import get_method
    from vllm_sparsekv.methods.base import LayerGeometry

    cap = {}

    def hook(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
        if module.layer_idx in sparse_layers:
            cap[module.layer_idx] = (query[0].float(), key[0].float(), scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)

    AttentionInterface.register("sparsekv_bench_capture", hook)
    mods = [m for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")]
    prev = [m.config._attn_implementation for m in mods]
    acc: dict = {}
    bs = block_size
    for ids in prompts:
        cap.clear()
        for m in mods:
            m.config._attn_implementation = "sparsekv_bench_capture"
        try:
            model.model(input_ids=torch.tensor([ids]), use_cache=False)
        finally:
            for m, v in zip(mods, prev):
                m.config._attn_implementation = v
        for layer in sparse_layers:
            q, k, scale = cap[layer]  # [Hq, L, D], [Hkv, L, D]
            hq, L, d = q.shape
            hkv = k.shape[0]
            P = -(-L // bs)
            kc = k.new_zeros(P * bs, hkv, d)
            kc[:L] = k.transpose(0, 1)
            key_cache = kc.view(P, bs, hkv, d)
            t = torch.linspace(L // 2, L - 1, queries).long()
            N = len(t)
            qb = q[:, t].transpose(0, 1).contiguous()  # [N, Hq, D]
            bt = torch.arange(P, dtype=torch.int32)[None].expand(N, -1).contiguous()
            sl = (t + 1).to(torch.int32)
            logits = torch.einsum("nhd,hld->nhl", qb, k.repeat_interleave(hq // hkv, 0)) * (scale or d ** -0.5)
            logits.masked_fill_(torch.arange(L)[None, None] > t[:, None, None], float("-inf"))
            ga = torch.softmax(logits, -1).view(N, hkv, hq // hkv, L).sum(2)  # [N, Hkv, L]
            pm = I.page_mass(ga.reshape(N * hkv, L), bs).view(N, hkv, P)
            npages = -(-(t + 1) // bs)
            pidx = torch.arange(P)
            cand = (pidx[None] >= sink_pages) & (pidx[None] < (npages - recent_pages)[:, None])  # [N, P]
            ncand = cand.sum(-1)
            pm_c = torch.where(cand[:, None], pm, torch.full_like(pm, float("-inf")))
            tot = torch.where(cand[:, None], pm, torch.zeros_like(pm)).sum(-1)
            for meth in (*METHODS, *SUM_VARIANTS):
                base = meth.removesuffix("-sum")
                opts = cfg.options(base).model_dump()
                if "page_reduce" in opts:
                    opts["page_reduce"] = "sum" if meth.endswith("-sum") else "max"
                mcfg = type(cfg).model_validate({**cfg.model_dump(), "method": base, base: opts})
                sel = get_method(base)(mcfg, LayerGeometry(hq, hkv, d, bs, layer))
                sel.allocate(P, torch.float32, torch.device("cpu"))
                sel.on_kv_write(k.transpose(0, 1).contiguous(), key_cache, torch.arange(L))
                sc = sel.score_pages(qb, key_cache, bt, sl, P)  # [N, Hkv, P]
                sc = torch.where(cand[:, None], sc, torch.full_like(sc, float("-inf")))
                for f in FRACTIONS:
                    kk = (ncand.float() * f).ceil().long().clamp(min=1)[:, None].expand(N, hkv)
                    a = I.topk_mask(sc, kk)
                    b = I.topk_mask(pm_c, kk)
                    ent = acc.setdefault(meth, {}).setdefault(f, {}).setdefault(layer, {"iou": [], "recall": [], "oracle_recall": []})
                    ent["iou"].append(I.iou(a, b).mean().item())
                    ent["recall"].append(((pm * a).sum(-1) / tot.clamp(min=1e-30)).mean().item())
                    ent["oracle_recall"].append(((pm * b).sum(-1) / tot.clamp(min=1e-30)).mean().item())
    out = {}
    for meth, per_f in acc.items():
        for f, per_l in per_f.items():
            lay = {l: {kk: sum(v) / len(v) for kk, v in e.items()} for l, e in per_l.items()}
            mean = {kk: sum(e[kk] for e in lay.values()) / len(lay) for kk in ("iou", "recall", "oracle_recall")}
            out.setdefault(meth, {})[f] = {**mean, "iou_per_layer": {str(l): round(e["iou"], 4) for l, e in lay.items()}}
    return out


def iou_table(rows: list[dict]) -> list[str]:
    """Markdown lines: one row per budget, IoU then recall of each of METHODS."""
    lines = ["| budget | " + " | ".join(METHODS) + " | recall " + " | recall ".join(METHODS) + " |",
             "|---|" + "---|" * (2 * len(METHODS))]
    for f in FRACTIONS:
        by = {r["method"]: r for r in rows if r["fraction"] == f}
        lines.append(f"| {f:.0%} | " + " | ".join(f"{by[m]['iou']:.3f}" for m in METHODS) + " | "
                     + " | ".join(f"{by[m]['recall']:.3f}" for m in METHODS) + " |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="decode steps probed per prompt")
    p.add_argument("--token-prompts", type=int, default=2, help="prompts also used for the token IoU")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--middle-queries", type=int, default=16, help="query positions per prompt for the middle-page IoU")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True, help="path prefix: OUT.json and OUT.md")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from vllm_sparsekv.config import SparseKVConfig
    from sparsekv_eval import sweep
    from vllm_sparsekv.methods.spotlight import load_checkpoint
    from vllm_sparsekv.tools import train_hash as T

    if not hasattr(sweep, "IouProbe"):
        raise SystemExit("eval/sweep.py has no IouProbe (needs the sweep's IoU probe)")
    ckpt = load_checkpoint(a.ckpt)
    held = ckpt["train"].get("heldout_essays")
    if not held:
        raise SystemExit(f"{a.ckpt} was trained on --text files: no held-out essay list")
    t0 = time.time()
    model, tok = sweep.load_model(a.model)
    prompts = heldout_windows(tok, held, a.length, a.prompts)
    cfg = SparseKVConfig(method="spotlight", spotlight={"checkpoint": str(Path(a.ckpt).resolve())})
    sparse_layers = [i for i in range(ckpt["num_layers"]) if i not in cfg.dense_layers]
    probe = sweep.IouProbe(list(METHODS), FRACTIONS, a.steps, cfg)
    page: dict[str, list[dict]] = {}
    for i, ids in enumerate(prompts):
        r = sweep.sweep_prompt(model, ids, [sweep.RunConfig("dense")], a.steps + 1, block_size=a.block_size,
                               iou_probe=probe)["dense"]["probe"]
        for k, v in r.items():
            page.setdefault(k, []).append(v)
        print(f"prompt {i}: " + " ".join(f"{k} {v['iou_mean']:.3f}" for k, v in sorted(r.items())),
              file=sys.stderr, flush=True)
    page_rows = []
    for m in METHODS:
        for f in FRACTIONS:
            vs = page[f"{m}@{f:g}"]
            avg = lambda key: sum(v[key] for v in vs) / len(vs)  # noqa: E731
            per_layer = {l: sum(sum(v["iou_per_layer_head"][l]) / len(v["iou_per_layer_head"][l]) for v in vs) / len(vs)
                         for l in vs[0]["iou_per_layer_head"]}
            page_rows.append({"method": m, "fraction": f, "iou": avg("iou_mean"), "recall": avg("recall_mean"),
                              "oracle_recall": avg("oracle_recall_mean"), "steps": sum(v["steps"] for v in vs),
                              "iou_per_layer": {l: round(x, 4) for l, x in per_layer.items()}})
    mid = middle_page_iou(model, prompts, cfg, sparse_layers, a.block_size, a.middle_queries)
    mid_rows = [{"method": m, "fraction": f, **mid[m][f]} for m in (*METHODS, *SUM_VARIANTS) for f in FRACTIONS]
    print("middle pages: " + " ".join(f"{r['method']}@{r['fraction']:g} {r['iou']:.3f}" for r in mid_rows),
          file=sys.stderr, flush=True)
    # token IoU: the trainer's validation measure on the held-out prompts
    s = ckpt["train"]["settings"]
    opts = dict(s, max_que=s["max_que"], seed=1234)
    seqs = [torch.tensor(x) for x in prompts[:a.token_prompts]]
    data = T.collect(model, [], seqs, opts, progress=False)["val"]
    tok_lin = {f: [] for f in T.VAL_FRACTIONS}
    tok_tr = {f: [] for f in T.VAL_FRACTIONS}
    for layer in sparse_layers:
        recs = data[layer]
        hkv, d = recs[0]["k"].shape[1:]
        lin = T.init_layer(hkv, d, ckpt["hash_bits"], ckpt["hidden"], layer, s["hash_seed"], recs)
        for f, v in T.val_iou(lin, recs, opts, ckpt["activation"]).items():
            tok_lin[f].append(v)
        for f, v in T.val_iou(ckpt["layers"][layer], recs, opts, ckpt["activation"]).items():
            tok_tr[f].append(v)
    token_rows = []
    for f in T.VAL_FRACTIONS:
        for name, d_ in (("hash", tok_lin), ("spotlight", tok_tr)):
            token_rows.append({"method": name, "fraction": f, "iou": sum(d_[f]) / len(d_[f]),
                               "iou_per_layer": {str(l): round(x, 4) for l, x in zip(sparse_layers, d_[f])}})
    summ = ckpt["train"].get("summary", {})
    res = {"model": Path(a.model).name, "checkpoint": {k: ckpt[k] for k in ("model", "num_layers", "num_kv_heads",
                                                                            "head_dim", "hash_bits", "hidden")},
           "train_settings": s, "train_val_iou": summ, "heldout_essays": held, "context": a.length,
           "prompts": a.prompts, "decode_steps_per_prompt": a.steps, "block_size": a.block_size,
           "sparse_layers": sparse_layers, "page_iou": page_rows, "middle_page_iou": mid_rows,
           "middle_queries_per_prompt": a.middle_queries, "token_iou": token_rows,
           "token_prompts": a.token_prompts, "token_queries_per_prompt_layer": opts["max_que"],
           "wall_s": round(time.time() - t0, 1), "argv": sys.argv[1:] if argv is None else argv}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    md = [f"# IoU vs oracle top-k: linear hash vs trained hash (Spotlight) vs Quest — {res['model']}", "",
          f"Held-out essays ({', '.join(held)}), {a.prompts} prompts of {a.length} tokens, sparse layers "
          f"{sparse_layers[0]}..{sparse_layers[-1]}, {ckpt['hash_bits']}-bit codes, pages of {a.block_size} tokens. "
          "No forced sink/recent pages on either side.", "",
          f"## Page IoU (decode queries, {a.steps} steps per prompt; budget = fraction of the context's pages)", "",
          *iou_table(page_rows)]
    orc = ", ".join(f"{r['oracle_recall']:.3f}" for r in page_rows if r["method"] == "hash")
    md += ["", f"recall = share of the exact attention mass inside the selected pages (oracle: {orc}).", "",
           "## Page IoU over the pages the scores choose (sink and recent page left out of both sides)", "",
           f"{a.middle_queries} query positions per prompt in its second half, k = ceil(f x candidate pages); "
           "recall = share of the candidate pages' attention mass inside the selection.", "",
           *iou_table(mid_rows)]
    md += ["", "With hash_page_reduce=\"sum\" (page score = sum of its tokens' Hamming similarities): "
           + "; ".join(f"{f:.0%}: " + ", ".join(f"{r['method']} {r['iou']:.3f}" for r in mid_rows
                                                   if r["fraction"] == f and r["method"] in SUM_VARIANTS)
                       for f in FRACTIONS)]
    orc = ", ".join(f"{r['oracle_recall']:.3f}" for r in mid_rows if r["method"] == "hash")
    md += ["", f"(oracle recall: {orc})", "",
           f"## Token IoU (Spotlight's metric; {opts['max_que']} query positions per prompt and layer, "
           f"{a.token_prompts} prompts; candidates = positions [sink, t - recent])", "",
           "| budget | linear hash | trained hash |", "|---|---|---|"]
    for f in T.VAL_FRACTIONS:
        rows = {r["method"]: r for r in token_rows if r["fraction"] == f}
        md.append(f"| {f:.0%} | {rows['hash']['iou']:.3f} | {rows['spotlight']['iou']:.3f} |")
    if summ:
        md += ["", "Trainer's validation IoU (token, training-distribution text, all layers, best epoch): "
               + ", ".join(f"{float(f):.0%}: linear {summ['linear'][f]:.3f} -> trained {summ['trained'][f]:.3f}"
                           for f in summ["linear"])]
    md += ["", f"Settings: {json.dumps(s)}", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
