"""ImageNet -> SD-VAE latent shards (ArrayRecord), resumable, on all local devices.

  python -m dimr_jax.data.ingest --imagenet_dir=IMAGENET/train --out=OUT \\
      --vae=assets/stable-diffusion/autoencoder_kl.pth --resolution=256 [--dtype=fp16] \\
      [--batch_size=64] [--shard_size=1024] [--source=folder|tfds]

What it does (U-ViT ``scripts/extract_imagenet_feature.py``, which DiMR's features come from):

  * reads ImageNet train either as an ImageFolder (``train/<synset>/*.JPEG``; label = index of the
    synset in the sorted folder names, files sorted, like torchvision's ImageFolder) or from TFDS
    ``imagenet2012`` (``--source=tfds``, ``--imagenet_dir`` = TFDS data_dir; its labels are the same
    sorted synsets). TensorFlow is imported only on that path.
  * preprocesses with ADM's ``center_crop_arr`` (BOX-halve while the short side >= 2*res, BICUBIC
    resize to short side = res, center crop), then ``x / 127.5 - 1``;
  * encodes every image AND its horizontal flip with the VAE (``encode_moments``), the batch sharded
    over ``jax.local_devices()`` on a 1-D mesh (the last batch padded);
  * writes the moments (fp16 or fp32, HWC) and labels as ArrayRecord shards in the format of
    :mod:`dimr_jax.data.latents`, then ``manifest.json``.

Resuming: the image list is sorted and shard ``s`` always holds images ``[s*shard_size, (s+1)*shard_size)``.
Each shard is written to a temporary name, renamed when complete, then marked by a ``.done`` file;
a rerun skips marked shards and redoes the rest. ``ingest_plan.json`` pins the settings (resolution,
dtype, shard size, VAE hash, file list hash), so a rerun with different settings cannot mix shards
into the same directory. The manifest is written last, once every shard is marked.

Several hosts can share the work: ``--process_index=i --process_count=n`` takes the shards with
``s % n == i``; whichever process finds all shards marked at its end writes the manifest (or rerun
once with the defaults to finalise).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import functools
import glob
import hashlib
import io
import itertools
import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from dimr_jax import vae as vae_lib
from dimr_jax.data import latents

__all__ = ["center_crop_arr", "load_image", "list_image_folder", "ingest", "main"]

PLAN_NAME = "ingest_plan.json"
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_DTYPE_ALIASES = {"fp16": "float16", "float16": "float16", "fp32": "float32", "float32": "float32"}


# ------------------------------------------------------------------------------------------------
# Images.
# ------------------------------------------------------------------------------------------------


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
  """ADM's center crop (guided_diffusion/image_datasets.py), returning uint8 HWC."""
  # Repeated 2x BOX downsampling first: cheap anti-aliasing before the final BICUBIC resize.
  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size),
                               resample=Image.BICUBIC)
  arr = np.array(pil_image)
  crop_y = (arr.shape[0] - image_size) // 2
  crop_x = (arr.shape[1] - image_size) // 2
  return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


def load_image(item: str | bytes, resolution: int) -> np.ndarray:
  """A path or encoded image bytes -> center-cropped uint8 (res, res, 3), as U-ViT loads them."""
  with Image.open(io.BytesIO(item) if isinstance(item, bytes) else item) as img:
    img.load()
    img = img.convert("RGB")
    return center_crop_arr(img, resolution)


# ------------------------------------------------------------------------------------------------
# Sources: num_images, classes, fingerprint, items(start, end) -> (path or bytes, label).
# ------------------------------------------------------------------------------------------------


