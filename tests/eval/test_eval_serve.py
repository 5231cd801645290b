"""benchmarks/serve.py against two local fake servers (sparse and dense)."""

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import needs_essays
from fake_server import FakeServer

from sparsekv_eval.tokenization import as_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def serve():
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "benchmarks" / "serve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@needs_essays
def test_prompts_have_the_requested_length(serve, hf_tokenizer):
    ps = serve.build_prompts(3, 700, hf_tokenizer, seed=1)
    tok = as_tokenizer(hf_tokenizer)
    assert len(set(ps)) == 3 and len({p[:40] for p in ps}) == 3  # distinct prefixes
    for p in ps:
        assert 690 <= len(tok.encode(p)) <= 700


@needs_essays
def test_serve_sparse_vs_dense(serve, tmp_path, capsys):
    stats_file = tmp_path / "stats.json"
    stats_file.write_text(json.dumps({"attended_pages": 10, "held_pages": 100}))
    with FakeServer(stream_tokens_delay=0.001) as sp, FakeServer(stream_tokens_delay=0.003) as de:
        out = tmp_path / "serve.json"
        res = serve.main(["--base-url", sp.url, "--model", "m", "--dense-base-url", de.url,
                          "--num-requests", "6", "--concurrency", "3", "--prompt-tokens", "300",
                          "--output-tokens", "8", "--stats-url", sp.url + "/sparsekv/stats",
                          "--out", str(out)])
        bodies = [b for p, b in sp.requests if b.get("max_tokens") == 8]
        assert len(bodies) == 6 and all(b["ignore_eos"] and b["min_tokens"] == 8 for b in bodies)
    s, d = res["sparse"], res["dense"]
    assert s["failed"] == 0 and s["output_tokens_total"] == 48 == d["output_tokens_total"]
    assert s["ttft_s"]["mean"] > 0 and s["tpot_s"]["mean"] > 0
    assert s["sparsity"]["attended_held_ratio"] == pytest.approx(0.25)
    r = res["ratio_sparse_over_dense"]
    assert r["tpot_mean"] is not None and r["output_throughput"] > 0
    assert json.loads(out.read_text())["sparse"]["requests"] == 6
    assert "sparse/dense" in capsys.readouterr().out
    # the backend's stats file works as a stats source too
    import asyncio
    assert asyncio.run(serve.read_stats(str(stats_file)))["held_pages"] == 100
