"""Config validation: every bad field is named, with what is allowed; each method's options are its
own model, validated through the registry; old flat keys still work, with a warning."""

import json
import re
import warnings
from pathlib import Path

import pytest
from pydantic import BaseModel
import torch

from vllm_sparsekv import budgets, kernels
from vllm_sparsekv.config import ENV_VAR, SparseKVConfig, SparseKVConfigError, load_config, markdown_table
from vllm_sparsekv.kernels.testing import brute_quest
from vllm_sparsekv.methods import available, get_method
from vllm_sparsekv.methods.base import LayerGeometry, MethodOptions

README = Path(__file__).resolve().parent.parent / "README.md"


def test_defaults_and_derived_pages():
    cfg = load_config({})
    assert cfg.method == "quest" and cfg.token_budget == 2048 and cfg.dense_layers == [0, 1]
    assert cfg.sink_pages(32) == 2 and cfg.recent_pages(32) == 2
    # the page being written is always attended, even with recent_tokens=0
    assert load_config({"sparsekv": {"recent_tokens": 0}}).recent_pages(16) == 1
    cfg = load_config({"sparsekv": {"token_budget": 1000, "sink_tokens": 16, "recent_tokens": 16}})
    assert budgets.max_selected_pages(cfg, 32, 8192) == 32  # ceil(1000/32)
    cfg = load_config({"sparsekv": {"budget_fraction": 0.125}})
    assert budgets.max_selected_pages(cfg, 16, 8192) == 64
    assert budgets.max_selected_pages(load_config({"sparsekv": {"method": "full"}}), 16, 1000) == 63
    assert load_config({"sparsekv": {"method": "QUEST", "token_budget": 64}}).method == "quest"


@pytest.mark.parametrize(
    "bad, first_line",
    [
        ({"method": "nope"}, "sparsekv.method: unknown method 'nope'; allowed: full, "),
        ({"quest": {"group_reduce": "foo"}}, "sparsekv.quest.group_reduce: must be one of sum, max, got 'foo'"),
        ({"method": "hash", "hash": {"bits": 48}}, "sparsekv.hash.bits: must be a multiple of 32 in [32, 256], got 48"),
        ({"hash": {"page_reduce": "mean"}}, "sparsekv.hash.page_reduce: must be one of max, sum, got 'mean'"),
        ({"snapkv": {"pooling_kernel": 0}}, "sparsekv.snapkv.pooling_kernel: must be >= 1, got 0"),
        ({"quest": {"group": "max"}}, "sparsekv.quest.group: unknown field; allowed fields: group_reduce"),
        ({"quest": "max"}, "sparsekv.quest: "),
        ({"nope": {}}, "sparsekv.nope: unknown field; allowed fields: method, token_budget"),
        ({"token_budget": 0}, "sparsekv.token_budget: must be a positive number of tokens, got 0"),
        ({"budget_fraction": 1.5}, "sparsekv.budget_fraction: must be in (0, 1]"),
        ({"sink_tokens": -1}, "sparsekv.sink_tokens: must be >= 0"),
        ({"dense_layers": [-2]}, "sparsekv.dense_layers: layer indices must be >= 0"),
        ({"token_budgets": 5}, "sparsekv.token_budgets: unknown field; allowed fields: method, token_budget"),
        ({"token_budget": 8, "budget_fraction": 0.5}, "sparsekv: set token_budget or budget_fraction, not both"),
        ({"min_context": "many"}, "sparsekv.min_context: Input should be a valid integer"),
    ],
)
def test_bad_fields_are_named_on_the_first_line(bad, first_line):
    with pytest.raises(SparseKVConfigError) as e:
        load_config({"sparsekv": bad})
    assert str(e.value).splitlines()[0].startswith(first_line), str(e.value)
    assert "additional_config['sparsekv']" in str(e.value)  # and where it came from