def list_image_folder(root: str) -> tuple[list[str], list[int], list[str]]:
  """Sorted (files, labels, classes) of an ImageFolder, in torchvision ImageFolder order."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"--imagenet_dir {root} is not a directory (expected train/<synset>/*.JPEG)")
  classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
  if not classes:
    raise ValueError(f"{root} has no class sub-folders (expected train/<synset>/*.JPEG)")
  files, labels = [], []
  for label, cls in enumerate(classes):
    for dirpath, dirnames, filenames in sorted(os.walk(os.path.join(root, cls), followlinks=True)):
      dirnames.sort()
      for name in sorted(filenames):
        if name.lower().endswith(IMG_EXTENSIONS):
          files.append(os.path.join(dirpath, name))
          labels.append(label)
  if not files:
    raise ValueError(f"{root}: no images found in {len(classes)} class folders")
  return files, labels, classes


class FolderSource:
  """ImageNet as an ImageFolder of JPEGs."""

  name = "folder"

  def __init__(self, root: str):
    self.root = root
    self.files, self.labels, self.classes = list_image_folder(root)
    self.num_images = len(self.files)
    rel = "\n".join(os.path.relpath(f, root) for f in self.files)
    self.fingerprint = hashlib.sha256(rel.encode()).hexdigest()

  def items(self, start: int, end: int) -> Iterator[tuple[str, int]]:
    return zip(self.files[start:end], self.labels[start:end])


def tfds_split_size(builder, split: str, data_dir: str | None) -> int:
  """Examples in a prepared TFDS split, or a one-line error saying how to prepare it."""
  try:
    return int(builder.info.splits[split].num_examples)
  except KeyError:
    raise FileNotFoundError(
        f"TFDS imagenet2012 split {split!r} is not prepared under data_dir={data_dir!r}: TFDS "
        "cannot download ImageNet; put the ILSVRC2012 tars in a folder and run `tfds build "
        f"imagenet2012 --data_dir={data_dir or '~/tensorflow_datasets'} --manual_dir=<that folder>` "
        "first (or use --source=folder on an ImageFolder tree)") from None


class TfdsSource:
  """TFDS ``imagenet2012`` (prepared beforehand); JPEG bytes are decoded with PIL like the folder path."""

  name = "tfds"

  def __init__(self, data_dir: str | None, split: str = "train"):
    import tensorflow as tf  # only on this path: TF stays out of the core install
    import tensorflow_datasets as tfds

    tf.config.set_visible_devices([], "GPU")  # the GPUs belong to JAX
    self._tfds, self.data_dir, self.split = tfds, data_dir, split
    builder = tfds.builder("imagenet2012", data_dir=data_dir)
    self.classes = list(builder.info.features["label"].names)
    self.num_images = tfds_split_size(builder, split, data_dir)
    self.fingerprint = f"tfds:imagenet2012:{builder.info.version}:{split}:{self.num_images}"

  def items(self, start: int, end: int) -> Iterator[tuple[bytes, int]]:
    tfds = self._tfds
    ds = tfds.load("imagenet2012", split=f"{self.split}[{start}:{end}]", data_dir=self.data_dir,
                   shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
    for ex in tfds.as_numpy(ds):
      yield bytes(ex["image"]), int(ex["label"])


# ------------------------------------------------------------------------------------------------
# Encoding on all local devices.
# ------------------------------------------------------------------------------------------------


def _encode_batch(graphdef, out_dtype, params, images_u8):
  """uint8 (B, H, W, 3) -> moments (2B, h, w, c): image i is row 2i, its horizontal flip 2i+1."""
  x = images_u8.astype(jnp.float32) / 127.5 - 1.0
  x = jnp.stack([x, x[:, :, ::-1]], axis=1)  # per-sample pairs keep the batch sharding local
  x = x.reshape((-1,) + x.shape[2:])
  return vae_lib.encode_moments_fn(graphdef, params, x).astype(out_dtype)


# Module level with static graphdef/dtype: repeated runs in one process reuse the compilation.
_encode_batch_jit = jax.jit(_encode_batch, static_argnums=(0, 1))


class _Encoder:
  """The VAE replicated over a 1-D mesh of the local devices, fed batch-sharded uint8 images."""

  def __init__(self, vae: vae_lib.FrozenAutoencoderKL, batch_size: int, out_dtype: str):
    devices = jax.local_devices()
    mesh = Mesh(np.array(devices), ("data",))
    self.num_devices = len(devices)
    self.batch_size = math.ceil(batch_size / self.num_devices) * self.num_devices
    self.data_sharding = NamedSharding(mesh, P("data"))
    self.params = jax.device_put(vae.params, NamedSharding(mesh, P()))
    self.graphdef, self.out_dtype = vae.graphdef, out_dtype

  def __call__(self, images_u8: np.ndarray) -> jax.Array:
    """Starts encoding (asynchronously); pads to the fixed batch so there is one compilation."""
    n = len(images_u8)
    if n < self.batch_size:
      pad = np.zeros((self.batch_size - n,) + images_u8.shape[1:], images_u8.dtype)
      images_u8 = np.concatenate([images_u8, pad])
    x = jax.device_put(images_u8, self.data_sharding)
    return _encode_batch_jit(self.graphdef, self.out_dtype, self.params, x)


# ------------------------------------------------------------------------------------------------
# Shards, markers, plan.
# ------------------------------------------------------------------------------------------------


def _write_json(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _shard_done(out: str, name: str, count: int) -> bool:
  marker = os.path.join(out, name + ".done")
  if not (os.path.exists(marker) and os.path.exists(os.path.join(out, name))):
    return False
  try:
    with open(marker) as f:
      return json.load(f).get("count") == count
  except (OSError, ValueError):
    return False


def _check_plan(out: str, plan: dict) -> None:
  path = os.path.join(out, PLAN_NAME)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    diff = {k: (old.get(k), v) for k, v in plan.items() if old.get(k) != v}
    if diff:
      raise ValueError(f"{out} holds shards from an ingest run with other settings "
                       f"(setting: (existing, requested)) {diff}; use another --out or delete it")
  else:
    _write_json(path, plan)


def _fmt_time(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class _Progress:
  """A log line every ``every`` seconds: shard, images, rate and ETA for this run's work."""

  def __init__(self, total: int, log: Callable[[str], None], every: float = 10.0):
    self.total, self.log, self.every = total, log, every
    self.done = 0
    self.t0 = self.last = time.time()

  def update(self, n: int, shard: int, num_shards: int, force: bool = False) -> None:
    self.done += n
    now = time.time()
    if force or now - self.last >= self.every:
      self.last = now
      rate = self.done / max(now - self.t0, 1e-9)
      eta = (self.total - self.done) / rate if rate > 0 else float("inf")
      pct = 100.0 * self.done / max(self.total, 1)
      self.log(f"[ingest] shard {shard + 1}/{num_shards} | {self.done}/{self.total} images "
               f"({pct:.1f}%) | {rate:.1f} img/s | elapsed {_fmt_time(now - self.t0)} | "
               f"ETA {_fmt_time(eta) if math.isfinite(eta) else '?'}")


