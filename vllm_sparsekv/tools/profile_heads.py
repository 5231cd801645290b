"""``sparsekv profile-heads MODEL --out head_scores.json``: per-head InfScore profiling (DiliLazyKV).

A needle-in-a-haystack run (the essays by default) with exact attention from Hugging Face
transformers. For every (needle, context length, depth) test the model answers greedily; then one
forward pass over prompt + answer captures each layer's (post-RoPE) queries and keys through an
attention-interface hook, and only the rows that produced the answer tokens (the last prompt token
and the answer tokens but the last) are turned into exact softmax attention over all earlier
positions, in float32: ``[query heads, answer tokens, context]`` per layer, never a full
``T x T`` matrix.

Per (layer, query head, answer step), with K = ``--top_k_infscore`` and N the needle's tokens:

- diligent attention      D = mass of the top-K keys that lie in the needle
- subconscious attention  S = mass of the needle's keys outside the top-K
- distracted attention    F = mass of the top-K keys outside the needle
- diffuse-peripheral      P = mass of the other keys (outside both) = 1 - D - S - F
- DiliScore = D / (D + F)  (how much of the head's focused attention is on the needle)
- LazyScore = D / (D + S)  (how much of the needle's attention the focus captures)
- InfScore  = 2 * Dili * Lazy / (Dili + Lazy)  (their harmonic mean, attention-weighted)

(the released DiliLazyKV code computes exactly these weighted precision / recall / F1 terms; the
counts of top-K keys inside / outside the needle are kept too). Also HeadKV's retrieval-reasoning
score: the attention mass of the top-|N| keys that lie in the needle (HeadKV-R2's detection score
up to a constant), used by ``budget_allocation: headkv``.

Scores are averaged over answer steps, then over the tests whose answer passes the similarity gate
(``--similarity_threshold``, 0.2 as in the seed). The seed's gate is a sentence-embedding cosine
(all-MiniLM-L6-v2); we ship no embedding model, so the gate is lexical: token F1 (default) or
ROUGE-L against the expected answer. Per KV head, the GQA group's query heads are averaged (query
head q belongs to KV head q // group_size, as in ``repeat_kv``).

Output JSON: model, num_layers, num_heads, num_kv_heads, group_size, ``scores`` (name ->
[num_layers][num_kv_heads]), ``query_head_scores`` (name -> [num_layers][num_heads]), the tests
(answer, similarity, whether counted), and the arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

HOOK_NAME = "sparsekv_profile_heads"

# The seed's three needles (question, needle, answer), then ours.
SEED_NEEDLES = [
    {"question": "What are good ways to spend time in campus?",
     "needle": "The good ways to spend time in campus include relax and do nothing.",
     "answer": "Relax and do nothing."},
    {"question": "What habits are beneficial for health during Ph.D. career?",
     "needle": "The beneficial habits during Ph.D. career contain exercise and healthy diet.",
     "answer": "Exercise and healthy diet."},
    {"question": "Which year did Tom start high school?",
     "needle": "Tom was born in 2005. Tom started high school fifteen years after he was born.",
     "answer": "Tom started high school in 2020."},
]
OUR_NEEDLES = [
    {"question": "What is the secret ingredient of Grandma Rosa's tomato soup?",
     "needle": "The secret ingredient of Grandma Rosa's tomato soup is smoked paprika.",
     "answer": "Smoked paprika."},
    {"question": "Which city did the blue train leave from?",
     "needle": "The red train left from Oslo. The blue train left from the city where the red train arrived, which was Bergen.",
     "answer": "The blue train left from Bergen."},
]
SCORE_NAMES = ("infscore", "diliscore", "lazyscore", "diligent", "subconscious", "distracted", "diffuse",
               "headkv_retrieval", "topk_in_needle", "topk_outside_needle")
TEMPLATE = "\n\nBased on the content in the book, answer the question: {question}\nAnswer:"


# ---------------------------------------------------------------------------- attention capture


class _Capture:
    rows: torch.Tensor | None = None  # positions whose attention rows are wanted
    attn: dict[int, torch.Tensor] = {}  # layer -> [Hq, R, T] float32


_CAP = _Capture()


def _hook(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Exact attention rows for the captured positions, then SDPA for the model's output."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _CAP.rows is not None and query.shape[0] == 1:
        hq, hkv, d = query.shape[1], key.shape[1], query.shape[-1]
        g = hq // hkv
        t = key.shape[2]
        rows = _CAP.rows.to(query.device)
        q = query[0, :, rows].float()  # [Hq, R, D]
        k = key[0].float().repeat_interleave(g, dim=0)  # [Hq, T, D] (GQA: q head -> kv head q // g)
        s = torch.matmul(q, k.transpose(1, 2)) * (scaling if scaling is not None else 1.0 / math.sqrt(d))
        causal = torch.arange(t, device=s.device)[None, :] > rows[:, None]  # [R, T]
        s.masked_fill_(causal[None], float("-inf"))
        _CAP.attn[module.layer_idx] = torch.softmax(s, dim=-1)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def _register(model) -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(HOOK_NAME, _hook)
    model.config._attn_implementation = HOOK_NAME
    for m in model.modules():
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
            m.config._attn_implementation = HOOK_NAME


def attention_rows(model, ids: list[int], rows: list[int]) -> list[torch.Tensor]:
    """Exact attention of the given positions over positions ``<=`` each: per layer [Hq, R, T]."""
    _CAP.rows = torch.tensor(rows, dtype=torch.long)
    _CAP.attn = {}
    try:
        with torch.no_grad():
            model(torch.tensor([ids]), use_cache=False)
    finally:
        _CAP.rows = None
    return [_CAP.attn[i] for i in sorted(_CAP.attn)]


# ---------------------------------------------------------------------------- head metrics


def head_metrics(attn: torch.Tensor, needle: tuple[int, int], top_k: int) -> dict[str, torch.Tensor]:
    """attn [..., R, T] (rows sum to 1) -> each metric [...], averaged over the R rows."""
    s, e = needle
    t = attn.shape[-1]
    pos = torch.arange(t, device=attn.device)
    in_needle = (pos >= s) & (pos < e)
    k = min(top_k, t)
    vals, idx = attn.topk(k, dim=-1)
    top_in = in_needle[idx]
    diligent = (vals * top_in).sum(-1)
    distracted = (vals * ~top_in).sum(-1)
    needle_mass = (attn * in_needle).sum(-1)
    subconscious = (needle_mass - diligent).clamp_min(0)
    diffuse = (1.0 - diligent - distracted - subconscious).clamp_min(0)
    dili = torch.where(diligent + distracted > 1e-9, diligent / (diligent + distracted), torch.zeros_like(diligent))
    lazy = torch.where(diligent + subconscious > 1e-9, diligent / (diligent + subconscious), torch.zeros_like(diligent))
    inf = torch.where(dili + lazy > 1e-9, 2 * dili * lazy / (dili + lazy), torch.zeros_like(dili))
    n = max(1, e - s)
    v2, i2 = attn.topk(min(n, t), dim=-1)
    retrieval = (v2 * in_needle[i2]).sum(-1)
    out = {"infscore": inf, "diliscore": dili, "lazyscore": lazy, "diligent": diligent,
           "subconscious": subconscious, "distracted": distracted, "diffuse": diffuse,
           "headkv_retrieval": retrieval, "topk_in_needle": top_in.sum(-1).float(),
           "topk_outside_needle": (~top_in).sum(-1).float()}
    return {name: v.mean(-1) for name, v in out.items()}


def to_kv_heads(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[L, Hq] -> [L, Hkv]: the mean over each GQA group's query heads."""
    L, hq = x.shape
    return x.reshape(L, num_kv_heads, hq // num_kv_heads).mean(-1)


# ---------------------------------------------------------------------------- the test grid


def similarity(pred: str, ref: str, kind: str) -> float:
    from sparsekv_eval.metrics import qa_f1_score, rouge_score

    if not pred.strip():
        return 0.0
    return float(qa_f1_score(pred, ref) if kind == "f1" else rouge_score(pred, ref))


def load_haystack_ids(tokenizer, haystack_dir: str | None, max_tokens: int) -> list[int]:
    from sparsekv_eval.haystack import HaystackNotFound, find_essays

    try:
        docs = find_essays(haystack_dir)
    except HaystackNotFound:
        if haystack_dir:
            raise
        from vllm_sparsekv.models import ensure_essays

        docs = find_essays(str(ensure_essays()))
    ids: list[int] = []
    for _, text in docs:
        ids += tokenizer.encode(" ".join(text.split()) + " ", add_special_tokens=False)
        if len(ids) >= max_tokens:
            break
    if len(ids) < max_tokens:
        raise ValueError(f"the haystack has {len(ids)} tokens, fewer than --max_len {max_tokens}")
    return ids[:max_tokens]


def build_prompt(tokenizer, hay: list[int], needle: dict, length: int, depth: float, chat: bool):
    """Token ids of haystack-with-needle + question (about ``length`` tokens) and the needle span."""
    needle_ids = tokenizer.encode(" " + needle["needle"] + " ", add_special_tokens=False)
    tail = TEMPLATE.format(question=needle["question"])
    if chat and getattr(tokenizer, "chat_template", None):
        pre_text, post_text = _chat_parts(tokenizer)
        pre = tokenizer.encode(pre_text, add_special_tokens=False)
        post = tokenizer.encode(tail, add_special_tokens=False) + tokenizer.encode(post_text, add_special_tokens=False)
    else:
        pre = tokenizer.encode("", add_special_tokens=True)
        post = tokenizer.encode(tail, add_special_tokens=False)
    n_ctx = max(1, length - len(pre) - len(post) - len(needle_ids))
    ctx = hay[:n_ctx]
    at = int(round(len(ctx) * depth / 100.0))
    if 0 < at < len(ctx):  # back up to a sentence end (within 50 tokens) so the needle stands alone
        for j in range(at, max(0, at - 50), -1):
            if tokenizer.decode(ctx[j - 1:j]).rstrip().endswith((".", "?", "!")):
                at = j
                break
    ids = pre + ctx[:at] + needle_ids + ctx[at:] + post
    start = len(pre) + at
    return ids, (start, start + len(needle_ids))


def _chat_parts(tokenizer) -> tuple[str, str]:
    marker = "\x00MARK\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=True)
    pre, post = text.split(marker)
    return pre, post


def greedy_answer(model, tokenizer, ids: list[int], max_new_tokens: int) -> list[int]:
    eos = set()
    for e in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        eos |= set(e) if isinstance(e, (list, tuple)) else ({e} if e is not None else set())
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or next(iter(eos), 0))
    new = out[0, len(ids):].tolist()
    cut = []
    for t in new:
        if t in eos:
            break
        cut.append(t)
        if "\n" in tokenizer.decode([t]) and len(cut) > 1:
            break
    return cut or new[:1]


