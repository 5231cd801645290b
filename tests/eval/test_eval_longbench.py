"""LongBench: loading the official format (folder and data.zip), prompts, middle truncation,
official scoring and the averaged table, on the fixture under tests/data/longbench."""

import shutil
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


# ---------------------------------------------------------------------- through `datasets`

FIXTURE_SETS = ["hotpotqa", "gov_report", "trec", "passage_count", "passage_retrieval_en", "lcc"]


def _plain(ds):
    return LB.load_dataset(DATA, ds, loader="json")


def test_jsonl_and_zip_through_datasets_match_plain_json(data_zip, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    assert LB.available_datasets(DATA) == FIXTURE_SETS
    for ds in FIXTURE_SETS:
        plain = _plain(ds)
        assert len(plain) >= 1 and plain[0]["dataset"] == ds
        assert LB.load_dataset(data_zip, ds, loader="datasets") == plain
        assert LB.load_dataset(DATA, ds, loader="datasets") == plain
    hp = LB.load_dataset(data_zip, "hotpotqa", loader="datasets", limit=1)
    assert [r["_id"] for r in hp] == ["hp0"] and hp[0]["answers"] == ["Paris"]
    assert any((tmp_path / "cache").iterdir())  # datasets wrote its arrow cache where it was told


def test_parquet_folder(tmp_path, monkeypatch, hf_tokenizer):
    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    pq = tmp_path / "longbench_parquet"
    # the hub's layouts: <config>/test-00000-of-00001.parquet, <config>/test/0000.parquet; and flat files
    (pq / "hotpotqa").mkdir(parents=True)
    datasets.Dataset.from_list(_plain("hotpotqa")).to_parquet(str(pq / "hotpotqa" / "test-00000-of-00001.parquet"))
    (pq / "trec" / "test").mkdir(parents=True)
    datasets.Dataset.from_list(_plain("trec")).to_parquet(str(pq / "trec" / "test" / "0000.parquet"))
    datasets.Dataset.from_list(_plain("lcc")).to_parquet(str(pq / "lcc.parquet"))
    assert LB.available_datasets(pq) == ["hotpotqa", "trec", "lcc"]
    for ds in ("hotpotqa", "trec", "lcc"):
        assert LB.load_dataset(pq, ds) == _plain(ds)
    a = LB.build_samples(pq, ["hotpotqa", "trec", "lcc"], hf_tokenizer, max_length=4000)
    b = LB.build_samples(DATA, ["hotpotqa", "trec", "lcc"], hf_tokenizer, max_length=4000)
    assert a == b and [s["id"] for s in a][:2] == ["hotpotqa-hp0", "hotpotqa-hp1"]
    with pytest.raises(LB.LongBenchNotFound, match=r"gov_report not found under .*\.parquet"):
        LB.load_dataset(pq, "gov_report")
    with pytest.raises(LB.LongBenchNotFound):  # json loader: parquet is not looked at
        LB.load_dataset(pq, "hotpotqa", loader="json")


def test_hub_name_detection(tmp_path):
    assert LB.is_hub_name("THUDM/LongBench") and LB.is_hub_name("Xnhyacinth/LongBench")
    assert not LB.is_hub_name(DATA) and not LB.is_hub_name("./a/b") and not LB.is_hub_name("a/b/c")
    assert not LB.is_hub_name("/abs/path") and not LB.is_hub_name("data.zip")
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").mkdir()
    import os

    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert not LB.is_hub_name("owner/name")  # an existing folder wins over a hub name
    finally:
        os.chdir(cwd)
    with pytest.raises(ValueError, match="hub name"):
        LB.load_dataset("THUDM/LongBench", "hotpotqa", loader="json")


# Runs in a fresh interpreter: `datasets` and `huggingface_hub` read the offline variables at import.
# HF_ENDPOINT points at a closed local port, so a request that slipped through would fail, not leak.
_HUB_SCRIPT = r"""
import json, shutil, sys
from pathlib import Path
from sparsekv_eval import longbench as LB

data_zip, hub_cache = Path(sys.argv[1]), Path(sys.argv[2])
out = {"available": LB.available_datasets("THUDM/LongBench"),
       "hotpotqa": LB.load_dataset("THUDM/LongBench", "hotpotqa")}
try:
    LB.load_dataset("THUDM/LongBench", "trec")
except LB.LongBenchNotFound as err:
    out["trec_error"] = str(err)
# the repository's data.zip in the hub cache, as hf_hub_download leaves it
snap = hub_cache / "datasets--THUDM--LongBench" / "snapshots" / ("a" * 40)
snap.mkdir(parents=True)
shutil.copy(data_zip, snap / "data.zip")
(hub_cache / "datasets--THUDM--LongBench" / "refs").mkdir()
(hub_cache / "datasets--THUDM--LongBench" / "refs" / "main").write_text("a" * 40)
out["available_with_zip"] = LB.available_datasets("THUDM/LongBench")
out["trec"] = LB.load_dataset("THUDM/LongBench", "trec")
out["hotpotqa_2"] = LB.load_dataset("THUDM/LongBench", "hotpotqa", limit=1)
print("RESULT " + json.dumps(out))
"""


def _datasets_cache_like_hub(cache: Path, config: str, jsonl: Path) -> Path:
    """What `load_dataset("THUDM/LongBench", config)` leaves in the datasets cache:
    THUDM___long_bench/<config>/0.0.0/<hash>/{dataset_info.json, long_bench-test.arrow}."""
    import json

    from datasets.packaged_modules.json.json import Json

    b = Json(cache_dir=str(cache.parent / "build"), dataset_name="long_bench", config_name=config,
             data_files={"test": [str(jsonl)]}, hash="0123456789abcdef")
    b.download_and_prepare()
    dst = cache / "THUDM___long_bench" / config / "0.0.0" / "0123456789abcdef"
    shutil.copytree(b.cache_dir, dst)
    info = json.loads((dst / "dataset_info.json").read_text())
    info["config_name"] = config  # the hub's config name, without the data_files suffix
    (dst / "dataset_info.json").write_text(json.dumps(info))
    return dst


def test_hub_name_offline_from_caches(data_zip, tmp_path):
    import json
    import os
    import subprocess
    import sys

    cache = tmp_path / "datasets_cache"
    # the cached copy is marked (ids "cached-..."), so the answers show which source was read
    cached = [dict(r, _id=f"cached-{r['_id']}") for r in _plain("hotpotqa")]
    jsonl = tmp_path / "hotpotqa.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in cached))
    assert (_datasets_cache_like_hub(cache, "hotpotqa", jsonl) / "long_bench-test.arrow").is_file()
    hub = tmp_path / "hf" / "hub"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(cache),
               HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(hub), HF_ENDPOINT="http://127.0.0.1:9")
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    p = subprocess.run([sys.executable, "-c", _HUB_SCRIPT, str(data_zip), str(hub)], env=env,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))[7:])
    assert out["available"] == ["hotpotqa"]  # offline: what the datasets cache holds
    assert out["hotpotqa"] == cached and [r["_id"] for r in cached] == ["cached-hp0", "cached-hp1"]
    err = out["trec_error"]
    assert "LongBench 'trec' not found" in err and str(cache) in err and "HF_DATASETS_OFFLINE" in err
    assert "data.zip" in err and "--data" in err
    assert out["available_with_zip"] == FIXTURE_SETS
    assert out["trec"] == _plain("trec")  # from the cached data.zip
    assert out["hotpotqa_2"] == cached[:1]  # the datasets cache still comes first


