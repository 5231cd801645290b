"""Offload policies without an engine: the trace replay counts recalls like a brute-force count and
follows the connector's candidate rules, atskv's features, threshold and choices match hand-computed
cases, the trainer recovers known weights, the connector runs atskv under memory pressure, and bad
policy settings fail at startup naming the option."""

import json
import math

import numpy as np
import pytest

from tests.test_offload import _add, _report, _side, _step
from vllm_sparsekv.config import SparseKVConfig, SparseKVConfigError, load_config
from vllm_sparsekv.offload.policy import (FEATURES, ATSKVPolicy, LRUPolicy, PageHistory, RecallRule, make_policy,
                                          pressure)
from vllm_sparsekv.offload.replay import replay, replay_request
from vllm_sparsekv.tools import train_relevance


def _np_rng(seed_gen) -> np.random.Generator:
    return np.random.default_rng(int(seed_gen.initial_seed()))


def _random_trace(rng, bs: int, steps: int, pairs: int = 6) -> list:
    """One request's decode steps: growing length, random selections with (layer, head) counts."""
    seq_len = int(rng.integers(2 * bs, 12 * bs))
    out = []
    for _ in range(steps):
        n = math.ceil(seq_len / bs)
        pages = sorted(set(rng.choice(n, size=int(rng.integers(1, n + 1)), replace=True).tolist()) | {n - 1})
        out.append((seq_len, pages, rng.integers(1, pairs + 1, len(pages)).tolist()))
        seq_len += 1 + int(rng.integers(0, bs // 2))  # several tokens a step: pages appear faster
    return out


class _RandomPolicy:
    """Chooses a random number (up to `count`) of random candidates: the replay must not care."""

    def __init__(self, rng):
        self.rng = rng

    def observe(self, *a): ...

    def choose(self, req_id, candidates, count, num_pages, free_share):
        k = int(self.rng.integers(0, count + 1))
        return self.rng.choice(candidates, size=k, replace=False).tolist()

    def forget(self, req_id): ...


@pytest.mark.parametrize("fraction, recall", [(0.25, None), (0.5, None), (0.9, None), (0.25, (1, 1)), (0.5, (2, 4))])
def test_replay_counts_like_a_brute_force_count_and_keeps_the_candidate_rules(seed_gen, fraction, recall):
    """The replay's counts recomputed step by step from the policy's logged choices, with the
    promotions of `read_back: recall` (k of the last `window` steps read from the host) worked out
    independently."""
    rng = _np_rng(seed_gen)
    bs, sink, recent = 8, int(rng.integers(0, 3)), int(rng.integers(1, 3))
    for policy_kind in ("random", "lru", "atskv"):
        trace = _random_trace(rng, bs, steps=40)
        policy = {"random": _RandomPolicy(rng), "lru": LRUPolicy(), "atskv": ATSKVPolicy()}[policy_kind]
        log: list = []
        got = replay_request("r", trace, policy, fraction, bs, sink, recent, log,
                             recall=RecallRule(*recall) if recall else None)
        moves = dict(log)
        passive: set[int] = set()
        host_steps: dict[int, list[int]] = {}  # page -> steps it was selected while passive
        recalls = reads = resident = promoted = 0
        for i, (seq_len, pages, counts) in enumerate(trace):
            n = math.ceil(seq_len / bs)
            chosen = moves.get(i, [])
            assert i > 0 or not chosen, "nothing moves before the first report"
            back = set()
            if recall and i > 0:
                k, window = recall
                back = {p for p in passive if sum(i - window <= s < i for s in host_steps.get(p, [])) >= k}
                passive -= back
                for p in back:
                    host_steps.pop(p)
                promoted += len(back)
            allowed = {p for p in range(n) if sink <= p < n - recent - 1} - passive - back
            assert set(chosen) <= allowed and len(set(chosen)) == len(chosen), (policy_kind, i, chosen)
            want = min(len(allowed), n - len(passive) - math.ceil(fraction * n))
            if policy_kind != "random" and i > 0:  # the real policies move exactly what the target asks
                assert len(chosen) == max(0, want), (policy_kind, i)
            passive |= set(chosen)
            resident += n - len(passive)
            for p, c in zip(pages, counts):
                recalls += p in passive
                reads += c * (p in passive)
                if p in passive:
                    host_steps.setdefault(p, []).append(i)
        assert (got.recalls, got.host_reads, got.offloaded, got.resident_pages, got.promoted) == (
            recalls, reads, sum(map(len, moves.values())), resident, promoted), policy_kind
        assert promoted > 0 or not recall, "the random traces exercise promotions"


def test_recall_rule_counts_host_reads_within_its_window():
    rule = RecallRule(k=2, window=3)
    rule.note("r", [4, 7], step=1)
    rule.note("r", [4], step=2)
    assert rule.due("r", 3) == [4] and rule.due("r", 5) == []  # at 5, step 1's read left the window
    rule.note("r", [7], step=5)
    rule.note("r", [7], step=6)
    assert rule.due("r", 7) == [7]
    rule.promoted("r", [7])
    assert rule.due("r", 7) == []
    rule.forget("r")
    assert rule.hits == {}


def test_page_history_features_by_hand():
    h = PageHistory()
    h.observe("r", [0, 2], [4, 2])  # step 0: page 2 picked by half the pairs that picked page 0
    h.observe("r", [0], [4])
    h.observe("r", [0, 2, 3], [4, 4, 1])  # page 3 appears; page 1 was never selected
    x = dict(zip(FEATURES, h.features("r", [1, 2, 3, 5], num_pages=6).T))
    d = 0.8
    np.testing.assert_allclose(x["selected_ema"], [0, (1 - d) * d * d + (1 - d), 1 - d, 0])
    np.testing.assert_allclose(x["share_ema"], [0, (1 - d) * 0.5 * d * d + (1 - d), (1 - d) * 0.25, 0])
    # page 1: never selected, seen since step 0 (3 steps); page 2, 3: selected at the last step;
    # page 5: not reported yet (appears now)
    np.testing.assert_allclose(x["recency"], [math.exp(-3 / 8), 1, 1, 1])
    np.testing.assert_allclose(x["frequency"], [0, 2 / 3, 1, 0])
    np.testing.assert_allclose(x["position"], [1 / 6, 2 / 6, 3 / 6, 5 / 6])
    np.testing.assert_allclose(x["distance"], np.log1p([4, 3, 2, 0]))
    h.forget("r")
    assert "r" not in h.reqs


def test_atskv_threshold_follows_memory_pressure():
    assert pressure(0.9, 0.0) == 1.0  # free_target 0: always full, like lru
    assert pressure(0.1, 0.2) == 1.0 and pressure(0.3, 0.2) == pytest.approx(0.5) and pressure(0.5, 0.2) == 0.0
    # one feature (recency) with weight 1, bias 0: r = sigmoid(exp(-since / 8))
    w = np.array([1.0 if f == "recency" else 0.0 for f in FEATURES])
    pol = ATSKVPolicy(w, 0.0, beta=1.0, free_target=0.2)
    for step in range(8):  # page p last selected at step p - 1 (page 0: never, seen 8 steps)
        pol.observe("r", [step + 1] if step < 7 else [], step)
    cand = list(range(8))
    r = pol.relevance("r", cand, 8)
    assert list(np.argsort(r, kind="stable")) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert pol.choose("r", cand, 4, 8, free_share=0.1) == [0, 1, 2, 3]  # full pressure: the target
    assert pol.choose("r", cand, 4, 8, free_share=0.5) == []  # blocks to spare: nothing moves
    # half pressure: q = 0.5 * 4 / 8 = 0.25, tau = quantile(r, 0.25), between r[1] and r[2]
    tau = np.quantile(r, 0.25)
    assert r[1] <= tau < r[2]
    assert pol.choose("r", cand, 4, 8, free_share=0.3) == [0, 1]
    # beta < 1 lowers the threshold under the second page
    low = ATSKVPolicy(w, 0.0, beta=float(r[1] / r[2]) * 0.999, free_target=0.2)
    low.history = pol.history
    assert low.choose("r", cand, 4, 8, free_share=0.3) == [0]
    assert pol.choose("r", [5, 3], 1, 8, 0.0) == [3] and pol.choose("r", cand, 0, 8, 0.0) == []


def test_lru_and_atskv_agree_where_only_recency_counts(seed_gen):
    """With recency as atskv's only feature, its order is lru's (least recently selected first,
    the older page on ties): random traces give the same choices and the same counts."""
    rng = _np_rng(seed_gen)
    w = np.array([1.0 if f == "recency" else 0.0 for f in FEATURES])
    for _ in range(5):
        trace = _random_trace(rng, 8, steps=30)
        a = replay({"r": trace}, LRUPolicy(), 0.3, 8, 1, 1)
        b = replay({"r": trace}, ATSKVPolicy(w, 0.0), 0.3, 8, 1, 1)
        assert (a.recalls, a.host_reads) == (b.recalls, b.host_reads)


def test_trainer_recovers_known_weights(seed_gen):
    rng = _np_rng(seed_gen)
    w_true, b_true = rng.normal(0, 1.5, len(FEATURES)), float(rng.normal(0, 1))
    x = rng.normal(0, 1, (40_000, len(FEATURES)))
    y = (rng.random(len(x)) < 1 / (1 + np.exp(-(x @ w_true + b_true)))).astype(float)
    w, b = train_relevance.fit_logistic(x, y, l2=0.0)
    np.testing.assert_allclose(w, w_true, atol=0.15)
    assert abs(b - b_true) < 0.15
    assert train_relevance.log_loss(x, y, w, b) <= train_relevance.log_loss(x, y, w_true, b_true)


def _trace_doc(rng, n: int = 6) -> dict:
    """A trace document like `offload_policy.py record` writes: page 2 is selected whenever page 5
    was (a pattern the predictor can learn), the rest at random."""
    reqs = []
    for i in range(n):
        steps = []
        for seq_len, pages, counts in _random_trace(rng, 8, steps=40):
            sel = set(pages) | ({2} if 5 in pages else set())
            steps.append([seq_len, sorted(sel), [3] * len(sel)])
        reqs.append({"id": f"t-{i}", "split": "train" if i < n - 2 else "test", "steps": steps})
    return {"model": "synthetic", "method": "quest", "budget": 0, "block_size": 8, "sink_tokens": 8,
            "recent_tokens": 8, "requests": reqs}


def test_train_relevance_writes_weights_the_config_and_policy_accept(seed_gen, tmp_path):
    from vllm_sparsekv.tools.cli import main

    traces, out = tmp_path / "t.json", tmp_path / "w.json"
    traces.write_text(json.dumps(_trace_doc(_np_rng(seed_gen))))
    assert main(["train-relevance", str(traces), "--out", str(out), "--horizon", "2"]) == 0
    saved = json.loads(out.read_text())
    assert saved["features"] == list(FEATURES) and saved["split"] == "train" and saved["requests"] == 4
    assert saved["command"].startswith("sparsekv train-relevance")
    cfg = SparseKVConfig(dense_layers=[], offload={"enabled": True, "policy": "atskv", "relevance_weights": str(out)})
    pol = make_policy(cfg.offload)
    assert isinstance(pol, ATSKVPolicy) and pol.w.tolist() == saved["weights"] and pol.b == saved["bias"]
    with pytest.raises(ValueError, match="no 'dev' requests"):
        train_relevance.train(json.loads(traces.read_text()) | {"sink_pages": 1, "recent_pages": 1}, "dev")


def test_connector_runs_atskv_to_the_target_under_pressure_only():
    for usage, moved in ((1.0, 40 - math.ceil(0.25 * 40)), (0.2, 0)):
        side, mgr, kvm = _side(usage=usage, policy="atskv", free_target=0.25)
        _add(side, mgr, "a", 40 * 16 - 5)
        _step(side, kvm, ["a"])
        _report(side, 1, {"a": [0, 5, 39]}, {"a": [6, 6, 6]})
        meta = _step(side, kvm, ["a"])
        pages = [p for _, p, _, _ in meta.store]
        assert len(pages) == moved and (not pages or (min(pages) >= 1 and max(pages) < 37 and 5 not in pages))


@pytest.mark.parametrize("offload, message", [
    ({"policy": "belady"}, "sparsekv.offload.policy: must be one of lru, atskv, got 'belady'"),
    ({"threshold_beta": 2, "free_target": 0.1},
     "sparsekv.offload: free_target, threshold_beta: only used by policy 'atskv' .policy is 'lru'.; allowed"),
    ({"policy": "atskv", "relevance_weights": "/nonexistent.json"},
     "sparsekv.offload.relevance_weights: cannot read relevance weights '/nonexistent.json'"),
    ({"policy": "atskv", "threshold_beta": 0}, "sparsekv.offload.threshold_beta: must be > 0"),
    ({"policy": "atskv", "free_target": 0.7}, r"sparsekv.offload.free_target: must be in \[0, 0.5\]"),
    ({"read_back": "promote"}, "sparsekv.offload.read_back: must be one of host, recall, got 'promote'"),
    ({"recall_k": 2}, "sparsekv.offload: recall_k: only used by read_back 'recall' .read_back is 'host'.; allowed: host, recall"),
    ({"read_back": "recall", "recall_k": 0}, "sparsekv.offload.recall_k: must be >= 1, got 0"),
    ({"read_back": "recall", "recall_k": 4, "recall_window": 3}, "recall_window must be >= recall_k .4., got 3"),
])
def test_bad_policy_settings_fail_at_startup_naming_the_option(offload, message):
    with pytest.raises(SparseKVConfigError, match=message):
        load_config({"sparsekv": {"dense_layers": [], "offload": {"enabled": True, **offload}}})


def test_weights_from_another_feature_set_are_refused(tmp_path):
    bad = tmp_path / "w.json"
    bad.write_text(json.dumps({"format": "sparsekv-relevance/1", "features": ["recency"], "weights": [1], "bias": 0}))
    with pytest.raises(SparseKVConfigError, match="rerun `sparsekv train-relevance`"):
        load_config({"sparsekv": {"offload": {"policy": "atskv", "relevance_weights": str(bad)}}})
    bad.write_text(json.dumps({"format": "sparsekv-relevance/1", "features": list(FEATURES),
                               "weights": ["x"] * len(FEATURES), "bias": 0}))
    with pytest.raises(SparseKVConfigError, match="relevance_weights: .* weights must be 6 finite numbers"):
        load_config({"sparsekv": {"offload": {"policy": "atskv", "relevance_weights": str(bad)}}})


def test_selection_reports_of_tensor_parallel_workers_add_their_counts():
    import numpy as np

    from vllm_sparsekv.offload.connector import SelectionReport

    a = SelectionReport(3, ["x", "y"], np.array([[0, 2, 0, 0, 1], [5, 0, 0, 0, 0]], dtype=np.uint16))
    b = SelectionReport(3, ["x"], np.array([[0, 0, 0, 0, 3, 0, 1]], dtype=np.uint16))
    m = a.aggregate(b)
    got = {rid: (pages.tolist(), counts.tolist()) for rid, pages, counts in m.items()}
    assert m.step == 3 and got == {"x": ([1, 4, 6], [2, 4, 1]), "y": ([0], [5])}