def profile(model, tokenizer, needles: list[dict], lengths: list[int], depths: list[float], top_k: int,
            threshold: float, sim_kind: str, haystack_dir: str | None, max_new_tokens: int, chat: bool,
            log=print) -> dict:
    cfg = model.config
    L, hq = cfg.num_hidden_layers, cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    hay = load_haystack_ids(tokenizer, haystack_dir, max(lengths))
    _register(model)
    acc = {n: torch.zeros(L, hq, dtype=torch.float64) for n in SCORE_NAMES}
    acc_all = {n: torch.zeros(L, hq, dtype=torch.float64) for n in SCORE_NAMES}
    tests, counted = [], 0
    total = len(needles) * len(lengths) * len(depths)
    t0 = time.time()
    for ni, nd in enumerate(needles):
        for length in lengths:
            for depth in depths:
                ids, span = build_prompt(tokenizer, hay, nd, length, depth, chat)
                ans = greedy_answer(model, tokenizer, ids, max_new_tokens)
                text = tokenizer.decode(ans, skip_special_tokens=True).strip()
                sim = similarity(text, nd["answer"], sim_kind)
                full = ids + ans[:-1]
                rows = list(range(len(ids) - 1, len(full)))  # the queries that produced each answer token
                per_layer = attention_rows(model, full, rows)
                m = _metrics_all(per_layer, span, top_k)
                used = sim > threshold
                for n in SCORE_NAMES:
                    acc_all[n] += m[n]
                    if used:
                        acc[n] += m[n]
                counted += used
                tests.append({"needle": ni, "length": len(ids), "target_length": length, "depth": depth,
                              "needle_span": list(span), "answer": text, "similarity": round(sim, 4),
                              "counted": bool(used)})
                log(f"[{len(tests)}/{total}] needle {ni} len {len(ids)} depth {depth:g}%: {text[:60]!r} "
                    f"sim {sim:.2f}{'' if used else ' (gated out)'}  {time.time() - t0:.0f}s")
    basis = acc if counted else acc_all
    denom = counted if counted else len(tests)
    q_scores = {n: (basis[n] / max(1, denom)) for n in SCORE_NAMES}
    return {
        "num_layers": L, "num_heads": hq, "num_kv_heads": hkv, "group_size": hq // hkv,
        "scores": {n: _round(to_kv_heads(v, hkv)) for n, v in q_scores.items()},
        "query_head_scores": {n: _round(v) for n, v in q_scores.items()},
        "tests_counted": counted, "tests_run": len(tests),
        "note": None if counted else "no test passed the similarity gate; scores average all tests",
        "tests": tests,
    }


