"""benchmarks/quality_vllm.py: the grid it builds, the report it writes (merged calls, paired with
dense), and one end-to-end run through vLLM on CPU (SmolLM2, ~1K tokens, dense + quest)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality_vllm as QV  # noqa: E402

ROW_KEYS = {"suite", "task", "model", "method", "context", "budget", "score", "dense_score", "n", "ci95",
            "command", "device", "commit"}


def test_budget_grid_and_config_filter():
    assert QV.parse_budgets("1/8,1/16,0.05,2048") == ([0.125, 0.0625, 0.05], [2048])
    a = QV.main.__globals__["argparse"].Namespace(
        methods=["quest", "snapkv@pyramid", "h2o"], budgets="1/8,2048", configs="dense,quest-*,h2o-f0.125",
        sink_tokens=None, recent_tokens=None, head_budgets=None, hash_checkpoint=None, set=["quest.group_reduce=max"])
    runs = QV.all_runs(a)
    assert [r.label for r in runs] == ["dense", "quest-f0.125", "quest-b2048", "h2o-f0.125"]
    cfg = QV.sparsekv_dict(runs[1].config)
    assert cfg["method"] == "quest" and cfg["budget_fraction"] == 0.125 and "token_budget" not in cfg
    assert cfg["quest"] == {"group_reduce": "max"}  # --set reaches the engine's config


def _pred(run, i, task, L, ok):
    out = f"{1000000 + i}"
    return {"run": run, "id": f"{task}-{L}-{i}", "task": task, "target_length": L, "outputs": [out],
            "pred": f" {out}." if ok else " no idea"}


def test_report_pairs_with_dense_and_merges_calls(tmp_path):
    """Two calls' files (overlapping) -> rows with the schema; quest is scored against dense on the
    same samples; a sample without a dense answer is left out of the ratios."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir(), b_dir.mkdir()
    dense = [_pred("dense", i, t, 1024, ok=i < 8) for t in ("vt", "niah_single_1") for i in range(10)]
    quest = [_pred("quest-f0.125", i, t, 1024, ok=i < 4) for t in ("vt", "niah_single_1") for i in range(10)]
    orphan = [_pred("quest-f0.125", 99, "vt", 1024, ok=True)]  # no dense answer for it
    start = lambda run, fields, cfg: {"run": run, "row_fields": fields, "sparsekv": cfg, "model": "M",  # noqa: E731
                                      "device": "cpu", "command": f"cmd {run}", "commit": "abc",
                                      "planned": {"vt@1024": 10, "niah_single_1@1024": 10}}
    done = lambda run, af: {"run": run, "done": True, "block_sizes": [16], "backends": ["X"], "startup_s": 1,  # noqa: E731
                            "generate_s": 2, "prompts": 20, "prompt_tokens": 20000, "gen_tokens": 100,
                            "stats": {"attended_fraction": af} if af else None, "device_name": "GPU-X"}
    (a_dir / "q.preds.jsonl").write_text("".join(json.dumps(p) + "\n" for p in dense + quest[:5]))
    (a_dir / "q.configs.jsonl").write_text(json.dumps(start("dense", {"method": "dense"}, None)) + "\n"
                                           + json.dumps(done("dense", None)) + "\n")
    (b_dir / "q.preds.jsonl").write_text("".join(json.dumps(p) + "\n" for p in quest + orphan) + '{"cut by a ki')
    qcfg = {"method": "quest", "budget_fraction": 0.125, "sink_tokens": 64, "recent_tokens": 64, "dense_layers": [0, 1]}
    (b_dir / "q.configs.jsonl").write_text(
        json.dumps(start("quest-f0.125", {"method": "quest", "budget_fraction": 0.125}, qcfg)) + "\n"
        + json.dumps(done("quest-f0.125", 0.14)) + "\n")
    args = QV.main.__globals__["argparse"].Namespace(out_dir=str(tmp_path / "out"), name="m", device_tag="GPU",
                                                     model="M", merge=[str(a_dir / "q.preds.jsonl"),
                                                                       str(b_dir / "q.preds.jsonl")])
    assert QV.cmd_report(args) == 0
    doc = json.loads((tmp_path / "out" / "quality_m.vllm_GPU.json").read_text())
    rows = {(r["task"], r["method"]): r for r in doc["rows"]}
    for r in doc["rows"]:
        assert ROW_KEYS <= set(r), sorted(ROW_KEYS - set(r))
    q = rows[("vt", "quest")]
    assert (q["score"], q["dense_score"], q["n"], q["budget"]) == (40.0, 80.0, 10, "1/8")
    assert q["ratio"] == 0.5 and q["attended_fraction"] == 0.14 and q["device"] == "GPU-X"
    assert rows[("average", "quest")]["score"] == 40.0 and not doc["partial"]
    md = (tmp_path / "out" / "quality_m.vllm_GPU.md").read_text()
    assert "| quest | 40.0 (50%) |" in md and "through vLLM" in md


