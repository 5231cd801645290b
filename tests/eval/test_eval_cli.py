"""``sparsekv eval ...`` end to end against the local fake server (a perfect needle finder)."""

import json
from pathlib import Path

import pytest
from conftest import needs_essays
from fake_server import FakeServer

from vllm_sparsekv.tools import cli
from vllm_sparsekv.tools.eval_cli import _csv_ints

DATA = Path(__file__).resolve().parents[1] / "data" / "longbench"


@pytest.fixture(scope="module")
def tok_dir(hf_tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    hf_tokenizer.save_pretrained(d)
    return str(d)


def test_csv_lengths():
    assert _csv_ints("2048, 4k,8K") == [2048, 4096, 8192]


@needs_essays
def test_ruler_and_fidelity(tok_dir, tmp_path):
    with FakeServer(fail_times=1) as srv:
        args = ["eval", "ruler", "--base-url", srv.url, "--model", tok_dir, "--lengths", "1024",
                "--tasks", "niah_single_1,niah_multiquery", "--num-samples", "3", "--out", str(tmp_path),
                "--no-progress", "--method", "dense", "--max-retries", "2"]
        assert cli.main(args) == 0
    scores = json.loads((tmp_path / "ruler-dense.scores.json").read_text())
    by = {r["task"]: r for r in scores["rows"]}
    assert by["niah_single_1"]["score"] == 100.0 and by["niah_multiquery"]["n"] == 3
    assert by["average"]["score"] == 100.0 and by["niah_single_1"]["method"] == "dense"
    assert "sparsekv eval ruler" in scores["command"] and scores["errors"] == 0
    lines = (tmp_path / "ruler-dense.jsonl").read_text().splitlines()
    assert len(lines) == 6
    # a "sparse" run whose answers differ on one sample -> fidelity
    recs = [json.loads(x) for x in lines]
    recs[0]["pred"] = "wrong"
    (tmp_path / "ruler-sparse.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "fid.json"
    assert cli.main(["eval", "fidelity", "--dense", str(tmp_path / "ruler-dense.jsonl"),
                     "--sparse", str(tmp_path / "ruler-sparse.jsonl"), "--out", str(out)]) == 0
    rows = {r["task"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["all"]["n"] == 6 and rows["all"]["identical"] == 5
    assert rows["all"]["exact_match"] == pytest.approx(5 / 6)


@needs_essays
def test_niah_grid_with_heatmap(tok_dir, tmp_path):
    with FakeServer() as srv:
        assert cli.main(["eval", "niah", "--base-url", srv.url, "--model", tok_dir, "--lengths", "512,1024",
                         "--depths", "0,50,100", "--out", str(tmp_path), "--no-progress",
                         "--label", "grid"]) == 0
    rows = json.loads((tmp_path / "niah-grid.scores.json").read_text())["rows"]
    assert len(rows) == 6 and all(r["score"] == 1.0 for r in rows)
    assert (tmp_path / "niah-grid.png").read_bytes()[:4] == b"\x89PNG"


def test_longbench_cli(tok_dir, tmp_path, capsys):
    with FakeServer() as srv:
        assert cli.main(["eval", "longbench", "--base-url", srv.url, "--model", tok_dir, "--data", str(DATA),
                         "--max-length", "3500", "--out", str(tmp_path), "--no-progress",
                         "--label", "lb"]) == 0
        assert len(srv.requests) == 7
    rows = {r["task"]: r for r in json.loads((tmp_path / "longbench-lb.scores.json").read_text())["rows"]}
    assert set(rows) >= {"hotpotqa", "trec", "lcc", "Average"}
    assert rows["hotpotqa"]["n"] == 2 and rows["hotpotqa"]["score"] == 0.0  # "I do not know."
    assert "| **Average** |" in capsys.readouterr().out


def test_ppl_cli(tok_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 200)
    with FakeServer() as srv:
        assert cli.main(["eval", "ppl", "--base-url", srv.url, "--model", tok_dir, "--corpus", str(text),
                         "--window", "64", "--stride", "32", "--max-text-tokens", "300",
                         "--out", str(tmp_path), "--label", "p"]) == 0
    (row,) = json.loads((tmp_path / "ppl-t.txt-p.scores.json").read_text())["rows"]
    assert row["tokens"] == 299 and row["score"] > 1.0


def test_missing_eval_package_names_the_extra(monkeypatch, tmp_path):
    """Without the eval package (or one of its dependencies) the CLI stops with the install line."""
    import sys

    for name in [m for m in sys.modules if m == "sparsekv_eval" or m.startswith("sparsekv_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import sparsekv_eval...` now fails
    monkeypatch.setitem(sys.modules, "sparsekv_eval", None)
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "fidelity", "--dense", str(tmp_path / "d.jsonl"), "--sparse", str(tmp_path / "s.jsonl")])
    msg = str(e.value.code)
    assert msg.startswith("sparsekv eval fidelity: the Python module 'sparsekv_eval' is missing")
    assert "pip install 'vllm-sparsekv[eval]'" in msg


def test_other_missing_modules_are_not_blamed_on_the_extra():
    from vllm_sparsekv.tools.eval_cli import with_eval_hint

    def cmd(args):
        import no_such_module_for_sparsekv  # noqa: F401

    with pytest.raises(ModuleNotFoundError, match="no_such_module_for_sparsekv"):
        with_eval_hint(cmd)(None)
