"""Converting the official PyTorch DiMR checkpoints (``DiMR-XL_2R_800epochs.pth``, ...) to Flax.

Python API::

    apply = dimr_jax.convert.load_official(source, model_config)
    outs = apply(x_nhwc, time_input, y)      # list of NHWC eps predictions, low resolution first

CLI (writes an orbax checkpoint that sampling, evaluation and the notebook restore)::

    python -m dimr_jax.convert --official DiMR-XL_2R_800epochs.pth --config configs/dimr_xl_256.py --out DIR

The mapping is exhaustive and strict: every official key must be consumed and every Flax parameter
filled, otherwise :class:`ConversionError` lists the missing keys, unexpected keys and shape
mismatches (key, expected, got). Nothing is ever loaded partially.

Name mapping (official -> ours). Torch Linear (out, in) becomes a (in, out) kernel; Conv2d
(O, I/g, kh, kw) becomes (kh, kw, I/g, O). Block ``i`` of a stage with ``n`` built blocks maps to
``in_blocks[i]`` (i < n//2), ``mid_block`` (i == n//2) or ``out_blocks[i-n//2-1]``;
``skip_denses.j`` maps to ``skip_denses[j]`` (they are stacked along a leading axis).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dimr_jax import weights
from dimr_jax.models import dimr as dimr_model

__all__ = ["ConversionError", "load_official", "official_to_params", "official_keys_for",
           "params_to_official"]


class ConversionError(ValueError):
  """The official state dict does not fit the model (lists every problem)."""


# Our sub-path (after the stage or block prefix) -> official sub-path.
_STAGE_RENAMES = [
    (("patch", "kernel"), "input_layer.1.weight"),
    (("patch", "bias"), "input_layer.1.bias"),
    (("pos_emb",), "input_layer.3.position_embeddings.weight"),
    (("class_emb",), "class_embeds.weight"),
    (("upsample", "norm_in"), "upsample.0"),
    (("upsample", "linear", "kernel"), "upsample.1.kernel.weight"),
    (("upsample", "linear", "bias"), "upsample.1.kernel.bias"),
    (("upsample", "norm_out"), "upsample.2"),
    (("out_norm",), "output_layer.0"),
    (("out_conv", "kernel"), "output_layer.2.weight"),
    (("out_conv", "bias"), "output_layer.2.bias"),
]


def _block_subpath(rest: tuple, is_conv_stage: bool) -> str:
  """Maps a path inside one block (or skip dense) to the official sub-key."""
  parts = [str(p) for p in rest]
  if parts[-1] == "kernel":
    parts[-1] = "weight"
  if is_conv_stage and parts[0] == "block1":  # ConvNeXt dwconv lives in Sequential index 1
    parts = ["block1", "1"] + parts[1:]
  return ".".join(parts)


def _translate(path: tuple, spec: dict) -> list[tuple[str, int | None]]:
  """Our parameter path -> [(official key, index into the stacked leading axis or None)]."""
  if path[0] != "stages":
    raise KeyError(path)
  s = int(path[1])
  rest = path[2:]
  sc = spec["stage_configs"][s]
  n = dimr_model.num_built_blocks(sc["num_blocks"])
  half = n // 2
  is_conv = sc["block_type"] == "ConvNeXtBlock"
  prefix = f"stages.{s}."
  head = rest[0]
  if head == "in_blocks":
    sub = _block_subpath(rest[1:], is_conv)
    return [(f"{prefix}blocks.{i}.{sub}", i) for i in range(half)]
  if head == "mid_block":
    return [(f"{prefix}blocks.{half}.{_block_subpath(rest[1:], is_conv)}", None)]
  if head == "out_blocks":
    sub = _block_subpath(rest[1:], is_conv)
    return [(f"{prefix}blocks.{half + 1 + j}.{sub}", j) for j in range(half)]
  if head == "skip_denses":
    sub = _block_subpath(rest[1:], False)
    return [(f"{prefix}skip_denses.{j}.{sub}", j) for j in range(half)]
  for ours, theirs in _STAGE_RENAMES:
    if rest[: len(ours)] == ours:
      tail = ".".join(str(p) for p in rest[len(ours):])
      return [(prefix + theirs + ("." + tail if tail else ""), None)]
  raise KeyError(f"no official name for parameter {'/'.join(map(str, path))}")


def _to_ours(arr: np.ndarray, our_rank: int, is_kernel: bool) -> np.ndarray:
  if is_kernel and arr.ndim == 2 and our_rank == 2:
    return arr.T
  if is_kernel and arr.ndim == 4 and our_rank == 4:
    return arr.transpose(2, 3, 1, 0)
  return arr


def _to_theirs(arr: np.ndarray, is_kernel: bool) -> np.ndarray:
  if is_kernel and arr.ndim == 2:
    return arr.T
  if is_kernel and arr.ndim == 4:
    return arr.transpose(3, 2, 0, 1)
  return arr


def _torch_shape(our_shape: tuple, is_kernel: bool) -> tuple:
  if is_kernel and len(our_shape) == 2:
    return our_shape[::-1]
  if is_kernel and len(our_shape) == 4:
    return (our_shape[3], our_shape[2], our_shape[0], our_shape[1])
  return tuple(our_shape)


def _abstract(spec: dict) -> nnx.Module:
  return nnx.eval_shape(lambda: dimr_model.DiMR(spec, rngs=nnx.Rngs(0)))


def official_keys_for(spec_or_config: Any) -> dict[str, tuple]:
  """Every official state_dict key the model expects, with its torch-layout shape."""
  spec = dimr_model.model_spec_from_config(spec_or_config)
  model = _abstract(spec)
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    shape = tuple(var.shape)
    is_kernel = path[-1] == "kernel"
    for key, idx in _translate(path, spec):
      shp = shape[1:] if idx is not None else shape
      out[key] = _torch_shape(shp, is_kernel)
  return out


def official_to_params(state_dict: Mapping[str, np.ndarray], spec_or_config: Any,
                       model: nnx.Module | None = None) -> nnx.State:
  """Converts an official state dict into an ``nnx.State`` of the model's parameters (numpy leaves).

  Raises ConversionError listing every missing / unexpected key and shape mismatch.
  """
  spec = dimr_model.model_spec_from_config(spec_or_config)
  sd = weights.strip_prefixes(state_dict)
  model = model if model is not None else _abstract(spec)
  abstract_state = nnx.state(model, nnx.Param)
  flat = nnx.to_flat_state(abstract_state)
  consumed, missing, mismatched = set(), [], []
  new_leaves = []
  for path, var in flat:
    shape = tuple(var.shape)
    is_kernel = path[-1] == "kernel"
    entries = _translate(path, spec)
    stacked = entries[0][1] is not None
    pieces = []
    for key, idx in entries:
      want = _torch_shape(shape[1:] if stacked else shape, is_kernel)
      if key not in sd:
        missing.append(key)
        continue
      consumed.add(key)
      arr = np.asarray(sd[key])
      if tuple(arr.shape) != want:
        mismatched.append((key, want, tuple(arr.shape)))
        continue
      pieces.append(_to_ours(arr, len(want), is_kernel).astype(np.float32))
    if len(pieces) == len(entries):
      new_leaves.append((path, np.stack(pieces) if stacked else pieces[0]))
  unexpected = sorted(set(sd) - consumed - set(missing))
  if missing or unexpected or mismatched:
    lines = ["official checkpoint does not match the model config:"]
    if missing:
      lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing[:20])
                   + (" ..." if len(missing) > 20 else ""))
    if unexpected:
      lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:20])
                   + (" ..." if len(unexpected) > 20 else ""))
    for key, want, got in mismatched[:20]:
      lines.append(f"  shape mismatch: {key}: expected {want}, got {got}")
    lines.append("  (is the config's variant / image_size the one the checkpoint was trained with?)")
    raise ConversionError("\n".join(lines))
  out = nnx.State({})
  leaves = {path: arr for path, arr in new_leaves}
  return nnx.from_flat_state([(p, v.replace(leaves[p])) for p, v in flat])


def params_to_official(params: nnx.State, spec_or_config: Any) -> dict[str, np.ndarray]:
  """Inverse mapping: our parameters -> official state dict (torch layouts). Used for round trips."""
  spec = dimr_model.model_spec_from_config(spec_or_config)
  out = {}
  for path, var in nnx.to_flat_state(params):
    arr = np.asarray(var[...] if hasattr(var, "shape") and hasattr(var, "replace") else var)
    is_kernel = path[-1] == "kernel"
    for key, idx in _translate(path, spec):
      a = arr[idx] if idx is not None else arr
      out[key] = _to_theirs(a, is_kernel)
  return out


def load_official(source: Any, model_config: Any, *, dtype: Any = jnp.float32,
                  pallas_ops: str | None = "auto") -> Callable[[Any, Any, Any], list]:
  """Loads an official checkpoint and returns ``apply(x_nhwc, time_input, y) -> [eps_low, ..., eps_high]``.

  ``source``: path (.pth read without torch, .npz, .safetensors) or mapping key -> array.
  ``model_config``: our config section (``variant`` ...) or the official layout dict.
  ``pallas_ops``: as the model's (which ops run as Pallas kernels; 'auto': GPU + 16-bit only).
  """
  spec = dimr_model.model_spec_from_config(model_config)
  sd = weights.load_state_dict(source)
  model = nnx.eval_shape(lambda: dimr_model.DiMR(spec, dtype=dtype, pallas_ops=pallas_ops,
                                                 rngs=nnx.Rngs(0)))
  params = official_to_params(sd, spec, model)
  graphdef, abstract_state = nnx.split(model)
  params = jax.tree.map(jnp.asarray, params)
  nnx.replace_by_pure_dict  # noqa: B018  (API presence check for older flax)
  state = _merge_state(abstract_state, params)

  @jax.jit
  def _apply(state, x, t, y):
    return nnx.merge(graphdef, state)(x, t, y)

  def apply(x, time_input, y):
    x = jnp.asarray(x, jnp.float32)
    t = jnp.broadcast_to(jnp.asarray(time_input, jnp.float32).reshape(-1), (x.shape[0],)) \
        if jnp.ndim(time_input) == 0 or jnp.size(time_input) == 1 else jnp.asarray(time_input, jnp.float32)
    return _apply(state, x, t, jnp.asarray(y, jnp.int32))

  apply.params = params  # type: ignore[attr-defined]
  apply.model_spec = spec  # type: ignore[attr-defined]
  apply.graphdef = graphdef  # type: ignore[attr-defined]
  return apply


def _merge_state(abstract_state: nnx.State, params: nnx.State) -> nnx.State:
  """Fills the Param leaves of a full abstract state from ``params`` (the model has only Params)."""
  flat_p = dict(nnx.to_flat_state(params))
  items = []
  for path, var in nnx.to_flat_state(abstract_state):
    if path not in flat_p:
      raise ConversionError(f"no value for model variable {'/'.join(map(str, path))}")
    items.append((path, flat_p[path]))
  return nnx.from_flat_state(items)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--official", required=True, help="official .pth / .npz / .safetensors")
  parser.add_argument("--config", required=True, help="config file, e.g. configs/dimr_xl_256.py")
  parser.add_argument("--out", required=True, help="output directory (orbax checkpoint)")
  parser.add_argument("--step", type=int, default=0, help="step number to record")
  args = parser.parse_args(argv)
  from dimr_jax import checkpoint as ckpt_lib
  from dimr_jax import config_utils

  config = config_utils.load_config_file(args.config)
  spec = dimr_model.model_spec_from_config(config.model)
  sd = weights.load_state_dict(args.official)
  params = official_to_params(sd, spec)
  ckpt_lib.save_params_checkpoint(args.out, params, config, step=args.step)
  n = sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(params))
  print(f"converted {len(sd)} tensors ({n} parameters) from {args.official} -> {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
