#!/usr/bin/env bash
# One SLURM task: activate the venv and run the training entry point under jax.distributed.
#
#   srun launch/run_slurm.sh --config=configs/dimr_xl_256.py --workdir=/shared/runs/x [--config.k=v ...]
#
# Started by the script launch/slurm.py renders, which exports DIMR_VENV, DIMR_COORDINATOR_ADDRESS and
# DIMR_NUM_PROCESSES for the job, and DIMR_PROCESS_ID (+ DIMR_LOCAL_DEVICE_IDS with one process per GPU)
# for each task. dimr_jax.main passes them to jax.distributed.initialize() when DIMR_DISTRIBUTED=1.
# Environment:
#   DIMR_VENV   venv to activate; empty = use the python on PATH (e.g. after `module load`)
set -euo pipefail

cd "$(dirname "$0")/.."  # the repo root
if [[ -n "${DIMR_VENV:-}" ]]; then
  if [[ ! -f "$DIMR_VENV/bin/activate" ]]; then
    echo "run_slurm.sh: no venv at DIMR_VENV=$DIMR_VENV (pip install -e '.[gpu]' into one first)" >&2
    exit 1
  fi
  # shellcheck disable=SC1091
  source "$DIMR_VENV/bin/activate"
fi

export DIMR_DISTRIBUTED=1
exec python -m dimr_jax.main "$@"
