"""benchmarks/gpu_e2e.py's agreement summary on hand-made runs (the GPU suite reports it)."""

import random

def _run(tokens, logprobs, gaps):
    return {"results": [{"token_ids": t, "logprobs": lp, "top2_gap": g} for t, lp, g in zip(tokens, logprobs, gaps)]}


def test_agreement_counts_identical_prompts_divergences_and_logprob_drift(load_benchmark):
    g = load_benchmark("gpu_e2e")
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rng = random.Random(seed)
    n = 6
    toks = [[rng.randrange(100) for _ in range(n)] for _ in range(3)]
    lps = [[-rng.random() for _ in range(n)] for _ in range(3)]
    gaps = [[rng.random() for _ in range(n)] for _ in range(3)]
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
