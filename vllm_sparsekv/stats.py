"""Sparsity counters: pages attended vs pages held at decode, per worker process.

The backend adds to device tensors (no host sync on the hot path); a daemon thread reads them,
logs a line per interval and keeps the optional stats file current.
Read them in-process with `snapshot()`, from an `LLM` with `collect(llm)` (a collective RPC to
every worker), or from a server through the `stats_file` config option.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import torch

logger = logging.getLogger("vllm.sparsekv")  # under vLLM's logger, so its handlers print it

_counters: dict[torch.device, torch.Tensor] = {}
# index: 0 pages attended by sparse layers, 1 pages held by them, 2 decode (request, layer) rows
_FIELDS = ("attended_pages", "held_pages", "decode_rows")


def _counter(device: torch.device) -> torch.Tensor:
    c = _counters.get(device)
    if c is None:
        c = _counters[device] = torch.zeros(len(_FIELDS), dtype=torch.int64, device=device)
    return c


def record(attended: torch.Tensor, held: torch.Tensor, rows: torch.Tensor) -> None:
    """Add one layer's decode step: 0-d int tensors on the compute device (graph-safe in-place adds;
    padded rows of a captured batch hold no pages and count nowhere)."""
    c = _counter(attended.device)
    c[0] += attended
    c[1] += held
    c[2] += rows


def snapshot() -> dict:
    """Totals since the process started (or since `reset()`), summed over devices."""
    totals = [0] * len(_FIELDS)
    for c in _counters.values():
        for i, v in enumerate(c.tolist()):
            totals[i] += v
    out = dict(zip(_FIELDS, totals))
    out["attended_fraction"] = out["attended_pages"] / out["held_pages"] if out["held_pages"] else None
    out["pid"] = os.getpid()
    return out


def reset() -> None:
    for c in _counters.values():
        c.zero_()


def _worker_snapshot(worker) -> dict:  # runs inside each worker via collective_rpc
    return snapshot()


def collect(llm) -> list[dict]:
    """Counters of every worker of an offline `vllm.LLM`."""
    return llm.collective_rpc(_worker_snapshot)


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


def start_reporter(interval_s: float, stats_file: str | None) -> None:
    """Start (once per process) the daemon thread that logs the sparsity every `interval_s` and
    keeps `stats_file` current (checked every second, rewritten when the counters moved).
    A thread rather than the step loop, so the file is right also after the last step."""
    global _reporter
    if _reporter is not None or (interval_s <= 0 and not stats_file):
        return

    def run() -> None:
        last_log, logged, written = time.monotonic(), None, None
        while True:
            time.sleep(min(1.0, interval_s) if interval_s > 0 else 1.0)
            if not _counters:
                continue
            snap = snapshot()
            now = time.monotonic()
            if interval_s > 0 and now - last_log >= interval_s:
                _log_interval(logged, snap, now - last_log)
                last_log, logged = now, snap
            if stats_file and snap != written:
                _write(stats_file, snap)
                written = snap

    _reporter = threading.Thread(target=run, name="sparsekv-stats", daemon=True)
    _reporter.start()
