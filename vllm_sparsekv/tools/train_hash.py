"""`sparsekv train-hash MODEL --out CKPT`: train the Spotlight hash (methods/spotlight.py).

1. **Collect.** Hugging Face transformers runs MODEL (any local HF folder; CPU, float32) over
   training text: by default the Paul Graham essays (minus a held-out set, recorded in the
   checkpoint) and Python's standard-library sources; `--text FILE ...` replaces them. A capture
   hook on the attention interface sees each layer's post-RoPE queries and keys. For `--max-que`
   sampled query positions t per sequence it computes exact causal attention, sums it over each KV
   head's GQA group, and ranks the *candidate* keys — positions in [sink, t - recent], the ones the
   backend does not attend anyway — into the oracle top (`--top-fraction` of the candidates, at most
   `--max-top`) and a sample of the others (`--max-oth`, a quarter of them hard: ranked just below
   the top). Kept in float16; the collected set is cached next to the output (`CKPT.collect.pt`)
   so a resumed run skips this step.
2. **Train**, layer by layer, a per-KV-head MLP for keys and one for queries
   (`x @ skip + act(x @ w1 + b1) @ w2 + b2`, `hash_bits` outputs), initialised to the linear hash
   of `hash_seed` (w2 = b2 = 0), relaxed with tanh; the score of key j for query i is the
   group-summed code agreement `sum_g tanh(l_q(q_g)) . tanh(l_k(k_j)) / bits`. Loss: Bradley-Terry
   over all (top, other) pairs, `softplus(-tau * (s_top - s_oth))`; the pairwise tensor is
   Hkv x que x top x oth, bounded by the three caps. After every epoch the hard (sign) codes are
   scored on validation sequences: token IoU of the hash's top-k with the oracle top-k among the
   candidates at 2%, 5%, 10% of them (epoch 0 = the untrained linear hash). The epoch with the best
   validation IoU at `--top-fraction` is kept.
3. **Checkpoint** after every layer (atomic replace); rerunning the same command resumes at the
   first untrained layer. Format: methods/spotlight.py.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

from vllm_sparsekv.methods.hash import linear_projection
from vllm_sparsekv.methods.spotlight import FORMAT, PARAMS, SIDES, layer_logits

HOOK_NAME = "sparsekv_capture"
VAL_FRACTIONS = (0.02, 0.05, 0.10)
# Settings that must agree between a checkpoint and the run that resumes it.
RESUME_KEYS = ("hash_bits", "hidden", "activation", "seq_len", "num_seqs", "val_seqs", "max_que", "max_top",
               "max_oth", "top_fraction", "sink", "recent", "seed", "hash_seed", "text")


def log(msg: str) -> None:
    try:
        from tqdm import tqdm
        tqdm.write(msg, file=sys.stderr)
    except ImportError:  # pragma: no cover
        print(msg, file=sys.stderr, flush=True)


def _bar(total: int, desc: str, initial: int = 0, disable: bool = False):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, initial=initial, disable=disable, dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        class _Null:
            def update(self, n=1): ...
            def set_postfix(self, **k): ...
            def close(self): ...
        return _Null()


# ---------------------------------------------------------------------------------------- text


def heldout_essay_names(names: list[str]) -> list[str]:
    """Every 8th essay (sorted names, index % 8 == 7): never trained on; benchmarks evaluate on them."""
    return [n for i, n in enumerate(sorted(names)) if i % 8 == 7]


def default_corpus() -> tuple[list[tuple[str, str]], list[str]]:
    """[(source name, text)] for training — essays minus the held-out ones, then stdlib code —
    and the held-out essay names."""
    from sparsekv_eval.haystack import code_corpus, find_essays

    try:
        essays = find_essays()
    except Exception:  # noqa: BLE001 - fall back to fetching them into data/
        from vllm_sparsekv.models import ensure_essays
        essays = find_essays(str(ensure_essays()))
    held = set(heldout_essay_names([n for n, _ in essays]))
    train = "\n\n".join(t for n, t in sorted(essays) if n not in held)
    return [("essays", train), ("python-stdlib", code_corpus(1_500_000))], sorted(held)


def make_sequences(tokenizer, sources: list[tuple[str, str]], seq_len: int, num_seqs: int, val_seqs: int,
                   seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Non-overlapping windows of seq_len tokens, spread evenly over the sources (round robin);
    validation windows are disjoint from the training ones."""
    pools = []
    for name, text in sources:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        wins = [torch.tensor(ids[i:i + seq_len]) for i in range(0, len(ids) - seq_len + 1, seq_len)]
        if not wins:
            raise ValueError(f"text source {name!r} has {len(ids)} tokens, fewer than --seq-len {seq_len}")
        random.Random(seed).shuffle(wins)
        pools.append(wins)
    out, i = [], 0
    while len(out) < num_seqs + val_seqs:
        if all(i >= len(p) for p in pools):
            raise ValueError(f"the text gives only {len(out)} windows of {seq_len} tokens; "
                             f"need {num_seqs + val_seqs} (--num-seqs + --val-seqs)")
        for p in pools:
            if i < len(p) and len(out) < num_seqs + val_seqs:
                out.append(p[i])
        i += 1
    # interleaved sources on both sides of the split
    return out[val_seqs:], out[:val_seqs]


