"""Sparse paged decode vs dense, one layer, on the GPU (issue 3).

For each (batch, context, page size): dense paged decode (our kernel, every page) and the dense peers
(`PEERS`; each one optional, skipped with a printed reason when it does not import or run): torch
SDPA over contiguous K/V (GQA as a G-row query per KV head); FlashAttention-3's paged decode from
vLLM 0.33 (`vllm.vllm_flash_attn.flash_attn_varlen_func` over the same paged cache and block table,
as vLLM's FULL-graph decode calls it: AOT scheduler metadata, at most 32 splits; and with FA3's own
split heuristic); xformers' split-K paged decode (`xformers.ops.fmha.triton_splitk`, which needs pages
of a multiple of 64 tokens: it reads the same bytes as 64-token pages under its own random block
table). Every peer's output is checked against a reference. The sparse rows' ratio is against the
best (fastest) dense kernel of the row; ratios against our dense and SDPA are kept too. For each method (quest,
hash-128, spotlight-128) and budget: sparse total (score + top-k + attend) and its parts.
`spotlight` is the trained hash as the backend runs it: its query MLP (hidden layer, SiLU, folded
last layer: `methods/spotlight.py`) runs on every decode step inside the timed score part, so its
cost shows (weights random at the checkpoint's shapes: timing does not depend on their values). Times: CUDA events around
CUDA-graph replays (launch gaps removed), L2 flushed before every replay, warm-up, median of --reps.

    python benchmarks/kernel_decode.py [--out benchmarks/results] [--commit SHA] [--quick] [--tune]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllm_sparsekv import kernels as K  # noqa: E402
from vllm_sparsekv.kernels import sparse_decode as SD  # noqa: E402

HQ, HKV, D = 32, 8, 128
G = HQ // HKV
DT = torch.bfloat16
SINK, RECENT = 1, 1
BITS = 128
HIDDEN = 128  # `sparsekv train-hash --hidden` default
BUDGETS = [("1/8", 1 / 8), ("1/16", 1 / 16), ("1/32", 1 / 32), ("2%", 0.02)]

_flush = None


def flush():
    global _flush
    if _flush is None:
        _flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    _flush.zero_()


def bench(fn, reps=30, warm=5, graph=True):
    """Median ms of fn (as a CUDA graph replay), L2 flushed before every run."""
    run = fn
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    for _ in range(warm):
        flush()
        run()
    st = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    en = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush()
        st[i].record()
        run()
        en[i].record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(st, en))


def hbm_copy_TBps():
    a = torch.empty(2 << 30, dtype=torch.int8, device="cuda")
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a), reps=20, graph=False)
    del a, b
    return 2 * (2 << 30) / ms / 1e9


class Case:
    def __init__(self, N, L, bs, seed=0):
        torch.manual_seed(seed)
        self.N, self.L, self.bs = N, L, bs
        self.P = P = L // bs
        B = N * P
        self.kv = torch.randn(2, B, bs, HKV, D, dtype=DT, device="cuda")
        self.kc, self.vc = self.kv[0], self.kv[1]
        self.bt = torch.randperm(B, device="cuda").to(torch.int32).view(N, P)
        self.sl = torch.full((N,), L, dtype=torch.int32, device="cuda")
        self.q = torch.randn(N, HQ, D, dtype=DT, device="cuda")
        self.out = torch.empty_like(self.q)
        self.scale = D ** -0.5
        slots = torch.arange(B * bs, device="cuda")
        self.bounds = torch.empty(B, HKV, 2, D, dtype=DT, device="cuda")
        K.page_bounds_update(self.kc, slots, self.bounds)
        self.proj = torch.randn(HKV, D, BITS, device="cuda")
        self.codes = torch.empty(B, bs, HKV, BITS // 32, dtype=torch.int32, device="cuda")
        K.hash_codes_update(self.kc.reshape(-1, HKV, D), slots, self.proj, self.codes)
        from vllm_sparsekv.methods import spotlight as S

        g = torch.Generator(device="cuda").manual_seed(seed)
        self.mlp = {"q_w1": torch.randn(HKV, D, HIDDEN, device="cuda", generator=g) / D ** 0.5,
                    "q_b1": torch.zeros(HKV, HIDDEN, device="cuda"),
                    "q_skip": torch.randn(HKV, D, BITS, device="cuda", generator=g),
                    "q_w2": torch.randn(HKV, HIDDEN, BITS, device="cuda", generator=g) / HIDDEN ** 0.5,
                    "q_b2": torch.zeros(HKV, BITS, device="cuda")}
        self.mlp_proj = S.folded_projection(self.mlp, "q")
        self.dense_idx = torch.arange(P, dtype=torch.int32, device="cuda").expand(N, HKV, P).contiguous()
        torch.cuda.synchronize()

    def free(self):
        for k in list(vars(self)):
            delattr(self, k)
        torch.cuda.empty_cache()

    # -- ops
    def dense(self, **kw):
        return lambda: SD.sparse_paged_decode_triton(self.q, self.kc, self.vc, self.bt, self.sl, self.dense_idx,
                                                     self.scale, out=self.out, **kw)

    def sdpa(self):
        # contiguous K/V [N, Hkv, L, D] (gathered once, outside the timing); queries as [N, Hkv, G, D]
        kcont = self.kc[self.bt.long()].permute(0, 3, 1, 2, 4).reshape(self.N, HKV, self.L, D).contiguous()
        vcont = self.vc[self.bt.long()].permute(0, 3, 1, 2, 4).reshape(self.N, HKV, self.L, D).contiguous()
        q4 = self.q.view(self.N, HKV, G, D)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def f():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                return F.scaled_dot_product_attention(q4, kcont, vcont, scale=self.scale)
        ref = f().reshape(self.N, HQ, D)
        return f, ref, (kcont, vcont)

    def score(self, method):
        if method == "quest":
            return lambda: K.quest_page_scores(self.q, self.bounds, self.bt, self.sl, self.P, self.bs)
        if method == "spotlight":
            from vllm_sparsekv.methods import spotlight as S

            return lambda: K.hash_page_scores(K.hash_query(S.layer_features(self.mlp, self.q, "q"), self.mlp_proj),
                                              self.codes, self.bt, self.sl, self.P, "max")
        return lambda: K.hash_page_scores(K.hash_query(self.q, self.proj), self.codes, self.bt, self.sl, self.P, "max")


class PeerUnavailable(Exception):
    """A dense peer that cannot run here (not installed, wrong GPU, unsupported shape)."""


def attn_ref(q, k_tok, v_tok, scale):
    """float32 decode attention of q [n, Hq, D] over tokens k_tok/v_tok [n, L, Hkv, D] (GQA by group)."""
    n = q.shape[0]
    qg = q.float().view(n, HKV, G, D)
    s = torch.einsum("nhgd,nlhd->nhgl", qg, k_tok.float()) * scale
    return torch.einsum("nhgl,nlhd->nhgd", s.softmax(-1), v_tok.float()).reshape(n, HQ, D)


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def peer_sdpa(c: "Case"):
    """torch SDPA (flash / memory-efficient) over contiguous K/V gathered once outside the timing."""
    f, ref, keep = c.sdpa()
    return f, lambda: f().reshape(c.N, HQ, D), keep, {}


def _fa3(c: "Case", num_splits: int | None):
    try:
        from vllm.vllm_flash_attn import flash_attn_interface as fai
    except Exception as e:  # noqa: BLE001
        raise PeerUnavailable(f"vllm.vllm_flash_attn does not import: {e!r}"[:200]) from None
    if not fai.FA3_AVAILABLE:
        raise PeerUnavailable(f"no FA3 extension: {fai.FA3_UNAVAILABLE_REASON}"[:200])
    if torch.cuda.get_device_capability()[0] != 9:
        raise PeerUnavailable("FA3 runs on Hopper (sm90) only")
    cu_q = torch.arange(c.N + 1, dtype=torch.int32, device="cuda")
    out = torch.empty_like(c.q)
    md = None
    if num_splits is not None:  # vLLM's FULL-graph decode: AOT schedule, max_num_splits
        md = fai.get_scheduler_metadata(batch_size=c.N, max_seqlen_q=1, max_seqlen_k=c.L, num_heads_q=HQ,
                                        num_heads_kv=HKV, headdim=D, cache_seqlens=c.sl, qkv_dtype=DT,
                                        cu_seqlens_q=cu_q, page_size=c.bs, causal=True, num_splits=num_splits)

    def f():
        return fai.flash_attn_varlen_func(c.q, c.kc, c.vc, max_seqlen_q=1, cu_seqlens_q=cu_q, max_seqlen_k=c.L,
                                          seqused_k=c.sl, softmax_scale=c.scale, causal=True, block_table=c.bt,
                                          out=out, scheduler_metadata=md, num_splits=num_splits or 0, fa_version=3)
    return f, lambda: (f(), out)[1], (cu_q, md), {"num_splits": num_splits or "heuristic"}


def peer_fa3(c: "Case"):
    return _fa3(c, 32)  # vLLM's attention_config.flash_attn_max_num_splits_for_cuda_graph


def peer_fa3_auto(c: "Case"):
    return _fa3(c, None)


def xformers_inputs(c: "Case", page: int):
    """xformers' paged split-K inputs over the case's K/V bytes: BMGHK queries [1, N, Hkv, G, D],
    K/V [1, tokens, Hkv, G, D] (a KV head's G query heads share it: expand, no copy), and the paged
    mask; the case's block table when its pages fit, else a random table of `page`-token pages."""
    from xformers.ops.fmha.attn_bias import PagedBlockDiagonalPaddedKeysMask

    T = c.kc.shape[0] * c.bs
    if c.L % page or T % page:
        raise PeerUnavailable(f"context {c.L} is not a whole number of {page}-token pages")
    dev = c.q.device
    bt = c.bt if page == c.bs else torch.randperm(T // page, device=dev).to(torch.int32)[: c.N * c.L // page]
    bt = bt.reshape(c.N, c.L // page)
    k5 = c.kc.reshape(1, T, HKV, 1, D).expand(1, T, HKV, G, D)
    v5 = c.vc.reshape(1, T, HKV, 1, D).expand(1, T, HKV, G, D)
    bias = PagedBlockDiagonalPaddedKeysMask.from_seqlens(q_seqlen=[1] * c.N, kv_seqlen=[c.L] * c.N,
                                                         block_tables=bt, page_size=page, device=dev)
    return c.q.view(1, c.N, HKV, G, D), k5, v5, bias, bt


def peer_xformers(c: "Case"):
    try:
        from xformers.ops import fmha
        from xformers.ops.fmha import triton_splitk
    except Exception as e:  # noqa: BLE001
        raise PeerUnavailable(f"xformers does not import: {e!r}"[:200]) from None
    page = c.bs if c.bs % triton_splitk.FwOp.BLOCK_N == 0 else triton_splitk.FwOp.BLOCK_N
    q5, k5, v5, bias, bt = xformers_inputs(c, page)

    def f():
        return fmha.memory_efficient_attention_forward(q5, k5, v5, attn_bias=bias, scale=c.scale,
                                                       op=triton_splitk.FwOp)
    return f, lambda: f().reshape(c.N, HQ, D), (bt, bias), {"page_size": page,
                                                            "block_table": "own" if page != c.bs else "shared"}


# name -> builder(case) -> (fn to time, fn giving the output [N, Hq, D], tensors to keep alive, notes)
PEERS = {"sdpa": peer_sdpa, "fa3": peer_fa3, "fa3_auto": peer_fa3_auto, "xformers": peer_xformers}


def peer_check_ref(c: "Case", name: str, notes: dict, dense_out, keep, n: int = 2):
    """What a peer's output must match: our dense output when it reads our block table, else attention
    over its own table's tokens for the first n requests (float32 reference)."""
    if notes.get("block_table") != "own":
        return dense_out, c.N
    bt = keep[0][:n].long()
    page = notes["page_size"]
    tok = (bt[:, :, None] * page + torch.arange(page, device=bt.device)).reshape(n, -1)
    kt = c.kc.reshape(-1, HKV, D)[tok]
    vt = c.vc.reshape(-1, HKV, D)[tok]
    return attn_ref(c.q[:n], kt, vt, c.scale), n


def time_peers(c: "Case", dense_out, reps: int, skipped: dict) -> tuple[dict, dict]:
    """ms and checks of every dense peer on this case. A peer that cannot run is skipped (reason in
    `skipped`, printed once); one that cannot be captured in a CUDA graph is timed eagerly."""
    ms, info = {}, {}
    for name, build in PEERS.items():
        if name in skipped:
            continue
        try:
            f, output, keep, notes = build(c)
            out = output()
            ref, n = peer_check_ref(c, name, notes, dense_out, keep)
            notes["rel_err"] = rel_err(out[:n], ref[:n])
            if not notes["rel_err"] < 2e-2:
                raise PeerUnavailable(f"wrong output: rel err {notes['rel_err']:.2e}")
            try:
                ms[name] = bench(f, reps)
                notes["timing"] = "graph"
            except Exception as e:  # noqa: BLE001 - capture refused: time the launches as they are
                torch.cuda.synchronize()
                ms[name] = bench(f, reps, graph=False)
                notes["timing"] = f"eager ({type(e).__name__})"
            info[name] = notes
            del f, output, keep, out, ref
        except PeerUnavailable as e:
            skipped[name] = str(e)
            print(f"   dense peer {name} skipped: {e}", flush=True)
        except Exception as e:  # noqa: BLE001 - a peer's failure must not sink the benchmark
            why = f"{type(e).__name__}: {e}"
            # xformers lists its reasons ("... is not supported because: ...") after the inputs
            skipped[name] = why if len(why) <= 900 else f"{why[:150]} ... {why[-750:]}"
            print(f"   dense peer {name} failed, skipped from now on: {skipped[name]}", flush=True)
    return ms, info


def best_dense(ms: dict) -> tuple[str, float]:
    """The fastest dense kernel of a row (ours included): the honest baseline of the ratios."""
    name = min(ms, key=ms.get)
    return name, ms[name]


def row_bytes(c: Case, method, k):
    N, P, bs = c.N, c.P, c.bs
    kv_tok = 2 * D * 2  # K+V bf16 per token per KV head
    dense = N * HKV * (c.L * kv_tok + P * 4 + P * 4) + 2 * N * HQ * D * 2
    meta = N * HKV * P * (2 * D * 2) if method == "quest" else N * HKV * c.L * (BITS // 8)
    if method == "spotlight":  # the query MLP's float32 weights
        meta += HKV * (D * HIDDEN + HIDDEN + (D + HIDDEN + 1) * BITS) * 4
    select = N * HKV * P * 4 * 2 + N * HKV * k * 4  # scores written + read, page ids written
    attend = N * HKV * k * (bs * kv_tok + 8) + 2 * N * HQ * D * 2
    return dense, meta + select + attend


def run(args):
    dev = torch.cuda.get_device_name()
    import triton

    res = {"device": dev, "torch": torch.__version__, "triton": triton.__version__, "commit": args.commit,
           "command": "python benchmarks/kernel_decode.py " + " ".join(sys.argv[1:]),
           "config": {"Hq": HQ, "Hkv": HKV, "D": D, "dtype": "bfloat16", "sink_pages": SINK,
                      "recent_pages": RECENT, "hash_bits": BITS, "spotlight_hidden": HIDDEN, "reps": args.reps,
                      "timing": "median of CUDA-event-timed CUDA-graph replays, L2 flushed before each"},
           "rows": [], "dense": [],
           "peers_skipped": {k: "not asked for (--peers)" for k in PEERS if k not in args.peers.split(",")}}
    res["hbm_copy_TBps"] = hbm_copy_TBps()
    print(f"device {dev}: D2D copy {res['hbm_copy_TBps']:.2f} TB/s (read+write)", flush=True)
    batches, contexts, pages = [1, 8, 32], [8192, 32768, 131072], [16, 32]
    if args.quick:
        batches, contexts = [8], [131072]
    for L in contexts:
        for N in batches:
            for bs in pages:
                t0 = time.time()
                c = Case(N, L, bs)
                dense_ms = bench(c.dense(), args.reps)
                dense_out = c.out.clone()
                peers_ms, peers_info = time_peers(c, dense_out, args.reps, res["peers_skipped"])
                all_ms = {"ours": dense_ms, **peers_ms}
                best, best_ms = best_dense(all_ms)
                sdpa_ms = peers_ms.get("sdpa")
                err = peers_info.get("sdpa", {}).get("rel_err")
                dense_b, _ = row_bytes(c, "quest", c.P)
                res["dense"].append({"batch": N, "context": L, "page_size": bs, "ms": all_ms, "info": peers_info,
                                     "best_dense": best, "dense_bytes": dense_b,
                                     "TBps": {k: dense_b / v / 1e9 for k, v in all_ms.items()}})
                print(f"N={N:3d} L={L:6d} bs={bs}: dense " + ", ".join(f"{k} {v:.3f}" for k, v in all_ms.items())
                      + f" ms; best {best} ({dense_b / best_ms / 1e9:.2f} TB/s)", flush=True)
                for method in args.methods:
                    score = c.score(method)
                    sc = score()
                    for bname, frac in BUDGETS:
                        k = max(SINK + RECENT, math.ceil(frac * c.P))
                        budget = torch.full((N, HKV), k, dtype=torch.int32, device="cuda")
                        sel = lambda: K.select_pages(sc, c.sl, bs, budget, SINK, RECENT, k)  # noqa: E731
                        idx, _ = sel()
                        att = lambda: K.sparse_paged_decode(c.q, c.kc, c.vc, c.bt, c.sl, idx, c.scale, out=c.out)  # noqa: E731

                        def total():
                            s2 = score()
                            i2, _ = K.select_pages(s2, c.sl, bs, budget, SINK, RECENT, k)
                            K.sparse_paged_decode(c.q, c.kc, c.vc, c.bt, c.sl, i2, c.scale, out=c.out)
                        score_ms = bench(score, args.reps)
                        topk_ms = bench(sel, args.reps)
                        attend_ms = bench(att, args.reps)
                        sparse_ms = bench(total, args.reps)
                        db, sb = row_bytes(c, method, k)
                        row = {"method": method, "batch": N, "context": L, "page_size": bs,
                               "budget": bname, "budget_fraction": frac, "budget_pages": k,
                               "dense_ms": dense_ms, "sdpa_ms": sdpa_ms, "sparse_ms": sparse_ms,
                               "score_ms": score_ms, "topk_ms": topk_ms, "attend_ms": attend_ms,
                               "best_dense": best, "best_dense_ms": best_ms,
                               "speedup_vs_best_dense": best_ms / sparse_ms,
                               "speedup_vs_dense": dense_ms / sparse_ms,
                               "speedup_vs_sdpa": sdpa_ms / sparse_ms if sdpa_ms else None,
                               "floor_speedup": db / sb, "dense_bytes": db, "sparse_bytes": sb,
                               "achieved_TBps": sb / sparse_ms / 1e9, "dense_TBps": db / dense_ms / 1e9,
                               "dense_frac_of_copy_bw": db / dense_ms / 1e9 / res["hbm_copy_TBps"],
                               "selection_frac": (score_ms + topk_ms) / sparse_ms,
                               "dense_vs_sdpa_rel_err": err}
                        res["rows"].append(row)
                        print(f"   {method:5s} {bname:>4s} k={k:5d}: sparse {sparse_ms:.3f} ms "
                              f"(score {score_ms:.3f} topk {topk_ms:.3f} attend {attend_ms:.3f}) "
                              f"x{row['speedup_vs_best_dense']:.2f} vs best dense ({best}), "
                              f"x{row['speedup_vs_dense']:.2f} vs ours, "
                              f"floor x{row['floor_speedup']:.1f}, {row['achieved_TBps']:.2f} TB/s", flush=True)
                c.free()
                print(f"   ({time.time() - t0:.0f}s)", flush=True)
    print_summary(res)
    return res


def print_summary(res) -> None:
    """The two tables of the run: dense kernels side by side, then sparse against the best dense."""
    names = ["ours", *[k for k in PEERS if any(k in d["ms"] for d in res["dense"])]]
    print("\ndense decode, ms (TB/s of the best)")
    print(f"{'B':>3} {'ctx':>7} {'page':>4} " + " ".join(f"{n:>9}" for n in names) + f" {'best':>9} {'TB/s':>5}")
    for d in res["dense"]:
        print(f"{d['batch']:>3} {d['context']:>7} {d['page_size']:>4} "
              + " ".join(f"{d['ms'][n]:>9.3f}" if n in d["ms"] else f"{'-':>9}" for n in names)
              + f" {d['best_dense']:>9} {d['TBps'][d['best_dense']]:>5.2f}")
    for name, why in res["peers_skipped"].items():
        print(f"skipped {name}: {why}")
    print("\nsparse, x vs the best dense kernel of the row")
    print(f"{'method':9} {'B':>3} {'ctx':>7} {'page':>4} {'budget':>6} {'ms':>7} {'x best':>7} {'best':>9} "
          f"{'x ours':>7} {'floor x':>7}")
    for r in res["rows"]:
        print(f"{r['method']:9} {r['batch']:>3} {r['context']:>7} {r['page_size']:>4} {r['budget']:>6} "
              f"{r['sparse_ms']:>7.3f} {r['speedup_vs_best_dense']:>7.2f} {r['best_dense']:>9} "
              f"{r['speedup_vs_dense']:>7.2f} {r['floor_speedup']:>7.1f}")


def tune(args):
    """Dense decode at B=8, L=128K, page 16 and 32 over the launch knobs."""
    for bs in (16, 32):
        c = Case(8, 131072, bs)
        nbytes = 8 * HKV * 131072 * 512
        for tile in (64, 128):
            for nw in (4, 8):
                for ns in (2, 3):
                    for spm in ((2, 4, 8) if (tile, nw, ns) == (64, 4, 3) else (4,)):
                        try:
                            ms = bench(c.dense(tile_tokens=tile, num_warps=nw, num_stages=ns, splits_per_sm=spm), 10)
                            print(f"tune bs={bs} tile={tile} warps={nw} stages={ns} splits/SM={spm}: {ms:.3f} ms "
                                  f"{nbytes / ms / 1e9:.2f} TB/s", flush=True)
                        except Exception as e:  # noqa: BLE001
                            print(f"tune bs={bs} tile={tile} warps={nw} stages={ns}: failed {type(e).__name__}: {e}"[:300])
        c.free()


def sweep(args):
    """Launch-knob sweeps of the sparse parts at B=8, L=128K (module globals of the kernels)."""
    from vllm_sparsekv.kernels import page_scores as PS
    from vllm_sparsekv.kernels import page_select as SEL

    c = Case(8, 131072, 32)
    for tw in (2048, 4096, 8192, 16384):
        for nw in (4, 8):
            PS.HASH_TILE_WORDS, PS.HASH_WARPS = tw, nw
            print(f"sweep hash score p32 tile_words={tw} warps={nw}: {bench(c.score('hash'), 15):.4f} ms", flush=True)
    print(f"sweep hash_query alone: {bench(lambda: K.hash_query(c.q, c.proj), 15):.4f} ms", flush=True)
    PS.HASH_TILE_WORDS, PS.HASH_WARPS = 4096, 4
    c.free()
    c = Case(8, 131072, 16)
    for te in (4096, 8192, 16384):
        for nw in (4, 8):
            PS.QUEST_TILE_ELEMS, PS.QUEST_WARPS = te, nw
            print(f"sweep quest score p16 tile_elems={te} warps={nw}: {bench(c.score('quest'), 15):.4f} ms", flush=True)
    PS.QUEST_TILE_ELEMS, PS.QUEST_WARPS = 8192, 4
    sc = c.score("quest")()
    budget = torch.full((8, HKV), 512, dtype=torch.int32, device="cuda")
    for nw in (4, 8, 16):
        SEL.SELECT_WARPS = nw
        ms = bench(lambda: K.select_pages(sc, c.sl, 16, budget, SINK, RECENT, 512), 15)
        print(f"sweep select P=8192 k=512 warps={nw}: {ms:.4f} ms", flush=True)
    SEL.SELECT_WARPS = 8
    # the search's fan-out, at B=8 and at the e2e B=1 point (one 32K request in a 128K engine)
    sl1 = torch.full((1,), 32768, dtype=c.sl.dtype, device="cuda")
    b1 = torch.full((1, HKV), 128, dtype=torch.int32, device="cuda")
    for ways in (2, 4):
        SEL.SELECT_WAYS = ways
        ms = bench(lambda: K.select_pages(sc, c.sl, 16, budget, SINK, RECENT, 512), 15)
        ms1 = bench(lambda: K.select_pages(sc[:1], sl1, 16, b1, SINK, RECENT, 512), 15)
        print(f"sweep select p16 k_max=512 ways={ways}: B=8 128K {ms:.4f} ms, B=1 32K {ms1:.4f} ms", flush=True)
    SEL.SELECT_WAYS = 2
    idx, _ = K.select_pages(sc, c.sl, 16, budget, SINK, RECENT, 512)
    for tile in (64, 128):
        for spm in (2, 4, 8, 16):
            for nw in (4, 8):
                ms = bench(lambda: SD.sparse_paged_decode_triton(c.q, c.kc, c.vc, c.bt, c.sl, idx, c.scale, out=c.out,
                                                                  tile_tokens=tile, splits_per_sm=spm, num_warps=nw), 15)
                print(f"sweep attend p16 k=512 tile={tile} splits/SM={spm} warps={nw}: {ms:.4f} ms", flush=True)
    c.free()


def parts(args):
    """The B=8, L=128K target cases part by part: launch knobs and the bandwidth of each scoring
    kernel, the selection (against its reference), the attention, and the total."""
    from vllm_sparsekv.kernels import page_scores as PS
    from vllm_sparsekv.kernels import page_select as SEL
    reps = args.reps
    print(f"D2D copy {hbm_copy_TBps():.2f} TB/s", flush=True)
    for bs, method, bname, frac in ((16, "quest", "1/16", 1 / 16), (32, "hash", "2%", 0.02)):
        c = Case(8, 131072, bs)
        N, P = c.N, c.P
        k = max(SINK + RECENT, math.ceil(frac * P))
        dense_ms = bench(c.dense(), reps)
        print(f"== {method} p{bs} {bname} k={k}: dense {dense_ms:.4f} ms", flush=True)
        budget = torch.full((N, HKV), k, dtype=torch.int32, device="cuda")
        if method == "quest":
            nb = N * P * HKV * 2 * D * 2 + N * HKV * P * 4
            for te in (8192,):
                for nw in (4,):
                    PS.QUEST_TILE_ELEMS, PS.QUEST_WARPS = te, nw
                    ms = bench(c.score("quest"), reps)
                    print(f"  score quest tile_elems={te} warps={nw}: {ms:.4f} ms {nb / ms / 1e9:.2f} TB/s", flush=True)
            PS.QUEST_TILE_ELEMS, PS.QUEST_WARPS = 8192, 4
        else:
            nb = N * c.L * HKV * BITS // 8 + N * HKV * P * 4
            qc = K.hash_query(c.q, c.proj)
            print(f"  hash_query alone: {bench(lambda: K.hash_query(c.q, c.proj), reps):.4f} ms", flush=True)
            for tw in (4096,):
                for nw in (4,):
                    PS.HASH_TILE_WORDS, PS.HASH_WARPS = tw, nw
                    ms = bench(lambda: K.hash_page_scores(qc, c.codes, c.bt, c.sl, P, "max"), reps)
                    print(f"  score hash tile_words={tw} warps={nw}: {ms:.4f} ms {nb / ms / 1e9:.2f} TB/s", flush=True)
            PS.HASH_TILE_WORDS, PS.HASH_WARPS = 4096, 4
        sc = c.score(method)()
        ref = K.select_pages_ref(sc, c.sl, bs, budget, SINK, RECENT, k)
        for nw in (4, 8, 16):
            SEL.SELECT_WARPS = nw
            f = lambda: SEL.select_pages_triton(sc, c.sl, bs, budget, SINK, RECENT, k)  # noqa: E731
            got = f()
            ok = torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
            print(f"  select warps={nw}: {bench(f, reps):.4f} ms exact={ok}", flush=True)
        SEL.SELECT_WARPS = 8
        idx, _ = K.select_pages(sc, c.sl, bs, budget, SINK, RECENT, k)
        for tile in (64, 128):
            for spm in (4, 8, 16):
                ms = bench(lambda: SD.sparse_paged_decode_triton(c.q, c.kc, c.vc, c.bt, c.sl, idx, c.scale, out=c.out,
                                                                  tile_tokens=tile, splits_per_sm=spm), reps)
                print(f"  attend tile={tile} splits/SM={spm}: {ms:.4f} ms", flush=True)
        score = c.score(method)

        def total():
            s2 = score()
            i2, _ = K.select_pages(s2, c.sl, bs, budget, SINK, RECENT, k)
            K.sparse_paged_decode(c.q, c.kc, c.vc, c.bt, c.sl, i2, c.scale, out=c.out)
        ms = bench(total, reps)
        print(f"  TOTAL {method} p{bs} {bname}: {ms:.4f} ms  x{dense_ms / ms:.2f} vs dense", flush=True)
        c.free()


def ncu_target():
    c = Case(8, 131072, 32)
    qc = K.hash_query(c.q, c.proj)
    f = lambda: K.hash_page_scores(qc, c.codes, c.bt, c.sl, c.P, "max")  # noqa: E731
    f()
    torch.cuda.synchronize()
    f()
    torch.cuda.synchronize()


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctxs = sorted({r["context"] for r in res["rows"]})
    fig, axes = plt.subplots(1, len(ctxs), figsize=(6 * len(ctxs), 4.5), squeeze=False)
    for ax, L in zip(axes[0], ctxs):
        for method, mk in (("quest", "o"), ("hash", "s"), ("spotlight", "^")):
            for bs, ls in ((16, "-"), (32, "--")):
                for N, col in ((1, "tab:blue"), (8, "tab:orange"), (32, "tab:green")):
                    rs = sorted((r for r in res["rows"] if r["context"] == L and r["method"] == method
                                 and r["page_size"] == bs and r["batch"] == N), key=lambda r: r["budget_fraction"])
                    if rs:
                        ax.plot([r["budget_fraction"] for r in rs],
                                [r.get("speedup_vs_best_dense", r["speedup_vs_dense"]) for r in rs], ls,
                                marker=mk, color=col, label=f"{method} p{bs} B{N}", alpha=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([0.02, 1 / 32, 1 / 16, 1 / 8])
        ax.set_xticklabels(["2%", "1/32", "1/16", "1/8"])
        ax.set_title(f"context {L // 1024}K")
        ax.set_xlabel("budget (fraction of pages)")
        ax.set_ylabel("speedup vs the best dense decode kernel")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"sparse decode speedup, {res['device']}, GQA 32/8, d=128, bf16")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--commit", default=os.environ.get("SPARSEKV_COMMIT", "unknown"))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="only B=8, L=128K")
    ap.add_argument("--methods", type=lambda x: [m for m in x.split(",") if m], default=["quest", "hash", "spotlight"],
                    help="comma list of quest, hash, spotlight")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"dense peers to time, comma list of {', '.join(PEERS)}")
    ap.add_argument("--tune", action="store_true", help="sweep the dense launch knobs first")
    ap.add_argument("--sweep", action="store_true", help="sweep the sparse parts' knobs, then exit")
    ap.add_argument("--parts", action="store_true", help="B=8 128K target cases part by part, then exit")
    ap.add_argument("--ncu-target", action="store_true", help="run the hash scoring once (for ncu), then exit")
    args = ap.parse_args()
    if args.sweep:
        return sweep(args)
    if args.parts:
        return parts(args)
    if args.ncu_target:
        return ncu_target()
    if args.tune:
        tune(args)
    res = run(args)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", res["device"]).strip("_")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (out / f"kernel_decode_{tag}{suffix}.json").write_text(json.dumps(res, indent=1))
    try:
        plot(res, out / f"kernel_decode_{tag}{suffix}.png")
    except Exception as e:  # noqa: BLE001
        print("plot failed:", e)
    print("wrote", out / f"kernel_decode_{tag}{suffix}.json")


if __name__ == "__main__":
    main()