@pytest.mark.engine
def test_end_to_end_on_cpu(smollm2_path, tmp_path):
    """dense (vLLM's CPU attention) and quest through sparsekv on the same token ids; then a rerun
    finds everything done. The rows carry the schema, and the worker says which backend ran."""
    out = tmp_path / "res"
    cmd = [sys.executable, str(ROOT / "benchmarks/quality_vllm.py"), "run", "--cpu", "--model", smollm2_path,
           "--name", "smol", "--contexts", "1k", "--n", "1", "--tasks", "niah_single_1", "--methods", "quest",
           "--budgets", "1/4", "--max-tokens", "10", "--workers", "1", "--out-dir", str(out)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'eval'}"}
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(f"end to end: {time.time() - t0:.0f} s")
    doc = json.loads((out / "quality_smol.vllm_cpu.json").read_text())
    assert {(r["task"], r["method"]) for r in doc["rows"]} == {
        ("niah_single_1", "dense"), ("niah_single_1", "quest"), ("average", "dense"), ("average", "quest")}
    for row in doc["rows"]:
        assert ROW_KEYS <= set(row) and row["context"] == 1024 and row["device"] == "cpu"
    runs = doc["runs"]
    assert runs["dense"]["backends"] == ["CPUAttentionBackend"] and runs["quest-f0.25"]["backends"] == ["SparseKVBackend"]
    assert 0 < runs["quest-f0.25"]["stats"]["attended_fraction"] < 0.5
    preds = (out / "quality_smol.vllm_cpu.preds.jsonl").read_text().splitlines()
    assert len(preds) == 2 and all(json.loads(p)["prompt_tokens"] > 800 for p in preds)
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count("already there") == 2
    assert (out / "quality_smol.vllm_cpu.preds.jsonl").read_text().splitlines() == preds


def test_plan_calibrates_from_measured_runs(smollm2_path):
    """The FLOP model's speed is replaced by what a finished run measured; H2O's runs do not count."""
    model = Path(smollm2_path)
    f4k = QV.prefill_flops(model, 4000)
    run = {"run": "dense", "done": True, "startup_s": 20.0,
           "contexts": {"4096": {"prompts": 10, "prompt_tokens": 40000, "gen_tokens": 0, "generate_s": 2.0}}}
    h2o = {**run, "run": "h2o-f0.125", "startup_s": 99.0,
           "contexts": {"4096": {"prompts": 10, "prompt_tokens": 40000, "gen_tokens": 0, "generate_s": 50.0}}}
    tflops, startup = QV.calibrate(model, [{"run": "dense"}, run, h2o], 150.0)
    assert tflops == pytest.approx(10 * f4k / 2.0 / 1e12) and startup == 30.0
    assert QV.calibrate(model, [{"run": "dense"}], 123.0) == (123.0, QV.PLAN_STARTUP_S)
    # the attention term grows with the square of the context
    assert QV.prefill_flops(model, 8000) - 2 * QV.prefill_flops(model, 4000) > 0


def test_partial_is_per_run(tmp_path):
    """A run planned with n=2 beside a dense run planned with n=4 is complete; one cut at 1 of 2 is not."""
    preds = [_pred("dense", i, "vt", 1024, ok=True) for i in range(4)]
    preds += [_pred("quest-f0.125", i, "vt", 1024, ok=True) for i in range(2)]
    preds += [_pred("hash-f0.125", 0, "vt", 1024, ok=True)]
    conf = [{"run": "dense", "row_fields": {"method": "dense"}, "planned": {"vt@1024": 4}},
            {"run": "quest-f0.125", "row_fields": {"method": "quest", "budget_fraction": 0.125}, "planned": {"vt@1024": 2}},
            {"run": "hash-f0.125", "row_fields": {"method": "hash", "budget_fraction": 0.125}, "planned": {"vt@1024": 2}}]
    rows = {(r["task"], r["method"]): r for r in QV.build_report(preds, conf, "m")["rows"]}
    assert not rows[("vt", "dense")]["partial"] and not rows[("vt", "quest")]["partial"]
    assert rows[("vt", "hash")]["partial"] and rows[("average", "hash")]["partial"]
    assert not rows[("average", "quest")]["partial"]