# ---------------------------------------------------------------------------------------- collection


class _Collector:
    """Attention-interface hook: per layer, sample queries and rank their candidate keys."""

    def __init__(self, opts: dict):
        self.o = opts
        self.train = True
        self.gen = torch.Generator()
        self.out: dict[int, dict] = {}

    def positions(self, L: int) -> torch.Tensor:
        o = self.o
        lo = o["sink"] + o["recent"] + max(16, math.ceil(1 / o["top_fraction"]))  # >= 1 top and some others
        if lo >= L:
            raise ValueError(f"--seq-len {L} too short for sink {o['sink']} + recent {o['recent']}")
        n = min(o["max_que"], L - lo)
        return torch.sort(torch.randperm(L - lo, generator=self.gen)[:n] + lo).values

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        layer = int(module.layer_idx)
        o = self.o
        q = query[0].float()  # [Hq, L, D]
        k = key[0].float()  # [Hkv, L, D]
        hq, L, d = q.shape
        hkv = k.shape[0]
        g = hq // hkv
        scale = scaling if scaling is not None else d ** -0.5
        t = self.positions(L)  # [nq]
        qs = q[:, t]  # [Hq, nq, D]
        logits = torch.einsum("hnd,hld->hnl", qs, k.repeat_interleave(g, 0)) * scale
        j = torch.arange(L)
        logits.masked_fill_(j[None, None, :] > t[None, :, None], float("-inf"))
        attn = torch.softmax(logits, -1).view(hkv, g, len(t), L).sum(1)  # [Hkv, nq, L]
        cand = (j[None, :] >= o["sink"]) & (j[None, :] <= (t[:, None] - o["recent"]))  # [nq, L]
        attn = torch.where(cand[None], attn, torch.full_like(attn, -1.0))
        order = torch.sort(attn, dim=-1, descending=True, stable=True).indices  # candidates first
        ncand = cand.sum(-1)  # [nq]
        ktop = (ncand.float() * o["top_fraction"]).ceil().long().clamp(1, o["max_top"])
        rec = {"q": qs.permute(1, 0, 2).half(), "k": k.permute(1, 0, 2).half(), "t": t.short(),
               "ncand": ncand.short()}
        if self.train:
            rec["top"] = order[..., :o["max_top"]].short()  # valid where rank < ktop
            rec["ktop"] = ktop.short()
            # others: ranks in [ktop, ncand); a quarter hard (within 4 x ktop of the top)
            no = o["max_oth"]
            nhard = no // 4
            u = torch.rand(hkv, len(t), no, generator=self.gen)
            span = (ncand - ktop).clamp(min=1).float()
            hard_span = torch.minimum(span, 4 * ktop.float())
            width = torch.cat([hard_span[None, :, None].expand(hkv, -1, nhard),
                               span[None, :, None].expand(hkv, -1, no - nhard)], -1)
            ranks = (ktop[None, :, None] + (u * width).long()).clamp(max=L - 1)
            rec["oth"] = torch.gather(order, -1, ranks).short()
        else:
            kv = max(1, math.ceil(max(VAL_FRACTIONS) * int(ncand.max())))
            rec["order"] = order[..., :kv].short()
        self.out.setdefault(layer, []).append(rec)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kw)


