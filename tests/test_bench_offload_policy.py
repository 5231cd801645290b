"""benchmarks/offload_policy.py without an engine: its rows on a synthetic trace (host bytes per
step from the replay's counts, ratios against lru) and its trace-knowing reference policy."""

import math

import pytest

from tests.test_offload_policy import _np_rng, _trace_doc
from vllm_sparsekv.offload.policy import LRUPolicy, RecallRule
from vllm_sparsekv.offload.replay import replay_request


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("offload_policy")


def test_rows_count_host_bytes_from_the_replay(bench, seed_gen):
    doc = _trace_doc(_np_rng(seed_gen)) | {"sink_pages": 1, "recent_pages": 1}
    policies = [("lru", lambda t: LRUPolicy(), None), ("future", bench.FuturePolicy, None), ("lru", lambda t: LRUPolicy(), (1, 2))]
    rows = bench.replay_rows(doc, policies, [0.25, 0.5], "test", pair_bytes=10, pairs=3)
    assert [(r["resident_fraction"], r["policy"], r["read_back"]) for r in rows] == [
        (share, name, rb) for share in (0.25, 0.5) for name, rb in (("lru", "host"), ("future", "host"),
                                                                     ("lru", "recall 1 of 2"))]
    traces = {r["id"]: r["steps"] for r in doc["requests"] if r["split"] == "test"}
    for row in rows:
        make = LRUPolicy if row["policy"] == "lru" else lambda: bench.FuturePolicy(traces)
        recall = RecallRule(1, 2) if row["read_back"] != "host" else None
        res = [replay_request(k, v, make(), row["resident_fraction"], 8, 1, 1, recall=recall) for k, v in traces.items()]
        steps = sum(r.steps for r in res)
        assert row["steps"] == steps and row["requests"] == 2
        assert row["host_bytes_per_step"] == round(sum(3 * (r.offloaded + r.promoted) + r.host_reads for r in res)
                                                   * 10 / steps)
        assert row["promoted_per_step"] == round(sum(r.promoted for r in res) / steps, 3)
        assert math.isclose(row["recalls_per_step"], round(sum(r.recalls for r in res) / steps, 3))
        # same share for every policy: only the choice of pages differs
        if row["read_back"] == "host":
            assert row["resident_share"] == rows[0 if row["resident_fraction"] == 0.25 else 3]["resident_share"]
    assert rows[0]["recalls_vs_lru"] == rows[3]["host_bytes_vs_lru"] == 1.0
    assert rows[1]["recalls_vs_lru"] == round(rows[1]["recalls_per_step"] / rows[0]["recalls_per_step"], 3)
    assert "future" in bench.format_table(rows)
