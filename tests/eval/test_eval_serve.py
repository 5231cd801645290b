"""benchmarks/serve.py against two local fake servers (sparse and dense)."""

import json

import pytest
from conftest import needs_essays
from fake_server import FakeServer

from sparsekv_eval.tokenization import as_tokenizer



@pytest.fixture(scope="module")
def serve(load_benchmark):
    return load_benchmark("serve")


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


# --- --launch: the servers started, loaded and stopped by serve.py itself -------------------------

def test_word_tokenizer_gives_exact_prompts_and_text_for_every_id(serve, tmp_path):
    from transformers import AutoTokenizer

    serve.write_word_tokenizer(tmp_path, 1000)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    ps = serve.word_prompts(3, 257, 1000, seed=4)
    assert [len(tok.encode(p)) for p in ps] == [257] * 3 and len({p.split()[0] for p in ps}) == 3
    assert all(tok.decode([i]) for i in (0, 1, 999))  # any sampled id streams as text
    assert len(serve.UNK_WORD) > len(" t999")  # vLLM bounds prompt characters by the longest token


def _args(serve, **kw):
    argv = ["--launch", "fa3,quest16", "--model", "/m", "--dummy", "--concurrency", "24"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return serve.parse_args(argv)


def test_server_commands_on_the_gpu(serve, monkeypatch):
    from vllm_sparsekv.tools import launch

    monkeypatch.setattr(launch, "on_cpu", lambda: False)
    monkeypatch.setattr(serve.shutil, "which", lambda name: None)  # vLLM installed with --target
    a = _args(serve)
    dense = serve.server_cmd("/m", 8001, "fa3", a, 33000, None)
    assert dense[1:4] == ["-m", "vllm.entrypoints.openai.api_server", "--model"] and dense[4] == "/m"
    assert dense[dense.index("--attention-backend") + 1] == "FLASH_ATTN"
    assert dense[dense.index("--max-model-len") + 1] == "33000" and "--no-enable-prefix-caching" in dense
    assert dense[dense.index("--load-format") + 1] == "dummy" and dense[dense.index("--dtype") + 1] == "bfloat16"
    comp = json.loads(dense[dense.index("--compilation-config") + 1])
    assert comp["cudagraph_mode"] == "FULL_DECODE_ONLY" and 24 in comp["cudagraph_capture_sizes"]
    sparse = serve.server_cmd("/m", 8002, "quest16_p32", a, 33000, "/tmp/s.json")
    assert sparse[sparse.index("--attention-backend") + 1] == "sparsekv"
    assert json.loads(sparse[sparse.index("--additional-config") + 1]) == {"sparsekv": {
        "method": "quest", "budget_fraction": 0.0625, "stats_file": "/tmp/s.json"}}
    assert sparse[sparse.index("--block-size") + 1] == "32"
    monkeypatch.setattr(launch, "on_cpu", lambda: True)  # CPU: vLLM's CPU attention is the dense one
    assert "--attention-backend" not in serve.server_cmd("/m", 8001, "fa3", a, 33000, None)


def test_launch_runs_each_server_in_turn_and_stops_it(serve, tmp_path, monkeypatch):
    """Two fake servers stand in for vLLM; the processes are real (`sleep`) and must be gone after."""
    import subprocess

    from vllm_sparsekv.tools import launch

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 500}))
    serve.write_word_tokenizer(model, 500)
    fakes = {"fa3": FakeServer(stream_tokens_delay=0.004).start(), "quest16": FakeServer(stream_tokens_delay=0.001).start(),
             "hash2_p32": None}
    ports = iter([fakes["fa3"].port, fakes["quest16"].port, 1])
    procs = []

    def start(cmd, log):
        procs.append(subprocess.Popen(["sleep", "60"], start_new_session=True))
        return procs[-1]

    def wait_healthy(proc, port, log, timeout):
        if port == 1:
            raise TimeoutError("server on port 1 not ready")

    monkeypatch.setattr(launch, "free_port", lambda: next(ports))
    monkeypatch.setattr(launch, "start", start)
    monkeypatch.setattr(launch, "wait_healthy", wait_healthy)
    try:
        doc = serve.main(["--launch", "fa3,quest16,hash2_p32", "--model", str(model), "--num-requests", "4",
                          "--concurrency", "2", "--prompt-tokens", "50", "--output-tokens", "6",
                          "--out-dir", str(tmp_path), "--commit", "abc123"])
    finally:
        for f in fakes.values():
            f and f.stop()
    assert all(p.poll() is not None for p in procs) and len(procs) == 3  # every server stopped, in turn
    assert doc["reference"] == "fa3" and doc["commit"] == "abc123" and doc["device"] and "torch" in doc
    assert doc["failures"] == {"hash2_p32": "TimeoutError: server on port 1 not ready"}
    s = doc["servers"]["quest16"]
    assert s["failed"] == 0 and s["output_tokens_total"] == 24 and s["tpot_s"]["mean"] > 0
    assert doc["ratios_vs_reference"]["quest16"]["output_throughput"] > 1  # the faster fake
    assert doc["ratios_vs_reference"]["fa3"]["output_throughput"] == pytest.approx(1)
    loads = [b for _, b in fakes["quest16"].requests if b.get("max_tokens") == 6]
    assert len(loads) == 4 and all(len(b["prompt"].split()) == 50 for b in loads)
    assert any(b.get("max_tokens") == 8 and len(b["prompt"].split()) == 50 for _, b in fakes["quest16"].requests)
    saved = json.loads((tmp_path / f"serve_{doc['device']}.json").read_text())
    assert saved["servers"]["fa3"]["cmd"] and saved["command"].startswith("serve.py --launch")
