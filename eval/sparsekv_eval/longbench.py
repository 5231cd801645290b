"""LongBench (v1, THUDM/LongBench): official prompts, middle truncation, metrics, averaged table.

Data: no hub access is assumed. Download ``data.zip`` from the dataset page
(https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip) and point ``--data`` at it,
or at the folder it unpacks to (``data/``, holding ``hotpotqa.jsonl``, ``hotpotqa_e.jsonl``, ...).
Each line is one sample with the official fields ``input, context, answers, length, dataset,
language, all_classes, _id``. (``datasets.load_dataset("json", data_files=...)`` reads the same
files; plain ``json`` is used here so that no extra dependency is needed.)

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


def _file_name(dataset: str, e: bool) -> str:
    return f"{dataset}_e.jsonl" if e else f"{dataset}.jsonl"


def load_dataset(data: str | os.PathLike, dataset: str, e: bool = False,
                 limit: int | None = None) -> list[dict]:
    """Samples of one dataset from ``data.zip`` or a folder of the official JSONL files."""
    if dataset not in DATASET2PROMPT:
        raise KeyError(f"unknown LongBench dataset {dataset!r}")
    p = Path(data).expanduser()
    name = _file_name(dataset, e)
    if p.is_file() and zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as z:
            cands = [n for n in z.namelist() if n.rsplit("/", 1)[-1] == name]
            if not cands:
                raise FileNotFoundError(f"{name} not in {p}")
            lines = io.TextIOWrapper(z.open(cands[0]), encoding="utf-8").read().splitlines()
    else:
        cands = [p / name, p / "data" / name]
        f = next((c for c in cands if c.exists()), None)
        if f is None:
            raise FileNotFoundError(
                f"{name} not found under {p} (looked at {', '.join(map(str, cands))}); download "
                "LongBench's data.zip and pass its path (or the folder it unpacks to)")
        lines = f.read_text(encoding="utf-8").splitlines()
    out = [json.loads(x) for x in lines if x.strip()]
    return out[:limit] if limit else out


def available_datasets(data: str | os.PathLike, e: bool = False) -> list[str]:
    p = Path(data).expanduser()
    if p.is_file() and zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as z:
            names = {n.rsplit("/", 1)[-1] for n in z.namelist()}
    else:
        names = {f.name for f in p.glob("*.jsonl")} | {f.name for f in (p / "data").glob("*.jsonl")}
    return [d for d in DATASETS if _file_name(d, e) in names]


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
                  e: bool = False, limit: int | None = None) -> list[dict]:
    """Request-ready samples: ``id, dataset, prompt, max_tokens, no_chat, stop, answers,
    all_classes, length``."""
    tok = as_tokenizer(tokenizer)
    out = []
    for ds in datasets:
        for i, obj in enumerate(load_dataset(data, ds, e, limit)):
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
