"""Training system: sharded equivalence, exact resume after SIGKILL, preemption, NaN, bad input."""
import functools
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dimr_jax import checkpoint as ckpt_lib
from dimr_jax import config_utils, sharding, train
from dimr_jax.data import pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "configs" / "dimr_mu_digits.py")


def _config(**overrides):
  base = {"model.variant": "mu/2R", "async_checkpointing": False, "sample_every": 0}
  base.update(overrides)
  return config_utils.load_config_file(DIGITS + ":test", base)


def _steps(config, mesh, n=3):
  tx = train.make_optimizer(config)
  gd = nnx.graphdef(train.abstract_model(config))
  abs_state = jax.eval_shape(functools.partial(train.init_state, config, tx), jax.random.key(0))
  sh = train.state_shardings(abs_state, mesh, config)
  state = jax.jit(functools.partial(train.init_state, config, tx), out_shardings=sh)(jax.random.key(0))
  step = train.build_train_step(config, gd, tx, mesh, sh, False)
  src, _ = pipeline.make_source(config)
  it = pipeline.make_iterator(src, config)
  for _ in range(n):
    batch = pipeline.to_global(next(it), sharding.batch_sharding(mesh))
    state, m = step(state, batch, jax.random.key(7))
  return state, m, sh


def test_sharded_step_matches_single_device():
  assert jax.device_count() == 8
  cfg = _config(fsdp_min_size_mb=0.001)
  mesh8 = sharding.make_mesh({"data": 2, "fsdp": 4})
  mesh1 = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  s8, m8, sh8 = _steps(cfg, mesh8)
  s1, m1, _ = _steps(cfg, mesh1)
  assert np.isfinite(float(m8["loss"]))
  for a, b in zip(jax.tree.leaves(s8), jax.tree.leaves(s1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  # Every large parameter is actually sharded over 'fsdp' (and so are its Adam moments and EMA).
  big = [(a, s) for a, s in zip(jax.tree.leaves(s8["params"]), jax.tree.leaves(sh8["params"]))
         if a.size * 4 >= 0.001 * 2**20]
  assert big
  for a, s in big:
    assert "fsdp" in tuple(a.sharding.spec), (a.shape, a.sharding.spec)
    assert a.addressable_shards[0].data.size * 4 == a.size or any(
        d % 4 == 0 for d in a.shape)
  n_sharded = sum("fsdp" in tuple(a.sharding.spec) for a in jax.tree.leaves(s8["opt"]) if hasattr(a, "sharding"))
  assert n_sharded >= len(big)


def test_fsdp_rule_replicates_small_and_keeps_layer_axis():
  from jax.sharding import PartitionSpec as P
  assert sharding.fsdp_spec((10,), 4, stacked=False, min_size_bytes=1e6) == P()
  assert sharding.fsdp_spec((19, 960, 2880), 4, stacked=True, min_size_bytes=0) == P(None, None, "fsdp")
  assert sharding.fsdp_spec((38400, 1920), 8, stacked=False, min_size_bytes=0) == P("fsdp", None)
  assert sharding.fsdp_spec((7, 7, 1, 481), 4, stacked=False, min_size_bytes=0) == P()  # fallback


def test_decay_mask_excludes_only_time_gates():
  cfg = _config()
  params = nnx.state(train.abstract_model(cfg), nnx.Param)
  mask = train.decay_mask(params)
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  off = [jax.tree_util.keystr(p) for p, v in flat if not v]
  assert off and all("nodecay_" in k for k in off)
  assert any("param0" in jax.tree_util.keystr(p) and v for p, v in flat)


def test_lr_warmup_from_zero():
  cfg = _config(**{"optim.warmup_steps": 10, "optim.lr": 1.0})
  lr = train.learning_rate_fn(cfg)
  assert float(lr(jnp.int32(0))) == 0.0
  assert float(lr(jnp.int32(5))) == pytest.approx(0.5)
  assert float(lr(jnp.int32(50))) == 1.0


def test_train_and_evaluate_end_to_end_and_restore_on_other_mesh(tmp_path):
  cfg = _config(**{"mesh.fsdp": 4, "fsdp_min_size_mb": 0.001, "total_steps": 4, "sample_every": 4,
                   "sample.steps": 3})
  state = train.train_and_evaluate(cfg, str(tmp_path))
  assert int(state["step"]) == 4
  assert (tmp_path / "config.json").exists() and (tmp_path / "metrics.jsonl").exists()
  assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
  assert (tmp_path / "samples" / "grid_00000004.png").exists()
  assert (tmp_path / "loss_curve.png").exists()
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert {"loss", "loss_4", "loss_8", "lr", "l2_grads", "img_per_s"} <= set(rows[0])
  # Continue on another mesh (8-way data parallel): restores and steps on.
  cfg2 = _config(**{"mesh.fsdp": 1, "total_steps": 6})
  state2 = train.train_and_evaluate(cfg2, str(tmp_path))
  assert int(state2["step"]) == 6
  # The EMA params restore alone onto one device (what the notebook does).
  abs_params = nnx.state(train.abstract_model(cfg), nnx.Param)
  ema = ckpt_lib.restore_ema_params(str(tmp_path), abs_params)
  leaf = jax.tree.leaves(ema)[0]
  assert len(leaf.devices()) == 1
  np.testing.assert_array_equal(np.asarray(leaf), np.asarray(jax.tree.leaves(state2["ema_params"])[0]))
  # ... or straight onto FSDP shardings over all 8 devices (a model larger than one device).
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  fsdp_sh = sharding.infer_param_shardings(abs_params, mesh, 0.001)
  ema_fsdp = ckpt_lib.restore_ema_params(str(tmp_path), abs_params, sharding=fsdp_sh)
  n_sharded = 0
  for a, b, sh in zip(jax.tree.leaves(ema_fsdp), jax.tree.leaves(ema), jax.tree.leaves(fsdp_sh)):
    assert a.sharding == sh
    n_sharded += "fsdp" in tuple(a.sharding.spec)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert n_sharded > 0


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  cfg = _config(**{"total_steps": 8, "ckpt_every": 2, "log_every": 4})
  real = pipeline.to_global
  calls = {"n": 0}

  def poisoned(batch, sh):
    calls["n"] += 1
    if calls["n"] == 3:
      batch = dict(batch, x=np.full_like(batch["x"], np.nan))
    return real(batch, sh)

  monkeypatch.setattr(pipeline, "to_global", poisoned)
  with pytest.raises(FloatingPointError, match="at step 3"):
    train.train_and_evaluate(cfg, str(tmp_path))
  assert ckpt_lib.latest_step(str(tmp_path)) == 2
  abs_params = nnx.state(train.abstract_model(cfg), nnx.Param)
  ema = ckpt_lib.restore_ema_params(str(tmp_path), abs_params)
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(ema))


def test_checkpoint_of_other_model_size_is_clear_error(tmp_path):
  train.train_and_evaluate(_config(**{"total_steps": 2}), str(tmp_path / "a"))
  other = _config(**{"total_steps": 4, "model.variant": "T/2R", "resume": str(tmp_path / "a")})
  with pytest.raises(ValueError, match="does not fit"):
    train.train_and_evaluate(other, str(tmp_path / "b"))
  abs_params = nnx.state(train.abstract_model(other), nnx.Param)
  with pytest.raises(ValueError, match="does not fit"):
    ckpt_lib.restore_ema_params(str(tmp_path / "a"), abs_params)


def test_missing_data_dir_is_one_line_error(tmp_path):
  cfg = _config(**{"input.dataset": "imagenet_latents", "input.data_dir": str(tmp_path / "nope"),
                   "model.channels": 4, "model.image_size": 32, "model.num_classes": 1001})
  with pytest.raises(FileNotFoundError) as e:
    train.train_and_evaluate(cfg, str(tmp_path / "w"))
  msg = str(e.value)
  assert "nope" in msg and "dimr_jax.data.ingest" in msg and "\n" not in msg


def test_bad_config_values():
  with pytest.raises(ValueError, match="loss_coeffs"):
    train.validate_config(_config(**{"diffusion.loss_coeffs": [1.0]}))
  with pytest.raises(ValueError, match="unknown DiMR variant"):
    train.validate_config(_config(**{"model.variant": "Q/2R"}))
  with pytest.raises(KeyError, match="unknown config key"):
    _config(**{"optim.learning_rate": 1.0})
  with pytest.raises(ValueError, match=r"model\.pallas_ops: unknown op\(s\) \['flash'\]"):
    train.validate_config(_config(**{"model.pallas_ops": "geglu,flash"}))


# ------------------------------------------------------------------------------------------------
# Process-level behaviour: the real entry point, killed and restarted.
# ------------------------------------------------------------------------------------------------
def _main_cmd(workdir, *extra):
  return [sys.executable, "-m", "dimr_jax.main", f"--config={DIGITS}:test", f"--workdir={workdir}",
          "--config.model.variant=mu/2R", "--config.sample_every=0", "--config.log_every=1",
          "--config.ckpt_every=1", *extra]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _committed_steps(workdir):
  """Step directories orbax has committed (in-flight saves live under temporary names)."""
  workdir = pathlib.Path(workdir)
  return [d for d in workdir.iterdir() if d.name.isdigit()] if workdir.exists() else []


def _run_until(cmd, step, sig, workdir=None):
  """Starts the entry point, waits until it logged ``step`` and has committed a checkpoint, then
  sends ``sig`` (without a committed checkpoint a restart would rightly begin from scratch)."""
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=_env(), cwd=REPO)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if f"step {step}/" in line:
      deadline = time.time() + 60
      while workdir is not None and not _committed_steps(workdir) and time.time() < deadline:
        time.sleep(0.05)
      proc.send_signal(sig)
      break
  out, _ = proc.communicate(timeout=300)
  return proc.returncode, "".join(lines) + (out or "")


