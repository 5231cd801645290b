"""The wheel holds the runtime package and the evaluation package side by side: vllm_sparsekv from
the top level, sparsekv_eval from eval/ (pyproject: packages.find.where = [".", "eval"]), and the
`eval` extra carries the harness' dependencies. A build context without eval/ (the Docker images)
gives a runtime-only wheel."""

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _wheel(src: Path, out: Path) -> zipfile.ZipFile:
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (whl,) = out.glob("vllm_sparsekv-*.whl")
    return zipfile.ZipFile(whl)


@pytest.fixture
def source_copy(tmp_path):
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, src / name)
    for name in ("vllm_sparsekv", "eval", "csrc"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    return src


def test_wheel_has_both_packages_and_the_eval_extra(source_copy, tmp_path):
    z = _wheel(source_copy, tmp_path / "dist")
    names = z.namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"vllm_sparsekv", "sparsekv_eval", "vllm_sparsekv-0.1.0.dist-info"}
    expected = {f"sparsekv_eval/{m}.py" for m in ("__init__", "client", "haystack", "iou", "lm_eval_cli",
                                                   "longbench", "metrics", "niah", "passkey", "ppl",
                                                   "ruler", "sweep", "tokenization")}
    assert expected <= set(names)
    assert not [n for n in names if n.startswith("vllm_sparsekv/eval/")]  # no harness in the runtime
    meta = z.read("vllm_sparsekv-0.1.0.dist-info/METADATA").decode()
    assert "Provides-Extra: eval" in meta
    for dep in ("datasets", "aiohttp", "transformers", "matplotlib"):
        assert f'Requires-Dist: {dep}; extra == "eval"' in meta


def test_runtime_only_build_context(source_copy, tmp_path):
    shutil.rmtree(source_copy / "eval")  # what docker/Dockerfile.* copy
    z = _wheel(source_copy, tmp_path / "dist")
    assert {n.split("/")[0] for n in z.namelist()} == {"vllm_sparsekv", "vllm_sparsekv-0.1.0.dist-info"}


def _eval_imports(tree, top_level_only: bool) -> list[int]:
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        if any(n == "sparsekv_eval" or n.startswith("sparsekv_eval.") for n in names):
            out.append(node.lineno)
    return out


def test_runtime_package_does_not_need_the_harness():
    """The server side never imports sparsekv_eval; the tools (CLI, demo, profile-heads,
    train-hash) import it only inside functions, so `import vllm_sparsekv.tools.cli` works without it."""
    assert not (ROOT / "vllm_sparsekv" / "eval").exists()
    files = sorted((ROOT / "vllm_sparsekv").rglob("*.py"))
    assert len(files) > 20
    lazy = set()
    for f in files:
        tree = ast.parse(f.read_text(encoding="utf-8"))
        rel = f.relative_to(ROOT).as_posix()
        if rel.startswith("vllm_sparsekv/tools/"):
            assert _eval_imports(tree, top_level_only=True) == [], rel
            if _eval_imports(tree, top_level_only=False):
                lazy.add(f.name)
        else:
            assert _eval_imports(tree, top_level_only=False) == [], rel
    assert lazy == {"demo.py", "eval_cli.py", "profile_heads.py", "train_hash.py"}
