"""Sparsity counters: pages attended vs pages held at decode, per worker process.

The metadata builder counts each step once, on the host, from the sequence lengths vLLM already
has there and the selection's own rule (no device op, no sync, nothing inside CUDA graphs). A
daemon thread logs a line per interval and keeps the optional stats file current; it never touches
the GPU and survives errors (it logs them and goes on).
Read the counters in-process with `snapshot()`, from an `LLM` with `collect(llm)` (a collective RPC
to every worker), or from a server through the `stats_file` config option.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

logger = logging.getLogger("vllm.sparsekv")  # under vLLM's logger, so its handlers print it

_FIELDS = ("attended_pages", "held_pages", "decode_rows")
_totals = [0, 0, 0]  # attended pages, held pages, decode (request, layer) rows of sparse layers
_lock = threading.Lock()


def add(attended: int, held: int, rows: int) -> None:
    """Add one decode step of the sparse layers (host ints)."""
    with _lock:
        _totals[0] += attended
        _totals[1] += held
        _totals[2] += rows


_extra: dict[str, int] = {}  # the passive store's counters (offloaded pages, ...) and peaks


def bump(name: str, n: int = 1) -> None:
    """Add `n` to the counter `name` (shown in `snapshot()` once it exists)."""
    with _lock:
        _extra[name] = _extra.get(name, 0) + n


def peak(name: str, value: int) -> None:
    """Keep the largest `value` seen under `name` (e.g. decode rows in one step)."""
    with _lock:
        _extra[name] = max(_extra.get(name, 0), value)


def snapshot() -> dict:
    """Totals since the process started (or since `reset()`)."""
    with _lock:
        out = dict(zip(_FIELDS, _totals))
        out.update(_extra)
    out["attended_fraction"] = out["attended_pages"] / out["held_pages"] if out["held_pages"] else None
    out["pid"] = os.getpid()
    return out


def reset() -> None:
    with _lock:
        _totals[:] = [0] * len(_FIELDS)
        _extra.clear()


def _worker_snapshot(worker) -> dict:  # runs inside each worker via collective_rpc
    return snapshot()


def collect(llm) -> list[dict]:
    """Counters of every worker of an offline `vllm.LLM`. The function goes as cloudpickle bytes,
    which vLLM's RPC carries and its workers load (a plain function is refused by vLLM 0.33's
    msgpack RPC unless VLLM_ALLOW_INSECURE_SERIALIZATION is set)."""
    import cloudpickle

    return llm.collective_rpc(cloudpickle.dumps(_worker_snapshot))


def _write(stats_file: str, snap: dict) -> None:
    tmp = f"{stats_file}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(snap, f)
    os.replace(tmp, stats_file)


def _log_interval(prev: dict | None, snap: dict, seconds: float) -> None:
    prev = prev or dict.fromkeys(_FIELDS, 0)
    att = snap["attended_pages"] - prev["attended_pages"]
    held = snap["held_pages"] - prev["held_pages"]
    if held:
        logger.info(
            "sparsekv: decode attended %d of %d pages (%.1f%%) in the last %.0f s; %.1f%% overall",
            att, held, 100.0 * att / held, seconds, 100.0 * snap["attended_fraction"],
        )


_reporter: threading.Thread | None = None


def start_reporter(interval_s: float, stats_file: str | None, engine: int = 0) -> None:
    """Start (once per process) the daemon thread that logs the sparsity every `interval_s` and
    keeps `stats_file` and, under a server, this worker's file for /metrics (metrics.py) current
    (checked every second, rewritten when the counters moved).
    A thread rather than the step loop, so the files are right also after the last step."""
    global _reporter
    from vllm_sparsekv.metrics import worker_file

    files = [f for f in (stats_file, worker_file(engine)) if f]
    if _reporter is not None or (interval_s <= 0 and not files):
        return

    def run() -> None:
        last_log, logged, written, failing = time.monotonic(), None, None, False
        while True:
            time.sleep(min(1.0, interval_s) if interval_s > 0 else 1.0)
            try:
                snap = snapshot()
                now = time.monotonic()
                if interval_s > 0 and now - last_log >= interval_s:
                    _log_interval(logged, snap, now - last_log)
                    last_log, logged = now, snap
                if files and snap != written:
                    for path in files:
                        _write(path, snap)
                    written, failing = snap, False
            except Exception as e:  # a full disk or a removed directory must not end the counters
                if not failing:
                    logger.warning("sparsekv: could not write %s: %s (retrying every second)",
                                   " or ".join(files), e)
                failing = True

    _reporter = threading.Thread(target=run, name="sparsekv-stats", daemon=True)
    _reporter.start()
