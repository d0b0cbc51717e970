"""DiMR training: ``train_and_evaluate(config, workdir)``.

The flow, top to bottom:
  1. mesh from ``config.mesh``; model built *abstractly* (``nnx.eval_shape``), shardings inferred
     from parameter shapes (FSDP), then one jitted init writes params / AdamW state / EMA straight
     into their shards (a G model is never materialised on one device);
  2. restore: the workdir's latest step -> ``config.resume`` -> ``config.init_from`` -> scratch;
  3. the train step: one pure function (loss, grads, AdamW, EMA), jitted once with explicit
     in/out shardings and the state donated;
  4. the loop: logging (TensorBoard + JSONL + console), checkpoints (orbax, async), sample grids,
     NaN checks, SIGTERM handling; at the end a loss curve.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from dimr_jax import checkpoint as ckpt_lib
from dimr_jax import diffusion, metrics, sharding
from dimr_jax.data import pipeline
from dimr_jax.models import dimr as dimr_model
from dimr_jax.models import layers
from dimr_jax.tools import summary

State = dict  # {'step', 'params', 'opt', 'ema_params'}


# ------------------------------------------------------------------------------------------------
# Model, optimizer, state.
# ------------------------------------------------------------------------------------------------
def compute_dtype(config) -> Any:
  """'auto': bfloat16 on GPU/TPU, float32 on CPU (where bf16 is slow and tests want exactness)."""
  name = config.model.dtype
  if name == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"model.dtype must be 'auto', 'float32' or 'bfloat16', got {name!r}")
  return jnp.dtype(name)


def make_model(config, rngs: nnx.Rngs) -> dimr_model.DiMR:
  return dimr_model.DiMR(
      dimr_model.model_spec_from_config(config.model), dtype=compute_dtype(config),
      remat=config.model.remat, attention_impl=config.model.attention_impl or None,
      scan_unroll=config.model.get("scan_unroll", 0) or None,
      pallas_ops=config.model.get("pallas_ops", "auto"), rngs=rngs)


def abstract_model(config) -> dimr_model.DiMR:
  return nnx.eval_shape(lambda: make_model(config, nnx.Rngs(params=0)))


def decay_mask(params: Any) -> Any:
  """AdamW decays everything except the TDP time gates (names ``nodecay_weight``/``nodecay_bias``)."""

  def keep(path, _):
    names = [getattr(k, "key", None) for k in path]
    return not any(n in ("nodecay_weight", "nodecay_bias") for n in names)

  return jax.tree_util.tree_map_with_path(keep, params)


def learning_rate_fn(config):
  """Official LambdaLR: lr * min(step / warmup, 1), from 0, no decay afterwards."""
  o = config.optim

  def lr(count):
    if o.warmup_steps <= 0:
      return jnp.asarray(o.lr, jnp.float32)
    return o.lr * jnp.minimum(count.astype(jnp.float32) / o.warmup_steps, 1.0)

  return lr


def make_optimizer(config) -> optax.GradientTransformation:
  o = config.optim
  parts = []
  if o.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip))
  parts.append(optax.adamw(learning_rate_fn(config), b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


def init_state(config, tx, key) -> State:
  model = make_model(config, nnx.Rngs(params=key))
  params = nnx.state(model, nnx.Param)
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt": tx.init(params),
          "ema_params": jax.tree.map(jnp.copy, params)}


def state_shardings(abstract_state: State, mesh, config) -> State:
  sh = sharding.infer_param_shardings(abstract_state, mesh, config.fsdp_min_size_mb)
  sh["step"] = sharding.replicated(mesh)
  return sh


# ------------------------------------------------------------------------------------------------
# The train step.
# ------------------------------------------------------------------------------------------------
def _l2(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def train_step(state: State, batch: dict, rng: jax.Array, *, graphdef, tx, config,
               latent_moments: bool) -> tuple[State, dict]:
  """One optimisation step. Pure: everything it needs is an argument or bound by partial."""
  # Fold the step in, so a resumed run draws exactly the noise the uninterrupted run would have.
  rng = jax.random.fold_in(rng, state["step"])
  k_post, k_loss = jax.random.split(rng)
  x = batch["x"]
  if latent_moments:
    # A fresh posterior sample every step from the stored moments (official train.py:193).
    mean, logvar = jnp.split(x, 2, axis=-1)
    std = jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))
    x = config.input.scale_factor * (mean + std * jax.random.normal(k_post, mean.shape))

  def loss_fn(params):
    model = nnx.merge(graphdef, params)
    return diffusion.diffusion_loss(
        model, x, batch["label"], k_loss, coeffs=list(config.diffusion.loss_coeffs),
        p_uncond=config.diffusion.p_uncond, null_class=config.model.num_classes - 1)

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  with jax.named_scope("optimizer"):
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    d = config.optim.ema_decay
    ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state["ema_params"], params)
    out = {"loss": loss, "l2_grads": _l2(grads), "lr": learning_rate_fn(config)(state["step"])}
    if config.get("log_param_norms", False):
      # Two more full passes over the parameters (~4% of an XL/2R step on an H100): opt-in.
      out.update(l2_params=_l2(params), l2_updates=_l2(updates))
  out.update({k: v for k, v in aux.items() if k.startswith("loss_")})
  return {"step": state["step"] + 1, "params": params, "opt": opt, "ema_params": ema}, out


def build_train_step(config, graphdef, tx, mesh, st_shardings, latent_moments: bool):
  """jit once with explicit shardings; the state is donated (updated in place on device)."""
  fn = functools.partial(train_step, graphdef=graphdef, tx=tx, config=config,
                         latent_moments=latent_moments)
  data_sh = sharding.batch_sharding(mesh)
  repl = sharding.replicated(mesh)
  return jax.jit(fn, in_shardings=(st_shardings, {"x": data_sh, "label": data_sh}, repl),
                 out_shardings=(st_shardings, repl), donate_argnums=0)


# ------------------------------------------------------------------------------------------------
# The loop.
# ------------------------------------------------------------------------------------------------
class _Preemption:
  """SIGTERM sets a flag; the loop saves at the current step and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._old = None
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint at the current step, then exiting")
    self.requested = True

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def validate_config(config) -> None:
  """Checks values early, with messages that name the key and the fix."""
  m, i, o = config.model, config.input, config.optim
  spec = dimr_model.model_spec_from_config(m)  # variant / norm errors
  if len(config.diffusion.loss_coeffs) != len(spec["stage_configs"]):
    raise ValueError(f"diffusion.loss_coeffs has {len(config.diffusion.loss_coeffs)} entries but "
                     f"{m.variant} has {len(spec['stage_configs'])} resolutions")
  if i.batch_size <= 0:
    raise ValueError(f"input.batch_size must be positive, got {i.batch_size}")
  if not 0.0 <= config.diffusion.p_uncond < 1.0:
    raise ValueError(f"diffusion.p_uncond must be in [0, 1), got {config.diffusion.p_uncond}")
  if o.lr <= 0 or not 0 <= o.ema_decay < 1:
    raise ValueError(f"optim.lr must be > 0 and optim.ema_decay in [0, 1) (got {o.lr}, {o.ema_decay})")
  if m.remat not in dimr_model.REMAT_POLICIES:
    raise ValueError(f"model.remat must be one of {dimr_model.REMAT_POLICIES}, got {m.remat!r}")
  try:
    layers.resolve_pallas_ops(m.get("pallas_ops", "auto"), compute_dtype(config))
  except ValueError as e:
    raise ValueError(f"model.{e}") from None


