"""`spotlight`: trained hashing (Spotlight Attention, seed 000). A small MLP per (layer, KV head),
trained offline by `sparsekv train-hash` (vllm_sparsekv/tools/train_hash.py) with a pairwise ranking
loss, maps keys and queries to `bits` logits whose signs are the codes:

    logits(x) = x @ skip + act(x @ w1 + b1) @ w2 + b2          (one set for keys, one for queries)

Everything after the hidden layer is linear, so the code is `sign(features(x) @ projection)` with
`features(x) = [x, act(x @ w1 + b1), 1]` and `projection = [skip; w2; b2]`: the selector computes
the features with two torch matmuls and hands them to the same kernels as the linear hash
(`hash_codes_update` / `hash_query`: projection, sign, packing, scatter), then scores pages with
`hash_page_scores` (`HashSelector` in hash.py is the one code path). With `w2 = b2 = 0` and `skip`
the linear hash's projection the trained hash *is* the linear hash; training starts there.

Checkpoint (torch file, `torch.load(weights_only=True)`)::

    {"format": "sparsekv-spotlight-v1", "model": str, "num_layers", "num_heads", "num_kv_heads",
     "head_dim", "hash_bits", "hidden", "activation": "silu", "layers": {layer: {name: tensor}},
     "complete": bool, "train": {...settings and validation IoU...}}

with per layer, for side s in {"k", "q"}: `s_skip [Hkv, D, bits]`, `s_w1 [Hkv, D, H]`,
`s_b1 [Hkv, H]`, `s_w2 [Hkv, H, bits]`, `s_b2 [Hkv, bits]` (float32).
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch
from pydantic import field_validator

from vllm_sparsekv.methods.base import MethodOptions, register
from vllm_sparsekv.methods.hash import HashSelector, check_bits

FORMAT = "sparsekv-spotlight-v1"
SIDES = ("k", "q")
PARAMS = ("skip", "w1", "b1", "w2", "b2")
ACTIVATIONS = {"silu": torch.nn.functional.silu, "relu": torch.relu, "tanh": torch.tanh}


class SpotlightCheckpointError(ValueError):
    """A missing, unreadable or mismatched `spotlight.checkpoint`."""


class SpotlightOptions(MethodOptions):
    checkpoint: str | None = None
    """Trained hash checkpoint (`sparsekv train-hash`); required."""
    page_reduce: Literal["max", "sum"] = "max"
    """Page score = `max` or `sum` of its tokens' Hamming similarities."""
    bits: int | None = None
    """Code length the checkpoint must have (unset: the checkpoint's own)."""

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int | None) -> int | None:
        return check_bits(v)


# ------------------------------------------------------------------------ the math, shared with the trainer


def layer_logits(p: dict, x: torch.Tensor, side: str, activation: str = "silu") -> torch.Tensor:
    """Reference: x [M, H, D] (H = Hkv, or Hq with head h using KV head h // G) -> [M, H, bits]."""
    hkv = p[f"{side}_skip"].shape[0]
    g = x.shape[1] // hkv
    rep = (lambda t: t.repeat_interleave(g, dim=0)) if g > 1 else (lambda t: t)
    x = x.float()
    h = ACTIVATIONS[activation](torch.einsum("mhd,hdk->mhk", x, rep(p[f"{side}_w1"])) + rep(p[f"{side}_b1"]))
    return (torch.einsum("mhd,hdb->mhb", x, rep(p[f"{side}_skip"]))
            + torch.einsum("mhk,hkb->mhb", h, rep(p[f"{side}_w2"])) + rep(p[f"{side}_b2"]))


def layer_features(p: dict, x: torch.Tensor, side: str, activation: str = "silu") -> torch.Tensor:
    """x [M, H, D] -> [M, H, D + hidden + 1]: the inputs of the folded last (linear) step."""
    hkv = p[f"{side}_w1"].shape[0]
    g = x.shape[1] // hkv
    w1, b1 = p[f"{side}_w1"], p[f"{side}_b1"]
    if g > 1:
        w1, b1 = w1.repeat_interleave(g, dim=0), b1.repeat_interleave(g, dim=0)
    x = x.float()
    h = ACTIVATIONS[activation](torch.einsum("mhd,hdk->mhk", x, w1) + b1)
    return torch.cat([x, h, x.new_ones(*x.shape[:2], 1)], dim=-1)


