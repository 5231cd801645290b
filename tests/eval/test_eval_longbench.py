"""LongBench: loading the official format (folder and data.zip), prompts, middle truncation,
official scoring and the averaged table, on the fixture under tests/data/longbench."""

import zipfile
from pathlib import Path

import pytest

from sparsekv_eval import longbench as LB
from sparsekv_eval.tokenization import as_tokenizer

DATA = Path(__file__).resolve().parents[1] / "data" / "longbench"


@pytest.fixture
def data_zip(tmp_path):
    z = tmp_path / "data.zip"
    with zipfile.ZipFile(z, "w") as f:
        for p in sorted((DATA / "data").glob("*.jsonl")):
            f.write(p, f"data/{p.name}")
    return z


def test_load_folder_and_zip(data_zip):
    for src in (DATA, DATA / "data", data_zip):
        rows = LB.load_dataset(src, "hotpotqa")
        assert [r["_id"] for r in rows] == ["hp0", "hp1"] and rows[0]["answers"] == ["Paris"]
    assert set(LB.available_datasets(data_zip)) == {"hotpotqa", "trec", "passage_retrieval_en",
                                                   "passage_count", "gov_report", "lcc"}
    with pytest.raises(FileNotFoundError, match="data.zip"):
        LB.load_dataset(DATA, "qasper")


def test_prompts_and_protocol(hf_tokenizer):
    s = LB.build_samples(DATA, ["hotpotqa", "trec", "lcc"], hf_tokenizer, max_length=4000)
    hp = s[0]
    assert hp["prompt"].startswith("Answer the question based on the given passages.")
    assert "Passage 2:\nParis is the capital" in hp["prompt"]
    assert hp["prompt"].endswith("Question: Which city is the capital of the country where the "
                                 "Eiffel Tower stands?\nAnswer:")
    assert hp["max_tokens"] == 32 and hp["no_chat"] is False and hp["id"] == "hotpotqa-hp0"
    trec = next(x for x in s if x["dataset"] == "trec")
    assert trec["no_chat"] is True and trec["max_tokens"] == 64
    assert trec["all_classes"] == ["Individual", "Distance", "City", "Country"]
    lcc = next(x for x in s if x["dataset"] == "lcc")
    assert lcc["prompt"] == ("Please complete the code given below. \ndef add(a, b):\n    return a + b\n\n"
                             "def mul(a, b):\nNext line of code:\n")


def test_middle_truncation(hf_tokenizer):
    tok = as_tokenizer(hf_tokenizer)
    text = "BEGIN " + " ".join(f"word{i}" for i in range(400)) + " END"
    n = len(tok.encode(text))
    out, n0, cut = LB.truncate_middle(text, hf_tokenizer, 100)
    assert n0 == n and cut and out.startswith("BEGIN word0") and out.endswith("word399 END")
    assert abs(len(tok.encode(out)) - 100) <= 2  # re-tokenizing at the seam may merge a token
    assert LB.truncate_middle(text, hf_tokenizer, n) == (text, n, False)
    s = LB.build_samples(DATA, ["gov_report"], hf_tokenizer, max_length=40)
    assert s[0]["meta"]["truncated"] and s[0]["prompt"].startswith("You are given a")  # the seam may split a word
    assert s[0]["prompt"].endswith("Summary:")


def test_official_scoring_and_table():
    recs = [
        {"dataset": "hotpotqa", "pred": "Paris", "answers": ["Paris"], "all_classes": None},
        {"dataset": "hotpotqa", "pred": "Philip Dick", "answers": ["Philip K. Dick"], "all_classes": None},
        {"dataset": "trec", "pred": "City\nQuestion: next", "answers": ["City"],
         "all_classes": ["Individual", "Distance", "City", "Country"]},
        {"dataset": "passage_retrieval_en", "pred": "Paragraph 2", "answers": ["Paragraph 2"], "all_classes": None},
        {"dataset": "passage_count", "pred": "2", "answers": [2], "all_classes": None},
        {"dataset": "gov_report", "pred": "The program costs grew. The agency recommends better oversight.",
         "answers": ["The program costs grew. The agency recommends better oversight."], "all_classes": None},
        {"dataset": "lcc", "pred": "    return a * b\n", "answers": ["    return a * b"], "all_classes": None},
    ]
    sc = LB.score_records(recs)
    assert sc == {"hotpotqa": 90.0, "gov_report": 100.0, "trec": 100.0, "passage_count": 100.0,
                  "passage_retrieval_en": 100.0, "lcc": 100.0}  # hotpotqa: mean(1.0, 0.8)
    table = LB.averaged_table(sc)
    assert table["Multi-Doc QA"] == 90.0 and table["Synthetic"] == 100.0
    assert table["Average"] == pytest.approx(round((90 + 500) / 6, 2))
    md = LB.markdown_table({"dense": sc, "quest": {**sc, "hotpotqa": 80.0}})
    assert "| hotpotqa | 90.00 | 80.00 |" in md and "**Average**" in md
    e = LB.score_records([dict(r, length=n) for r, n in zip(recs[:2], (1000, 9000))], e=True)
    assert e["hotpotqa"]["0-4k"] == 100.0 and e["hotpotqa"]["8k+"] == 80.0
