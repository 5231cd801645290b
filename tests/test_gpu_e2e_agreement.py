"""benchmarks/gpu_e2e.py's agreement summary on hand-made runs (the GPU suite reports it)."""

import random


def _run(tokens, logprobs, gaps):
    return {"results": [{"token_ids": t, "logprobs": lp, "top2_gap": g, "text": str(t)}
                        for t, lp, g in zip(tokens, logprobs, gaps)]}


def _random_outputs(prompts: int, n: int, gap_floor: float = 0.0):
    """Fresh seeded greedy outputs: token ids, logprobs and dense top-2 gaps (>= gap_floor)."""
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rng = random.Random(seed)
    toks = [[rng.randrange(100) for _ in range(n)] for _ in range(prompts)]
    lps = [[-rng.random() for _ in range(n)] for _ in range(prompts)]
    gaps = [[gap_floor + rng.random() for _ in range(n)] for _ in range(prompts)]
    return toks, lps, gaps


def test_agreement_counts_identical_prompts_divergences_and_logprob_drift(load_benchmark):
    g = load_benchmark("gpu_e2e")
    toks, lps, gaps = _random_outputs(3, 6)
    dense = _run(toks, lps, gaps)
    got_toks = [list(toks[0]), list(toks[1]), list(toks[2])]
    got_toks[1][4] = (toks[1][4] + 1) % 100  # prompt 1 differs at token 4
    got_lps = [list(lps[0]), list(lps[1]), list(lps[2])]
    got_lps[0][2] += 0.03  # prompt 0: drift above the tolerance
    got_lps[1][5] += 0.5  # after prompt 1's divergence: not counted
    got_lps[2][1] -= 0.01  # under the tolerance
    s = g.agreement(dense, _run(got_toks, got_lps, gaps), tol=0.02)
    assert s["identical"] == 2 and s["prompts"] == 3
    assert s["diverged"] == [{"prompt": 1, "token": 4, "dense_top2_gap": round(gaps[1][4], 4)}]
    assert abs(s["max_dlogprob"] - 0.03) < 1e-4 and s["over_tol"] == 1


def test_same_as_dense_uses_the_fixed_tolerance_then_the_dense_vs_dense_spread(load_benchmark):
    from tests.engine.harness import LOGPROB_TOL, NEAR_TIE

    g = load_benchmark("gpu_e2e")
    toks, lps, gaps = _random_outputs(2, 8, gap_floor=NEAR_TIE)  # no near-tie anywhere
    dense = _run(toks, lps, gaps)

    def verdict(drift, calibrated, flip=None, tie=False):
        got_lps = [list(x) for x in lps]
        got_lps[1][3] += drift
        got_toks = [list(t) for t in toks]
        my_gaps = [list(x) for x in gaps]
        if flip is not None:
            got_toks[0][flip] = (toks[0][flip] + 1) % 100
            if tie:
                my_gaps[0][flip] = NEAR_TIE / 2
        got = _run(got_toks, got_lps, gaps)
        ref = _run(toks, lps, my_gaps)
        return g.same_as_dense(ref, got, "x", g.agreement(ref, got, LOGPROB_TOL), calibrated)

    assert verdict(LOGPROB_TOL / 2, LOGPROB_TOL).startswith("same as dense (")
    assert verdict(2 * LOGPROB_TOL, 3 * LOGPROB_TOL).startswith("same as dense within the dense-vs-dense spread")
    assert verdict(4 * LOGPROB_TOL, 3 * LOGPROB_TOL).startswith("DIFFERS")
    assert verdict(0.0, LOGPROB_TOL, flip=5).startswith("DIFFERS")  # a flip where dense is sure
    assert verdict(0.0, LOGPROB_TOL, flip=5, tie=True).startswith("same as dense (")
