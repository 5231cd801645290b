"""The /metrics collector (vllm_sparsekv.metrics) on worker files written as the stats thread
writes them; the live scrape is tests/server/test_server.py."""

import json

from prometheus_client import CollectorRegistry, generate_latest

from vllm_sparsekv import metrics


def test_collector_sums_each_engines_workers(tmp_path):
    for name, (att, held, rows) in {"0-11": (3, 10, 2), "0-12": (1, 6, 2), "1-13": (5, 5, 1)}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"attended_pages": att, "held_pages": held, "decode_rows": rows, "attended_fraction": att / held}))
    (tmp_path / "0-14.json.tmp14").write_text("{")  # a write in progress is not read
    registry = CollectorRegistry()
    registry.register(metrics._Collector(str(tmp_path), "smol"))
    text = generate_latest(registry).decode()
    for line in ['vllm:sparsekv_attended_pages_total{engine="0",model_name="smol"} 4.0',
                 'vllm:sparsekv_held_pages_total{engine="0",model_name="smol"} 16.0',
                 'vllm:sparsekv_decode_rows_total{engine="0",model_name="smol"} 4.0',
                 'vllm:sparsekv_attended_fraction{engine="0",model_name="smol"} 0.25',
                 'vllm:sparsekv_attended_fraction{engine="1",model_name="smol"} 1.0',
                 "# TYPE vllm:sparsekv_attended_pages_total counter"]:
        assert line in text, text


def test_worker_file_follows_the_inherited_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(metrics.ENV_DIR, raising=False)
    assert metrics.worker_file(0) is None  # offline without a front end: no file
    monkeypatch.setenv(metrics.ENV_DIR, str(tmp_path))
    assert metrics.worker_file(2).startswith(str(tmp_path / "2-"))
