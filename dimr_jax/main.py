"""Entry point: ``python -m dimr_jax.main --config=configs/<file>.py [--config.x=...] --workdir=DIR``.

Thin on purpose: flags, optional multi-controller init, then :func:`dimr_jax.train.train_and_evaluate`.
``jax.distributed.initialize()`` runs only when asked (``--distributed`` or ``DIMR_DISTRIBUTED=1``,
which the launchers in ``launch/`` set), so single-machine runs need nothing. Explicit coordinates
come from ``DIMR_COORDINATOR_ADDRESS``, ``DIMR_NUM_PROCESSES``, ``DIMR_PROCESS_ID`` and
``DIMR_LOCAL_DEVICE_IDS`` when set (SLURM launcher, localhost tests); otherwise JAX auto-detects
Cloud TPU / SLURM.
"""
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False,
                                  "Compile the train step for this mesh, print memory, exit.")
flags.mark_flags_as_required(["config"])


def _maybe_initialize_distributed() -> None:
  if not (_DISTRIBUTED.value or os.environ.get("DIMR_DISTRIBUTED", "") in ("1", "true", "True")):
    return
  import jax

  kw = {}
  if os.environ.get("DIMR_COORDINATOR_ADDRESS"):
    kw["coordinator_address"] = os.environ["DIMR_COORDINATOR_ADDRESS"]
  if os.environ.get("DIMR_NUM_PROCESSES"):
    kw["num_processes"] = int(os.environ["DIMR_NUM_PROCESSES"])
  if os.environ.get("DIMR_PROCESS_ID"):
    kw["process_id"] = int(os.environ["DIMR_PROCESS_ID"])
  if os.environ.get("DIMR_LOCAL_DEVICE_IDS"):
    kw["local_device_ids"] = [int(i) for i in os.environ["DIMR_LOCAL_DEVICE_IDS"].split(",")]
  # (Read from the environment: asking jax for its backend here would start it before initialize.)
  if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
    # Multi-process CPU runs (tests, debugging) need a collectives implementation; gloo is the
    # default only in newer jax releases.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kw)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Keep TensorFlow (if an optional extra pulled it in) away from the accelerators.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    import tensorflow as tf  # noqa: F401  # pytype: disable=import-error
    tf.config.set_visible_devices([], "GPU")
  except Exception:  # noqa: BLE001 - TF is optional and absent in the core install
    pass
  _maybe_initialize_distributed()
  config = _CONFIG.value
  from dimr_jax import train

  if _COMPILE_ONLY.value:
    with config.unlocked():
      config.compile_only = True
  workdir = _WORKDIR.value
  if workdir is None:
    if not config.compile_only:
      raise app.UsageError("--workdir is required (where checkpoints and logs go)")
    workdir = "/tmp/dimr_compile_only"
  train.train_and_evaluate(config, workdir)


if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  app.run(main)
  sys.exit(0)