def _restore_or_init(config, workdir, mngr, tx, mesh, st_sh, abs_state, data_iter):
  """Returns (state, start_step, source) following the documented resume order."""
  init = jax.jit(functools.partial(init_state, config, tx), out_shardings=st_sh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, st_sh)

  def restore_full(m, step, where):
    _check_checkpoint_fits(m, step, abs_state, where)
    args = {"state": ocp.args.StandardRestore(target)}
    if data_iter is not None and "data" in m.item_metadata(step):
      import grain
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = m.restore(step, args=ocp.args.Composite(**args))
    return restored["state"]

  step = mngr.latest_step()
  if step is not None:
    return restore_full(mngr, step, workdir), step, f"resumed from {workdir} step {step}"
  if config.resume:
    other = ckpt_lib.make_manager(config.resume, async_save=False)
    step = other.latest_step()
    if step is None:
      raise FileNotFoundError(f"config.resume={config.resume!r} holds no checkpoint")
    state = restore_full(other, step, config.resume)
    other.close()
    return state, step, f"resumed from {config.resume} step {step}"
  state = init(jax.random.key(config.seed))
  if config.init_from:
    abs_params = abs_state["params"]
    # Straight onto the training shardings: no single-device copy (which a multi-process run
    # could not re-shard, and a model larger than one device could not hold).
    params = ckpt_lib.restore_ema_params(config.init_from, abs_params, sharding=st_sh["params"])
    state["params"] = params
    state["ema_params"] = jax.tree.map(jnp.copy, params)
    return state, 0, f"initialised params from {config.init_from}"
  return state, 0, "initialised from scratch"


