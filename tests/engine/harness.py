"""Run engine configurations in subprocesses and compare greedy outputs the way the tests must."""

import json
import os
import subprocess
import sys
import tempfile

RUNNER = os.path.join(os.path.dirname(__file__), "runner.py")


def set_cpu_engine_env() -> None:
    """The in-process CPU engine scripts' environment, set before vLLM is imported (defaults only):
    the engine core in this process, 2 OpenMP threads bound to cores 0-1, 1 GiB of KV space."""
    for key, value in (("VLLM_ENABLE_V1_MULTIPROCESSING", "0"), ("OMP_NUM_THREADS", "2"),
                       ("VLLM_CPU_OMP_THREADS_BIND", "0-1"), ("VLLM_CPU_KVCACHE_SPACE", "1")):
        os.environ.setdefault(key, value)


def llm_device_kwargs() -> dict:
    """The engine scripts' device settings (SPARSEKV_TEST_DEVICE, read at call time): CPU float32
    eager; CUDA fp16 with FULL decode graphs, torch.compile off, graphs for batches up to 32 only
    (starts in seconds; the decode path is what is tested, and no test sends more than 32 prompts)."""
    if os.environ.get("SPARSEKV_TEST_DEVICE") != "cuda":
        return {"dtype": "float32", "enforce_eager": True, "gpu_memory_utilization": 0.5}
    # SPARSEKV_TEST_KV_BYTES: other engines share the GPU (gpu_e2e.py's lanes); the utilization is
    # then only vLLM's startup check of free memory, kept low
    util = 0.15 if os.environ.get("SPARSEKV_TEST_KV_BYTES") else 0.5
    return {"dtype": "float16", "enforce_eager": False, "max_num_seqs": 32, "gpu_memory_utilization": util,
            "compilation_config": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY",
                                   "cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32]}}


def read_spec(arg: str) -> dict:
    """The engine scripts' SPEC_JSON argument: JSON text, or @path to a file holding it (long
    prompts overflow argv)."""
    if arg.startswith("@"):
        with open(arg[1:]) as f:
            arg = f.read()
    return json.loads(arg)


def run_engine(spec: dict, timeout: int = 900, script: str = RUNNER) -> dict:
    """Run `script` (runner.py, or another engine script with the same SPEC_JSON / RESULT contract)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:  # long prompts overflow argv
        json.dump(spec, f)
    try:
        proc = subprocess.run([sys.executable, script, "@" + f.name], capture_output=True, text=True, timeout=timeout)
    finally:
        os.unlink(f.name)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"engine run failed (rc={proc.returncode}) for {spec.get('backend')}:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# top-2 logprob gap under which a flipped greedy token is a tie, not an error, and the logprob
# agreement before it: float32 on CPU; float16 on CUDA (FA3 dense vs our Triton decode sum in other
# orders, and fp16 keeps 11 bits)
ON_CUDA = os.environ.get("SPARSEKV_TEST_DEVICE") == "cuda"
NEAR_TIE = 5e-2 if ON_CUDA else 1e-2
LOGPROB_TOL = 2e-2 if ON_CUDA else 1e-3


def assert_same_greedy(ref: dict, got: dict, what: str, tol: float = LOGPROB_TOL) -> None:
    """Token for token; where a genuine near-tie flips a token, everything before it must agree in
    logprob within `tol` and the flip must happen where the reference's top two are within
    NEAR_TIE."""
    for i, (r, g) in enumerate(zip(ref["results"], got["results"])):
        a, b = r["token_ids"], g["token_ids"]
        n = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        upto = len(a) if n is None else n
        for j in range(upto):
            assert abs(r["logprobs"][j] - g["logprobs"][j]) <= tol, (
                f"{what}, prompt {i}, token {j}: logprob {g['logprobs'][j]} vs {r['logprobs'][j]}"
            )
        if n is not None:
            assert r["top2_gap"][n] < NEAR_TIE, (
                f"{what}, prompt {i}: token {n} differs ({b[n]} vs {a[n]}) and it is no near-tie "
                f"(top-2 gap {r['top2_gap'][n]:.4f}): {g['text']!r} vs {r['text']!r}"
            )
        assert len(a) == len(b) or n is not None, f"{what}, prompt {i}: lengths {len(b)} vs {len(a)}"
