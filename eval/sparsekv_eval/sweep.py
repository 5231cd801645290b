"""Offline sweep driver: one dense prefill per prompt, many methods and budgets on top of it.

Hugging Face transformers runs the model; an attention-interface hook (``attn_implementation=
"sparsekv_sweep"``) replaces decode attention (one query token) with the backend's own path:
the method's ``PageSelector`` (``vllm_sparsekv.methods``: ``on_kv_write`` then ``score_pages``),
``kernels.select_pages`` with the budget rules of the backend's metadata builder, and
``kernels.sparse_paged_decode`` over a paged view of the HF cache. Prefill is dense (SDPA), as in
the backend. Because the selection code is the backend's, the two pick the same pages for the same
queries and keys; the per-request budget is the backend's own ``budgets.request_budget_pages``.

Per prompt: prefill once (dense), take the first token from it (as vLLM does), then for each
configuration decode greedily from a copy of the prefill cache. With ``collect_iou`` every sparse
decode step also computes exact attention and records, per layer and KV head, the IoU of the
selected pages with the oracle top pages at the same budget, and the attention mass covered.

Also ``decode_perplexity``: teacher-forced decode steps over the last tokens of a text, i.e.
perplexity *under sparse decode* (prompt logprobs through a server only measure dense prefill).

CLI::

    python -m sparsekv_eval.sweep --model ./smollm2 --lengths 2048,4096 --num-samples 30 \\
        --methods quest --budget-fractions 0.25,0.125,0.0625 --token-budgets 256,1024 \\
        --out benchmarks/results/sweep_smollm2.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

HOOK_NAME = "sparsekv_sweep"


@dataclass
class RunConfig:
    """One point of the sweep: a label plus a SparseKVConfig (None = dense)."""

    label: str
    config: Any = None  # vllm_sparsekv.config.SparseKVConfig | None

    @property
    def dense(self) -> bool:
        return self.config is None

    def row_fields(self) -> dict:
        if self.config is None:
            return {"method": "dense"}
        d = {"method": self.config.method}
        if self.config.budget_allocation != "uniform":
            d["budget_allocation"] = self.config.budget_allocation
        if self.config.budget_fraction is not None:
            d["budget_fraction"] = self.config.budget_fraction
        else:
            d["token_budget"] = self.config.token_budget
        return d


def resolve_methods(methods: Sequence[str]) -> list[str]:
    """Method names -> registered selector names (``vllm_sparsekv.methods.available()``).

    ``all`` expands to every registered method except ``full`` (the sparse path's dense baseline);
    ``dense`` is dropped (the dense run is always included). Unknown names raise, listing the
    registry, so a method added there later is sweepable without touching this file."""
    from vllm_sparsekv.methods import available

    avail = available()
    out: list[str] = []
    for m in methods:
        m = m.strip().lower()
        if m == "dense" or not m:
            continue
        names = [x for x in avail if x != "full"] if m == "all" else [m]
        for n in names:
            if n not in avail:
                raise ValueError(f"unknown sparsekv method {n!r}; registered: {', '.join(avail)}")
            if n not in out:
                out.append(n)
    return out


def make_configs(methods: Sequence[str], fractions: Sequence[float] = (), token_budgets: Sequence[int] = (),
                 include_dense: bool = True, label_suffix: str = "", **common) -> list[RunConfig]:
    """Dense plus every (method, budget). A method may name a budget allocation as ``method@alloc``
    (e.g. ``snapkv@headkv``: SnapKV's selection with HeadKV's per-head budgets; needs
    ``head_budgets`` in ``common`` for infscore/headkv). ``label_suffix`` keeps labels of runs with
    other common settings (sink/recent) apart when their records share a file."""
    from vllm_sparsekv.config import SparseKVConfig

    out = [RunConfig("dense")] if include_dense else []
    specs = []
    for spec in methods:
        m, _, alloc = spec.partition("@")
        specs += [(n, alloc) for n in resolve_methods([m]) if (n, alloc) not in specs]
    for m, alloc in specs:
        extra = dict(common, budget_allocation=alloc) if alloc else dict(common)
        if not alloc:
            extra.pop("head_budgets", None)
        name = f"{m}@{alloc}" if alloc else m
        for f in fractions:
            out.append(RunConfig(f"{name}-f{f:g}{label_suffix}", SparseKVConfig(method=m, budget_fraction=f, **extra)))
        for b in token_budgets:
            out.append(RunConfig(f"{name}-b{b}{label_suffix}", SparseKVConfig(method=m, token_budget=b, **extra)))
    return out


def budget_pages_for(cfg, seq_len: int, block_size: int) -> int:
    """Pages the backend grants one (request, head): ``budgets.request_budget_pages``."""
    from vllm_sparsekv.budgets import request_budget_pages

    return int(request_budget_pages(cfg, torch.tensor([seq_len]), block_size)[0])


@dataclass
class _LayerState:
    selector: Any
    written: int = 0


@dataclass
class _Active:
    run: RunConfig | None = None
    block_size: int = 16
    max_model_len: int = 32768
    capacity_pages: int = 0
    layers: dict = field(default_factory=dict)
    collect_iou: bool = False
    iou: dict = field(default_factory=dict)  # layer -> list of [Hkv] tensors
    recall: dict = field(default_factory=dict)
    oracle_recall: dict = field(default_factory=dict)
    attended: int = 0
    held: int = 0
    prefills: int = 0
    num_layers: int = 0
    probe: IouProbe | None = None  # IoU of several methods/budgets along the dense decode
    probe_layers: dict = field(default_factory=dict)  # (method, layer) -> _LayerState
    probe_acc: dict = field(default_factory=dict)  # (method, fraction) -> {layer: [dict of [Hkv]]}
    paged: dict = field(default_factory=dict)  # (layer, 0|1) -> [paged K|V buffer, tokens copied]
    capture_prefill_q: bool = False  # keep the prefill queries (methods with needs_prefill_queries)
    prefill_q: dict = field(default_factory=dict)  # layer -> [L0, Hq, D] post-RoPE prefill queries
    prefill_len: int = 0


@dataclass
class IouProbe:
    """IoU probe along the *dense* decode trajectory: at each of the first ``steps`` decode steps,
    every sparse layer's query is scored by each method's selector (same code as the backend), the
    top ``ceil(P * fraction)`` pages are compared with the oracle top pages of exact attention
    (group mass per page), with no forced sink/recent pages on either side (they would make both
    sides agree by construction at small budgets). Also the attention mass each side covers.
    All methods see the same queries and keys, so they are directly comparable."""

    methods: Sequence[str]
    fractions: Sequence[float] = (0.02, 0.05, 0.10)
    steps: int = 8
    config: Any = None  # SparseKVConfig for the selectors' settings (dense_layers, hash_*)


_STATE = _Active()


def _paged(x: torch.Tensor, block_size: int, capacity_pages: int) -> torch.Tensor:
    """HF cache [1, Hkv, L, D] -> paged view [capacity_pages, bs, Hkv, D] (zero padded)."""
    _, h, L, d = x.shape
    out = x.new_zeros(capacity_pages * block_size, h, d)
    out[:L] = x[0].transpose(0, 1)
    return out.view(capacity_pages, block_size, h, d)


def _paged_cached(layer: int, x: torch.Tensor, which: int) -> torch.Tensor:
    """``_paged`` kept per (layer, K|V) for the current run: only tokens not yet copied are written
    (a run's cache only grows), so a decode step costs one token's copy, not the whole context."""
    st = _STATE
    ent = st.paged.get((layer, which))
    _, h, L, d = x.shape
    if ent is None:
        buf = x.new_zeros(st.capacity_pages * st.block_size, h, d)
        ent = st.paged[(layer, which)] = [buf, 0]
    buf, n = ent
    if n < L:
        buf[n:L] = x[0, :, n:L].transpose(0, 1)
        ent[1] = L
    return buf.view(st.capacity_pages, st.block_size, h, d)


def _hook(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    st = _STATE
    run = st.run
    if query.shape[2] != 1 or run is None or run.dense:
        if query.shape[2] != 1:
            st.prefills += 1 if getattr(module, "layer_idx", 0) == 0 else 0
            if st.capture_prefill_q:
                st.prefill_q[module.layer_idx] = query[0].transpose(0, 1).contiguous()  # [L0, Hq, D]
                st.prefill_len = key.shape[2]
        elif st.probe is not None:
            _probe(module.layer_idx, query, key, scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    cfg = run.config
    layer = module.layer_idx
    if layer in cfg.dense_layers:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    from vllm_sparsekv import budgets, kernels
    from vllm_sparsekv.methods import get_method
    from vllm_sparsekv.methods.base import LayerGeometry

    from . import iou as I

    bs = st.block_size
    _, hq, _, d = query.shape
    hkv, L = key.shape[1], key.shape[2]
    P = -(-L // bs)
    if P > st.capacity_pages:
        raise ValueError(f"context {L} exceeds the sweep's capacity of {st.capacity_pages} pages")
    key_cache = _paged_cached(layer, key, 0)
    value_cache = _paged_cached(layer, value, 1)
    ls = st.layers.get(layer)
    if ls is None:
        sel = get_method(cfg.method)(cfg, LayerGeometry(hq, hkv, d, bs, layer))
        if not sel.selects_all:
            sel.allocate(st.capacity_pages, key.dtype, key.device)
        ls = st.layers[layer] = _LayerState(sel)
    q = query[:, :, 0, :]  # [1, Hq, D]
    block_table = torch.arange(st.capacity_pages, dtype=torch.int32, device=q.device)[None]
    seq_lens = torch.tensor([L], dtype=torch.int32, device=q.device)
    if ls.selector.selects_all:
        scores = torch.zeros(1, hkv, P, device=q.device)
        k_max = P
    else:
        scale0 = scaling if scaling is not None else 1.0 / math.sqrt(d)
        if ls.selector.needs_prefill_queries and ls.written == 0 and layer in st.prefill_q:
            # the backend's prefill step: KV write of the prompt, then observe_prefill (SparseKVImpl
            # .forward -> _observe_prefill) with the prompt's queries; then this decode's write
            L0 = st.prefill_len
            slots = torch.arange(0, L0, dtype=torch.int64, device=q.device)
            ls.selector.on_kv_write(key[0, :, :L0].transpose(0, 1), key_cache, slots)
            ls.selector.observe_prefill(st.prefill_q[layer], key_cache, block_table[0], L0, scale0)
            ls.written = L0
        if ls.written < L:  # the tokens the backend's write hook would have seen
            slots = torch.arange(ls.written, L, dtype=torch.int64, device=q.device)
            new_keys = key[0, :, ls.written:L].transpose(0, 1)
            ls.selector.on_kv_write(new_keys, key_cache, slots)
            ls.written = L
        scores = ls.selector.score_pages(q, key_cache, block_table, seq_lens, P)
        k_max = min(budgets.max_selected_pages(cfg, bs, st.max_model_len), P)
    budget = torch.full((1, hkv), budget_pages_for(cfg, L, bs), dtype=torch.int32, device=q.device)
    if not ls.selector.selects_all:  # per-(layer, head) multipliers, as SparseKVImpl._sparse_decode
        w = _budget_weights(cfg, layer, hkv)
        if w is not None:
            budget = torch.round(budget * w.to(q.device)).to(torch.int32)
            k_max = min(P, math.ceil(k_max * max(1.0, float(w.max()))))  # as the backend: never narrowed
    # k_max only sizes the -1 padding of page_idx (k = min(max(budget, forced), pages, k_max)), so
    # trimming it to what this step can select changes no selection; it keeps the torch reference
    # of sparse_paged_decode from walking every padded slot (the backend's CPU k_max is the batch's
    # page count, i.e. dense cost).
    k_max = min(k_max, max(int(budget.max()), cfg.sink_pages(bs) + cfg.recent_pages(bs)))
    page_idx, num_sel = kernels.select_pages(scores, seq_lens, bs, budget, cfg.sink_pages(bs),
                                             cfg.recent_pages(bs), k_max)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
    out = kernels.sparse_paged_decode(q.contiguous(), key_cache, value_cache, block_table, seq_lens,
                                      page_idx, scale)
    st.attended += int(num_sel.sum())
    st.held += P * hkv
    if st.collect_iou:
        attn = I.exact_attention(q[0], key[0].transpose(0, 1), scale)
        r = I.page_iou(page_idx[0], attn, bs, cfg.sink_pages(bs), cfg.recent_pages(bs))
        st.iou.setdefault(layer, []).append(r["iou"])
        st.recall.setdefault(layer, []).append(r["recall"])
        st.oracle_recall.setdefault(layer, []).append(r["oracle_recall"])
    return out[:, None].to(query.dtype), None  # [1, 1, Hq, D]


_WEIGHTS: dict = {}


def _budget_weights(cfg, layer: int, hkv: int) -> torch.Tensor | None:
    """[Hkv] budget multipliers of this layer (budgets.layer_head_weights), None when uniform."""
    if cfg.budget_allocation == "uniform":
        return None
    key = (cfg.model_dump_json(), _STATE.num_layers, hkv)
    if key not in _WEIGHTS:
        from vllm_sparsekv import budgets

        if not _STATE.num_layers:
            raise ValueError("budget_allocation needs the model's layer count (sweep_prompt sets it)")
        _WEIGHTS[key] = budgets.layer_head_weights(cfg, _STATE.num_layers, hkv)
    w = _WEIGHTS[key][layer]
    return None if bool((w == 1).all()) else w


def _probe(layer: int, query, key, scaling) -> None:
    from vllm_sparsekv.methods import get_method
    from vllm_sparsekv.methods.base import LayerGeometry

    from . import iou as I

    st = _STATE
    pr = st.probe
    cfg = pr.config
    if layer in cfg.dense_layers:
        return
    first = st.probe_acc.setdefault((pr.methods[0], pr.fractions[0]), {}).setdefault(layer, [])
    if len(first) >= pr.steps:
        return
    bs = st.block_size
    _, hq, _, d = query.shape
    hkv, L = key.shape[1], key.shape[2]
    P = -(-L // bs)
    key_cache = _paged_cached(layer, key, 0)
    q = query[:, :, 0, :]
    block_table = torch.arange(st.capacity_pages, dtype=torch.int32, device=q.device)[None]
    seq_lens = torch.tensor([L], dtype=torch.int32, device=q.device)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
    attn = I.exact_attention(q[0], key[0].transpose(0, 1), scale)
    ga = I.group_attention(attn, hkv)
    pm = I.page_mass(ga, bs)
    for m in pr.methods:
        mcfg = cfg.model_copy(update={"method": m})
        ls = st.probe_layers.get((m, layer))
        if ls is None:
            sel = get_method(m)(mcfg, LayerGeometry(hq, hkv, d, bs, layer))
            sel.allocate(st.capacity_pages, key.dtype, key.device)
            ls = st.probe_layers[(m, layer)] = _LayerState(sel)
        if ls.written < L:
            slots = torch.arange(ls.written, L, dtype=torch.int64, device=q.device)
            ls.selector.on_kv_write(key[0, :, ls.written:L].transpose(0, 1), key_cache, slots)
            ls.written = L
        scores = ls.selector.score_pages(q, key_cache, block_table, seq_lens, P)[0]  # [Hkv, P]
        for f in pr.fractions:
            k = max(1, math.ceil(P * f))
            sel_m = I.topk_mask(scores, k)
            orc = I.topk_mask(pm, k)
            rec = {"iou": I.iou(sel_m, orc),
                   "recall": I.attention_recall(ga, I.pages_to_tokens(sel_m, bs, L)),
                   "oracle_recall": I.attention_recall(ga, I.pages_to_tokens(orc, bs, L))}
            st.probe_acc.setdefault((m, f), {}).setdefault(layer, []).append(rec)


def _probe_summary() -> dict | None:
    st = _STATE
    if st.probe is None or not st.probe_acc:
        return None
    out = {}
    for (m, f), per_layer in st.probe_acc.items():
        if not per_layer:
            continue
        layers = sorted(per_layer)
        ent = {}
        for k in ("iou", "recall", "oracle_recall"):
            lh = torch.stack([torch.stack([r[k] for r in per_layer[l]]).mean(0) for l in layers])  # [layers, Hkv]
            ent[k + "_mean"] = lh.mean().item()
            if k == "iou":
                ent["iou_per_layer_head"] = {str(l): [round(v, 4) for v in lh[i].tolist()] for i, l in enumerate(layers)}
        ent["steps"] = len(per_layer[layers[0]])
        out[f"{m}@{f:g}"] = ent
    return out


def register_hook() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(HOOK_NAME, _hook)


def load_model(path: str, dtype=torch.float32, device: str = "cpu"):
    """Model (eval mode, sweep hook on) and tokenizer. On ``cuda`` the selectors and kernels run
    their Triton versions (``vllm_sparsekv.kernels`` dispatch), as the backend does on a GPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    register_hook()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=HOOK_NAME)
    model.to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def use_hook(model) -> None:
    """Switch an already loaded model to the sweep hook."""
    register_hook()
    model.config._attn_implementation = HOOK_NAME
    for m in model.modules():
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
            m.config._attn_implementation = HOOK_NAME


def _needs_prefill_queries(runs) -> bool:
    from vllm_sparsekv.methods import get_method

    return any(r.config is not None and get_method(r.config.method).needs_prefill_queries for r in runs)


def _begin(run: RunConfig | None, block_size: int, capacity_tokens: int, collect_iou: bool,
           max_model_len: int, num_layers: int = 0, probe: IouProbe | None = None,
           capture: bool = False) -> None:
    global _STATE
    prefills = _STATE.prefills
    keep_q, keep_len = _STATE.prefill_q, _STATE.prefill_len
    _STATE = _Active(run=run, block_size=block_size, capacity_pages=-(-capacity_tokens // block_size),
                     collect_iou=collect_iou and run is not None and not run.dense,
                     max_model_len=max_model_len, num_layers=num_layers,
                     probe=probe if (run is not None and run.dense) else None, capture_prefill_q=capture)
    _STATE.prefills = prefills
    if not capture and run is not None:  # the prompt's queries stay for every run of this prompt
        _STATE.prefill_q, _STATE.prefill_len = keep_q, keep_len


def _iou_summary() -> dict | None:
    st = _STATE
    if not st.iou:
        return None
    layers = sorted(st.iou)
    per = lambda d: {l: torch.stack(d[l]).mean(0) for l in layers}  # noqa: E731, E741
    iou_l, rec_l, orc_l = per(st.iou), per(st.recall), per(st.oracle_recall)
    allv = lambda d: torch.stack(list(d.values()))  # noqa: E731
    return {"iou_mean": allv(iou_l).mean().item(), "recall_mean": allv(rec_l).mean().item(),
            "oracle_recall_mean": allv(orc_l).mean().item(),
            "iou_per_layer_head": {str(l): [round(v, 4) for v in iou_l[l].tolist()] for l in layers},
            "steps": len(st.iou[layers[0]])}


@torch.no_grad()
def sweep_prompt(model, input_ids: Sequence[int], runs: Sequence[RunConfig], max_new_tokens: int,
                 eos_token_ids: Sequence[int] = (), block_size: int = 16, collect_iou: bool = False,
                 max_model_len: int = 32768, iou_probe: IouProbe | None = None) -> dict[str, dict]:
    """Greedy generations of every run from one shared dense prefill: {label: {"ids", "iou", ...}}.

    ``iou_probe``: during the dense run (which must be in ``runs``), also record the IoU of each
    probe method at each probe fraction vs the oracle (``out["dense"]["probe"]``)."""
    nl = getattr(model.config, "num_hidden_layers", 0)
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    ids = torch.tensor([list(input_ids)], device=dev)
    L0 = ids.shape[1]
    _begin(None, block_size, L0 + max_new_tokens, False, max_model_len, capture=_needs_prefill_queries(runs))
    cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1]
    prefill_s = time.perf_counter() - t0
    first = int(logits.argmax())
    out = {}
    for run in runs:
        _begin(run, block_size, L0 + max_new_tokens, collect_iou, max_model_len, nl, iou_probe)
        c = copy.deepcopy(cache)
        toks = [first]
        t1 = time.perf_counter()
        while len(toks) < max_new_tokens and toks[-1] not in eos_token_ids:
            pos = torch.tensor([[L0 + len(toks) - 1]], device=dev)
            lg = model(input_ids=torch.tensor([[toks[-1]]], device=dev), past_key_values=c,
                       position_ids=pos, cache_position=pos[0], use_cache=True).logits[0, -1]
            toks.append(int(lg.argmax()))
        out[run.label] = {"ids": toks, "decode_s": time.perf_counter() - t1, "prefill_s": prefill_s,
                          "iou": _iou_summary(), "probe": _probe_summary(),
                          "attended_fraction": (_STATE.attended / _STATE.held) if _STATE.held else None}
    _begin(None, block_size, 1, False, max_model_len)
    return out


@torch.no_grad()
def decode_perplexity(model, ids: Sequence[int], score_last: int, runs: Sequence[RunConfig],
                      block_size: int = 16, max_model_len: int = 32768) -> dict[str, dict]:
    """Perplexity of the last ``score_last`` tokens of ``ids``, each predicted by a decode step
    (dense prefill of the rest, shared by all runs)."""
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    ids = list(ids)
    L0 = len(ids) - score_last
    _begin(None, block_size, len(ids), False, max_model_len, capture=_needs_prefill_queries(runs))
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=torch.tensor([ids[:L0]], device=dev), past_key_values=cache, use_cache=True).logits[0, -1]
    first_lp = float(torch.log_softmax(logits.float(), -1)[ids[L0]])
    out = {}
    nl = getattr(model.config, "num_hidden_layers", 0)
    for run in runs:
        _begin(run, block_size, len(ids), False, max_model_len, nl)
        c = copy.deepcopy(cache)
        lps = [first_lp]
        for t in range(L0, len(ids) - 1):
            pos = torch.tensor([[t]], device=dev)
            lg = model(input_ids=torch.tensor([[ids[t]]], device=dev), past_key_values=c, position_ids=pos,
                       cache_position=pos[0], use_cache=True).logits[0, -1]
            lps.append(float(torch.log_softmax(lg.float(), -1)[ids[t + 1]]))
        out[run.label] = {"ppl": math.exp(-sum(lps) / len(lps)), "tokens": len(lps),
                          "attended_fraction": (_STATE.attended / _STATE.held) if _STATE.held else None}
    return out


