"""LongBench (v1, THUDM/LongBench): official prompts, middle truncation, metrics, averaged table.

Data (``--data``), any of:

- the hub name ``THUDM/LongBench`` (the default), loaded with ``datasets.load_dataset(name, config,
  split="test")``: from the ``datasets`` cache when it holds the config (``HF_DATASETS_CACHE``;
  with ``HF_DATASETS_OFFLINE=1`` only from there), else from the hub. THUDM/LongBench is a
  loading-script dataset, which ``datasets`` >= 4 no longer runs; caches made by older versions
  still load. When ``datasets`` cannot load it, the repository's official ``data.zip`` is taken from
  the Hugging Face hub cache, or downloaded unless offline. A parquet copy on the hub whose
  configs carry LongBench's names loads the same way (none was tried here).
- the official ``data.zip`` (https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip)
  or the folder it unpacks to (``data/hotpotqa.jsonl``, ``data/hotpotqa_e.jsonl``, ...): read with
  plain ``json``, no dependency; ``loader="datasets"`` reads the same files through ``datasets``.
- a folder of parquet files, one config each: ``hotpotqa.parquet``, ``hotpotqa/*.parquet`` or the
  hub's parquet layouts (``hotpotqa/test-00000-of-00001.parquet``, ``hotpotqa/test/0000.parquet``),
  read through ``datasets``.

Each sample has the official fields ``input, context, answers, length, dataset, language,
all_classes, _id``; every source gives the same dicts.

Protocol, as the official ``pred.py`` / ``eval.py``:
- prompt = ``DATASET2PROMPT[dataset].format(**sample)``;
- if it has more than ``max_length`` tokens, keep the first and last ``max_length // 2`` tokens
  (middle truncation, decoded back to text);
- chat models get their chat template except on trec, triviaqa, samsum, lsht, lcc, repobench-p
  (few-shot / code continuation, sent as plain completions: ``no_chat``);
- generation length ``DATASET2MAXLEN[dataset]``, greedy; samsum stops at a newline;
- scoring: the first line only for trec/triviaqa/samsum/lsht; max over the reference answers; the
  mean x 100, rounded to 2 decimals; LongBench-E also per length bucket (0-4k, 4-8k, 8k+).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence

from . import metrics as M
from .tokenization import as_tokenizer

# THUDM/LongBench LongBench/config/dataset2prompt.json (v1). "asconcisely" (sic) is in the
# official narrativeqa prompt that produced the published numbers.
DATASET2PROMPT = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
    "passage_retrieval_zh": "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是：",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

# LongBench/config/dataset2maxlen.json
DATASET2MAXLEN = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512,
    "multi_news": 512, "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64,
    "passage_count": 32, "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64,
    "repobench-p": 64,
}

DATASET2METRIC: dict[str, Callable[..., float]] = {
    "narrativeqa": M.qa_f1_score, "qasper": M.qa_f1_score, "multifieldqa_en": M.qa_f1_score,
    "multifieldqa_zh": M.qa_f1_zh_score, "hotpotqa": M.qa_f1_score, "2wikimqa": M.qa_f1_score,
    "musique": M.qa_f1_score, "dureader": M.rouge_zh_score, "gov_report": M.rouge_score,
    "qmsum": M.rouge_score, "multi_news": M.rouge_score, "vcsum": M.rouge_zh_score,
    "trec": M.classification_score, "triviaqa": M.qa_f1_score, "samsum": M.rouge_score,
    "lsht": M.classification_score, "passage_retrieval_en": M.retrieval_score,
    "passage_count": M.count_score, "passage_retrieval_zh": M.retrieval_zh_score,
    "lcc": M.code_sim_score, "repobench-p": M.code_sim_score,
}

DATASETS = list(DATASET2PROMPT)
DATASETS_E = ["qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec",
              "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p"]
DATASETS_EN = [d for d in DATASETS if d not in
               ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")]
NO_CHAT = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
FIRST_LINE = {"trec", "triviaqa", "samsum", "lsht"}
CATEGORIES = {
    "Single-Doc QA": ["narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"],
    "Multi-Doc QA": ["hotpotqa", "2wikimqa", "musique", "dureader"],
    "Summarization": ["gov_report", "qmsum", "multi_news", "vcsum"],
    "Few-shot Learning": ["trec", "triviaqa", "samsum", "lsht"],
    "Synthetic": ["passage_count", "passage_retrieval_en", "passage_retrieval_zh"],
    "Code": ["lcc", "repobench-p"],
}


# ---------------------------------------------------------------------- data


HUB_REPO = "THUDM/LongBench"
DATA_ZIP_URL = f"https://huggingface.co/datasets/{HUB_REPO}/resolve/main/data.zip"
_TRUE = {"1", "ON", "YES", "TRUE"}


class LongBenchNotFound(FileNotFoundError):
    """No source holds the requested LongBench config (message says where we looked)."""


def _config(dataset: str, e: bool) -> str:
    return f"{dataset}_e" if e else dataset


def _file_name(dataset: str, e: bool) -> str:
    return f"{_config(dataset, e)}.jsonl"


def hf_offline() -> bool:
    """``HF_DATASETS_OFFLINE`` as ``datasets`` reads it (it falls back to ``HF_HUB_OFFLINE``)."""
    v = os.environ.get("HF_DATASETS_OFFLINE")
    if v is None:
        v = os.environ.get("HF_HUB_OFFLINE", "")
    return v.upper() in _TRUE


def is_hub_name(data: str | os.PathLike) -> bool:
    """``owner/name`` that is not an existing local path."""
    s = str(data)
    return (not Path(s).expanduser().exists() and s.count("/") == 1 and not s.startswith((".", "/", "~"))
            and all(part and all(c.isalnum() or c in "-_." for c in part) for part in s.split("/")))


def _datasets():
    import datasets  # the eval extra; a ModuleNotFoundError names it (sparsekv eval turns it into a hint)

    return datasets


def _datasets_cache_dir() -> str | None:
    # Passed explicitly so that the variable counts even when datasets was imported before it was set.
    return os.environ.get("HF_DATASETS_CACHE") or None


def _rows(ds, limit: int | None) -> list[dict]:
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    return [dict(r) for r in ds]


# -- official JSONL (data.zip or its folder), plain json


def _jsonl_source(p: Path, name: str) -> tuple[Path, str | None] | None:
    """(file, member) of ``name`` in a zip (member set) or a folder (member None); None if absent."""
    if p.is_file() and zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as z:
            cands = sorted(n for n in z.namelist() if n.rsplit("/", 1)[-1] == name)
        return (p, cands[0]) if cands else None
    f = next((c for c in (p / name, p / "data" / name) if c.is_file()), None)
    return (f, None) if f else None


def _read_jsonl(src: tuple[Path, str | None], limit: int | None) -> list[dict]:
    f, member = src
    if member is not None:
        with zipfile.ZipFile(f) as z:
            lines = io.TextIOWrapper(z.open(member), encoding="utf-8").read().splitlines()
    else:
        lines = f.read_text(encoding="utf-8").splitlines()
    out = [json.loads(x) for x in lines if x.strip()]
    return out[:limit] if limit else out


def _read_jsonl_datasets(src: tuple[Path, str | None], limit: int | None) -> list[dict]:
    f, member = src
    url = f"zip://{member}::{f.resolve()}" if member is not None else str(f.resolve())
    ds = _datasets().load_dataset("json", data_files={"test": url}, split="test", cache_dir=_datasets_cache_dir())
    return _rows(ds, limit)


# -- parquet folder, through datasets


def _parquet_files(p: Path, config: str) -> list[Path]:
    if not p.is_dir():
        return []
    for cand in (p / f"{config}.parquet", p / "data" / f"{config}.parquet"):
        if cand.is_file():
            return [cand]
    sub = p / config
    return sorted(sub.rglob("*.parquet")) if sub.is_dir() else []


def _read_parquet(files: list[Path], limit: int | None) -> list[dict]:
    ds = _datasets().load_dataset("parquet", data_files={"test": [str(f.resolve()) for f in files]},
                                  split="test", cache_dir=_datasets_cache_dir())
    return _rows(ds, limit)


# -- hub name: datasets cache / hub, then the repository's data.zip


def _hub_data_zip(repo: str, offline: bool) -> tuple[Path | None, str]:
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, "data.zip", repo_type="dataset", local_files_only=offline)), ""
    except Exception as err:  # not cached / no network / no such file: reported by the caller
        return None, f"{type(err).__name__}: {err}".splitlines()[0]


def _load_hub(repo: str, config: str, limit: int | None) -> list[dict]:
    offline = hf_offline()
    try:
        ds = _datasets().load_dataset(repo, config, split="test", cache_dir=_datasets_cache_dir())
        return _rows(ds, limit)
    except ModuleNotFoundError:
        raise
    except Exception as err:  # not cached while offline, a loading script (datasets >= 4), no network
        ds_err = f"{type(err).__name__}: {err}".splitlines()[0]
    zip_path, zip_err = _hub_data_zip(repo, offline)
    if zip_path is not None:
        src = _jsonl_source(zip_path, f"{config}.jsonl")
        if src is not None:
            return _read_jsonl(src, limit)
        zip_err = f"{config}.jsonl is not in {zip_path}"
    from datasets import config as dconfig

    cache = _datasets_cache_dir() or dconfig.HF_DATASETS_CACHE
    where = (f"{repo} config {config!r} is not in the datasets cache ({cache}) and {repo}'s data.zip is "
             "not in the Hugging Face hub cache")
    why = ("HF_DATASETS_OFFLINE / HF_HUB_OFFLINE forbid downloading them; run once online, or"
           if offline else "and neither could be downloaded;")
    raise LongBenchNotFound(
        f"LongBench {config!r} not found: {where}, {why} download {DATA_ZIP_URL} and pass its path (or "
        f"the folder it unpacks to, or a folder of parquet files) as --data. "
        f"[datasets: {ds_err}] [data.zip: {zip_err}]")


def load_dataset(data: str | os.PathLike = HUB_REPO, dataset: str = "hotpotqa", e: bool = False,
                 limit: int | None = None, loader: str = "auto") -> list[dict]:
    """Samples of one dataset (``e``: its LongBench-E config ``<dataset>_e``) as plain dicts.

    ``data``: a hub name, ``data.zip``, its folder, or a folder of parquet files (module docstring).
    ``loader``: ``auto`` (plain json for the official JSONL, ``datasets`` for hub names and parquet),
    ``json`` (official JSONL only) or ``datasets`` (everything through ``datasets``)."""
    if dataset not in DATASET2PROMPT:
        raise KeyError(f"unknown LongBench dataset {dataset!r}")
    if loader not in ("auto", "json", "datasets"):
        raise ValueError(f"loader must be auto, json or datasets, got {loader!r}")
    config = _config(dataset, e)
    if is_hub_name(data):
        if loader == "json":
            raise ValueError(f"{data!r} is a hub name; loader='json' reads only local files")
        return _load_hub(str(data), config, limit)
    p = Path(data).expanduser()
    src = _jsonl_source(p, f"{config}.jsonl")
    if src is not None:
        return _read_jsonl_datasets(src, limit) if loader == "datasets" else _read_jsonl(src, limit)
    files = _parquet_files(p, config) if loader != "json" else []
    if files:
        return _read_parquet(files, limit)
    looked = [str(p / f"{config}.jsonl"), str(p / "data" / f"{config}.jsonl")]
    if p.is_file():
        looked = [f"{config}.jsonl in {p}"]
    elif loader != "json":
        looked += [str(p / f"{config}.parquet"), str(p / config / "**" / "*.parquet")]
    raise LongBenchNotFound(
        f"{config} not found under {p} (looked at {', '.join(looked)}); download LongBench's data.zip "
        f"({DATA_ZIP_URL}) and pass its path (or the folder it unpacks to), or pass the hub name {HUB_REPO}")


def available_datasets(data: str | os.PathLike = HUB_REPO, e: bool = False) -> list[str]:
    """The datasets ``data`` holds, in LongBench's order. For a hub name: every dataset online;
    offline, those in the datasets cache or in a cached data.zip."""
    names = DATASETS_E if e else DATASETS
    if is_hub_name(data):
        if not hf_offline():
            return list(names)
        from datasets import config as dconfig
        from datasets.naming import camelcase_to_snakecase

        owner, name = str(data).split("/")
        root = Path(_datasets_cache_dir() or dconfig.HF_DATASETS_CACHE) / f"{owner}___{camelcase_to_snakecase(name)}"
        have = {d.name for d in root.glob("*") if d.is_dir()}
        zip_path, _ = _hub_data_zip(str(data), offline=True)
        if zip_path is not None:
            with zipfile.ZipFile(zip_path) as z:
                have |= {n.rsplit("/", 1)[-1][:-len(".jsonl")] for n in z.namelist() if n.endswith(".jsonl")}
        return [d for d in names if _config(d, e) in have]
    p = Path(data).expanduser()
    return [d for d in names if _jsonl_source(p, _file_name(d, e)) is not None
            or _parquet_files(p, _config(d, e))]


# ---------------------------------------------------------------------- prompts


def truncate_middle(prompt: str, tokenizer: Any, max_length: int) -> tuple[str, int, bool]:
    """Official middle truncation: (prompt, tokens before truncation, truncated?)."""
    tok = as_tokenizer(tokenizer)
    ids = tok.encode(prompt)
    if len(ids) <= max_length:
        return prompt, len(ids), False
    half = int(max_length / 2)
    return tok.decode(ids[:half]) + tok.decode(ids[-half:]), len(ids), True


def build_samples(data: str | os.PathLike, datasets: Sequence[str], tokenizer: Any, max_length: int,
                  e: bool = False, limit: int | None = None, loader: str = "auto") -> list[dict]:
    """Request-ready samples: ``id, dataset, prompt, max_tokens, no_chat, stop, answers,
    all_classes, length``."""
    tok = as_tokenizer(tokenizer)
    out = []
    for ds in datasets:
        for i, obj in enumerate(load_dataset(data, ds, e, limit, loader)):
            prompt = DATASET2PROMPT[ds].format(**obj)
            prompt, n_tok, truncated = truncate_middle(prompt, tok, max_length)
            s = {"id": f"{ds}{'_e' if e else ''}-{obj.get('_id', i)}", "dataset": ds, "prompt": prompt,
                 "max_tokens": DATASET2MAXLEN[ds], "no_chat": ds in NO_CHAT,
                 "answers": obj["answers"], "all_classes": obj.get("all_classes"),
                 "length": obj.get("length"), "meta": {"prompt_tokens": n_tok, "truncated": truncated}}
            if ds == "samsum":  # official: stop at "\n" after at least one token
                s["stop"] = ["\n"]
                s["extra"] = {"min_tokens": 1}
            out.append(s)
    return out


# ---------------------------------------------------------------------- scoring


def _sample_score(dataset: str, pred: str, answers: Sequence[str], all_classes) -> float:
    if dataset in FIRST_LINE:
        pred = pred.lstrip("\n").split("\n")[0]
    score = 0.0
    for gt in answers:
        score = max(score, DATASET2METRIC[dataset](pred, gt, all_classes=all_classes))
    return score


def scorer(dataset: str, predictions: Sequence[str], answers: Sequence[Sequence[str]],
           all_classes) -> float:
    total = sum(_sample_score(dataset, p, a, all_classes) for p, a in zip(predictions, answers))
    return round(100 * total / len(predictions), 2)


def scorer_e(dataset: str, predictions, answers, lengths, all_classes) -> dict:
    buckets: dict[str, list[float]] = {"0-4k": [], "4-8k": [], "8k+": []}
    for p, a, n in zip(predictions, answers, lengths):
        s = _sample_score(dataset, p, a, all_classes)
        buckets["0-4k" if n < 4000 else "4-8k" if n < 8000 else "8k+"].append(s)
    return {k: (round(100 * sum(v) / len(v), 2) if v else float("nan")) for k, v in buckets.items()}


def score_records(records: Sequence[dict], e: bool = False) -> dict[str, Any]:
    """{dataset: score} (or per-bucket dicts for LongBench-E) from result records with
    ``dataset, pred, answers, all_classes[, length]``; errored records count as empty answers."""
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r["dataset"], []).append(r)
    out = {}
    for ds in [d for d in DATASETS if d in by]:
        rs = by[ds]
        preds = [r.get("pred", "") or "" for r in rs]
        ans = [r["answers"] for r in rs]
        ac = rs[0].get("all_classes")
        out[ds] = (scorer_e(ds, preds, ans, [r["length"] for r in rs], ac) if e
                   else scorer(ds, preds, ans, ac))
    return out


def per_sample_scores(records: Sequence[dict]) -> list[float]:
    return [_sample_score(r["dataset"], r.get("pred", "") or "", r["answers"], r.get("all_classes"))
            for r in records]


def averaged_table(scores: dict[str, float]) -> dict[str, float]:
    """Category means (over the datasets present) and the overall mean of the dataset scores."""
    out = {}
    for cat, dss in CATEGORIES.items():
        v = [scores[d] for d in dss if d in scores]
        if v:
            out[cat] = round(sum(v) / len(v), 2)
    if scores:
        out["Average"] = round(sum(scores.values()) / len(scores), 2)
    return out


def markdown_table(columns: dict[str, dict[str, float]]) -> str:
    """Rows = datasets then categories and the average; one column per run (e.g. dense, quest-1/8)."""
    names = list(columns)
    rows = [d for d in DATASETS if any(d in c for c in columns.values())]
    avg = {n: averaged_table(columns[n]) for n in names}
    rows_cat = [c for c in list(CATEGORIES) + ["Average"] if any(c in a for a in avg.values())]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = ["| dataset | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {d} | " + " | ".join(fmt(columns[n].get(d)) for n in names) + " |" for d in rows]
    lines += [f"| **{c}** | " + " | ".join(fmt(avg[n].get(c)) for n in names) + " |" for c in rows_cat]
    return "\n".join(lines)
