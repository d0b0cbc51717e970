"""Writes zip-format PyTorch files WITHOUT torch, for tests of the torch-free reader.

It produces the same archive layout torch.save uses (``<name>/data.pkl`` with persistent ids
``('storage', torch.FloatStorage, key, 'cpu', numel)`` and ``<name>/data/<key>`` raw storages), by
pickling stand-in objects registered under the torch module names only while writing.
"""
import collections
import io
import pickle
import sys
import types
import zipfile

import numpy as np

_DTYPE_TO_STORAGE = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
                     np.dtype(np.float64): "DoubleStorage", np.dtype(np.int64): "LongStorage",
                     np.dtype(np.int32): "IntStorage", np.dtype(np.uint8): "ByteStorage"}


class _Tensor:
  def __init__(self, key, arr):
    self.key, self.arr = key, arr


def write_pth(path, state_dict, *, extra_objects=None, wrap=None):
  """state_dict: name -> np.ndarray. ``wrap``: e.g. 'state_dict' to nest under that key."""
  fake_torch = types.ModuleType("torch")
  fake_utils = types.ModuleType("torch._utils")
  storage_types = {}
  for name in set(_DTYPE_TO_STORAGE.values()):
    cls = type(name, (), {"__module__": "torch"})
    setattr(fake_torch, name, cls)
    storage_types[name] = cls

  def _rebuild_tensor_v2(*args):  # never called: only its name is pickled
    raise AssertionError

  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  fake_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
  sys.modules["torch"], sys.modules["torch._utils"] = fake_torch, fake_utils
  storages = {}
  try:
    class _Pickler(pickle.Pickler):
      def persistent_id(self, obj):
        if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "__storage__":
          key, arr = obj[1]
          storages[key] = arr
          return ("storage", storage_types[_DTYPE_TO_STORAGE[arr.dtype]], key, "cpu", arr.size)
        return None

    class _TensorReduce:
      def __init__(self, key, arr):
        self.key, self.arr = key, np.ascontiguousarray(arr)

      def __reduce__(self):
        stride = tuple(s // self.arr.itemsize for s in self.arr.strides)
        return (_rebuild_tensor_v2, (("__storage__", (self.key, self.arr.reshape(-1))), 0,
                                     tuple(self.arr.shape), stride, False, collections.OrderedDict()))

    od = collections.OrderedDict(
        (k, _TensorReduce(str(i), np.asarray(v))) for i, (k, v) in enumerate(state_dict.items()))
    obj = {wrap: od} if wrap else od
    if extra_objects:
      obj = dict(obj) if not isinstance(obj, dict) else obj
      obj.update(extra_objects)
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", buf.getvalue())
    for key, arr in storages.items():
      zf.writestr(f"archive/data/{key}", arr.astype(arr.dtype.newbyteorder("<")).tobytes())
  return path
