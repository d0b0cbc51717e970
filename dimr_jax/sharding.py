"""Device mesh and shardings: a ('data', 'fsdp') mesh from the config, FSDP inferred from shapes.

* The batch is split over both axes (every device holds a distinct slice of the global batch).
* Parameters (and everything shaped like them: optimizer moments, EMA) are sharded over 'fsdp' along
  their largest dimension divisible by the axis size; stacked block parameters never shard their
  leading (layer) axis, so a scan step gathers one layer at a time. Parameters under
  ``min_size_mb`` stay replicated, and a tensor with no divisible dimension falls back to
  replication (logged, never an error).
"""
from __future__ import annotations

import logging
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")


def make_mesh(mesh_config: Any, devices=None) -> Mesh:
  """Builds the mesh from ``{'data': -1, 'fsdp': N}`` (-1: all remaining devices)."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  sizes = {"data": int(mesh_config["data"]), "fsdp": int(mesh_config["fsdp"])}
  unknown = [k for k, v in sizes.items() if v == -1]
  if len(unknown) > 1:
    raise ValueError("at most one mesh axis may be -1")
  known = math.prod(v for v in sizes.values() if v != -1)
  if any(v == 0 or v < -1 for v in sizes.values()):
    raise ValueError(f"mesh sizes must be positive or -1, got {sizes}")
  if unknown:
    if n % known:
      raise ValueError(f"mesh {sizes}: {n} devices are not divisible by {known}")
    sizes[unknown[0]] = n // known
  if math.prod(sizes.values()) != n:
    raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices but {n} are present; "
                     "set --config.mesh.data=-1 to use the rest")
  shape = (sizes["data"], sizes["fsdp"])
  axis_types = (jax.sharding.AxisType.Auto,) * 2
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, ("data", "fsdp"), axis_types=axis_types)
  return Mesh(np.asarray(devices).reshape(shape), ("data", "fsdp"), axis_types=axis_types)


def mesh_context(mesh: Mesh):
  """``jax.set_mesh(mesh)`` where available (newer jax), else the Mesh context manager. Tracing
  under it lets the model see the mesh (``layers.kernel_mesh``) and run its Pallas kernels per
  device instead of gathered onto every device."""
  if hasattr(jax, "set_mesh"):
    return jax.set_mesh(mesh)
  return mesh


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _is_stacked(path) -> bool:
  names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  return any(n in ("in_blocks", "out_blocks", "skip_denses") for n in names)


def fsdp_spec(shape: tuple, fsdp_size: int, *, stacked: bool, min_size_bytes: float,
              itemsize: int = 4, axis: str = "fsdp") -> P:
  """PartitionSpec for one parameter: shard its largest divisible (non-layer) dim over ``axis``."""
  if fsdp_size == 1 or math.prod(shape) * itemsize < min_size_bytes:
    return P()
  dims = list(range(1 if stacked else 0, len(shape)))
  for d in sorted(dims, key=lambda i: -shape[i]):
    if shape[d] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[d] = axis
      return P(*spec)
  logging.info("replicating parameter of shape %s: no dimension divisible by %s=%d", shape, axis,
               fsdp_size)
  return P()


def infer_param_shardings(abstract_tree: Any, mesh: Mesh, min_size_mb: float = 4.0,
                          axis: str = "fsdp") -> Any:
  """NamedShardings for a params-shaped pytree (params, EMA or optimizer state), sharded over
  the mesh axis ``axis`` (training: 'fsdp'; sampling may use its one 'data' axis)."""
  fsdp = mesh.shape[axis]

  def one(path, leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    itemsize = np.dtype(getattr(leaf, "dtype", np.float32)).itemsize
    spec = fsdp_spec(shape, fsdp, stacked=_is_stacked(path), min_size_bytes=min_size_mb * 2**20,
                     itemsize=itemsize, axis=axis)
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(one, abstract_tree)
