"""Sparsity counters: pages attended vs pages held at decode, per worker process.

The backend adds to device tensors (no host sync on the hot path); the counters are read, and
the log line / stats file written, from the metadata builder once per interval.
Read them in-process with `snapshot()`, from an `LLM` with `collect(llm)` (a collective RPC to
every worker), or from a server through the `stats_file` config option.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time

import torch

logger = logging.getLogger("vllm.sparsekv")  # under vLLM's logger, so its handlers print it

_counters: dict[torch.device, torch.Tensor] = {}
# index: 0 pages attended by sparse layers, 1 pages held by them, 2 decode (request, layer) rows
_FIELDS = ("attended_pages", "held_pages", "decode_rows")
_last_log = {"time": time.monotonic(), "snap": None}


def _counter(device: torch.device) -> torch.Tensor:
    c = _counters.get(device)
    if c is None:
        c = _counters[device] = torch.zeros(len(_FIELDS), dtype=torch.int64, device=device)
    return c


def record(attended: torch.Tensor, held: torch.Tensor, rows: int) -> None:
    """Add one layer's decode step: `attended`, `held` are 0-d int tensors on the compute device."""
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


def default_stats_file() -> str:
    return os.path.join(tempfile.gettempdir(), f"vllm_sparsekv_stats_{os.getpid()}.json")


def maybe_log(interval_s: float, stats_file: str | None) -> None:
    """Log the sparsity of the last interval and refresh the stats file; cheap when not due."""
    now = time.monotonic()
    if interval_s <= 0 or now - _last_log["time"] < interval_s or not _counters:
        return
    snap = snapshot()
    prev = _last_log["snap"] or dict.fromkeys(_FIELDS, 0)
    att = snap["attended_pages"] - prev["attended_pages"]
    held = snap["held_pages"] - prev["held_pages"]
    if held:
        logger.info(
            "sparsekv: decode attended %d of %d pages (%.1f%%) in the last %.0f s; %.1f%% overall",
            att, held, 100.0 * att / held, now - _last_log["time"], 100.0 * snap["attended_fraction"],
        )
    _last_log.update(time=now, snap=snap)
    if stats_file:
        tmp = f"{stats_file}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(snap, f)
        os.replace(tmp, stats_file)