def prefill_count() -> int:
    return _STATE.prefills


# ---------------------------------------------------------------------- RULER sweep


def ruler_sweep(model, tokenizer, samples: Sequence, runs: Sequence[RunConfig], out_path: str | Path,
                block_size: int = 16, collect_iou: bool = True, chat: bool = False,
                progress: bool = True, max_new_tokens: int | None = None,
                iou_probe: IouProbe | None = None) -> list[dict]:
    """Run every RULER sample under every config; one JSONL record per sample (resumable).

    ``max_new_tokens`` caps RULER's tokens-to-generate per task (CPU time; greedy decoding stops at
    EOS anyway); ``iou_probe`` records probe IoUs along the dense decode (``runs["dense"]["probe"]``)."""
    from .client import load_results
    from .ruler import score_prediction

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = load_results(out_path)
    eos = set()
    for e in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        eos |= set(e) if isinstance(e, (list, tuple)) else ({e} if e is not None else set())
    todo = [s for s in samples if s.id not in done]
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc="sweep")
        except ImportError:  # pragma: no cover
            pass
    with out_path.open("a", encoding="utf-8") as f:
        for s in todo:
            if chat and getattr(tokenizer, "chat_template", None):
                text = tokenizer.apply_chat_template([{"role": "user", "content": s.input}], tokenize=False,
                                                     add_generation_prompt=True) + s.answer_prefix
                ids = tokenizer.encode(text, add_special_tokens=False)
            else:
                ids = tokenizer.encode(s.input + s.answer_prefix)
            gen = s.max_tokens if max_new_tokens is None else min(s.max_tokens, max_new_tokens)
            res = sweep_prompt(model, ids, runs, gen, eos, block_size, collect_iou, iou_probe=iou_probe)
            rec = {"id": s.id, "task": s.task, "target_length": s.target_length, "length": len(ids),
                   "outputs": s.outputs, "meta": s.meta, "runs": {}}
            for label, r in res.items():
                pred = tokenizer.decode(r["ids"], skip_special_tokens=True)
                rec["runs"][label] = {"pred": pred, "score": score_prediction(pred, s.outputs),
                                      "iou": r["iou"], "attended_fraction": r["attended_fraction"],
                                      "decode_s": round(r["decode_s"], 3)}
                if r.get("probe"):
                    rec["runs"][label]["probe"] = r["probe"]
            rec["prefill_s"] = round(next(iter(res.values()))["prefill_s"], 3)
            f.write(json.dumps(rec) + "\n")
            f.flush()
            done[s.id] = rec
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return [done[s.id] for s in samples]