def test_unknown_top_level_field_lists_the_method_sections():
    with pytest.raises(SparseKVConfigError) as e:
        load_config({"sparsekv": {"qest": {}}})
    for name in available():
        assert name in str(e.value)


DEPRECATED = [  # (method, old flat key, value) -> config.<method>.<new field>
    (m, old, new) for m in available() for old, new in get_method(m).deprecated_keys.items()
]


def test_every_old_flat_key_is_mapped():
    assert {old for _, old, _ in DEPRECATED} == {
        "quest_group_reduce", "hash_bits", "hash_page_reduce", "hash_seed", "hash_checkpoint",
        "observation_window", "pooling_kernel"}


@pytest.mark.parametrize("method, old, new", DEPRECATED, ids=[f"{m}-{o}" for m, o, _ in DEPRECATED])
def test_old_flat_keys_still_work_with_a_warning_naming_the_new_key(method, old, new):
    value = {"quest_group_reduce": "max", "hash_bits": 64, "hash_page_reduce": "sum", "hash_seed": 7,
             "hash_checkpoint": "/x/ckpt.pt", "observation_window": 5, "pooling_kernel": 3}[old]
    with pytest.warns(FutureWarning, match=rf"sparsekv\.{old} is deprecated; use .*sparsekv\.{method}\.{new}"):
        cfg = load_config({"sparsekv": {"method": method, old: value}})
    assert getattr(cfg.options(), new) == value
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new shape: no warning
        assert load_config({"sparsekv": {"method": method, method: {new: value}}}).options() == cfg.options()


def test_a_new_key_wins_over_the_old_one():
    with pytest.warns(FutureWarning):
        cfg = SparseKVConfig(method="quest", quest_group_reduce="max", quest={"group_reduce": "sum"})
    assert cfg.options().group_reduce == "sum"


def test_options_models_belong_to_their_methods():
    for m in available():
        cls = get_method(m)
        assert issubclass(cls.options_model, MethodOptions), m
        assert cls.options_model.model_config["extra"] == "forbid", m
        cfg = SparseKVConfig(method=m, **({"spotlight": {"checkpoint": "x"}} if m == "spotlight" else {}))
        assert isinstance(cfg.options(), cls.options_model)
    # options of other methods than the selected one are validated too, and read by name
    cfg = SparseKVConfig(method="quest", hash={"bits": 64})
    assert cfg.options().group_reduce == "sum" and cfg.options("hash").bits == 64
    assert SparseKVConfig(**cfg.model_dump()) == cfg  # the dump round-trips
    with pytest.raises(Exception, match="hash.bits"):
        SparseKVConfig(method="quest", hash={"bits": 40})


def test_config_module_names_no_method():
    """Only the default of `method` may be a method name in config.py; rules about methods live in
    the method classes (selects_all, default_allocation, options_model)."""
    import ast

    tree = ast.parse((Path(__file__).resolve().parent.parent / "vllm_sparsekv" / "config.py").read_text())
    names = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in available()]
    assert names == [SparseKVConfig.model_fields["method"].default], names


def test_readme_table_lists_every_field_of_every_model():
    text = README.read_text()
    rows = {r.group(1) for r in re.finditer(r"^\| `([^`]+)` \|", text, re.M)}
    want = set()
    for name, field in SparseKVConfig.model_fields.items():  # a section (offload) lists its fields
        sub = type(field.default).model_fields if isinstance(field.default, BaseModel) else None
        want |= {f"{name}.{f}" for f in sub} if sub else {name}
    for m in available():
        want |= {f"{m}.{f}" for f in get_method(m).options_model.model_fields}
    assert want <= rows, f"README's configuration table misses {sorted(want - rows)}"
    for m in available():
        assert f"- `{m}`: " in text, f"README does not list the method {m}"
    # and it is the generated table (python -m vllm_sparsekv.config), not a hand-edited copy
    assert markdown_table() in text, "README table is stale: paste `python -m vllm_sparsekv.config`"


