"""Ingest -> train: JPEGs in an ImageFolder become latent shards that train a tiny latent DiMR.

The end-to-end check of the data issue: nothing here is mocked. A tiny random-weight SD-style VAE
(the fixture's weight rule, f=2) encodes a few dozen generated JPEGs at 16x16, so the latents are
8x8x4 (moments 8x8x8), the shape a mu/2R model trains on in seconds on CPU.
"""
import json
import math
import os
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from dimr_jax import checkpoint as ckpt_lib
from dimr_jax import config_utils, evaluate, train, vae
from tests.conftest import write_rule_vae_weights
from dimr_jax.data import ingest, latents, pipeline

DIGITS = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "dimr_mu_digits.py")

RES = 16                                                        # image side seen by the VAE
TINY = vae.VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)   # f=2: latents 8x8x4
CLASSES = ("n01440764", "n01443537", "n01484850")
PER_CLASS = 8                                                   # 24 JPEGs -> 48 records


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory, fixtures_dir):
  """Weights of the tiny VAE from the fixture's documented weight rule."""
  return write_rule_vae_weights(fixtures_dir, TINY, tmp_path_factory.mktemp("vae") / "tiny_vae.npz", 11)


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory, tiny_vae):
  """24 JPEGs (32x32 or 64x64, one colour scheme per class) in 3 folders, ingested at 16x16."""
  root = tmp_path_factory.mktemp("imagenet") / "train"
  rng = np.random.default_rng(0)
  for label, cls in enumerate(CLASSES):
    (root / cls).mkdir(parents=True)
    for i in range(PER_CLASS):
      size = (32, 64)[i % 2]
      yy, xx = np.mgrid[:size, :size] * (255 // (size - 1))
      img = np.stack([xx, yy, rng.integers(0, 256, (size, size))], -1)
      img = np.roll(img, label, axis=-1)  # classes differ in which channel carries the noise
      Image.fromarray(img.astype(np.uint8)).save(root / cls / f"{cls}_{i:04d}.JPEG", quality=90)
  out = str(tmp_path_factory.mktemp("latents"))
  r = ingest.ingest(str(root), out, tiny_vae, resolution=RES, batch_size=8, shard_size=10,
                    dtype="fp16", log=lambda s: None)
  assert r["manifest"] is not None
  return out


def _config(data_dir, **overrides):
  """The digits test config turned into a latent-space run on the ingested shards."""
  base = {
      "model.variant": "mu/2R", "async_checkpointing": False, "sample_every": 0,
      "input.dataset": "imagenet_latents", "input.data_dir": data_dir,
      "model.image_size": RES // TINY.downsample_factor, "model.channels": TINY.embed_dim,
      "model.num_classes": len(CLASSES) + 1, "diffusion.loss_coeffs": [0.25, 1.0],
      "input.batch_size": 16, "total_steps": 3, "log_every": 1, "ckpt_every": 3,
  }
  base.update(overrides)
  return config_utils.load_config_file(DIGITS + ":test", base)


def test_shards_describe_the_latent_dataset(latent_dir):
  """The manifest and the training source agree on what the model must look like."""
  m = latents.read_manifest(latent_dir)
  n = len(CLASSES) * PER_CLASS
  assert m["latent_shape"] == [8, 8, 8] and m["count"] == 2 * n
  assert m["num_shards"] == math.ceil(n / 10) and m["classes"] == list(CLASSES)
  source, info = pipeline.make_source(_config(latent_dir))
  assert len(source) == 2 * n
  assert (info.image_size, info.channels, info.num_classes) == (8, 4, 3)
  assert info.latent_moments and not info.pixel_space
  # A model of the wrong shape is refused with the setting to change.
  with pytest.raises(ValueError, match="model.image_size=8"):
    pipeline.make_source(_config(latent_dir, **{"model.image_size": 16}))
  with pytest.raises(ValueError, match="num_classes=4"):
    pipeline.make_source(_config(latent_dir, **{"model.num_classes": 11}))


def test_batches_hold_moments_and_labels(latent_dir):
  """The iterator yields the training batch layout: x = stored moments (float32), int labels."""
  cfg = _config(latent_dir)
  source, _ = pipeline.make_source(cfg)
  batch = next(pipeline.make_iterator(source, cfg))
  assert batch["x"].shape == (16, 8, 8, 8) and batch["x"].dtype == np.float32
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  assert set(batch["label"].tolist()) <= set(range(len(CLASSES)))
  assert np.isfinite(batch["x"]).all()


def test_shards_train_a_tiny_latent_model(latent_dir, tiny_vae, tmp_path):
  """A few steps of train_and_evaluate on the shards: finite losses, a checkpoint, samples."""
  assert jax.device_count() == 8  # the batch of 16 is split 2 per device
  cfg = _config(latent_dir)
  workdir = tmp_path / "run"
  state = train.train_and_evaluate(cfg, str(workdir))
  assert int(state["step"]) == 3
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 3 and all(np.isfinite(losses))
  assert ckpt_lib.latest_step(str(workdir)) == 3
  assert os.path.isdir(workdir / "3")
  # The checkpoint holds the latent model: its EMA params and config come back on their own.
  saved = ckpt_lib.restore_config(str(workdir))
  assert saved.input.dataset == "imagenet_latents" and saved.model.channels == 4
  ema = ckpt_lib.restore_ema_params(str(workdir), nnx.state(train.abstract_model(cfg), nnx.Param))
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(ema))

  # And back to pixels: the evaluation decodes the sampled latents with the same VAE.
  with pytest.raises(ValueError, match="latent-space model.*--vae"):
    evaluate.evaluate(None, str(workdir), num_samples=6)
  r = evaluate.evaluate(None, str(workdir), num_samples=6, steps=2, batch_size=8, vae=tiny_vae,
                        out_dir=str(tmp_path / "eval"))
  with np.load(r["npz"]) as z:
    assert z["arr_0"].shape == (6, RES, RES, 3) and z["arr_0"].dtype == np.uint8
    assert z["arr_1"].tolist() == [0, 0, 1, 1, 2, 2]
