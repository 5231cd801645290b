"""benchmarks/kernel_decode.py's dense peers, on CPU: which peer is the baseline, that a peer with a
wrong output or no library is skipped with its reason, and the layouts the peers read (xformers'
paged mask checked through its own `materialize` when xformers imports)."""

from types import SimpleNamespace

import pytest
import torch

from vllm_sparsekv.kernels import sparse_paged_decode_ref
from vllm_sparsekv.kernels.testing import all_pages



@pytest.fixture(scope="module")
def kd(load_benchmark):
    return load_benchmark("kernel_decode")


def fake_case(kd, N=2, L=128, bs=16, extra_blocks=8, seed=0):
    """A kernel_decode.Case on CPU in float32: shuffled block table, spare blocks beyond it."""
    g = torch.Generator().manual_seed(seed)
    P = L // bs
    B = N * P + extra_blocks
    kc = torch.randn(B, bs, kd.HKV, kd.D, generator=g)
    vc = torch.randn(B, bs, kd.HKV, kd.D, generator=g)
    bt = torch.randperm(B, generator=g)[: N * P].to(torch.int32).view(N, P)
    return SimpleNamespace(N=N, L=L, bs=bs, P=P, kc=kc, vc=vc, bt=bt, sl=torch.full((N,), L, dtype=torch.int32),
                           q=torch.randn(N, kd.HQ, kd.D, generator=g), scale=kd.D ** -0.5)


def ours_ref(kd, c, kc, vc, bt, page):
    """Our kernels' torch reference, every page of `bt` (pages of `page` tokens over kc/vc)."""
    kp, vp = kc.reshape(-1, page, kd.HKV, kd.D), vc.reshape(-1, page, kd.HKV, kd.D)
    idx = all_pages(c.sl, page, c.L // page, kd.HKV)
    return sparse_paged_decode_ref(c.q, kp, vp, bt, c.sl, idx, c.scale)


def test_best_dense_is_the_fastest_kernel(kd):
    assert kd.best_dense({"ours": 1.46, "sdpa": 1.40, "fa3": 1.31, "xformers": 1.52}) == ("fa3", 1.31)
    assert kd.best_dense({"ours": 0.2}) == ("ours", 0.2)


def test_reference_over_a_peers_own_pages(kd):
    """A peer on its own 64-token pages is checked against attention over those pages' tokens."""
    c = fake_case(kd, N=2, L=128, bs=16, extra_blocks=8)  # 24 blocks of 16 = 6 pages of 64
    bt64 = torch.randperm(6)[:4].to(torch.int32).view(2, 2)
    ref, n = kd.peer_check_ref(c, "x", {"block_table": "own", "page_size": 64}, None, (bt64,))
    assert n == 2
    want = ours_ref(kd, c, c.kc, c.vc, bt64, 64)
    assert kd.rel_err(ref, want) < 1e-5
    # the case's own table: the check is against our dense output itself
    dense_out = ours_ref(kd, c, c.kc, c.vc, c.bt, 16)
    assert kd.peer_check_ref(c, "fa3", {}, dense_out, ())[0] is dense_out
    assert kd.rel_err(kd.attn_ref(c.q, c.kc[c.bt.long()].flatten(1, 2), c.vc[c.bt.long()].flatten(1, 2), c.scale),
                      dense_out) < 1e-5


@pytest.mark.parametrize("bs,page", [(16, 64), (64, 64)])
def test_xformers_inputs_address_the_right_tokens(kd, bs, page):
    pytest.importorskip("xformers.ops.fmha.attn_bias")
    c = fake_case(kd, N=3, L=256, bs=bs, extra_blocks=64 // bs * 2)
    q5, k5, v5, bias, bt = kd.xformers_inputs(c, page)
    assert bt.shape == (3, 256 // page) and (page != bs or torch.equal(bt, c.bt))
    assert q5.shape == (1, 3, kd.HKV, kd.G, kd.D) and k5.shape[2:] == (kd.HKV, kd.G, kd.D)
    T = k5.shape[1]
    mask = bias.materialize((c.N, c.N * c.L))  # [queries, physical keys]: 0 where attended, -inf elsewhere
    assert mask.shape[0] == c.N and mask.shape[1] <= T
    s = torch.einsum("nhgd,thgd->nhgt", q5[0], k5[0, : mask.shape[1]]) * c.scale + mask[:, None, None, :]
    out = torch.einsum("nhgt,thgd->nhgd", s.softmax(-1), v5[0, : mask.shape[1]]).reshape(c.N, kd.HQ, kd.D)
    want, _ = kd.peer_check_ref(c, "xformers", {"block_table": "own" if page != bs else "shared", "page_size": page},
                                ours_ref(kd, c, c.kc, c.vc, c.bt, bs), (bt,), n=c.N)
    assert kd.rel_err(out, want) < 1e-5


def test_peers_are_checked_and_skipped_with_a_reason(kd, monkeypatch):
    c = fake_case(kd)
    dense_out = ours_ref(kd, c, c.kc, c.vc, c.bt, c.bs)
    builds = []

    def peer(output, notes=None):
        def build(case):
            builds.append(output)
            if output == "none":
                raise kd.PeerUnavailable("library not installed")
            out = {"good": dense_out, "wrong": dense_out.flip(0)}[output]
            return (lambda: None), (lambda: out), (), dict(notes or {})
        return build

    monkeypatch.setattr(kd, "PEERS", {"good": peer("good"), "wrong": peer("wrong"), "none": peer("none")})
    monkeypatch.setattr(kd, "bench", lambda f, reps, graph=True: 0.5)
    skipped = {}
    ms, info = kd.time_peers(c, dense_out, 3, skipped)
    assert ms == {"good": 0.5} and info["good"]["rel_err"] == 0 and info["good"]["timing"] == "graph"
    assert skipped["none"] == "library not installed" and skipped["wrong"].startswith("wrong output")
    kd.time_peers(c, dense_out, 3, skipped)  # a skipped peer is not built again
    assert builds == ["good", "wrong", "none", "good"]


def test_fa3_peer_says_why_it_cannot_run_here(kd):
    """On a host without vLLM's FA3 extension (this one) the peer is skipped with the reason."""
    try:
        from vllm.vllm_flash_attn import flash_attn_interface as fai
        if fai.FA3_AVAILABLE and torch.cuda.is_available():
            pytest.skip("FA3 is installed here")
    except Exception:  # noqa: BLE001
        pass
    with pytest.raises(kd.PeerUnavailable, match="vllm_flash_attn|FA3"):
        kd.peer_fa3(fake_case(kd))


def test_summary_tables(kd, capsys):
    res = {"dense": [{"batch": 8, "context": 131072, "page_size": 16, "ms": {"ours": 1.46, "fa3": 1.31},
                      "best_dense": "fa3", "TBps": {"ours": 2.9, "fa3": 3.2}}],
           "peers_skipped": {"xformers": "xformers does not import"},
           "rows": [{"method": "quest", "batch": 8, "context": 131072, "page_size": 16, "budget": "1/16",
                     "sparse_ms": 0.226, "speedup_vs_best_dense": 1.31 / 0.226, "best_dense": "fa3",
                     "speedup_vs_dense": 1.46 / 0.226, "floor_speedup": 7.9}]}
    kd.print_summary(res)
    out = capsys.readouterr().out
    assert "skipped xformers: xformers does not import" in out and "3.20" in out
    assert " 5.80 " in out and " 6.46 " in out  # x best dense (fa3), x ours
