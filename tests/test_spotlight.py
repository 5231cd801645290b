"""Spotlight (trained hashing): the trainer on a tiny random Llama (an epoch runs, the loss falls,
resume picks up at the first untrained layer, the checkpoint loads), the method's codes against a
direct computation (MLP, sign, pack), a fresh checkpoint is exactly the linear hash, and a missing or
mismatched checkpoint is a clear error at selector creation and at engine-config time."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from vllm_sparsekv import kernels  # noqa: E402
from vllm_sparsekv.config import SparseKVConfig, SparseKVConfigError  # noqa: E402
from vllm_sparsekv.kernels._common import pack_bits  # noqa: E402
from vllm_sparsekv.methods import get_method  # noqa: E402
from vllm_sparsekv.methods import spotlight as S  # noqa: E402
from vllm_sparsekv.methods.base import LayerGeometry  # noqa: E402
from vllm_sparsekv.tools import train_hash as T  # noqa: E402

HQ, HKV, D, LAYERS, BITS = 4, 2, 16, 2, 64
OPTS = dict(hash_bits=BITS, hidden=16, activation="silu", seq_len=192, num_seqs=4, val_seqs=1, max_que=24,
            max_top=6, max_oth=24, top_fraction=0.05, sink=4, recent=4, epochs=2, lr=1e-2, tau=8.0, seed=0,
            hash_seed=0)


def _tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=HQ * D, intermediate_size=128, num_hidden_layers=LAYERS,
                      num_attention_heads=HQ, num_key_value_heads=HKV, max_position_embeddings=1024,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def _seqs(n, L=192, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (L,), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("spot") / "tiny.pt"
    ckpt = T.train_hash(_tiny_llama(), _seqs(4), _seqs(1, seed=2), out, OPTS, model_id="tiny", progress=False)
    return out, ckpt


def test_trainer_loss_falls_and_checkpoint_loads(trained):
    out, ckpt = trained
    assert ckpt["complete"] and sorted(ckpt["layers"]) == [0, 1]
    for info in ckpt["train"]["layers"].values():
        losses = [h["loss"] for h in info["history"][1:]]
        assert losses[-1] < losses[0], losses
        assert set(info["history"][0]["val_iou"]) == set(T.VAL_FRACTIONS)  # epoch 0 = linear hash
        assert all(0.0 <= v <= 1.0 for h in info["history"] for v in h["val_iou"].values())
    loaded = S.load_checkpoint(str(out))
    assert (loaded["num_layers"], loaded["num_kv_heads"], loaded["head_dim"], loaded["hash_bits"]) == (LAYERS, HKV, D, BITS)
    p = loaded["layers"][1]
    assert p["k_w2"].abs().sum() > 0 and p["q_skip"].shape == (HKV, D, BITS)
    assert not out.with_name(out.name + ".collect.pt").exists()  # removed once complete


def test_resume_trains_only_missing_layers(tmp_path, monkeypatch):
    out = tmp_path / "r.pt"
    opts = dict(OPTS, epochs=1)
    real = T.train_layer
    calls = []

    def boom(layer, *a, **k):
        calls.append(layer)
        if layer == 1 and len(calls) == 2:
            raise KeyboardInterrupt  # killed while training layer 1
        return real(layer, *a, **k)

    monkeypatch.setattr(T, "train_layer", boom)
    model = _tiny_llama()
    with pytest.raises(KeyboardInterrupt):
        T.train_hash(model, _seqs(4), _seqs(1, seed=2), out, opts, model_id="tiny", progress=False)
    part = torch.load(out, weights_only=True)
    assert not part["complete"] and sorted(part["layers"]) == [0]
    assert out.with_name(out.name + ".collect.pt").exists()
    done = T.train_hash(model, _seqs(4), _seqs(1, seed=2), out, opts, model_id="tiny", progress=False)
    assert calls == [0, 1, 1] and done["complete"]
    assert torch.equal(done["layers"][0]["k_w1"], part["layers"][0]["k_w1"])
    with pytest.raises(SystemExit, match="other settings"):
        T.train_hash(model, _seqs(4), _seqs(1, seed=2), out, dict(opts, hidden=8), model_id="tiny", progress=False)


def _selector(path, layer=1, hkv=HKV, d=D, **opts):
    config = SparseKVConfig(method="spotlight", spotlight={"checkpoint": str(path), **opts})
    return get_method("spotlight")(config, LayerGeometry(HQ if hkv == HKV else hkv * 2, hkv, d, 4, layer))


def _write(sel, T_=21, num_blocks=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(T_, HKV, D, generator=g)
    slots = torch.randperm(num_blocks * 4, generator=g)[:T_].long()
    slots[5] = -1  # padding
    sel.allocate(num_blocks, torch.float32, torch.device("cpu"))
    sel.on_kv_write(keys, None, slots)
    return keys, slots


def test_codes_equal_direct_computation(trained):
    out, ckpt = trained
    sel = _selector(out)
    keys, slots = _write(sel)
    p = ckpt["layers"][1]
    logits = S.layer_logits(p, keys, "k")
    want = pack_bits(logits > 0)
    got = sel.codes.view(-1, HKV, BITS // 32)[slots.clamp(min=0)]
    ok = slots >= 0
    # sign of a value within rounding of zero may differ between the folded and direct sums
    near0 = pack_bits(logits.abs() < 1e-4).ne(0)
    assert torch.equal(got[ok] | near0[ok], want[ok] | near0[ok])
    assert (got[ok] == want[ok]).float().mean() > 0.99
    q = torch.randn(3, HQ, D, generator=torch.Generator().manual_seed(4))
    q_codes = kernels.hash_query(sel.query_features(q), sel.query_projection)
    assert torch.equal(q_codes, pack_bits(S.layer_logits(p, q, "q") > 0))
    # scores: the Hamming kernel over these codes
    bt = torch.arange(8, dtype=torch.int32)[None].expand(3, -1).contiguous()
    sl = torch.tensor([32, 17, 5], dtype=torch.int32)
    got_s = sel.score_pages(q, None, bt, sl, 8)
    assert torch.equal(got_s, kernels.hash_page_scores(q_codes, sel.codes, bt, sl, 8, "max"))
    assert torch.isinf(got_s[2, :, 2:]).all() and torch.isfinite(got_s[2, :, :2]).all()


def test_untrained_checkpoint_is_the_linear_hash(tmp_path):
    g = torch.Generator().manual_seed(0)
    recs = [{"k": torch.randn(50, HKV, D, generator=g).half(), "q": torch.randn(20, HQ, D, generator=g).half()}]
    ckpt = {"format": S.FORMAT, "model": "x", "num_layers": 2, "num_heads": HQ, "num_kv_heads": HKV, "head_dim": D,
            "hash_bits": BITS, "hidden": 8, "activation": "silu", "complete": True,
            "layers": {i: T.init_layer(HKV, D, BITS, 8, i, 0, recs) for i in range(2)}}
    torch.save(ckpt, tmp_path / "init.pt")
    spot = _selector(tmp_path / "init.pt", bits=BITS)
    lin = get_method("hash")(SparseKVConfig(method="hash", hash={"bits": BITS}), LayerGeometry(HQ, HKV, D, 4, 1))
    _write(spot)
    _write(lin)
    assert torch.equal(spot.codes, lin.codes)
    q = torch.randn(2, HQ, D)
    assert torch.equal(kernels.hash_query(spot.query_features(q), spot.query_projection),
                       kernels.hash_query(q, lin.projection))


def test_checkpoint_errors(trained, tmp_path):
    out, _ = trained
    with pytest.raises(S.SpotlightCheckpointError, match="spotlight.checkpoint.*train-hash"):
        get_method("spotlight")(SparseKVConfig(method="spotlight"), LayerGeometry(HQ, HKV, D, 4, 1))
    with pytest.raises(S.SpotlightCheckpointError, match="not found"):
        _selector(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(S.SpotlightCheckpointError, match="cannot read"):
        _selector(tmp_path / "junk.pt")
    with pytest.raises(S.SpotlightCheckpointError, match=r"num_kv_heads: checkpoint 2, model 3"):
        _selector(out, hkv=3)
    with pytest.raises(S.SpotlightCheckpointError, match=r"head_dim: checkpoint 16, model 32"):
        _selector(out, d=32)
    with pytest.raises(S.SpotlightCheckpointError, match=r"hash_bits: checkpoint 64, sparsekv.spotlight.bits 128"):
        _selector(out, bits=128)
    with pytest.raises(S.SpotlightCheckpointError, match=r"layers \[5\] are not trained"):
        _selector(out, layer=5)
    _selector(out)  # bits left unset: the checkpoint's bits are used


def test_engine_config_validation(trained):
    from vllm_sparsekv.validate import validate_engine_config

    out, _ = trained

    def vcfg(layers, kv, d, **extra):
        model = SimpleNamespace(get_total_num_hidden_layers=lambda: layers, get_total_num_kv_heads=lambda: kv,
                                get_head_size=lambda: d, get_sliding_window=lambda: None)
        return SimpleNamespace(additional_config={"sparsekv": {"method": "spotlight", "spotlight": {"checkpoint": str(out)},
                                                               "dense_layers": [], **extra}},
                               model_config=model, cache_config=None, parallel_config=None)

    validate_engine_config(vcfg(LAYERS, HKV, D))
    with pytest.raises(SparseKVConfigError, match=r"num_layers: checkpoint 2, model 30(.|\n)*num_kv_heads: checkpoint 2, model 3"):
        validate_engine_config(vcfg(30, 3, D))
    with pytest.raises(SparseKVConfigError, match="head_dim"):
        validate_engine_config(vcfg(LAYERS, HKV, 64))


def test_cli_wires_train_hash():
    from vllm_sparsekv.tools.cli import build_parser

    a = build_parser().parse_args(["train-hash", "some/model", "--out", "x.pt", "--max-que", "16"])
    assert a.func is T.main and a.max_que == 16 and a.max_top == 32 and a.max_oth == 96