def _metrics_all(per_layer: list[torch.Tensor], span, top_k: int) -> dict[str, torch.Tensor]:
    ms = [head_metrics(a, span, top_k) for a in per_layer]
    return {n: torch.stack([m[n] for m in ms]).double() for n in SCORE_NAMES}


def _round(x: torch.Tensor) -> list:
    return [[round(float(v), 6) for v in row] for row in x]


# ---------------------------------------------------------------------------- CLI


def _ints(x: str) -> list[int]:
    return [int(v) for v in x.replace(",", " ").split()]


def add_profile_parser(sub) -> None:
    p = sub.add_parser("profile-heads", help="InfScore / HeadKV head profiling (needle in a haystack, exact attention)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="local HF model folder (or hub id already in the cache)")
    p.add_argument("--out", required=True, help="output JSON (head_budgets file)")
    p.add_argument("--haystack_dir", default=None,
                   help="folder of .txt haystack files (default: the Paul Graham essays)")
    p.add_argument("--min_len", type=int, default=1024, help="shortest context in tokens")
    p.add_argument("--max_len", type=int, default=2048, help="longest context in tokens")
    p.add_argument("--context_intervals", type=int, default=3, help="context lengths from min_len to max_len")
    p.add_argument("--depths", type=float, nargs="+", default=[10, 30, 50, 70, 90],
                   help="needle depths in percent (e.g. --depths 10 50 90)")
    p.add_argument("--top_k_infscore", type=int, default=10, help="K of the top-K attention split")
    p.add_argument("--similarity_threshold", type=float, default=0.2,
                   help="tests count only when the answer's similarity exceeds this")
    p.add_argument("--similarity", choices=("f1", "rougeL"), default="f1",
                   help="answer-similarity measure of the gate (lexical; see the module doc)")
    p.add_argument("--needles", default="all", choices=("all", "seed", "ours"))
    p.add_argument("--needles_file", default=None, help="extra needles: JSONL with question, needle, answer")
    p.add_argument("--max_new_tokens", type=int, default=24)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.min_len > args.max_len or args.min_len < 64:
        raise SystemExit(f"--min_len ({args.min_len}) must be >= 64 and <= --max_len ({args.max_len})")
    n = max(1, args.context_intervals)
    lengths = sorted({round(v) for v in torch.linspace(args.min_len, args.max_len, n).tolist()})
    depths = sorted({d for d in args.depths if 0 <= d <= 100})
    if not depths:
        raise SystemExit("--depths: give percentages in [0, 100]")
    needles = {"all": SEED_NEEDLES + OUR_NEEDLES, "seed": SEED_NEEDLES, "ours": OUR_NEEDLES}[args.needles]
    if args.needles_file:
        with open(args.needles_file, encoding="utf-8") as f:
            needles = needles + [json.loads(ln) for ln in f if ln.strip()]
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                 attn_implementation="sdpa").eval()
    t0 = time.time()
    res = profile(model, tok, needles, lengths, depths, args.top_k_infscore, args.similarity_threshold,
                  args.similarity, args.haystack_dir, args.max_new_tokens, args.chat,
                  log=lambda s: print(s, file=sys.stderr, flush=True))
    out = {"model": Path(args.model).name if os.path.isdir(args.model) else args.model, **res,
           "needles": needles, "context_lengths": lengths, "depths": depths,
           "args": {k: v for k, v in vars(args).items() if k not in ("func", "_argv")},
           "argv": getattr(args, "_argv", None), "elapsed_s": round(time.time() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    inf = torch.tensor(res["scores"]["infscore"])
    top = sorted(((float(inf[l, h]), l, h) for l in range(inf.shape[0]) for h in range(inf.shape[1])), reverse=True)[:8]
    print(f"{res['tests_counted']}/{res['tests_run']} tests passed the gate; top KV heads by InfScore: "
          + ", ".join(f"L{l}H{h}={s:.3f}" for s, l, h in top))
    print(f"wrote {args.out}")
    return 0
