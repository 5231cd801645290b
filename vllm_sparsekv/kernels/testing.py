"""Input generators and float64 brute-force oracles shared by the kernel tests and benchmarks/gpu_check.py.

The oracles are deliberately naive (explicit masks, per-element Python loops): they restate the
contract in README.md, independently of the vectorised references."""

from __future__ import annotations

import math

import torch


def make_paged(seq_lens, Hkv, G, D, bs, dtype=torch.float32, device="cpu", layout="nhd", extra_blocks=3,
               gen=None, max_blocks=None):
    """Random paged KV cache with a shuffled block table. layout 'nhd': key/value_cache are views
    of one [2, B, bs, Hkv, D] tensor (vLLM's flash layout); 'cpu': views of [B, Hkv, bs, 2D]
    (key = cache[..., :D].transpose(1, 2)), i.e. non-contiguous strides."""
    g = gen or torch.Generator().manual_seed(0)
    N = len(seq_lens)
    pages = [math.ceil(s / bs) for s in seq_lens]
    mb = max_blocks or max(1, max(pages))
    B = sum(pages) + extra_blocks
    if layout == "nhd":
        kv = torch.randn(2, B, bs, Hkv, D, generator=g).to(dtype)
        kc, vc = kv[0], kv[1]
    else:
        kv = torch.randn(B, Hkv, bs, 2 * D, generator=g).to(dtype)
        kc, vc = kv[..., :D].transpose(1, 2), kv[..., D:].transpose(1, 2)
    perm = torch.randperm(B, generator=g)
    bt = torch.full((N, mb), -1, dtype=torch.int32)  # unused entries: -1 (must never be read)
    i = 0
    for n, p in enumerate(pages):
        bt[n, :p] = perm[i:i + p].to(torch.int32)
        i += p
    q = torch.randn(N, Hkv * G, D, generator=g).to(dtype)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    to = lambda t: t.to(device)  # noqa: E731
    if device != "cpu":
        kv = kv.to(device)
        if layout == "nhd":
            kc, vc = kv[0], kv[1]
        else:
            kc, vc = kv[..., :D].transpose(1, 2), kv[..., D:].transpose(1, 2)
    return to(q), kc, vc, to(bt), to(sl)


def brute_bounds(key_cache, slot_mapping, bounds):
    out = bounds.detach().cpu().double().clone()
    kc = key_cache.detach().cpu().double()
    bs = kc.shape[1]
    last = {}
    for s in slot_mapping.cpu().tolist():
        if s >= 0:
            b, o = divmod(s, bs)
            last[b] = max(last.get(b, -1), o)
    for b, lo in last.items():
        keys = kc[b, : lo + 1]  # [l, Hkv, D]
        out[b, :, 0] = keys.min(0).values
        out[b, :, 1] = keys.max(0).values
    return out


