#!/usr/bin/env bash
# Per-worker bootstrap for Cloud TPU VMs: venv + `pip install -e ".[tpu]"`, then the training entry point.
#
#   bash launch/run_tpu.sh --config=configs/dimr_xl_256.py --workdir=gs://BUCKET/dimr_xl_256 [--config.k=v ...]
#
# launch/tpu_pod.py runs this on every worker of a slice at once (gcloud ... ssh --worker=all).
# Environment:
#   DIMR_VENV          venv to create/use                        (default $HOME/dimr_venv)
#   DIMR_PYTHON        interpreter for the venv (>= 3.11)        (default: newest python3.1x on PATH,
#                                                                 else one fetched with uv)
#   DIMR_REINSTALL=1   pip install again even if dimr_jax + jax already import
#   DIMR_INSTALL_ONLY=1  install and exit (what `tpu_pod.py setup` does)
#   DIMR_DISTRIBUTED   exported as 1: dimr_jax.main then calls jax.distributed.initialize(), which
#                      finds the other workers of the slice by itself
set -euo pipefail

cd "$(dirname "$0")/.."  # the repo root, wherever this is called from
VENV="${DIMR_VENV:-$HOME/dimr_venv}"

log() { echo "[run_tpu $(hostname)] $*" >&2; }

# jax needs Python >= 3.11; TPU VM images ship 3.10, so fall back to a uv-managed interpreter.
make_venv() {
  local py="${DIMR_PYTHON:-}"
  if [[ -z "$py" ]]; then
    for cand in python3.13 python3.12 python3.11 python3; do
      if command -v "$cand" >/dev/null \
          && "$cand" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        py="$cand"
        break
      fi
    done
  fi
  if [[ -n "$py" ]]; then
    log "creating $VENV with $py"
    "$py" -m venv "$VENV"
  else
    log "no python >= 3.11 with venv found; creating $VENV with uv (python 3.12)"
    export PATH="$HOME/.local/bin:$PATH"
    if ! command -v uv >/dev/null; then
      python3 -m pip install --user --quiet uv || curl -LsSf https://astral.sh/uv/install.sh | sh
    fi
    uv venv --seed --python 3.12 "$VENV"
  fi
}

[[ -x "$VENV/bin/python" ]] || make_venv
# shellcheck disable=SC1091
source "$VENV/bin/activate"

# Already installed = both import from outside the repo (so the checkout itself does not count).
if [[ "${DIMR_REINSTALL:-0}" == 1 ]] || ! (cd / && python -c 'import dimr_jax, jax' 2>/dev/null); then
  log "pip install -e .[tpu]"
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -e ".[tpu]"
fi

if [[ "${DIMR_INSTALL_ONLY:-0}" == 1 ]]; then
  log "installed: $(cd / && python -c 'import jax, dimr_jax; print("jax", jax.__version__)')"
  exit 0
fi

export DIMR_DISTRIBUTED=1
exec python -m dimr_jax.main "$@"