def test_env_var_json_and_path(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, json.dumps({"token_budget": 512}))
    assert load_config({}).token_budget == 512
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps({"budget_fraction": 0.25}))
    monkeypatch.setenv(ENV_VAR, str(p))
    assert load_config(None).budget_fraction == 0.25
    # both sources: fine when equal, an error naming the field and both sources when they differ
    assert load_config({"sparsekv": {"budget_fraction": 0.25}}).budget_fraction == 0.25
    with pytest.raises(SparseKVConfigError, match=ENV_VAR) as e:
        load_config({"sparsekv": {"budget_fraction": 0.5}})
    assert str(e.value).startswith("sparsekv.budget_fraction:")
    monkeypatch.setenv(ENV_VAR, "{not json")
    with pytest.raises(SparseKVConfigError, match="not valid JSON"):
        load_config({})


def test_env_var_and_flag_are_compared_after_validation(monkeypatch):
    monkeypatch.setenv(ENV_VAR, json.dumps({"method": "QUEST", "quest": {"group_reduce": "sum"}, "sink_tokens": 64}))
    assert load_config({"sparsekv": {"method": "quest"}}).method == "quest"
    monkeypatch.setenv(ENV_VAR, json.dumps({"method": "quest", "quest_group_reduce": "max"}))
    with pytest.warns(FutureWarning):
        assert load_config({"sparsekv": {"quest": {"group_reduce": "max"}}}).options().group_reduce == "max"
        with pytest.raises(SparseKVConfigError) as e:
            load_config({"sparsekv": {"method": "quest"}})
    assert str(e.value).startswith("sparsekv.quest: the settings are given twice and differ")
    monkeypatch.setenv(ENV_VAR, json.dumps({"method": "pyramidkv"}))  # default allocation resolved too
    assert load_config({"sparsekv": {"method": "pyramidkv", "budget_allocation": "pyramid"}}).method == "pyramidkv"


def test_frozen():
    with pytest.raises(Exception):
        SparseKVConfig().token_budget = 3


def test_quest_reads_group_reduce_from_its_options(seed_gen):
    """The selector scores with the reduction its own options name (against the float64 brute force)."""
    g = seed_gen
    n, hkv, grp, d, bs, blocks = 2, 2, 3, 16, 8, 6
    q = torch.randn(n, hkv * grp, d, generator=g)
    bounds = torch.randn(blocks, hkv, 2, d, generator=g).sort(dim=2).values
    bt = torch.stack([torch.randperm(blocks, generator=g) for _ in range(n)]).to(torch.int32)
    sl = torch.tensor([blocks * bs, 3 * bs - 2], dtype=torch.int32)
    for reduce in ("sum", "max"):
        sel = get_method("quest")(SparseKVConfig(quest={"group_reduce": reduce}), LayerGeometry(hkv * grp, hkv, d, bs))
        sel.bounds = bounds
        got = sel.score_pages(q, None, bt, sl, blocks)
        torch.testing.assert_close(got.double(), brute_quest(q, bounds, bt, sl, blocks, bs, reduce), rtol=1e-5, atol=1e-5)
    assert not torch.equal(kernels.quest_page_scores(q, bounds, bt, sl, blocks, bs),
                           kernels.quest_page_scores_group_max(q, bounds, bt, sl, blocks, bs))


def test_hash_reads_bits_and_seed_from_its_options():
    from vllm_sparsekv.methods.hash import linear_projection

    geo = LayerGeometry(4, 2, 16, 8, layer=3)
    for bits, seed in ((64, 0), (128, 5)):
        sel = get_method("hash")(SparseKVConfig(method="hash", hash={"bits": bits, "seed": seed}), geo)
        sel.allocate(4, torch.float32, torch.device("cpu"))
        assert sel.codes.shape == (4, 8, 2, bits // 32)
        assert torch.equal(sel.projection, linear_projection(2, 16, bits, seed, 3))
