"""SparseKVConfig: the one source of truth for every knob of the plugin.

Read from ``additional_config["sparsekv"]`` (``--additional-config '{"sparsekv": {...}}'``) or
from the ``VLLM_SPARSEKV_CONFIG`` environment variable (JSON text or a path to a JSON file).
Both at once is an error unless they agree, so a stale variable never wins silently.

The fields here are the ones every method shares (budget, sink/recent pages, dense layers, ...).
A method's own knobs live in its options model (``vllm_sparsekv.methods``: ``options_model`` of
the method's class), given as the config section named after the method, e.g.
``{"method": "quest", "quest": {"group_reduce": "max"}}``; this module names no method.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails


ENV_VAR = "VLLM_SPARSEKV_CONFIG"
CONFIG_KEY = "sparsekv"
DEFAULT_TOKEN_BUDGET = 2048


class SparseKVConfigError(ValueError):
    """A bad sparsekv setting; the message names the field and what is allowed."""


class OffloadConfig(BaseModel):
    """The passive store (README, "Passive store"): low-relevance KV pages of decoding requests move
    to a host pool and their KV blocks go back to vLLM, so more requests fit."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    enabled: bool = False
    """Move low-relevance pages of decoding requests to the host pool (needs `dense_layers: []`
    and no async scheduling)."""
    cpu_bytes: int = 1 << 30
    """Size of the host pool in bytes (per worker): K/V pages of every layer. When it is full, pages
    stay in the KV cache (logged once)."""
    resident_fraction: float = 0.5
    """Share of a decoding request's pages kept in the KV cache, in (0, 1]; sink, recent and
    just-written pages always stay."""
    policy: Literal["lru", "atskv"] = "lru"
    """Which pages go passive first: `lru` (least recently selected by any layer's decode) or
    `atskv` (least relevant first, by a learned predictor over the selection history, fewer while
    vLLM has free blocks; README, "Passive store")."""
    relevance_weights: str | None = None
    """`atskv`: the predictor's weights, a JSON file from `sparsekv train-relevance`. Unset: the
    hand-set weights."""
    threshold_beta: float = 1.0
    """`atskv`: beta of the threshold tau = beta * quantile(relevance, q); > 0. Below 1 moves fewer
    pages than the target share asks for."""
    free_target: float = 0.0
    """`atskv`: share of vLLM's KV blocks, in [0, 0.5], under which memory pressure is full (every
    request goes to its target share); pressure falls to 0 at twice this share free. `0`: always
    full, like `lru`."""
    read_back: Literal["host", "recall"] = "host"
    """How the decode reads a passive page: `host` (straight from the host pool at every step it is
    selected) or `recall` (also straight from the pool, until it was read at `recall_k` of the last
    `recall_window` steps: then it goes back into a KV block)."""
    recall_k: int = 8
    """`read_back: recall`: host reads, within the window, that bring a page back; >= 1."""
    recall_window: int = 16
    """`read_back: recall`: the window, in steps; >= recall_k."""

    @field_validator("cpu_bytes")
    @classmethod
    def _positive_bytes(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be a positive number of bytes, got {v}")
        return v

    @field_validator("resident_fraction")
    @classmethod
    def _share(cls, v: float) -> float:
        if not (0.0 < v <= 1.0):
            raise ValueError(f"must be in (0, 1], got {v}")
        return v

    @field_validator("threshold_beta")
    @classmethod
    def _beta(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"must be > 0, got {v}")
        return v

    @field_validator("free_target")
    @classmethod
    def _free_target(cls, v: float) -> float:
        if not (0.0 <= v <= 0.5):
            raise ValueError(f"must be in [0, 0.5], got {v}")
        return v

    @field_validator("relevance_weights")
    @classmethod
    def _weights(cls, v: str | None) -> str | None:
        if v is not None:
            from vllm_sparsekv.offload.policy import load_relevance_weights

            load_relevance_weights(v)  # read at startup: a bad file fails here, not at the first offload
        return v

    @field_validator("recall_k")
    @classmethod
    def _recall_k(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _knobs_of_their_choice(self) -> OffloadConfig:
        fields = type(self).model_fields

        def changed(*names: str) -> list[str]:  # not fields_set: a dump round-trips
            return sorted(k for k in names if getattr(self, k) != fields[k].default)

        knobs = changed("relevance_weights", "threshold_beta", "free_target")
        if self.policy != "atskv" and knobs:
            raise ValueError(f"{', '.join(knobs)}: only used by policy 'atskv' (policy is {self.policy!r}); "
                             "allowed policies: lru, atskv")
        knobs = changed("recall_k", "recall_window")
        if self.read_back != "recall" and knobs:
            raise ValueError(f"{', '.join(knobs)}: only used by read_back 'recall' (read_back is "
                             f"{self.read_back!r}); allowed: host, recall")
        if self.recall_window < self.recall_k:
            raise ValueError(f"recall_window must be >= recall_k ({self.recall_k}), got {self.recall_window}")
        return self


class SparseKVConfig(BaseModel):
    """Sparse decode attention settings (see README, "Configuration").

    Besides the fields below, a key named after a registered method holds that method's options
    (validated by its ``options_model``); ``options(name)`` returns them, defaults filled in."""

    # extra keys are method sections, validated in _method_sections (anything else is refused)
    model_config = ConfigDict(extra="allow", frozen=True, use_attribute_docstrings=True)

    method: str = "quest"
    """Page selection method (the methods are listed below the table)."""
    token_budget: int | None = None
    """Tokens attended per (request, KV head) at decode, sink and recent pages included. Rounded up
    to whole pages. 2048 when `budget_fraction` is unset too."""
    budget_fraction: float | None = None
    """Budget as a fraction of each request's context, in (0, 1]. Cannot be combined with
    `token_budget`."""
    sink_tokens: int = 64
    """Leading tokens that are always attended (rounded up to pages)."""
    recent_tokens: int = 64
    """Trailing tokens that are always attended (rounded up to pages). The page being written is
    always attended."""
    dense_layers: list[int] = [0, 1]
    """Layers that always run dense through the platform kernel (Quest keeps the first two dense).
    Each must be a layer of the model."""
    min_context: int = 0
    """Requests with a shorter context decode dense."""
    budget_allocation: Literal["uniform", "pyramid", "infscore", "headkv"] = "uniform"
    """How the budget is spread over (layer, KV head), total preserved: `uniform`, `pyramid`
    (shrinks with depth, PyramidKV), `infscore` / `headkv` (from `head_budgets`). Unset: the
    method's default (`uniform`; `pyramid` for `pyramidkv`)."""
    head_budgets: str | None = Field(default=None, validate_default=True)
    """Head-score profile (`sparsekv profile-heads`) for `infscore` / `headkv`."""
    budget_beta: float = 1.351
    """`infscore` / `headkv`: each head keeps `1 - 1/beta` of the uniform budget; the rest is shared
    by score (HeadKV's split)."""
    budget_temp: float = 1.0
    """`infscore` / `headkv`: temperature that sharpens the head scores before sharing."""
    log_interval_s: float = 10.0
    """Seconds between sparsity log lines. `0` turns them off."""
    stats_file: str | None = None
    """The worker rewrites this JSON file with the sparsity counters (checked every second). Its
    directory must exist and be writable at startup."""
    offload: OffloadConfig = OffloadConfig()
    """The passive store (`offload.*` below)."""

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from vllm_sparsekv.methods import available

        name = v.lower()
        if name not in available():
            raise ValueError(f"unknown method {v!r}; allowed: {', '.join(available())}")
        return name

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

    @model_validator(mode="before")
    @classmethod
    def _deprecated_keys(cls, data: Any) -> Any:
        """Old flat method keys (``quest_group_reduce``, ``hash_bits``, ...) -> the method sections
        that declare them (``deprecated_keys`` of the method classes), with a warning naming the
        new key. A value already given under the new key wins."""
        if not isinstance(data, dict):
            return data
        from vllm_sparsekv.methods import available, get_method

        names = available()
        old = [k for k in data if k not in cls.model_fields and k not in names]
        if not old:
            return data
        data = dict(data)
        method = str(data.get("method", cls.model_fields["method"].default)).lower()
        for key in old:
            targets = [(n, get_method(n).deprecated_keys[key]) for n in names if key in get_method(n).deprecated_keys]
            if not targets:
                continue  # an unknown field: refused by _method_sections, naming it
            value = data.pop(key)
            for name, field in targets:
                section = data.get(name)
                if isinstance(section, BaseModel):
                    section = section.model_dump(exclude_unset=True)
                if section is None or isinstance(section, dict):
                    data[name] = {field: value, **(section or {})}
            shown = [t for t in targets if t[0] == method] or targets
            new = " / ".join(f"sparsekv.{n}.{f}" for n, f in shown)
            msg = f"sparsekv.{key} is deprecated; use {new} (e.g. {{\"{shown[0][0]}\": {{\"{shown[0][1]}\": ...}}}})"
            warnings.warn(msg, FutureWarning, stacklevel=2)
        return data

    @model_validator(mode="after")
    def _method_sections(self) -> SparseKVConfig:
        """Every extra key must be a registered method; its value is validated by that method's
        options model (errors located at ``<method>.<field>``)."""
        from vllm_sparsekv.methods import available, get_method

        extra = self.__pydantic_extra__ if self.__pydantic_extra__ is not None else {}
        errors: list[InitErrorDetails] = []
        for key, value in list(extra.items()):
            if key not in available():
                errors.append(InitErrorDetails(type="extra_forbidden", loc=(key,), input=value))
                continue
            model = get_method(key).options_model
            if isinstance(value, model):
                continue
            try:
                extra[key] = model.model_validate(value.model_dump() if isinstance(value, BaseModel) else value)
            except ValidationError as e:
                for d in e.errors():
                    ctx = d.get("ctx")
                    errors.append(InitErrorDetails(type=d["type"], loc=(key, *d["loc"]), input=d["input"],
                                                   **({"ctx": ctx} if ctx else {})))
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        if self.token_budget is not None and self.budget_fraction is not None:
            raise ValueError("set token_budget or budget_fraction, not both")
        default_alloc = get_method(self.method).default_allocation
        if default_alloc and "budget_allocation" not in self.model_fields_set:
            object.__setattr__(self, "budget_allocation", default_alloc)  # e.g. PyramidKV = SnapKV + pyramid
        if self.token_budget is None and self.budget_fraction is None:
            object.__setattr__(self, "token_budget", DEFAULT_TOKEN_BUDGET)
        return self

    def options(self, method: str | None = None) -> BaseModel:
        """The validated options of ``method`` (default: the configured one): its config section,
        or its options model's defaults when the section is not given."""
        from vllm_sparsekv.methods import get_method

        name = (method or self.method).lower()
        extra = self.__pydantic_extra__ or {}
        if name in extra:
            return extra[name]
        return get_method(name).options_model()

    def canonical(self) -> dict:
        """The settings as a plain dict with every default filled in: the configured method's
        options always present, other methods' sections only where they differ from their defaults.
        Two configs with equal ``canonical()`` select and attend the same pages."""
        from vllm_sparsekv.methods import get_method

        out = {k: v for k, v in self.model_dump().items() if k in type(self).model_fields}
        for name, opts in (self.__pydantic_extra__ or {}).items():
            dumped = opts.model_dump()
            if name == self.method or dumped != get_method(name).options_model().model_dump():
                out[name] = dumped
        out.setdefault(self.method, self.options().model_dump())
        return out

    # ---- derived sizes (pages of `block_size` tokens) ------------------------------------
    def sink_pages(self, block_size: int) -> int:
        return math.ceil(self.sink_tokens / block_size)

    def recent_pages(self, block_size: int) -> int:
        # At least one: the page the decode token was just written to.
        return max(1, math.ceil(self.recent_tokens / block_size))


def _default_text(field) -> str:
    if field.default is None:
        return "unset"
    return f"`{json.dumps(field.default)}`"


def _doc(field) -> str:
    return " ".join((field.description or "").split()).replace("|", "\\|")


def markdown_table() -> str:
    """The README's configuration table, generated from the models: the shared fields, then each
    method's options (`<method>.<field>`), then the methods. `python -m vllm_sparsekv.config`
    prints it; tests/test_config.py checks that the README lists every field."""
    from vllm_sparsekv.methods import available, get_method

    rows = ["| field | default | meaning |", "| --- | --- | --- |"]
    for name, field in SparseKVConfig.model_fields.items():
        if isinstance(field.default, BaseModel):  # a section: one row per field
            for sub, subfield in type(field.default).model_fields.items():
                rows.append(f"| `{name}.{sub}` | {_default_text(subfield)} | {_doc(subfield)} |")
            continue
        rows.append(f"| `{name}` | {_default_text(field)} | {_doc(field)} |")
    for method in available():
        cls = get_method(method)
        for name, field in cls.options_model.model_fields.items():
            old = [k for k, v in cls.deprecated_keys.items() if v == name]
            was = f" (was `{old[0]}`)" if old else ""
            doc = _doc(field)
            rows.append(f"| `{method}.{name}` | {_default_text(field)} | `{method}`: {doc[:1].lower()}{doc[1:]}{was} |")
    rows.append("")
    rows.append("Methods (`method`):")
    rows.append("")
    for method in available():
        rows.append(f"- `{method}`: {get_method(method).summary}")
    return "\n".join(rows)


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


def _describe(e: dict) -> str:
    """One pydantic error -> "what is wrong" (the field is named by the caller)."""
    msg = e["msg"].removeprefix("Value error, ")
    loc = e["loc"]
    if e["type"] == "extra_forbidden":
        from vllm_sparsekv.methods import available, get_method

        section = SparseKVConfig.model_fields.get(str(loc[0]))
        if len(loc) == 1:
            allowed = ", ".join(list(SparseKVConfig.model_fields) + available())
        elif section is not None and isinstance(section.default, BaseModel):
            allowed = ", ".join(type(section.default).model_fields)
        else:
            allowed = ", ".join(get_method(str(loc[0])).options_model.model_fields) or "none"
        return f"unknown field; allowed fields: {allowed}"
    ctx = e.get("ctx") or {}
    for kind, op in (("greater_than_equal", ">="), ("greater_than", ">"), ("less_than_equal", "<="), ("less_than", "<")):
        if e["type"] == kind:
            bound = next(iter(ctx.values()), "?")
            return f"must be {op} {bound}, got {e['input']!r}"
    if e["type"] == "literal_error":
        choices = re.findall(r"'([^']*)'", str(e.get("ctx", {}).get("expected", ""))) or [e.get("ctx", {}).get("expected")]
        return f"must be one of {', '.join(map(str, choices))}, got {e['input']!r}"
    return msg


def _format(err: ValidationError, source: str) -> str:
    """First line: the first bad field and what is wrong with it (what a user reads first)."""
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        lines.append(f"sparsekv{'.' + field if field else ''}: {_describe(e)}")
    lines.append(f"(invalid sparsekv configuration in {source})")
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
    configs = []
    for source, data in sources or [("defaults", {})]:
        try:
            configs.append((source, SparseKVConfig(**data)))
        except ValidationError as e:
            raise SparseKVConfigError(_format(e, source)) from None
    if len(configs) == 2 and configs[0][1].canonical() != configs[1][1].canonical():
        # compared after validation: "QUEST" vs "quest", or a default written out, are the same settings
        a, b = configs[0][1].canonical(), configs[1][1].canonical()
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise SparseKVConfigError(
            f"sparsekv.{diff[0]}: the settings are given twice and differ: additional_config['sparsekv'] has "
            + ", ".join(f"{k}={a.get(k)!r}" for k in diff) + f"; {ENV_VAR} has "
            + ", ".join(f"{k}={b.get(k)!r}" for k in diff) + "; set only one"
        )
    return configs[0][1]


if __name__ == "__main__":
    print(markdown_table())
