"""benchmarks/gpu_e2e.py --lanes: how the suite's units of work are shared over processes that run
side by side on one GPU, the arguments each lane gets, and the one summary made of theirs."""

import random


def test_every_unit_runs_in_exactly_one_lane_and_the_lanes_are_balanced(load_benchmark):
    g = load_benchmark("gpu_e2e")
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rng = random.Random(seed)
    labels = [r[0] for r in g.stress_runs(None)]
    assert "quest-preempt:graphs" in labels and "dense-fa3:eager" not in labels
    assert "test_engine.py" in g.ENGINE_FILES and "test_offload_engine.py" in g.ENGINE_FILES
    picked = rng.sample(labels, rng.randrange(1, len(labels) + 1))
    parts = ["kernels", "engine", "agree", "stress", "sanitizer"]
    for lanes in (1, 2, 3):
        plan = g.plan_lanes(parts, lanes, ["smollm2", "qwen-coder-0.5b"], picked)
        units = [u for lane in plan for u in lane]
        want = [("kernels",), *[("engine", f) for f in g.ENGINE_FILES], ("agree", "smollm2"), ("agree", "qwen-coder-0.5b"),
                *[("stress", x) for x in picked], ("sanitizer",)]
        assert sorted(units) == sorted(want) and len(plan) <= lanes
        loads = [sum(g.UNIT_SECONDS[u[0]] for u in lane) for lane in plan]
        longest = max(g.UNIT_SECONDS[u[0]] for u in units)
        assert max(loads) - min(loads) <= longest  # longest-first greedy: within one unit
        for lane in plan:  # the arguments name exactly the lane's units
            args = g.lane_args(lane)
            assert "--share-gpu" in args
            got_parts = set(args[args.index("--parts") + 1].split(","))
            assert got_parts == {u[0] for u in lane}
            if "stress" in got_parts:
                only = args[args.index("--stress-only") + 1].split(",")
                assert set(only) == {u[1] for u in lane if u[0] == "stress"}
                assert {r[0] for r in g.stress_runs(set(only))} == set(only)
            if "engine" in got_parts:
                assert args[args.index("--engine-files") + 1].split(",") == [u[1] for u in lane if u[0] == "engine"]
            if "agree" in got_parts:
                assert args[args.index("--agree-models") + 1].split(",") == [u[1] for u in lane if u[0] == "agree"]


def test_the_lanes_summary_holds_every_result_and_fails_if_one_failed(load_benchmark):
    g = load_benchmark("gpu_e2e")
    docs = [{"command": f"gpu_e2e.py --parts {p}", "device": "GPU X", "vllm": "0.33.0", "torch": "2.11",
             "commit": "abc", "results": [{"part": p, "ok": ok, "summary": "s", "seconds": 1.0}]}
            for p, ok in (("engine", True), ("agree", False))]
    doc = g.merge_lane_docs(docs, "gpu_e2e.py --lanes 2")
    assert [r["part"] for r in doc["results"]] == ["engine", "agree"]
    assert doc["lanes"] == ["gpu_e2e.py --parts engine", "gpu_e2e.py --parts agree"]
    text = g.summary_text(doc)
    assert "[PASS] engine" in text and "[FAIL] agree" in text and "lane: gpu_e2e.py --parts agree" in text
