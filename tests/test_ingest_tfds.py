"""The TFDS ImageNet source of the ingest (only where the optional `.[tfds]` extra is installed).

TensorFlow is not part of the core install (nor of CI); these tests skip without it. They run
the real TFDS reading path under ``tfds.testing.mock_data`` (random JPEG-encoded examples, no
files, no network) and the error for a dataset that was never prepared.
"""
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from dimr_jax import vae  # noqa: E402
from dimr_jax.data import ingest, latents  # noqa: E402
from tests.conftest import write_rule_vae_weights  # noqa: E402

TINY = vae.VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)


def test_unprepared_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"not prepared under data_dir=.*tfds build imagenet2012"):
    ingest.TfdsSource(str(tmp_path), "train")


def test_tfds_ingest_end_to_end(tmp_path, fixtures_dir, monkeypatch):
  vae_path = write_rule_vae_weights(fixtures_dir, TINY, tmp_path / "tiny_vae.npz", 7)
  monkeypatch.setattr(ingest, "tfds_split_size", lambda builder, split, data_dir: 10)
  out = str(tmp_path / "latents")
  with tfds.testing.mock_data(num_examples=10):
    src = ingest.TfdsSource(None, "train")
    assert len(src.classes) == 1000 and src.num_images == 10
    items = list(src.items(0, 10))
    assert len(items) == 10 and all(isinstance(b, bytes) and b[:2] == b"\xff\xd8" for b, _ in items)
    # One shard: mock_data ignores split slices ("train[0:6]" still gives all 10 examples).
    r = ingest.ingest("", out, vae_path, resolution=32, batch_size=4, shard_size=10, source="tfds",
                      log=lambda s: None)
  m = latents.read_manifest(out)
  assert r["written"] == [0] and m["source"] == "tfds" and m["num_images"] == 10
  assert m["count"] == 20 and m["latent_shape"] == [16, 16, 8] and len(m["classes"]) == 1000
  got = latents.LatentDataSource(out).__getitems__(list(range(20)))
  labels = [int(g["label"]) for g in got]
  assert labels[::2] == labels[1::2] == [lab for _, lab in items]  # each image and its flip
  assert all(np.isfinite(g["moments"].astype(np.float32)).all() for g in got)