def _path_key(path) -> str:
  """Normalised tree path: dict keys / attributes / indices, without NNX's trailing ``.value``."""
  parts = []
  for k in path:
    name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
    parts.append(str(name))
  if parts and parts[-1] == "value":  # nnx.Variable leaves ('.value' attribute or 'value' key)
    parts.pop()
  return "/".join(parts)


def _check_checkpoint_fits(mngr, step, abs_state, where):
  """A checkpoint of another model size fails here with names and shapes, before any restore."""
  meta = mngr.item_metadata(step)["state"]
  if meta is None:
    return
  want = {_path_key(p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(abs_state)[0]}
  got = {_path_key(p): tuple(getattr(a, "shape", ()) or ())
         for p, a in jax.tree_util.tree_flatten_with_path(meta)[0]}
  if not got:
    return
  missing = [k for k in want if k not in got]
  bad = [(k, want[k], got[k]) for k in want if k in got and got[k] != want[k]]
  extra = sorted(set(got) - set(want))
  if missing or bad or extra:
    lines = [f"checkpoint {where} step {step} does not fit this model/config (another model size?):"]
    lines += [f"  {k}: expected {w}, found {g}" for k, w, g in bad[:10]]
    if missing:
      lines.append(f"  missing in checkpoint ({len(missing)}): {missing[:5]}")
    if extra:
      lines.append(f"  unexpected in checkpoint ({len(extra)}): {extra[:5]}")
    raise ValueError("\n".join(lines))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> State | None:
  """Trains per ``config``, writing checkpoints, logs and samples to ``workdir``; returns the state."""
  validate_config(config)
  workdir = os.fspath(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  mesh = sharding.make_mesh(config.mesh)
  source, info = pipeline.make_source(config)
  tx = make_optimizer(config)
  abs_model = abstract_model(config)
  graphdef = nnx.graphdef(abs_model)
  abs_state = jax.eval_shape(functools.partial(init_state, config, tx), jax.random.key(0))
  st_sh = state_shardings(abs_state, mesh, config)
  step_fn = build_train_step(config, graphdef, tx, mesh, st_sh, info.latent_moments)
  n_params = dimr_model.count_params(abs_model)
  macs = summary.count_macs(config.model)["total"]
  logging.info("model %s: %d params, %.2f GMACs/img; mesh %s", config.model.variant, n_params,
               macs / 1e9, dict(mesh.shape))

  in_ch = info.channels * (2 if info.latent_moments else 1)
  if config.compile_only:
    return _compile_only(config, step_fn, abs_state, st_sh, mesh, in_ch)

  data_iter = pipeline.make_iterator(source, config)
  mngr = ckpt_lib.make_manager(workdir, keep_last=config.keep_last, keep_every=config.keep_every,
                               async_save=config.async_checkpointing)
  state, start, how = _restore_or_init(config, workdir, mngr, tx, mesh, st_sh, abs_state, data_iter)
  logging.info("%s", how)
  if is_main:
    print(f"[dimr_jax] {how}; training steps {start}..{config.total_steps}", flush=True)

  writer = metrics.MetricWriter(workdir)
  rng = jax.random.key(config.seed + 1)
  data_sh = sharding.batch_sharding(mesh)
  progress = metrics.Progress(config.total_steps, start, config.input.batch_size)
  peak = metrics.peak_flops_per_device(config.get("peak_tflops", 0.0))
  train_flops_per_img = 6.0 * macs
  preempt = _Preemption()
  pending = []  # (step, device metrics) since the last host sync
  sampler = _Sampler(config, abs_model, info, mesh) if config.sample_every > 0 else None
  from dimr_jax import evaluate as eval_lib  # noqa: PLC0415 (optional heavy deps load lazily)
  fid_fn = eval_lib.fid_eval_fn(config)  # None unless evals.fid_every, Inception and ref stats are set

  def save(step):
    args = {"state": ocp.args.StandardSave(state),
            "ema_params": ocp.args.StandardSave(state["ema_params"]),
            "config": ocp.args.JsonSave(ckpt_lib.config_to_json_dict(config))}
    import grain
    args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    mngr.save(step, args=ocp.args.Composite(**args), force=True)

  def check_finite():
    """Fetches buffered metrics; raises naming the first step whose loss is not finite."""
    fetched = jax.device_get(pending)
    pending.clear()
    for s, m in fetched:
      if not np.isfinite(m["loss"]):
        mngr.wait_until_finished()
        raise FloatingPointError(
            f"loss is {m['loss']} at step {s}; stopping. The last good checkpoint "
            f"(step {mngr.latest_step()}) in {workdir} is intact. Lower optim.lr, set "
            "optim.grad_clip, or check the input data.")
    return fetched

  step = start
  try:
    with sharding.mesh_context(mesh):
      for step in range(start + 1, config.total_steps + 1):
        batch = pipeline.to_global(next(data_iter), data_sh)
        state, m = step_fn(state, batch, rng)
        pending.append((step, m))
        if itstime_log := metrics.itstime(step, config.log_every, config.total_steps, first=True):
          fetched = check_finite()
          last = dict(fetched[-1][1])
          rates = progress.rates(step)
          last.update(rates)
          if peak:
            last["mfu"] = rates["img_per_s"] * train_flops_per_img / (peak * jax.device_count())
          writer.write_scalars(step, last)
          if is_main:
            print("[dimr_jax] " + progress.line(step, last["loss"], rates), flush=True)
        del itstime_log
        if preempt.requested or metrics.itstime(step, config.ckpt_every, config.total_steps):
          check_finite()
          save(step)
        if preempt.requested:
          logging.warning("preempted: checkpoint for step %d saved, exiting", step)
          break
        if sampler is not None and metrics.itstime(step, config.sample_every, config.total_steps):
          sampler.grid(state["ema_params"], step, workdir, writer)
        if fid_fn is not None and metrics.itstime(step, config.evals.fid_every, config.total_steps):
          # Official monitoring: FID on the EMA params (every process takes part in sampling).
          scores = fid_fn(abs_model, state["ema_params"], step)
          if scores:
            writer.write_scalars(step, scores)
            if is_main:
              print(f"[dimr_jax] step {step}: FID-{config.evals.fid_num_samples} "
                    f"{scores['fid']:.3f}", flush=True)
    mngr.wait_until_finished()
    check_finite()
    if sampler is not None and not preempt.requested and info.pixel_space and is_main:
      acc = sampler.class_accuracy(state["ema_params"], source)
      if acc is not None:
        writer.write_scalars(step, {"sample_class_accuracy": acc})
        print(f"[dimr_jax] classifier accuracy on class-conditional samples: {acc:.3f}", flush=True)
  finally:
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
    preempt.restore()
  if is_main:
    metrics.plot_loss_curve(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "loss_curve.png"))
  return state


def _compile_only(config, step_fn, abs_state, st_sh, mesh, in_ch):
  """Lowers and compiles the step for this mesh and prints XLA's memory analysis."""
  m = config.model
  data_sh = sharding.batch_sharding(mesh)
  b = config.input.batch_size
  batch = {"x": jax.ShapeDtypeStruct((b, m.image_size, m.image_size, in_ch), jnp.float32, sharding=data_sh),
           "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=data_sh)}
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, st_sh)
  t0 = time.perf_counter()
  with sharding.mesh_context(mesh):  # traced as the train loop traces it
    compiled = step_fn.lower(state, batch, jax.random.key(0)).compile()
  mem = compiled.memory_analysis()
  gib = 2.0 ** 30
  print(f"[dimr_jax] compiled train step for mesh {dict(mesh.shape)}, global batch {b}, "
        f"in {time.perf_counter() - t0:.1f}s on {jax.devices()[0].device_kind}")
  if mem is not None:
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes")
    for f in fields:
      v = getattr(mem, f, None)
      if v is not None:
        print(f"  {f}: {v / gib:.3f} GiB per device")
    total = (getattr(mem, "argument_size_in_bytes", 0) + getattr(mem, "output_size_in_bytes", 0)
             + getattr(mem, "temp_size_in_bytes", 0) - getattr(mem, "alias_size_in_bytes", 0))
    print(f"  peak estimate: {total / gib:.3f} GiB per device")
  return None


class _Sampler:
  """Sample grids from the EMA params (DPM-Solver + CFG) and, for digits/MNIST, a class check."""

  def __init__(self, config, abs_model, info, mesh):
    self.config, self.model, self.info, self.mesh = config, abs_model, info, mesh
    self._classifier = None
    self._vae = None

  def _sampler_config(self, steps=None):
    s = self.config.sample
    return dict(name=s.name, steps=steps or s.steps, order=s.order, method=s.method,
                skip_type=s.skip_type, cfg_scale=s.cfg_scale,
                cfg_scale_pow=s.cfg_scale_pow if s.cfg_scale_pow > 0 else None,
                cfg_interval=tuple(s.cfg_interval),
                latent_shape=(self.info.image_size, self.info.image_size, self.info.channels),
                null_class=self.config.model.num_classes - 1)

  def sample(self, params, labels, seed=0, steps=None):
    from dimr_jax import sampling

    params = jax.device_put(params, sharding.replicated(self.mesh))
    labels = np.asarray(labels, np.int32)
    return np.asarray(sampling.sample_images(self.model, params, labels, jax.random.key(seed),
                                             self._sampler_config(steps)))

  def _to_images(self, x):
    if not self.info.pixel_space:
      if not self.config.evals.vae_weights:
        return None
      if self._vae is None:
        from dimr_jax import vae
        self._vae = vae.load_autoencoder(self.config.evals.vae_weights)
      x = np.asarray(self._vae.decode(x))
    return np.clip((x + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)

  def grid(self, params, step, workdir, writer):
    s = self.config.sample
    classes = [c % self.info.num_classes for c in s.grid_classes]
    labels = np.repeat(np.asarray(classes), s.grid_per_class)
    imgs = self._to_images(self.sample(params, labels, seed=step))
    if imgs is None:
      logging.info("no evals.vae_weights: skipping the sample grid of a latent-space model")
      return None
    grid = make_grid(imgs, nrow=s.grid_per_class, upscale=max(1, 64 // imgs.shape[1]))
    if jax.process_index() == 0:
      from PIL import Image
      os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
      path = os.path.join(workdir, "samples", f"grid_{step:08d}.png")
      Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(path)
      writer.write_image(step, "samples", grid if grid.shape[-1] == 3 else np.repeat(grid, 3, -1))
      return path

  def class_accuracy(self, params, source, per_class=20):
    """Accuracy of a classifier trained on the real data, on class-conditional samples."""
    from sklearn.linear_model import LogisticRegression

    x, y = source.x.reshape(len(source.x), -1), source.y
    clf = LogisticRegression(max_iter=2000).fit(x, y)
    labels = np.repeat(np.arange(self.info.num_classes), per_class)
    samples = np.clip(self.sample(params, labels, seed=12345), -1.0, 1.0)
    return float((clf.predict(samples.reshape(len(labels), -1)) == labels).mean())


def make_grid(imgs: np.ndarray, nrow: int, upscale: int = 1, pad: int = 1) -> np.ndarray:
  """(N,H,W,C) uint8 -> one (rows*(H+pad), nrow*(W+pad), C) image (row r = one class)."""
  if upscale > 1:
    imgs = imgs.repeat(upscale, 1).repeat(upscale, 2)
  n, h, w, c = imgs.shape
  rows = -(-n // nrow)
  out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, col = divmod(i, nrow)
    out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = imgs[i]
  return out
