"""benchmarks/quality.py's rows: runs that differ only in budget allocation stay apart, the
average over tasks is the mean of the task means, and the markdown shows every run."""

import importlib.util
import random
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from sparsekv_eval import sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _quality():
    spec = importlib.util.spec_from_file_location("quality_bench", ROOT / "benchmarks" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rows_keep_allocations_apart(tmp_path):
    import json

    q = _quality()
    prof = tmp_path / "heads.json"
    prof.write_text(json.dumps({"num_layers": 3, "num_kv_heads": 1,
                                "scores": {"headkv": [[1.0], [2.0], [3.0]], "infscore": [[1.0], [1.0], [1.0]]}}))
    runs = sweep.make_configs(["snapkv", "snapkv@headkv"], [0.125], [], head_budgets=str(prof))
    rng = random.Random()
    recs, truth = [], {}
    for task in ("t1", "t2"):
        n = rng.randint(3, 9)
        for i in range(n):
            r = {"id": f"{task}-{i}", "task": task, "target_length": 4096, "runs": {}}
            for run in runs:
                s = float(rng.random() < 0.5) if run.label != "dense" else 1.0
                r["runs"][run.label] = {"score": s, "attended_fraction": 0.125}
                truth.setdefault((task, run.label), []).append(s)
            recs.append(r)
    rows = q.build_rows(recs, runs, "m", {})
    for run in runs:
        per_task = [100 * sum(truth[(t, run.label)]) / len(truth[(t, run.label)]) for t in ("t1", "t2")]
        got = [r for r in rows if r["task"] == "average" and q._key(r) == q._key(run.row_fields())]
        assert len(got) == 1
        assert got[0]["score"] == pytest.approx(sum(per_task) / 2, abs=0.011)
        for t, want in zip(("t1", "t2"), per_task):
            (row,) = [r for r in rows if r["task"] == t and q._key(r) == q._key(run.row_fields())]
            assert row["score"] == pytest.approx(want, abs=0.006)
    md = q.markdown(rows, [], {"settings": {"sink_tokens": 64, "recent_tokens": 64, "dense_layers": [0, 1]}},
                    False, 16)
    assert "| snapkv@headkv | 1/8 |" in md and "| snapkv | 1/8 |" in md


def test_report_reads_its_own_stem_only(tmp_path):
    q = _quality()
    base = tmp_path / "quality_m"
    for name in ("quality_m.records.jsonl", "quality_m.a.records.jsonl", "quality_m.b2.records.jsonl",
                 "quality_m_methods.a.records.jsonl", "quality_m_2pct.records.jsonl", "quality_mx.records.jsonl"):
        (tmp_path / name).write_text("")
    got = [p.name for p in q._stem_files(base, "records.jsonl")]
    assert got == ["quality_m.a.records.jsonl", "quality_m.b2.records.jsonl", "quality_m.records.jsonl"]