def rows_from_records(records: Sequence[dict], runs: Sequence[RunConfig], model_name: str) -> list[dict]:
    """Report rows {"suite", "task", "model", "method", "context", "budget_fraction" | "token_budget",
    "score", "dense_score", "n", "ci95", "iou", "recall"} per (task, context, run), plus "average"."""
    from .metrics import mean_ci95

    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["task"], r["target_length"]), []).append(r)
    rows = []
    for (task, L), rs in sorted(groups.items(), key=lambda x: (x[0][1], x[0][0])):
        dense = mean_ci95([r["runs"]["dense"]["score"] for r in rs])[0] if "dense" in rs[0]["runs"] else None
        for run in runs:
            sc = [r["runs"][run.label]["score"] for r in rs]
            m, hw, n = mean_ci95(sc)
            ious = [r["runs"][run.label]["iou"] for r in rs if r["runs"][run.label].get("iou")]
            rows.append({"suite": "ruler", "task": task, "model": model_name, **run.row_fields(),
                         "context": L, "score": 100 * m, "dense_score": None if dense is None else 100 * dense,
                         "n": n, "ci95": 100 * hw,
                         "iou": (sum(i["iou_mean"] for i in ious) / len(ious)) if ious else None,
                         "recall": (sum(i["recall_mean"] for i in ious) / len(ious)) if ious else None})
    for L in sorted({r["context"] for r in rows}):
        for run in runs:
            sel = [r for r in rows if r["context"] == L and r["method"] == run.row_fields()["method"]
                   and all(r.get(k) == v for k, v in run.row_fields().items())]
            if sel:
                avg = lambda k: (sum(r[k] for r in sel) / len(sel)) if all(r[k] is not None for r in sel) else None  # noqa: E731
                rows.append({"suite": "ruler", "task": "average", "model": model_name, **run.row_fields(),
                             "context": L, "score": avg("score"), "dense_score": avg("dense_score"),
                             "n": sum(r["n"] for r in sel), "ci95": None, "iou": avg("iou"),
                             "recall": avg("recall")})
    return rows


