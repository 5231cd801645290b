"""benchmarks/capacity.py without an engine: the rows it writes (schema, TPOT percentiles, decode
tok/s, host traffic per decode step), the comparisons against dense and sparsekv, the table, and the
KV memory -> blocks conversion that gives every configuration the same memory."""

import json
from types import SimpleNamespace

import pytest


@pytest.fixture(scope="module")
def cap(load_benchmark):
    return load_benchmark("capacity")


def _args(**kw):
    base = dict(budget=128, sink_tokens=32, recent_tokens=32, cpu_bytes=2**30, resident_fraction=0.25,
                kv_blocks=72, kv_memory_bytes=0, block_size=32)
    return SimpleNamespace(**{**base, **kw})


def _raw(**kw):
    raw = {"wall_s": 12.34, "steps": 10, "decode_steps": 8, "running_max": 2, "decoding_max": 2,
           "kv_memory_bytes": 72 * 1474560, "kv_blocks": 72, "block_size": 32, "finished": 3,
           "output_tokens": [5, 5, 3], "tokens_sha1": ["a", "b", "c"],
           "first_token_ts": [10.0, 10.5, 12.0], "last_token_ts": [10.4, 11.3, 12.2],
           "preemptions": 1, "stats": {}}
    return {**raw, **kw}


def _meta(cap, names=("dense", "sparsekv", "sparsekv_offload")):
    return {"device": "cpu", "model": "SmolLM2-135M-Instruct", "context": 1024, "requests": 3,
            "sparsekv": {n: cap.sparse_config(n, _args()) for n in names}}


def test_a_row_has_the_issue_schema_and_its_numbers(cap):
    counters = {"offloaded_bytes": 3000, "host_read_bytes": 1000, "host_page_reads": 12, "offloaded_pages": 7,
                "max_decode_rows": 4, "attended_pages": 99}
    row = cap.build_row("sparsekv_offload", _raw(stats=counters), _meta(cap))
    assert tuple(row)[: len(cap.ROW_KEYS)] == cap.ROW_KEYS
    assert row["method"] == "quest" and row["budget"] == 128 and row["kv_memory_bytes"] == 72 * 1474560
    # TPOT per request: (last - first) / (tokens - 1) = 100, 200, 100 ms
    assert row["tpot_p50_ms"] == pytest.approx(100.0) and row["tpot_p99_ms"] == pytest.approx(200.0)
    # 4 + 4 + 2 decode tokens from the first first token (10.0) to the last token (12.2)
    assert row["decode_tok_s"] == pytest.approx(10 / 2.2, abs=0.01)
    assert row["host_bytes_per_step"] == 500 and row["recalls_per_step"] == 1.5  # over 8 decode steps
    assert row["offloaded_pages"] == 7 and row["max_decode_rows"] == 4 and "attended_pages" not in row
    json.dumps(row)


def test_dense_rows_have_no_method_and_no_host_traffic(cap):
    row = cap.build_row("dense", _raw(), _meta(cap))
    assert row["method"] is None and row["budget"] is None
    assert row["host_bytes_per_step"] == 0 and row["recalls_per_step"] == 0


def test_ratios_against_dense_and_offload_tokens_against_sparsekv(cap):
    meta = _meta(cap)
    rows = cap.compare([
        cap.build_row("dense", _raw(), meta),
        cap.build_row("sparsekv", _raw(), meta),
        cap.build_row("sparsekv_offload", _raw(running_max=5, last_token_ts=[10.2, 10.9, 12.1],
                                               tokens_sha1=["a", "x", "c"]), meta),
    ])
    off = rows[2]
    assert off["running_vs_dense"] == 2.5 and off["decode_vs_dense"] > 1
    assert off["same_tokens_as_sparsekv"] == 2  # request 1 changed
    assert "same_tokens_as_sparsekv" not in rows[1] and rows[0]["running_vs_dense"] == 1.0
    table = cap.format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 4 and lines[3].split()[:6] == ["sparsekv_offload", "128", "1024", "101.2", "3", "5"]


def test_the_configs_and_the_kv_memory_per_device(cap, tmp_path):
    assert cap.config_names(cuda=True)[0] == "dense_fa3" and cap.config_names(cuda=False)[0] == "dense"
    assert cap.sparse_config("dense_fa3", _args()) is None
    assert "offload" not in cap.sparse_config("sparsekv", _args())
    assert cap.sparse_config("sparsekv_offload", _args())["offload"]["enabled"]
    both = cap.sparse_config("sparsekv_offload_atskv_recall", _args())["offload"]
    assert both["policy"] == "atskv" and both["read_back"] == "recall" and both["resident_fraction"] == 0.25
    with pytest.raises(SystemExit, match="offload variants are atskv, recall"):
        cap.sparse_config("sparsekv_offload_belady", _args())
    assert cap.sparse_config("sparsekv", _args())["dense_layers"] == []
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 30, "num_attention_heads": 9,
                                                      "num_key_value_heads": 3, "hidden_size": 576}))
    assert cap.kv_blocks(_args(), str(tmp_path), cuda=False) == 72  # --kv-blocks as given
    # SmolLM2 on CPU: 2 (K, V) x 30 layers x 3 heads x 64 x 4 bytes x 32 tokens = 1474560 bytes a block
    assert cap.kv_blocks(_args(kv_memory_bytes=72 * 1474560 + 5), str(tmp_path), cuda=False) == 72
    assert cap.kv_blocks(_args(kv_memory_bytes=72 * 1474560), str(tmp_path), cuda=True) == 144  # bf16
