"""On-disk format of the ImageNet latent shards (written by ``ingest.py``, read by training).

A latent directory holds::

  manifest.json                                  written last: the directory is complete
  latents-00000-of-00042.array_record            the shards, listed in the manifest
  latents-00000-of-00042.array_record.done       per-shard completion markers (for resuming)
  ingest_plan.json                               the settings of the run (a rerun must match)

Record format (one ArrayRecord record = one sample, i.e. one image or one flipped image):

  bytes [0, 8)   label, int64 little-endian
  bytes [8, ...) posterior moments, HWC (h, w, 8) in C order, little-endian float16 or float32;
                 channels [mean(4) | logvar(4)] of the SD VAE (unscaled, logvar not clamped)

HWC is the layout the NHWC models consume, so a batch is a plain stack. Neither shape nor dtype
is stored per record: they are in the manifest, which :func:`decode_record` checks the byte length
against. Records are written with ``group_size:1`` so that any index is one read (what grain's
random-access sampling needs).

Within the dataset, image ``i`` (in the sorted file order) is record ``2*i`` and its horizontal flip
is record ``2*i + 1``, so shard ``s`` holds images ``[s*shard_size, (s+1)*shard_size)``.

``manifest.json`` schema (version 1)::

  format: "dimr_jax.latents", version: 1,
  resolution: int            image side the VAE saw (256 or 512),
  latent_shape: [h, w, c]    HWC shape of the moments of one record,
  layout: "HWC",
  dtype: "float16" | "float32",
  count: int                 number of records (= 2 * num_images with flips),
  num_images: int, flips: bool,
  num_classes: int, classes: [str]   label index -> class name (ImageNet synset ids, sorted),
  num_shards: int, shard_size: int (images per shard),
  shards: [{"file": str, "count": int}]   file names relative to the directory, in order,
  vae_checkpoint: str (basename), vae_sha256: str, scale_factor: float,
  source: "folder" | "tfds", created: str (UTC ISO time)
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "MANIFEST_NAME", "FORMAT", "VERSION", "encode_record", "decode_record", "read_manifest",
    "write_manifest", "shard_name", "LatentDataSource", "INGEST_HINT",
]

MANIFEST_NAME = "manifest.json"
FORMAT = "dimr_jax.latents"
VERSION = 1
_LABEL = struct.Struct("<q")
_DTYPES = ("float16", "float32")
_REQUIRED = ("format", "version", "resolution", "latent_shape", "dtype", "count", "num_shards",
             "shards", "classes", "vae_sha256")
INGEST_HINT = ("prepare it with: python -m dimr_jax.data.ingest --imagenet_dir=IMAGENET/train "
               "--out={dir} --vae=autoencoder_kl.pth --resolution=256")


def shard_name(index: int, num_shards: int) -> str:
  """File name of shard ``index`` (zero-based) out of ``num_shards``."""
  return f"latents-{index:05d}-of-{num_shards:05d}.array_record"


def encode_record(moments: np.ndarray, label: int) -> bytes:
  """Serialises one sample: HWC float16/float32 moments (h, w, c) and an integer label."""
  moments = np.asarray(moments)
  if moments.ndim != 3:
    raise ValueError(f"moments must be HWC (h, w, c), got shape {moments.shape}")
  if moments.dtype.name not in _DTYPES:
    raise ValueError(f"moments must be float16 or float32, got {moments.dtype}")
  data = np.ascontiguousarray(moments, dtype=moments.dtype.newbyteorder("<"))
  return _LABEL.pack(int(label)) + data.tobytes()


def decode_record(record: bytes, manifest: Mapping[str, Any]) -> tuple[np.ndarray, int]:
  """Inverse of :func:`encode_record`: ``(moments HWC array in the manifest dtype, label)``."""
  dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
  shape = tuple(manifest["latent_shape"])
  n = int(np.prod(shape)) * dtype.itemsize
  if len(record) != _LABEL.size + n:
    raise ValueError(f"latent record has {len(record)} bytes; the manifest's {shape} "
                     f"{manifest['dtype']} needs {_LABEL.size + n}")
  (label,) = _LABEL.unpack_from(record, 0)
  moments = np.frombuffer(record, dtype=dtype, offset=_LABEL.size).reshape(shape)
  return moments.astype(dtype.newbyteorder("="), copy=False), int(label)


def write_manifest(directory: str, manifest: Mapping[str, Any]) -> str:
  """Writes ``manifest.json`` atomically (temp file + rename), so readers never see half of one."""
  path = os.path.join(directory, MANIFEST_NAME)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(dict(manifest), f, indent=1)
  os.replace(tmp, path)
  return path


def read_manifest(directory: str) -> dict[str, Any]:
  """Reads and checks ``<directory>/manifest.json``; one-line errors say how to prepare it."""
  directory = os.fspath(directory)
  path = os.path.join(directory, MANIFEST_NAME)
  hint = INGEST_HINT.format(dir=directory)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found (no finished latent dataset there); {hint}")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is not valid JSON ({e}); {hint}") from None
  if not isinstance(manifest, dict):
    raise ValueError(f"{path} is malformed (not a JSON object); {hint}")
  missing = [k for k in _REQUIRED if k not in manifest]
  if missing:
    raise ValueError(f"{path} is malformed (missing {missing}); {hint}")
  if manifest["format"] != FORMAT or manifest["version"] != VERSION:
    raise ValueError(f"{path} has format {manifest['format']!r} v{manifest['version']}, expected "
                     f"{FORMAT!r} v{VERSION}; {hint}")
  if manifest["dtype"] not in _DTYPES or len(manifest["latent_shape"]) != 3:
    raise ValueError(f"{path} is malformed (dtype {manifest['dtype']!r}, latent_shape "
                     f"{manifest['latent_shape']}); {hint}")
  shards = manifest["shards"]
  if (len(shards) != manifest["num_shards"]
      or sum(int(s["count"]) for s in shards) != manifest["count"]):
    raise ValueError(f"{path} is malformed (shard list does not add up to num_shards/count); {hint}")
  return manifest


class LatentDataSource:
  """grain ``RandomAccessDataSource`` over the shards of a latent directory.

  ``source[i]`` is ``{'moments': (h, w, c) array, 'label': np.int32}``; the moments stay in the
  stored dtype unless ``dtype`` is given. Global index ``i`` runs over the shards in manifest
  order. Picklable, so grain worker processes can hold it.
  """

  def __init__(self, directory: str, dtype: Any = None):
    from grain.sources import ArrayRecordDataSource

    self.directory = os.fspath(directory)
    self.manifest = read_manifest(self.directory)
    self.dtype = None if dtype is None else np.dtype(dtype)
    paths = [os.path.join(self.directory, s["file"]) for s in self.manifest["shards"]]
    absent = [p for p in paths if not os.path.exists(p)]
    if absent:
      raise FileNotFoundError(f"{len(absent)} shard(s) listed in the manifest are missing, e.g. "
                              f"{absent[0]}; {INGEST_HINT.format(dir=self.directory)}")
    self._source = ArrayRecordDataSource(paths)
    if len(self._source) != self.manifest["count"]:
      raise ValueError(f"{self.directory}: shards hold {len(self._source)} records, the manifest "
                       f"says {self.manifest['count']}; rerun the ingest command to repair it")

  def __len__(self) -> int:
    return len(self._source)

  def _decode(self, record: bytes) -> dict[str, np.ndarray]:
    moments, label = decode_record(record, self.manifest)
    if self.dtype is not None:
      moments = moments.astype(self.dtype)
    return {"moments": moments, "label": np.int32(label)}

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self._decode(self._source[index])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Batched reads (grain uses this when present): one call into ArrayRecord for many records."""
    return [self._decode(r) for r in self._source.__getitems__(list(indices))]

  def __repr__(self) -> str:
    m = self.manifest
    return (f"LatentDataSource({self.directory!r}, count={m['count']}, "
            f"latent_shape={tuple(m['latent_shape'])}, dtype={m['dtype']})")
