"""SparseKVConfig: the one source of truth for every knob of the plugin.

Read from ``additional_config["sparsekv"]`` (``--additional-config '{"sparsekv": {...}}'``) or
from the ``VLLM_SPARSEKV_CONFIG`` environment variable (JSON text or a path to a JSON file).
Both at once is an error unless they agree, so a stale variable never wins silently.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

ENV_VAR = "VLLM_SPARSEKV_CONFIG"
CONFIG_KEY = "sparsekv"
DEFAULT_TOKEN_BUDGET = 2048


class SparseKVConfigError(ValueError):
    """A bad sparsekv setting; the message names the field and what is allowed."""


class SparseKVConfig(BaseModel):
    """Sparse decode attention settings (see README, "Configuration")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = "quest"
    """Page selection method: a name from ``vllm_sparsekv.methods.available()``."""
    token_budget: int | None = None
    """Tokens attended per (request, KV head) at decode, sink and recent pages included
    (default 2048 when budget_fraction is not set either)."""
    budget_fraction: float | None = None
    """Budget as a fraction of the request's context (0 < f <= 1); exclusive with token_budget."""
    sink_tokens: int = 64
    """Leading tokens always attended (rounded up to whole pages)."""
    recent_tokens: int = 64
    """Trailing tokens always attended (rounded up to whole pages; the page being written is
    always included)."""
    dense_layers: list[int] = [0, 1]
    """Layer indices that always run dense (Quest keeps the first two layers dense)."""
    min_context: int = 0
    """Requests whose context is shorter than this decode dense."""
    budget_allocation: Literal["uniform", "pyramid", "infscore", "headkv"] = "uniform"
    """How the budget is spread over layers and KV heads (total preserved); infscore/headkv read
    `head_budgets`."""
    head_budgets: str | None = Field(default=None, validate_default=True)
    """Path of a head-score profile (`sparsekv profile-heads`) for infscore/headkv allocation."""
    budget_beta: float = 1.351
    """infscore/headkv: each head keeps 1 - 1/beta of the uniform budget; the rest is shared by score."""
    budget_temp: float = 1.0
    """infscore/headkv: head scores are raised to this power before sharing (sharper when > 1)."""
    quest_group_reduce: Literal["sum", "max"] = "sum"
    """`quest`: combine the GQA group's per-query-head bounds by `sum` (Quest's score, one fused
    read of the bounds) or `max` (a page one query head needs wins even if the others do not;
    torch path, no Triton kernel yet)."""
    hash_checkpoint: str | None = None
    """Trained hash checkpoint (`sparsekv train-hash`) for the trained-hash method."""
    observation_window: int = 32
    """snapkv/pyramidkv: prompt queries (the last ones) whose attention picks the kept pages."""
    pooling_kernel: int = 7
    """snapkv/pyramidkv: max-pooling width over tokens of the window's attention (1 = none)."""
    hash_bits: int = 128
    """Code length of the `hash` method (a multiple of 32, 32-256)."""
    hash_page_reduce: Literal["max", "sum"] = "max"
    """How the `hash` method turns token scores into a page score."""
    hash_seed: int = 0
    """Seed of the `hash` method's fixed random projections."""
    log_interval_s: float = 10.0
    """Seconds between the sparsity log lines (0 turns them off)."""
    stats_file: str | None = None
    """If set, the worker rewrites this JSON file with the sparsity counters at each log interval."""

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from vllm_sparsekv.methods import available

        name = v.lower()
        if name not in available():
            raise ValueError(f"unknown method {v!r}; allowed: {', '.join(available())}")
        return name

    @field_validator("hash_bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v % 32 or not 32 <= v <= 256:
            raise ValueError(f"must be a multiple of 32 in [32, 256], got {v}")
        return v

    @field_validator("observation_window", "pooling_kernel")
    @classmethod
    def _at_least_one(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v

    @field_validator("token_budget")
    @classmethod
    def _positive_budget(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be a positive number of tokens, got {v}")
        return v

    @field_validator("budget_fraction")
    @classmethod
    def _fraction(cls, v: float | None) -> float | None:
        if v is not None and not (0.0 < v <= 1.0):
            raise ValueError(f"must be in (0, 1], got {v}")
        return v

    @field_validator("sink_tokens", "recent_tokens", "min_context")
    @classmethod
    def _non_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"must be >= 0, got {v}")
        return v

    @field_validator("dense_layers")
    @classmethod
    def _layers(cls, v: list[int]) -> list[int]:
        if any(i < 0 for i in v):
            raise ValueError(f"layer indices must be >= 0, got {v}")
        return sorted(set(v))

    @field_validator("budget_beta")
    @classmethod
    def _beta(cls, v: float) -> float:
        if not (math.isfinite(v) and v >= 1.0):
            raise ValueError(f"must be >= 1 (1: the whole budget is shared by score), got {v}")
        return v

    @field_validator("budget_temp")
    @classmethod
    def _temp(cls, v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"must be > 0, got {v}")
        return v

    @field_validator("head_budgets")
    @classmethod
    def _head_budgets(cls, v: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("budget_allocation")
        if kind in ("infscore", "headkv"):
            if not v:
                raise ValueError(f"budget_allocation={kind!r} needs a head-score profile; run "
                                 "`sparsekv profile-heads MODEL --out FILE.json` and set head_budgets to it")
            if not os.path.isfile(v):
                raise ValueError(f"file not found: {v}")
        return v

    @model_validator(mode="after")
    def _one_budget(self) -> SparseKVConfig:
        if self.token_budget is not None and self.budget_fraction is not None:
            raise ValueError("set token_budget or budget_fraction, not both")
        if self.method == "pyramidkv" and self.budget_allocation == "uniform":
            object.__setattr__(self, "budget_allocation", "pyramid")  # PyramidKV = SnapKV + pyramid
        if self.token_budget is None and self.budget_fraction is None:
            object.__setattr__(self, "token_budget", DEFAULT_TOKEN_BUDGET)
        return self

    # ---- derived sizes (pages of `block_size` tokens) ------------------------------------
    def sink_pages(self, block_size: int) -> int:
        return math.ceil(self.sink_tokens / block_size)

    def recent_pages(self, block_size: int) -> int:
        # At least one: the page the decode token was just written to.
        return max(1, math.ceil(self.recent_tokens / block_size))

    def max_selected_pages(self, block_size: int, max_model_len: int) -> int:
        """Static k of the selection: the most pages any (request, head) can attend."""
        max_pages = math.ceil(max_model_len / block_size)
        if self.method == "full":
            return max_pages
        forced = self.sink_pages(block_size) + self.recent_pages(block_size)
        if self.token_budget is not None:
            budget = math.ceil(self.token_budget / block_size)
        else:
            budget = math.ceil(self.budget_fraction * max_pages)
        dense_short = math.ceil(self.min_context / block_size)
        return min(max_pages, max(budget, forced, dense_short))


def _parse(raw: Any, source: str) -> dict:
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, BaseModel):
        return raw.model_dump()
    if isinstance(raw, str):
        text = raw
        if not raw.lstrip().startswith("{") and os.path.exists(raw):
            with open(raw) as f:
                text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SparseKVConfigError(f"{source}: not valid JSON nor a JSON file path ({e})") from e
        if not isinstance(data, dict):
            raise SparseKVConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        return data
    raise SparseKVConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")


def _format(err: ValidationError, source: str) -> str:
    lines = [f"invalid sparsekv configuration ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(config)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(SparseKVConfig.model_fields)
            msg = f"unknown field; allowed fields: {allowed}"
        lines.append(f"  sparsekv.{field}: {msg}")
    return "\n".join(lines)


def load_config(additional_config: dict | None = None) -> SparseKVConfig:
    """Build and validate the config from vLLM's additional_config and/or the environment."""
    from_args = (additional_config or {}).get(CONFIG_KEY) if isinstance(additional_config, dict) else None
    from_env = os.environ.get(ENV_VAR)
    sources = []
    if from_args is not None:
        sources.append(("additional_config['sparsekv']", _parse(from_args, "additional_config['sparsekv']")))
    if from_env:
        sources.append((ENV_VAR, _parse(from_env, ENV_VAR)))
    if len(sources) == 2 and sources[0][1] != sources[1][1]:
        raise SparseKVConfigError(
            f"sparsekv settings given twice and they differ: additional_config['sparsekv']="
            f"{sources[0][1]} vs {ENV_VAR}={sources[1][1]}; set only one"
        )
    source, data = sources[0] if sources else ("defaults", {})
    try:
        return SparseKVConfig(**data)
    except ValidationError as e:
        raise SparseKVConfigError(_format(e, source)) from None