def _final_state(workdir, cfg):
  tx = train.make_optimizer(cfg)
  abs_state = jax.eval_shape(functools.partial(train.init_state, cfg, tx), jax.random.key(0))
  mngr = ckpt_lib.make_manager(workdir, async_save=False, with_data=False)
  import orbax.checkpoint as ocp
  step = mngr.latest_step()
  st = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abs_state)))["state"]
  mngr.close()
  return step, st


def test_sigkill_resume_is_exact_and_sigterm_exits_cleanly(tmp_path):
  n = 12
  total = f"--config.total_steps={n}"
  ref = subprocess.run(_main_cmd(tmp_path / "ref", total), env=_env(), cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  assert ref.returncode == 0, ref.stdout + ref.stderr
  kill_at = random.Random(time.time()).randint(2, n // 2)
  rc, out = _run_until(_main_cmd(tmp_path / "run", total), kill_at, signal.SIGKILL, tmp_path / "run")
  assert rc == -signal.SIGKILL, out
  again = subprocess.run(_main_cmd(tmp_path / "run", total), env=_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stdout + again.stderr
  assert "resumed from" in again.stdout
  cfg = _config()
  s_ref, st_ref = _final_state(str(tmp_path / "ref"), cfg)
  s_run, st_run = _final_state(str(tmp_path / "run"), cfg)
  assert s_ref == s_run == n
  for a, b in zip(jax.tree.leaves(st_ref), jax.tree.leaves(st_run)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Same data order: the saved iterator positions agree too.
  for s in (n,):
    a = json.loads((tmp_path / "ref" / str(s) / "data" / "process_0-of-1.json").read_text())
    b = json.loads((tmp_path / "run" / str(s) / "data" / "process_0-of-1.json").read_text())
    assert a == b

  # SIGTERM (preemption): checkpoint at the current step, exit 0.
  rc, out = _run_until(_main_cmd(tmp_path / "pre", "--config.total_steps=1000",
                                 "--config.ckpt_every=1000"), 3, signal.SIGTERM)
  assert rc == 0, out
  assert ckpt_lib.latest_step(str(tmp_path / "pre")) >= 3


def test_config_typo_on_command_line_fails_loudly(tmp_path):
  r = subprocess.run([sys.executable, "-m", "dimr_jax.main", f"--config={DIGITS}",
                      f"--workdir={tmp_path}", "--config.optim.lrr=1e-3"],
                     env=_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
  assert r.returncode != 0
  assert "lrr" in (r.stderr + r.stdout)
