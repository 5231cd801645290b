"""The sweep drives every registered method through the backend's selector protocol: a budget that
covers the context reproduces dense decoding for each of them (prefill-scored ones included), the
hash selectors get their layer's projection (as in SparseKVImpl._setup), and the IoU probe
compares methods on the same queries."""

import pytest
import torch

pytest.importorskip("transformers")

from vllm_sparsekv.config import SparseKVConfig  # noqa: E402
from sparsekv_eval import sweep  # noqa: E402
from vllm_sparsekv.methods import available, get_method  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tiny_model):
    sweep.use_hook(tiny_model)
    return tiny_model


def _prompt(n=300):
    g = torch.Generator().manual_seed(1)
    return torch.randint(5, 500, (n,), generator=g).tolist()


# every registered method except the dense baseline and the trained hash, which needs a trained
# checkpoint (tests/test_spotlight.py trains a tiny one and checks its codes)
METHODS = [m for m in available() if m not in ("full", "spotlight")]


def _config(method, **kw):
    return SparseKVConfig(method=method, **kw)


def test_resolve_methods_follows_the_registry():
    assert sweep.resolve_methods(["dense", "quest", "hash", "quest"]) == ["quest", "hash"]
    assert set(sweep.resolve_methods(["all"])) == set(available()) - {"full"}
    with pytest.raises(ValueError, match="registered"):
        sweep.resolve_methods(["nope"])
    labels = [r.label for r in sweep.make_configs(["hash"], [0.125], [256])]
    assert labels == ["dense", "hash-f0.125", "hash-b256"]


def test_method_at_allocation_specs(tmp_path):
    import json

    prof = tmp_path / "heads.json"
    prof.write_text(json.dumps({"num_layers": 3, "num_kv_heads": 1, "scores": {"infscore": [[1.0], [2.0], [3.0]],
                                                                             "headkv": [[1.0], [2.0], [3.0]]}}))
    runs = sweep.make_configs(["snapkv", "snapkv@headkv", "quest@pyramid"], [0.125], [64], include_dense=False,
                              label_suffix="-t", head_budgets=str(prof), sink_tokens=16)
    assert [r.label for r in runs] == ["snapkv-f0.125-t", "snapkv-b64-t", "snapkv@headkv-f0.125-t",
                                       "snapkv@headkv-b64-t", "quest@pyramid-f0.125-t", "quest@pyramid-b64-t"]
    assert runs[0].config.budget_allocation == "uniform" and runs[0].config.head_budgets is None
    assert runs[2].config.budget_allocation == "headkv" and runs[2].config.head_budgets == str(prof)
    assert runs[2].row_fields() == {"method": "snapkv", "budget_allocation": "headkv", "budget_fraction": 0.125}
    assert runs[0].row_fields() == {"method": "snapkv", "budget_fraction": 0.125}
    assert all(r.config.sink_tokens == 16 for r in runs)
    with pytest.raises(ValueError, match="registered"):
        sweep.make_configs(["nope@headkv"])


@pytest.mark.parametrize("method", METHODS)
def test_every_method_with_a_covering_budget_is_dense(tiny_model, method):
    cfg = _config(method, token_budget=4096, dense_layers=[])
    runs = [sweep.RunConfig("dense"), sweep.RunConfig(method, cfg)]
    res = sweep.sweep_prompt(tiny_model, _prompt(), runs, max_new_tokens=6)
    assert res[method]["ids"] == res["dense"]["ids"]
    assert res[method]["attended_fraction"] == pytest.approx(1.0)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_at_a_small_budget(tiny_model, method):
    cfg = _config(method, token_budget=64, sink_tokens=16, recent_tokens=16, dense_layers=[0])
    res = sweep.sweep_prompt(tiny_model, _prompt(), [sweep.RunConfig(method, cfg)], max_new_tokens=4)
    assert len(res[method]["ids"]) == 4
    assert res[method]["attended_fraction"] < 0.3  # 4 of 19 pages


def test_selectors_get_their_layer(tiny_model, monkeypatch):
    seen = []
    cls = get_method("hash")
    orig = cls.__init__

    def spy(self, config, geometry):
        seen.append(geometry.layer)
        orig(self, config, geometry)

    monkeypatch.setattr(cls, "__init__", spy)
    cfg = SparseKVConfig(method="hash", token_budget=64, sink_tokens=16, recent_tokens=16, dense_layers=[0])
    sweep.sweep_prompt(tiny_model, _prompt(), [sweep.RunConfig("h", cfg)], max_new_tokens=2)
    assert sorted(seen) == [1, 2]  # hash projections are seeded per layer in the backend


def test_iou_probe(tiny_model):
    probe = sweep.IouProbe(["quest", "hash"], [0.05, 0.5], steps=3, config=SparseKVConfig(dense_layers=[0]))
    res = sweep.sweep_prompt(tiny_model, _prompt(), [sweep.RunConfig("dense")], max_new_tokens=5, iou_probe=probe)
    pr = res["dense"]["probe"]
    assert set(pr) == {"quest@0.05", "hash@0.05", "quest@0.5", "hash@0.5"}
    for v in pr.values():
        assert v["steps"] == 3 and set(v["iou_per_layer_head"]) == {"1", "2"}
        assert 0.0 <= v["iou_mean"] <= 1.0
        assert v["recall_mean"] <= v["oracle_recall_mean"] + 1e-6
    assert pr["quest@0.5"]["oracle_recall_mean"] > pr["quest@0.05"]["oracle_recall_mean"]