def _batched(it: Iterable, n: int) -> Iterator[list]:
  it = iter(it)
  while batch := list(itertools.islice(it, n)):
    yield batch


def _write_shard(path: str, src, start: int, end: int, encoder: _Encoder, pool,
                 resolution: int, progress: _Progress, shard: int, num_shards: int) -> int:
  """Encodes images [start, end) into ``path``; decoding of batch k+1 overlaps the device on k."""
  from array_record.python.array_record_module import ArrayRecordWriter

  load = functools.partial(load_image, resolution=resolution)
  writer = ArrayRecordWriter(path, "group_size:1")
  count = 0

  def flush(pending):
    nonlocal count
    out, labels = pending
    moments = np.asarray(out)[: 2 * len(labels)]
    for i, label in enumerate(labels):
      writer.write(latents.encode_record(moments[2 * i], label))
      writer.write(latents.encode_record(moments[2 * i + 1], label))
    count += 2 * len(labels)
    progress.update(len(labels), shard, num_shards)

  batches = _batched(src.items(start, end), encoder.batch_size)
  submit = lambda b: ([pool.submit(load, item) for item, _ in b], [lab for _, lab in b])
  nxt = next(batches, None)
  futures = submit(nxt) if nxt else None
  pending = None
  try:
    while futures is not None:
      imgs, labels = futures
      images = np.stack([f.result() for f in imgs])
      nxt = next(batches, None)
      futures = submit(nxt) if nxt else None  # host work for the next batch starts now
      out = encoder(images)
      if pending is not None:
        flush(pending)
      pending = (out, labels)
    if pending is not None:
      flush(pending)
  finally:
    writer.close()
  return count