def folded_projection(p: dict, side: str) -> torch.Tensor:
    """[Hkv, D + hidden + 1, bits]: skip, w2 and b2 stacked (features @ this == logits)."""
    return torch.cat([p[f"{side}_skip"], p[f"{side}_w2"], p[f"{side}_b2"][:, None, :]], dim=1).float().contiguous()


# ------------------------------------------------------------------------ checkpoint loading and checks


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, mtime: float) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise SpotlightCheckpointError(f"sparsekv.spotlight.checkpoint: cannot read {path!r}: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise SpotlightCheckpointError(
            f"sparsekv.spotlight.checkpoint: {path!r} is not a `sparsekv train-hash` checkpoint (format {FORMAT})")
    return ckpt


def load_checkpoint(path: str | None) -> dict:
    if not path:
        raise SpotlightCheckpointError(
            "sparsekv.spotlight.checkpoint: method 'spotlight' needs a trained hash checkpoint; "
            "make one with `sparsekv train-hash MODEL --out CKPT` and set "
            '{"spotlight": {"checkpoint": PATH}}')
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise SpotlightCheckpointError(f"sparsekv.spotlight.checkpoint: file not found: {path!r}")
    return _load_cached(path, os.path.getmtime(path))


def check_geometry(ckpt: dict, bits: int | None = None, *, num_layers: int | None = None, num_kv_heads: int | None = None,
                   head_dim: int | None = None, layers=None, path: str = "") -> None:
    """Raise SpotlightCheckpointError listing every way the checkpoint does not fit the model."""
    bad = []
    for name, want in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if want is not None and int(ckpt[name]) != int(want):
            bad.append(f"{name}: checkpoint {ckpt[name]}, model {want}")
    if bits is not None and int(bits) != int(ckpt["hash_bits"]):
        bad.append(f"hash_bits: checkpoint {ckpt['hash_bits']}, sparsekv.spotlight.bits {bits}")
    if layers is not None and not bad:  # (a wrong geometry already says it all)
        missing = sorted(set(layers) - set(int(k) for k in ckpt["layers"]))
        if missing:
            bad.append(f"layers {missing} are not trained in the checkpoint (complete={ckpt.get('complete')}; "
                       "finish `sparsekv train-hash`, it resumes, or add them to dense_layers)")
    if bad:
        raise SpotlightCheckpointError(
            f"sparsekv.spotlight.checkpoint {path or ''} (trained for {ckpt.get('model')!r}) does not match this model:\n  - "
            + "\n  - ".join(bad))


@register("spotlight")
class SpotlightSelector(HashSelector):
    """Trained (MLP) hashing; codes stored and scored exactly like `hash`."""

    summary = ("Spotlight's trained hash (an MLP per layer and KV head, `sparsekv train-hash`), scored "
               "like `hash`.")
    options_model = SpotlightOptions
    deprecated_keys = {"hash_checkpoint": "checkpoint", "hash_page_reduce": "page_reduce", "hash_bits": "bits"}
    whole_model_heads = True  # trained weights per KV head of the whole model

    def __init__(self, config, geometry):
        super().__init__(config, geometry)
        path = self.options.checkpoint
        ckpt = load_checkpoint(path)
        check_geometry(ckpt, self.options.bits, num_kv_heads=geometry.num_kv_heads, head_dim=geometry.head_size,
                       layers=[geometry.layer], path=path)
        if geometry.layer >= int(ckpt["num_layers"]):
            raise SpotlightCheckpointError(
                f"sparsekv.spotlight.checkpoint: layer {geometry.layer} but the checkpoint has {ckpt['num_layers']} layers")
        self.activation = ckpt.get("activation", "silu")
        self._bits = int(ckpt["hash_bits"])
        self.params = {k: v.float() for k, v in ckpt["layers"][int(geometry.layer)].items()}

    @classmethod
    def validate_model(cls, config, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        """Engine-config time check (validate.py): the checkpoint exists and fits the model."""
        opts = config.options(cls.name)
        ckpt = load_checkpoint(opts.checkpoint)
        sparse = [i for i in range(num_layers) if i not in set(config.dense_layers)]
        check_geometry(ckpt, opts.bits, num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                       layers=sparse, path=opts.checkpoint)

    @property
    def bits(self) -> int:
        return self._bits

    def make_projections(self, device):
        self.params = {k: v.to(device) for k, v in self.params.items()}
        return folded_projection(self.params, "k"), folded_projection(self.params, "q")

    def key_features(self, key):
        return layer_features(self.params, key, "k", self.activation)

    def query_features(self, query):
        return layer_features(self.params, query, "q", self.activation)