@torch.no_grad()
def collect(model, train_seqs, val_seqs, opts: dict, progress: bool = True) -> dict:
    """{"train": {layer: [rec per seq]}, "val": {layer: [rec per seq]}} (float16 / int16 tensors)."""
    from transformers import AttentionInterface

    col = _Collector(opts)
    col.gen.manual_seed(opts["seed"])
    AttentionInterface.register(HOOK_NAME, col)
    mods = [m for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")]
    prev = [m.config._attn_implementation for m in mods]
    for m in mods:
        m.config._attn_implementation = HOOK_NAME
    res = {}
    bar = _bar(len(train_seqs) + len(val_seqs), "collect", disable=not progress)
    try:
        for split, seqs in (("train", train_seqs), ("val", val_seqs)):
            col.train = split == "train"
            col.out = {}
            body = getattr(model, "model", model)  # the decoder stack: no LM head needed
            for s in seqs:
                body(input_ids=s[None].to(next(model.parameters()).device), use_cache=False)
                bar.update(1)
            res[split] = col.out
    finally:
        bar.close()
        for m, v in zip(mods, prev):
            m.config._attn_implementation = v
    return res


# ---------------------------------------------------------------------------------------- model


def init_layer(hkv: int, d: int, bits: int, hidden: int, layer: int, hash_seed: int, recs: list[dict]) -> dict:
    """Parameters that reproduce the linear hash of `hash_seed` exactly (w2 = b2 = 0), scaled so
    that the logits are O(1) on the data (the sign does not change)."""
    gen = torch.Generator().manual_seed(hash_seed * 7919 + layer + 1)
    proj = linear_projection(hkv, d, bits, hash_seed, layer)
    p = {}
    k = torch.cat([r["k"] for r in recs]).float()  # [M, Hkv, D]
    q = torch.cat([r["q"] for r in recs]).float()  # [M, Hq, D]
    g = q.shape[1] // hkv
    for side, x in (("k", k), ("q", q.view(q.shape[0], hkv, g, d).transpose(1, 2).reshape(-1, hkv, d))):
        y = torch.einsum("mhd,hdb->mhb", x, proj)
        std = y.std(dim=(0, 2)).clamp(min=1e-6)  # [Hkv]
        xs = x.std(dim=(0, 2)).clamp(min=1e-6)
        p[f"{side}_skip"] = proj / std[:, None, None]
        p[f"{side}_w1"] = torch.randn(hkv, d, hidden, generator=gen) / (math.sqrt(d) * xs[:, None, None])
        p[f"{side}_b1"] = torch.zeros(hkv, hidden)
        p[f"{side}_w2"] = torch.zeros(hkv, hidden, bits)
        p[f"{side}_b2"] = torch.zeros(hkv, bits)
    return p


def _group_sum(zq: torch.Tensor, hkv: int) -> torch.Tensor:
    """[nq, Hq, bits] -> [nq, Hkv, bits] (the score is linear in the query codes)."""
    n, hq, b = zq.shape
    return zq.view(n, hkv, hq // hkv, b).sum(2)


def pair_loss(p: dict, rec: dict, tau: torch.Tensor, activation: str) -> torch.Tensor:
    k, q = rec["k"].float(), rec["q"].float()
    hkv = k.shape[1]
    bits = p["k_skip"].shape[-1]
    zk = torch.tanh(layer_logits(p, k, "k", activation))  # [L, Hkv, bits]
    zq = _group_sum(torch.tanh(layer_logits(p, q, "q", activation)), hkv)  # [nq, Hkv, bits]
    S = torch.einsum("nhb,lhb->hnl", zq, zk) / bits  # [Hkv, nq, L]
    st = torch.gather(S, -1, rec["top"].long())  # [Hkv, nq, T]
    so = torch.gather(S, -1, rec["oth"].long())  # [Hkv, nq, O]
    valid = torch.arange(st.shape[-1])[None, None, :] < rec["ktop"].long()[None, :, None]
    z = torch.nn.functional.softplus(-tau * (st[..., :, None] - so[..., None, :]))  # [Hkv, nq, T, O]
    w = valid[..., None].float()
    return (z * w).sum() / (w.sum() * so.shape[-1]).clamp(min=1)


@torch.no_grad()
def val_iou(p: dict, recs: list[dict], opts: dict, activation: str) -> dict[float, float]:
    """Mean token IoU (hard codes) of the hash top-k vs the oracle top-k among the candidates."""
    out = {f: [] for f in VAL_FRACTIONS}
    for rec in recs:
        k, q = rec["k"].float(), rec["q"].float()
        hkv = k.shape[1]
        L = k.shape[0]
        ck = torch.sign(layer_logits(p, k, "k", activation))
        cq = _group_sum(torch.sign(layer_logits(p, q, "q", activation)), hkv)
        S = torch.einsum("nhb,lhb->hnl", cq, ck)  # group-summed agreement == 2 x Hamming sim - const
        t = rec["t"].long()
        j = torch.arange(L)
        cand = (j[None, :] >= opts["sink"]) & (j[None, :] <= (t[:, None] - opts["recent"]))
        S = torch.where(cand[None], S, torch.full_like(S, float("-inf")))
        hs = torch.sort(S, dim=-1, descending=True, stable=True).indices  # ties -> lower index
        ncand = rec["ncand"].long()
        order = rec["order"].long()
        for f in VAL_FRACTIONS:
            kk = (ncand.float() * f).ceil().long().clamp(min=1)  # [nq]
            r = torch.arange(max(int(kk.max()), 1))
            m = (r[None, :] < kk[:, None])[None].expand(hkv, -1, -1)  # [Hkv, nq, kmax]
            A = torch.zeros(hkv, len(t), L + 1, dtype=torch.bool)
            B = torch.zeros_like(A)
            pad = torch.full_like(m, L, dtype=torch.long)
            A.scatter_(-1, torch.where(m, hs[..., :m.shape[-1]], pad), True)
            B.scatter_(-1, torch.where(m, order[..., :m.shape[-1]], pad), True)
            inter = (A[..., :L] & B[..., :L]).sum(-1).float()
            out[f].append((inter / (2 * kk[None].float() - inter)).flatten())
    return {f: float(torch.cat(v).mean()) for f, v in out.items()}


def train_layer(layer: int, train_recs: list[dict], val_recs: list[dict], opts: dict, bar=None) -> tuple[dict, dict]:
    o = opts
    k0 = train_recs[0]["k"]
    hkv, d = k0.shape[1], k0.shape[2]
    torch.manual_seed(o["seed"] * 1009 + layer)
    p = init_layer(hkv, d, o["hash_bits"], o["hidden"], layer, o["hash_seed"], train_recs[:4])
    params = {n: torch.nn.Parameter(v.clone()) for n, v in p.items()}
    log_tau = torch.nn.Parameter(torch.tensor(math.log(o["tau"])))
    opt = torch.optim.Adam([*params.values(), log_tau], lr=o["lr"])
    act = o["activation"]
    hist = []
    v = val_iou(p, val_recs, o, act) if val_recs else {}
    best = (v.get(o["top_fraction"], 0.0), 0, {n: t.clone() for n, t in p.items()})
    hist.append({"epoch": 0, "loss": None, "val_iou": v})
    log(f"layer {layer:>3} epoch 0 (linear hash): val IoU " + " ".join(f"{f:.0%} {x:.3f}" for f, x in v.items()))
    rng = random.Random(o["seed"] + layer)
    for ep in range(1, o["epochs"] + 1):
        order = list(range(len(train_recs)))
        rng.shuffle(order)
        tot = 0.0
        for i in order:
            loss = pair_loss(params, train_recs[i], log_tau.exp(), act)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += float(loss.detach())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(layer=layer, epoch=ep, loss=f"{float(loss.detach()):.4f}")
        cur = {n: t.detach().clone() for n, t in params.items()}
        v = val_iou(cur, val_recs, o, act) if val_recs else {}
        mean_loss = tot / max(len(order), 1)
        hist.append({"epoch": ep, "loss": mean_loss, "val_iou": v})
        log(f"layer {layer:>3} epoch {ep} loss {mean_loss:.4f} tau {float(log_tau.detach().exp()):.2f}: val IoU "
            + " ".join(f"{f:.0%} {x:.3f}" for f, x in v.items()))
        if not val_recs or v[o["top_fraction"]] > best[0]:
            best = (v.get(o["top_fraction"], 0.0), ep, cur)
    return best[2], {"history": hist, "best_epoch": best[1]}


# ---------------------------------------------------------------------------------------- driver


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_hash(model, train_seqs: list[torch.Tensor], val_seqs: list[torch.Tensor], out: str | Path, opts: dict,
               model_id: str = "", meta: dict | None = None, progress: bool = True, overwrite: bool = False,
               keep_collect: bool = False) -> dict:
    """Collect, train every layer, checkpoint after each one; resumes from `out` when it exists."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    nl = cfg.num_hidden_layers
    hkv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    settings = {k: opts[k] for k in RESUME_KEYS if k in opts}
    # what the collected activations depend on besides the settings
    fingerprint = {"model": model_id, "geometry": [nl, hkv, hd],
                   "tokens": [int(sum(int(s.sum()) * (i + 1) for i, s in enumerate(ss))) for ss in (train_seqs, val_seqs)]}
    ckpt = None
    if out.exists() and not overwrite:
        ckpt = torch.load(out, map_location="cpu", weights_only=True)
        old = ckpt.get("train", {}).get("settings", {})
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if ckpt.get("format") != FORMAT or diff or int(ckpt["num_layers"]) != nl:
            raise SystemExit(f"{out} exists with other settings {diff or ''}; pass --overwrite to start over")
        if ckpt.get("complete"):
            log(f"{out}: complete ({nl} layers); nothing to do (--overwrite retrains)")
            return ckpt
        log(f"{out}: resuming, layers done: {sorted(int(k) for k in ckpt['layers'])}")
    if ckpt is None:
        ckpt = {"format": FORMAT, "model": model_id, "num_layers": nl, "num_heads": cfg.num_attention_heads,
                "num_kv_heads": hkv, "head_dim": hd, "hash_bits": opts["hash_bits"], "hidden": opts["hidden"],
                "activation": opts["activation"], "layers": {}, "complete": False,
                "train": {"settings": settings, "layers": {}, **(meta or {})}}
    todo = [l for l in range(nl) if l not in {int(k) for k in ckpt["layers"]}]  # noqa: E741
    cache = out.with_name(out.name + ".collect.pt")
    data = None
    if cache.exists():
        blob = torch.load(cache, map_location="cpu", weights_only=True)
        if blob.get("settings") == settings and blob.get("fingerprint") == fingerprint:
            data = blob["data"]
            log(f"collected activations from {cache}")
    if data is None:
        t0 = time.time()
        data = collect(model, train_seqs, val_seqs, opts, progress)
        log(f"collected {len(train_seqs)} + {len(val_seqs)} sequences in {time.time() - t0:.0f} s")
        if todo and len(todo) > 1 or keep_collect:
            _atomic_save({"settings": settings, "fingerprint": fingerprint, "data": data}, cache)
    bar = _bar(len(todo) * opts["epochs"] * len(train_seqs), "train", disable=not progress)
    try:
        for layer in todo:
            p, info = train_layer(layer, data["train"][layer], data["val"].get(layer, []), opts, bar)
            ckpt["layers"][layer] = {n: t.float().contiguous() for n, t in p.items()}
            ckpt["train"]["layers"][layer] = info
            ckpt["complete"] = len(ckpt["layers"]) == nl
            _atomic_save(ckpt, out)
    finally:
        bar.close()
    if ckpt["complete"] and cache.exists() and not keep_collect:
        cache.unlink()
    summary = summarize(ckpt)
    ckpt["train"]["summary"] = summary
    _atomic_save(ckpt, out)
    log(f"saved {out} ({out.stat().st_size / 1e6:.1f} MB); mean val IoU " + ", ".join(
        f"{f}: linear {summary['linear'][f]:.3f} -> trained {summary['trained'][f]:.3f}" for f in summary["linear"]))
    return ckpt


def summarize(ckpt: dict) -> dict:
    lin, tr = {}, {}
    for info in ckpt["train"]["layers"].values():
        h = info["history"]
        for f, v in h[0]["val_iou"].items():
            lin.setdefault(str(f), []).append(v)
        for f, v in h[info["best_epoch"]]["val_iou"].items():
            tr.setdefault(str(f), []).append(v)
    avg = lambda d: {f: sum(v) / len(v) for f, v in d.items()}  # noqa: E731
    return {"linear": avg(lin), "trained": avg(tr)}


def add_parser(sub) -> None:
    p = sub.add_parser("train-hash", help="train the Spotlight hash (method 'spotlight') for a model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="local HF model folder")
    p.add_argument("--out", required=True, help="checkpoint path (resumed if it exists)")
    p.add_argument("--text", nargs="*", default=None,
                   help="training text files (default: the essays minus the held-out ones, and stdlib code)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: MODEL)")
    p.add_argument("--hash-bits", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128, help="hidden units of the MLP")
    p.add_argument("--activation", default="silu", choices=["silu", "relu", "tanh"])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--num-seqs", type=int, default=12, help="training sequences")
    p.add_argument("--val-seqs", type=int, default=2, help="validation sequences")
    p.add_argument("--max-que", type=int, default=128, help="query positions per sequence and layer")
    p.add_argument("--max-top", type=int, default=32, help="oracle-top keys per query (cap)")
    p.add_argument("--max-oth", type=int, default=96, help="other keys per query")
    p.add_argument("--top-fraction", type=float, default=0.05, choices=list(VAL_FRACTIONS),
                   help="oracle top = this fraction of the candidate keys (capped by --max-top)")
    p.add_argument("--sink", type=int, default=64, help="leading tokens excluded from the ranking (always attended)")
    p.add_argument("--recent", type=int, default=64, help="trailing tokens excluded from the ranking")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--tau", type=float, default=8.0, help="initial Bradley-Terry temperature (learned)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hash-seed", type=int, default=0, help="linear hash the training starts from (config hash_seed)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="start over even if --out exists")
    p.add_argument("--keep-collect", action="store_true", help="keep OUT.collect.pt after training")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)


def main(a) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if a.hash_bits % 32 or not 32 <= a.hash_bits <= 256:
        raise SystemExit(f"--hash-bits must be a multiple of 32 in [32, 256], got {a.hash_bits}")
    if a.threads:
        torch.set_num_threads(a.threads)
    opts = {k: getattr(a, k) for k in ("hash_bits", "hidden", "activation", "seq_len", "num_seqs", "val_seqs",
                                       "max_que", "max_top", "max_oth", "top_fraction", "sink", "recent",
                                       "epochs", "lr", "tau", "seed", "hash_seed")}
    tok = AutoTokenizer.from_pretrained(a.tokenizer or a.model)
    meta = {}
    if a.text:
        sources = [(f, Path(f).read_text(encoding="utf-8", errors="replace")) for f in a.text]
        opts["text"] = sorted(os.path.abspath(f) for f in a.text)
    else:
        sources, held = default_corpus()
        meta["heldout_essays"] = held
        opts["text"] = "default"
    train_seqs, val_seqs = make_sequences(tok, sources, a.seq_len, a.num_seqs, a.val_seqs, a.seed)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    model_id = getattr(model.config, "_name_or_path", "") or str(a.model)
    train_hash(model, train_seqs, val_seqs, a.out, opts, model_id=str(Path(a.model).name) or model_id, meta=meta,
               progress=not a.no_progress, overwrite=a.overwrite, keep_collect=a.keep_collect)
    return 0