def ingest(imagenet_dir: str, out: str, vae: str | Any, *, resolution: int = 256,
           dtype: str = "fp16", batch_size: int = 64, shard_size: int = 1024, source: str = "folder",
           threads: int | None = None, process_index: int = 0, process_count: int = 1,
           max_shards: int | None = None, precision: str | None = None, split: str = "train",
           log: Callable[[str], None] | None = None) -> dict:
  """Runs (or resumes) ingestion; returns ``{'manifest': dict or None, 'written': [...], 'skipped': [...]}``.

  ``vae`` is a weight path (or a mapping, for tests). ``batch_size`` counts images before flips,
  over all local devices (rounded up to a multiple of the device count). ``max_shards`` stops after
  that many shards were written in this call (to split a long run, or to test resuming).
  """
  log = log or (lambda s: print(s, file=sys.stderr, flush=True))
  dtype = _DTYPE_ALIASES.get(dtype)
  if dtype is None:
    raise ValueError("--dtype must be fp16 or fp32")
  if resolution % 8:
    raise ValueError(f"--resolution {resolution} must be a multiple of 8")
  src = FolderSource(imagenet_dir) if source == "folder" else (
      TfdsSource(imagenet_dir, split) if source == "tfds" else None)
  if src is None:
    raise ValueError(f"--source must be folder or tfds, got {source!r}")
  os.makedirs(out, exist_ok=True)

  model = vae_lib.load_autoencoder(vae, precision=precision)
  f = model.config.downsample_factor
  if resolution % f:
    raise ValueError(f"--resolution {resolution} is not divisible by the VAE's factor {f}")
  latent_shape = [resolution // f, resolution // f, 2 * model.config.embed_dim]
  num_shards = math.ceil(src.num_images / shard_size)
  bounds = [(s * shard_size, min((s + 1) * shard_size, src.num_images)) for s in range(num_shards)]
  names = [latents.shard_name(s, num_shards) for s in range(num_shards)]
  _check_plan(out, dict(resolution=resolution, dtype=dtype, shard_size=shard_size,
                        num_images=src.num_images, source=src.name, inputs=src.fingerprint,
                        latent_shape=latent_shape, vae_sha256=model.sha256))

  mine = [s for s in range(num_shards) if s % process_count == process_index]
  skipped = [s for s in mine if _shard_done(out, names[s], 2 * (bounds[s][1] - bounds[s][0]))]
  todo = [s for s in mine if s not in skipped][:max_shards]
  for s in todo:  # leftovers of an interrupted write of one of our shards
    for tmp in glob.glob(os.path.join(glob.escape(out), names[s] + ".tmp-*")):
      os.remove(tmp)
  log(f"[ingest] {src.num_images} images, {len(src.classes)} classes -> {num_shards} shards in {out}; "
      f"{len(skipped)} already done, {len(todo)} to write now on {jax.local_device_count()} device(s)")

  written = []
  if todo:
    encoder = _Encoder(model, batch_size, dtype)
    progress = _Progress(sum(bounds[s][1] - bounds[s][0] for s in todo), log)
    with concurrent.futures.ThreadPoolExecutor(threads or os.cpu_count()) as pool:
      for s in todo:
        final = os.path.join(out, names[s])
        tmp = f"{final}.tmp-{os.getpid()}"
        count = _write_shard(tmp, src, *bounds[s], encoder, pool, resolution, progress, s, num_shards)
        expected = 2 * (bounds[s][1] - bounds[s][0])
        if count != expected:
          raise RuntimeError(f"shard {s}: wrote {count} records, expected {expected} (source changed?)")
        os.replace(tmp, final)
        _write_json(final + ".done", {"count": count, "images": list(bounds[s])})
        written.append(s)
        progress.update(0, s, num_shards, force=True)

  manifest = None
  counts = [2 * (e - b) for b, e in bounds]
  if all(_shard_done(out, names[s], counts[s]) for s in range(num_shards)):
    manifest = dict(
        format=latents.FORMAT, version=latents.VERSION, resolution=resolution,
        latent_shape=latent_shape, layout="HWC", dtype=dtype, count=sum(counts),
        num_images=src.num_images, flips=True, num_classes=len(src.classes),
        classes=list(src.classes), num_shards=num_shards, shard_size=shard_size,
        shards=[{"file": n, "count": c} for n, c in zip(names, counts)],
        vae_checkpoint=os.path.basename(vae) if isinstance(vae, (str, os.PathLike)) else "<mapping>",
        vae_sha256=model.sha256, scale_factor=vae_lib.SCALE_FACTOR, source=src.name,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    try:  # a rerun over a finished directory keeps the manifest (and its creation time)
      old = latents.read_manifest(out)
    except (OSError, ValueError):
      old = None
    if old is None or {**old, "created": None} != {**manifest, "created": None}:
      latents.write_manifest(out, manifest)
    log(f"[ingest] done: {manifest['count']} records in {num_shards} shards; wrote "
        f"{os.path.join(out, latents.MANIFEST_NAME)}")
  else:
    left = sum(not _shard_done(out, names[s], counts[s]) for s in range(num_shards))
    log(f"[ingest] {left} shard(s) still to do; rerun the same command to continue")
  return {"manifest": manifest, "written": written, "skipped": skipped}


def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(prog="python -m dimr_jax.data.ingest", description=__doc__.split("\n")[0])
  p.add_argument("--imagenet_dir", required=True,
                 help="ImageFolder root (train/<synset>/*.JPEG), or the TFDS data_dir with --source=tfds")
  p.add_argument("--out", required=True, help="output directory for shards and manifest.json")
  p.add_argument("--vae", required=True, help="VAE weights (.pth/.ckpt/.safetensors/.npz, LDM or diffusers)")
  p.add_argument("--resolution", type=int, default=256)
  p.add_argument("--dtype", default="fp16", choices=sorted(_DTYPE_ALIASES))
  p.add_argument("--batch_size", type=int, default=64, help="images per batch (before flips), all devices")
  p.add_argument("--shard_size", type=int, default=1024, help="images per shard (2x records)")
  p.add_argument("--source", default="folder", choices=("folder", "tfds"))
  p.add_argument("--split", default="train", help="TFDS split (with --source=tfds)")
  p.add_argument("--threads", type=int, default=None, help="image decoding threads (default: all CPUs)")
  p.add_argument("--process_index", type=int, default=0)
  p.add_argument("--process_count", type=int, default=1)
  p.add_argument("--max_shards", type=int, default=None, help="stop after writing this many shards")
  p.add_argument("--precision", default=None, choices=(None, "default", "high", "highest"),
                 help="conv/matmul precision (default: backend default)")
  a = p.parse_args(argv)
  return ingest(a.imagenet_dir, a.out, a.vae, resolution=a.resolution, dtype=a.dtype,
                batch_size=a.batch_size, shard_size=a.shard_size, source=a.source, threads=a.threads,
                process_index=a.process_index, process_count=a.process_count,
                max_shards=a.max_shards, precision=a.precision, split=a.split)


if __name__ == "__main__":
  main()