def brute_hash(x, projection, G=1):
    """x [M, H, D] -> (codes [M, H, W] int32 as Python-packed words, margin [M, H, bits] float64)."""
    x64 = x.detach().cpu().double()
    pr = projection.detach().cpu().double()
    M, H, D = x64.shape
    bits = pr.shape[2]
    W = bits // 32
    codes = torch.zeros(M, H, W, dtype=torch.int32)
    margin = torch.zeros(M, H, bits, dtype=torch.float64)
    for m in range(M):
        for h in range(H):
            y = x64[m, h] @ pr[h // G]
            margin[m, h] = y
            for w in range(W):
                v = 0
                for i in range(32):
                    if y[w * 32 + i] > 0:
                        v |= 1 << i
                codes[m, h, w] = v - (1 << 32) if v >= 1 << 31 else v
    return codes, margin


def brute_quest(q, bounds, block_table, seq_lens, max_pages, bs, group_reduce="sum"):
    q64, b64 = q.detach().cpu().double(), bounds.detach().cpu().double()
    bt, sl = block_table.cpu().tolist(), seq_lens.cpu().tolist()
    N, Hq, D = q64.shape
    Hkv = b64.shape[1]
    G = Hq // Hkv
    out = torch.full((N, Hkv, max_pages), float("-inf"), dtype=torch.float64)
    for n in range(N):
        for p in range(min(max_pages, math.ceil(sl[n] / bs))):
            blk = bt[n][p]
            for h in range(Hkv):
                per_head = [torch.maximum(q64[n, h * G + g] * b64[blk, h, 0], q64[n, h * G + g] * b64[blk, h, 1]).sum().item()
                            for g in range(G)]
                out[n, h, p] = sum(per_head) if group_reduce == "sum" else max(per_head)
    return out


def brute_hash_scores(q_codes, codes, block_table, seq_lens, max_pages, reduce):
    qc, kc = q_codes.cpu().tolist(), codes.cpu()
    bt, sl = block_table.cpu().tolist(), seq_lens.cpu().tolist()
    N, Hq, W = q_codes.shape
    _, bs, Hkv, _ = codes.shape
    G = Hq // Hkv
    bits = 32 * W
    out = torch.full((N, Hkv, max_pages), float("-inf"), dtype=torch.float64)
    for n in range(N):
        for p in range(min(max_pages, math.ceil(sl[n] / bs))):
            blk = bt[n][p]
            for h in range(Hkv):
                vals = []
                for o in range(bs):
                    if p * bs + o >= sl[n]:
                        continue
                    k_words = kc[blk, o, h].tolist()
                    sim = 0
                    for g in range(G):
                        ham = sum(bin((a ^ b) & 0xFFFFFFFF).count("1") for a, b in zip(qc[n][h * G + g], k_words))
                        sim += bits - ham
                    vals.append(sim)
                out[n, h, p] = max(vals) if reduce == "max" else sum(vals)
    return out


def brute_select(scores, seq_lens, bs, budget, sink, recent, k_max):
    sc = scores.detach().cpu().double()
    N, Hkv, P = sc.shape
    idx = torch.full((N, Hkv, k_max), -1, dtype=torch.int32)
    num = torch.zeros(N, Hkv, dtype=torch.int32)
    for n in range(N):
        npg = min(P, math.ceil(int(seq_lens[n]) / bs))
        forced = sorted(set(range(min(sink, npg))) | set(range(max(0, npg - recent), npg)))
        for h in range(Hkv):
            k = min(max(int(budget[n, h]), len(forced)), npg, k_max)
            def s(p):
                v = sc[n, h, p].item()
                return float("-inf") if math.isnan(v) else v
            others = sorted((p for p in range(npg) if p not in forced), key=lambda p: (-s(p), p))
            chosen = sorted((forced + others)[:k])
            num[n, h] = k
            idx[n, h, :k] = torch.tensor(chosen, dtype=torch.int32)
    return idx, num


def brute_decode(q, key_cache, value_cache, block_table, seq_lens, page_idx, scale):
    q64 = q.detach().cpu().double()
    kc, vc = key_cache.detach().cpu().double(), value_cache.detach().cpu().double()
    bt, sl, pi = block_table.cpu().tolist(), seq_lens.cpu().tolist(), page_idx.cpu().tolist()
    N, Hq, D = q64.shape
    bs, Hkv = kc.shape[1], kc.shape[2]
    G = Hq // Hkv
    out = torch.zeros(N, Hq, D, dtype=torch.float64)
    for n in range(N):
        for hq in range(Hq):
            h = hq // G
            ks, vs = [], []
            for p in pi[n][h]:
                if p < 0:
                    continue
                for o in range(bs):
                    if p * bs + o < sl[n]:
                        ks.append(kc[bt[n][p], o, h])
                        vs.append(vc[bt[n][p], o, h])
            if not ks:
                continue
            K, V = torch.stack(ks), torch.stack(vs)
            w = torch.softmax(K @ q64[n, hq] * scale, 0)
            out[n, hq] = w @ V
    return out


def all_pages(seq_lens, bs, k_max, Hkv, device="cpu"):
    """page_idx selecting every page of every request (dense decode through the sparse kernel)."""
    N = len(seq_lens)
    idx = torch.full((N, Hkv, k_max), -1, dtype=torch.int32)
    for n, s in enumerate(seq_lens):
        p = min(k_max, math.ceil(s / bs))
        idx[n, :, :p] = torch.arange(p, dtype=torch.int32)
    return idx.to(device)


def rel_err(out, ref) -> float:
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    return ((out - ref).norm() / ref.norm().clamp(min=1e-30)).item()
