"""ImageNet -> latent shards: record format, manifest errors, ingestion with an interrupted rerun."""
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from dimr_jax import vae
from tests.conftest import write_rule_vae_weights
from dimr_jax.data import ingest, latents

RES = 32
TINY = vae.VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)  # f=2: latents (16, 16, 8)
CLASSES = ["n01440764", "n01443537", "n01484850"]
PER_CLASS = (9, 7, 8)  # 24 images -> 3 shards of 10 images (the last holds 4)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory, fixtures_dir):
  return write_rule_vae_weights(fixtures_dir, TINY, tmp_path_factory.mktemp("vae") / "tiny_vae.npz", 7)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """A few dozen JPEGs of assorted sizes (some large enough for the BOX halving) in 3 classes."""
  root = tmp_path_factory.mktemp("imagenet") / "train"
  rng = np.random.default_rng(0)
  for cls, n in zip(CLASSES, PER_CLASS):
    (root / cls).mkdir(parents=True)
    for i in range(n):
      h, w = rng.integers(24, 90, size=2)
      yy, xx = np.mgrid[:h, :w]
      img = np.stack([(xx * 255 // w), (yy * 255 // h), rng.integers(0, 256, (h, w))], -1)
      Image.fromarray(img.astype(np.uint8)).save(root / cls / f"{cls}_{i:04d}.JPEG", quality=90)
  (root / CLASSES[0] / "notes.txt").write_text("not an image")
  return str(root)


def test_record_roundtrip_and_errors(tmp_path):
  rng = np.random.default_rng(0)
  for dtype in ("float16", "float32"):
    m = rng.standard_normal((4, 6, 8)).astype(dtype)
    manifest = {"dtype": dtype, "latent_shape": [4, 6, 8]}
    rec = latents.encode_record(m, 917)
    assert len(rec) == 8 + m.nbytes
    out, label = latents.decode_record(rec, manifest)
    assert label == 917 and out.dtype == m.dtype and np.array_equal(out, m)
  with pytest.raises(ValueError, match="bytes"):
    latents.decode_record(rec[:-1], manifest)
  with pytest.raises(ValueError, match="HWC"):
    latents.encode_record(np.zeros((8, 8), np.float32), 0)

  with pytest.raises(FileNotFoundError, match=r"manifest\.json not found.*dimr_jax\.data\.ingest"):
    latents.read_manifest(tmp_path)
  (tmp_path / "manifest.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"not valid JSON.*dimr_jax\.data\.ingest") as e:
    latents.read_manifest(tmp_path)
  assert "\n" not in str(e.value)
  (tmp_path / "manifest.json").write_text(json.dumps({"format": latents.FORMAT}))
  with pytest.raises(ValueError, match=r"malformed \(missing .*resolution"):
    latents.read_manifest(tmp_path)


def test_center_crop_arr():
  img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (75, 140, 3), np.uint8))
  out = ingest.center_crop_arr(img, 32)
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8
  # ADM reference steps: BOX to (70, 37), BICUBIC to short side 32 = (61, 32), crop x from 14.
  ref = img.resize((70, 37), Image.BOX).resize((61, 32), Image.BICUBIC)
  assert np.array_equal(out, np.asarray(ref)[:, 14:46])


def test_ingest_resume_and_readback(tmp_path, image_folder, tiny_vae):
  out = str(tmp_path / "latents")
  logs = []
  kw = dict(resolution=RES, batch_size=3, shard_size=10, log=logs.append)

  # "Interrupted" run: two of the three shards, no manifest yet.
  r = ingest.ingest(image_folder, out, tiny_vae, max_shards=2, **kw)
  assert r["written"] == [0, 1] and r["skipped"] == [] and r["manifest"] is None
  with pytest.raises(FileNotFoundError, match="ingest"):
    latents.read_manifest(out)
  assert any("ETA" in line for line in logs)
  names = [latents.shard_name(s, 3) for s in range(3)]
  stamp = os.stat(os.path.join(out, names[0])).st_mtime_ns

  # The rerun (through the CLI) only does the missing shard and writes the manifest.
  r = ingest.main([f"--imagenet_dir={image_folder}", f"--out={out}", f"--vae={tiny_vae}",
                   f"--resolution={RES}", "--batch_size=3", "--shard_size=10"])
  assert r["written"] == [2] and r["skipped"] == [0, 1]
  assert os.stat(os.path.join(out, names[0])).st_mtime_ns == stamp

  # A shard whose completion was not recorded is redone, the others are kept.
  os.remove(os.path.join(out, names[1] + ".done"))
  r = ingest.ingest(image_folder, out, tiny_vae, **kw)
  assert r["written"] == [1] and r["skipped"] == [0, 2] and r["manifest"] is not None
  assert not [f for f in os.listdir(out) if ".tmp-" in f]

  # Other settings into the same directory are refused rather than mixed.
  with pytest.raises(ValueError, match="other settings"):
    ingest.ingest(image_folder, out, tiny_vae, **{**kw, "shard_size": 5})

  m = latents.read_manifest(out)
  n = sum(PER_CLASS)
  assert m["count"] == 2 * n and m["num_images"] == n and m["num_shards"] == 3
  assert [s["file"] for s in m["shards"]] == names and [s["count"] for s in m["shards"]] == [20, 20, 8]
  assert m["classes"] == CLASSES and m["resolution"] == RES and m["dtype"] == "float16"
  assert m["latent_shape"] == [16, 16, 8] and m["layout"] == "HWC"
  assert m["vae_sha256"] == vae.source_sha256(tiny_vae)

  # Records decode back to the moments of each image and of its flip, with the folder labels.
  files, labels, classes = ingest.list_image_folder(image_folder)
  assert classes == CLASSES and len(files) == n
  model = vae.load_autoencoder(tiny_vae)
  x = np.stack([ingest.load_image(f, RES) for f in files]).astype(np.float32) / 127.5 - 1
  want = np.asarray(model.encode_moments(np.concatenate([x, x[:, :, ::-1]])))
  want = np.stack([want[:n], want[n:]], axis=1).reshape(2 * n, 16, 16, 8)
  source = latents.LatentDataSource(out)
  assert len(source) == 2 * n
  got = source.__getitems__(list(range(2 * n)))
  assert all(g["moments"].dtype == np.float16 and g["moments"].shape == (16, 16, 8) for g in got)
  assert [int(g["label"]) for g in got] == list(np.repeat(labels, 2))
  np.testing.assert_allclose(np.stack([g["moments"] for g in got]).astype(np.float32), want,
                             rtol=2e-3, atol=2e-3)
  assert np.array_equal(source[5]["moments"], got[5]["moments"])
  assert latents.LatentDataSource(out, dtype=np.float32)[0]["moments"].dtype == np.float32
  assert "tensorflow" not in sys.modules
