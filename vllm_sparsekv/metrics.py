"""The sparsity counters on vLLM's own Prometheus `/metrics` endpoint.

The counters live in the worker processes (stats.py); `/metrics` is served by the API-server
process from prometheus_client's default registry. The front end, when it validates a sparsekv
config (plugin.py, before any engine process starts), makes a private directory and names it in
`VLLM_SPARSEKV_METRICS_DIR`; the engine and worker processes it starts inherit that variable, and
each worker's stats thread keeps `<dir>/<engine>-<pid>.json` current (the same snapshot as
`stats_file`, checked every second). A collector registered in the front end reads those files at
each scrape and sums them per engine.

Why not a `vllm.stat_logger_plugins` logger: vLLM builds stat loggers after the engine processes
have started (too late to hand them a path), builds them for every model once installed (and turns
stats on even under `--disable-log-stats`), and its PrometheusStatLogger, built after custom
loggers, unregisters every `vllm:` metric already in the registry. A collector (no `_name`) is left
alone and reads the workers' numbers when scraped. With `--api-server-count` > 1 vLLM serves
`/metrics` from its multiprocess directory only, which these metrics are not in.
"""

from __future__ import annotations

import glob
import json
import logging
import multiprocessing
import os
import tempfile

ENV_DIR = "VLLM_SPARSEKV_METRICS_DIR"
logger = logging.getLogger("vllm.sparsekv")

_dir: tempfile.TemporaryDirectory | None = None  # the one this front end made (removed at exit)
_collector: "_Collector | None" = None


def worker_file(engine: int) -> str | None:
    """Where this worker writes its snapshot for the front end, or None outside a server."""
    folder = os.environ.get(ENV_DIR)
    return os.path.join(folder, f"{engine}-{os.getpid()}.json") if folder else None


def read(folder: str) -> dict[str, dict]:
    """Counters per engine index (str), summed over that engine's workers."""
    out: dict[str, dict] = {}
    for path in glob.glob(os.path.join(folder, "*-*.json")):
        try:
            with open(path) as f:
                snap = json.load(f)
        except (OSError, ValueError):  # a worker file is replaced atomically; skip what vanished
            continue
        engine = os.path.basename(path).split("-", 1)[0]
        tot = out.setdefault(engine, {"attended_pages": 0, "held_pages": 0, "decode_rows": 0})
        for key in tot:
            tot[key] += int(snap.get(key) or 0)
    return out


class _Collector:
    """Reads the workers' files at scrape time (prometheus_client custom collector)."""

    def __init__(self, folder: str, model_name: str):
        self.folder, self.model_name = folder, model_name

    def describe(self):  # no scrape at registration
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels = ["model_name", "engine"]
        fam = {
            "attended_pages": CounterMetricFamily(
                "vllm:sparsekv_attended_pages", "KV pages read by sparse decode attention (sparse layers, "
                "summed over requests, layers and KV heads).", labels=labels),
            "held_pages": CounterMetricFamily(
                "vllm:sparsekv_held_pages", "KV pages the decoding requests held at those steps (what dense "
                "decode would read).", labels=labels),
            "decode_rows": CounterMetricFamily(
                "vllm:sparsekv_decode_rows", "Decode (request, sparse layer) rows counted.", labels=labels),
        }
        frac = GaugeMetricFamily("vllm:sparsekv_attended_fraction",
                                 "attended_pages / held_pages since the engine started.", labels=labels)
        for engine, tot in sorted(read(self.folder).items()):
            values = [self.model_name, engine]
            for key, metric in fam.items():
                metric.add_metric(values, tot[key])
            if tot["held_pages"]:
                frac.add_metric(values, tot["attended_pages"] / tot["held_pages"])
        yield from fam.values()
        yield frac


def setup(vllm_config) -> None:
    """In the process that validates a sparsekv config: give its engine a metrics directory and
    serve it on /metrics. An engine or worker process (a multiprocessing child) that inherited the
    directory keeps it."""
    global _dir, _collector
    if os.environ.get(ENV_DIR) and multiprocessing.parent_process() is not None:
        return
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return
    _dir = tempfile.TemporaryDirectory(prefix="sparsekv-metrics-")
    os.environ[ENV_DIR] = _dir.name
    model = vllm_config.model_config
    name = getattr(model, "served_model_name", None) or getattr(model, "model", "")
    if isinstance(name, (list, tuple)):
        name = name[0]
    if _collector is None:
        _collector = _Collector(_dir.name, str(name))
        REGISTRY.register(_collector)
    else:  # a new engine in this process: its counters start again (a counter reset)
        _collector.folder, _collector.model_name = _dir.name, str(name)