def main(argv=None) -> int:
    from .ruler import TASKS, RulerGenerator
    from .tokenization import chat_template_tokens, parse_length

    def csv_ints(x):
        return [parse_length(v) for v in x.split(",") if v]

    def csv_floats(x):
        return [float(v) for v in x.split(",") if v]

    def csv_strs(x):
        return [v.strip() for v in x.split(",") if v.strip()]

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local HF model folder")
    p.add_argument("--lengths", type=csv_ints, default=[2048])
    p.add_argument("--tasks", type=csv_strs, default=None)
    p.add_argument("--num-samples", type=int, default=30)
    p.add_argument("--methods", type=csv_strs, default=["quest"],
                   help="registered method names (vllm_sparsekv.methods.available()) or 'all'")
    p.add_argument("--budget-fractions", type=csv_floats, default=[0.25, 0.125, 0.0625])
    p.add_argument("--token-budgets", type=csv_ints, default=[256, 1024])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--sink-tokens", type=int, default=None)
    p.add_argument("--recent-tokens", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="apply the chat template")
    p.add_argument("--no-iou", action="store_true", help="no IoU at the runs' own budgets")
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap on RULER's tokens to generate")
    p.add_argument("--iou-probe-fractions", type=csv_floats, default=[],
                   help="IoU probe of every method at these budget fractions along the dense decode")
    p.add_argument("--iou-probe-steps", type=int, default=8)
    p.add_argument("--haystack", default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True, help="records JSONL (resumable); rows go to OUT.rows.json")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    common = {k: v for k, v in (("sink_tokens", a.sink_tokens), ("recent_tokens", a.recent_tokens)) if v is not None}
    runs = make_configs(a.methods, a.budget_fractions, a.token_budgets, **common)
    model, tok = load_model(a.model)
    tmpl = 0
    if a.chat and getattr(tok, "chat_template", None):
        tmpl = chat_template_tokens(tok)
    g = RulerGenerator(tok, a.haystack, a.seed, tmpl)
    samples = [s for L in a.lengths for t in (a.tasks or TASKS) for s in g.generate(t, L, a.num_samples)]
    probe = None
    if a.iou_probe_fractions:
        from vllm_sparsekv.config import SparseKVConfig

        probe = IouProbe(resolve_methods(a.methods), a.iou_probe_fractions, a.iou_probe_steps,
                         SparseKVConfig(**common))
    recs = ruler_sweep(model, tok, samples, runs, a.out, a.block_size, not a.no_iou, a.chat,
                       max_new_tokens=a.max_new_tokens, iou_probe=probe)
    rows = rows_from_records(recs, runs, Path(a.model).name)
    Path(str(a.out) + ".rows.json").write_text(json.dumps({"rows": rows, "argv": argv}, indent=2) + "\n")
    for r in rows:
        if r["task"] == "average":
            print(f"{r['context']:>6} {r['method']:>8} {r.get('budget_fraction', r.get('token_budget'))!s:>8} "
                  f"score {r['score']:.1f} (dense {r['dense_score'] if r['dense_score'] is None else round(r['dense_score'], 1)}) "
                  f"iou {r['iou']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