def test_cli_longbench_defaults_to_the_hub_name():
    from vllm_sparsekv.tools import cli

    a = cli.build_parser().parse_args(["eval", "longbench", "--base-url", "http://x", "--model", "m",
                                       "--max-length", "100"])
    assert a.data == "THUDM/LongBench" and a.loader == "auto"


def test_script_dataset_falls_back_to_the_repos_data_zip(data_zip, monkeypatch):
    """datasets >= 4 refuses THUDM/LongBench's loading script; the repo's data.zip is read instead,
    and when that cannot be had either the error says so (online wording, no offline variables)."""
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    class FakeDatasets:
        @staticmethod
        def load_dataset(path, name=None, split=None, cache_dir=None):
            calls.append((path, name, split))
            raise RuntimeError("Dataset scripts are no longer supported, but found LongBench.py")

    monkeypatch.setattr(LB, "_datasets", lambda: FakeDatasets)
    monkeypatch.setattr(LB, "_hub_data_zip", lambda repo, offline: (data_zip, "") if not offline else (None, "x"))
    assert LB.load_dataset("THUDM/LongBench", "trec") == _plain("trec")
    assert calls == [("THUDM/LongBench", "trec", "test")]
    monkeypatch.setattr(LB, "_hub_data_zip", lambda repo, offline: (None, "ConnectError: no route"))
    with pytest.raises(LB.LongBenchNotFound) as e:
        LB.load_dataset("THUDM/LongBench", "trec", e=False)
    msg = str(e.value)
    assert "neither could be downloaded" in msg and "OFFLINE" not in msg
    assert "Dataset scripts are no longer supported" in msg and "ConnectError: no route" in msg
