"""Run every GPU kernel test (compiled Triton at real sizes + CUDA-graph capture/replay of the
decode path) in one call and write a summary to <out>/gpu_tests_<device>.txt.

    python benchmarks/gpu_check.py [--out benchmarks/results] [--commit SHA]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--commit", default=os.environ.get("SPARSEKV_COMMIT", "unknown"))
    ap.add_argument("pytest_args", nargs="*")
    a = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    dev = torch.cuda.get_device_name()
    tag = re.sub(r"[^A-Za-z0-9]+", "_", dev).strip("_")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "--durations=15",
           "tests/kernels/", *a.pytest_args]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    dt = time.time() - t0
    import triton

    lines = [
        f"device: {dev}", f"torch: {torch.__version__}", f"triton: {triton.__version__}", f"commit: {a.commit}",
        f"command: python benchmarks/gpu_check.py  (runs: {' '.join(cmd[1:])})",
        f"exit code: {r.returncode}   wall: {dt:.0f}s", "",
        r.stdout[-20000:], r.stderr[-4000:],
    ]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_tests_{tag}.txt"
    path.write_text("\n".join(lines))
    print("\n".join(lines[:6]))
    print(r.stdout[-3000:])
    print("wrote", path)
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
