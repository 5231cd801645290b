"""benchmarks/offload_host.py on a small shape: its rows, and the plans it times really brought
every request down to the resident share (a plan that skipped its work would time fast)."""

import json
import math


def test_rows_and_the_resident_share_the_timed_plans_reached(load_benchmark, tmp_path):
    bench = load_benchmark("offload_host")
    assert bench.main(["--requests", "3", "--context", "2048", "--steps", "5", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "offload_host_cpu.json").read_text())
    assert doc["commit"] and doc["command"].startswith("offload_host.py")
    rows = {r["policy"]: r for r in doc["rows"]}
    assert set(rows) == {"lru", "atskv"}
    pages = math.ceil((2048 + 5) / 16)
    # lru moves every request to ceil(0.25 * pages) resident pages; atskv at most that many
    assert rows["lru"]["resident_share"] == round(math.ceil(0.25 * pages) / pages, 4)
    assert rows["atskv"]["resident_share"] >= rows["lru"]["resident_share"]
    for r in rows.values():
        assert r["host_ms_per_step"] > 0 and r["report_bytes"] > 0
