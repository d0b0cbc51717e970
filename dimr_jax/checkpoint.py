"""Orbax checkpoints with named items.

Items of a training checkpoint (one step directory):
  ``state``      full train state (params, optimizer, EMA, step) for exact resume;
  ``ema_params`` the EMA parameters alone (what sampling and the notebook restore);
  ``config``     the resolved config as JSON (the notebook rebuilds the model from it);
  ``data``       the grain iterator state (exact data order on resume).
Orbax writes each step to a temporary directory and renames it when complete, so a half-written
step (crash, SIGKILL, preemption mid-save) is never listed or restored.

Resume order (``train.py``): the workdir's latest step -> ``config.resume`` (another workdir) ->
``config.init_from`` (parameters only, e.g. from ``dimr_jax.convert``) -> scratch.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

ITEMS = ("state", "ema_params", "config", "data")


def make_manager(directory: str, *, keep_last: int = 3, keep_every: int = 0, save_every: int = 1,
                 async_save: bool = True, with_data: bool = True) -> ocp.CheckpointManager:
  """CheckpointManager keeping the last ``keep_last`` steps plus every ``keep_every``-th."""
  item_names = ITEMS if with_data else ITEMS[:3]
  handlers = {"state": ocp.StandardCheckpointHandler(), "ema_params": ocp.StandardCheckpointHandler(),
              "config": ocp.JsonCheckpointHandler()}
  if with_data:
    import grain

    handlers["data"] = grain.checkpoint.CheckpointHandler()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep_last if keep_last > 0 else None,
      keep_period=keep_every if keep_every > 0 else None,
      enable_async_checkpointing=async_save,
      create=True,
      save_interval_steps=1,
  )
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for name, handler in handlers.items():
    if name == "data":
      import grain

      registry.add(name, grain.checkpoint.CheckpointSave, handler)
      registry.add(name, grain.checkpoint.CheckpointRestore, handler)
    else:
      save_args = ocp.args.JsonSave if name == "config" else ocp.args.StandardSave
      restore_args = ocp.args.JsonRestore if name == "config" else ocp.args.StandardRestore
      registry.add(name, save_args, handler)
      registry.add(name, restore_args, handler)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, handler_registry=registry)


def config_to_json_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def save_params_checkpoint(directory: str, params: nnx.State, config: ml_collections.ConfigDict,
                           step: int = 0) -> None:
  """Writes a params-only checkpoint (``ema_params`` + ``config``), e.g. from converted weights."""
  mngr = make_manager(directory, keep_last=0, async_save=False, with_data=False)
  params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
  mngr.save(step, args=ocp.args.Composite(
      ema_params=ocp.args.StandardSave(params),
      config=ocp.args.JsonSave(config_to_json_dict(config))))
  mngr.wait_until_finished()
  mngr.close()


def latest_step(directory: str) -> int | None:
  if not os.path.isdir(directory):
    return None
  mngr = ocp.CheckpointManager(os.path.abspath(directory))
  step = mngr.latest_step()
  mngr.close()
  return step


def _require_dir(directory: str) -> None:
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory not found: {directory} (a training workdir or "
                            "the --out of `python -m dimr_jax.convert`)")


def restore_config(directory: str, step: int | None = None) -> ml_collections.ConfigDict:
  """Reads the saved config JSON of a checkpoint (latest step by default)."""
  _require_dir(directory)
  mngr = make_manager(directory, keep_last=0, async_save=False, with_data=False)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint found in {directory}")
  cfg = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  mngr.close()
  return ml_collections.ConfigDict(cfg)


def restore_ema_params(directory: str, abstract_params: nnx.State, step: int | None = None,
                       sharding: Any = None) -> nnx.State:
  """Restores only the EMA parameters onto ``sharding`` (default: the first local device).

  ``sharding`` is one ``jax.sharding.Sharding`` for every leaf, or a pytree of them shaped like
  ``abstract_params`` (e.g. FSDP shardings from ``sharding.infer_param_shardings``: each process
  then reads only its shards, and a model larger than one device can be restored).
  ``abstract_params`` is the ``nnx.state(abstract_model, nnx.Param)`` of the model the checkpoint
  was written for; a checkpoint of a different size fails with a clear message.
  """
  _require_dir(directory)
  mngr = make_manager(directory, keep_last=0, async_save=False, with_data=False)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint found in {directory}")
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, abstract_params)
  target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, np.float32, sharding=sh),
                        abstract_params, sharding)
  try:
    out = mngr.restore(step, args=ocp.args.Composite(ema_params=ocp.args.StandardRestore(target)))
  except (ValueError, KeyError) as e:
    raise ValueError(f"checkpoint {directory} step {step} does not fit this model "
                     f"(another model size or variant?): {e}") from e
  finally:
    mngr.close()
  return out["ema_params"]
