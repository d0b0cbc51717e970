"""Throughput of the real DiMR train step and of one guided sampling step, on whatever is present.

    python benchmarks/bench.py --cases=XL/2R:train:64:none,XL/2R:sample:125 --peak_tflops=798 \
        --out=benchmarks/results/h100.json

A case is ``MODEL:train:BATCH:REMAT`` or ``MODEL:sample:BATCH``. Each case runs in its own
subprocess (clean peak-memory statistics, an OOM only loses that case). Train cases time the exact
jitted step ``train.py`` uses (AdamW, EMA, posterior sampling, multi-scale loss, donation);
sample cases time one DPM-Solver update with classifier-free guidance (cond + uncond in one 2B
forward). Inputs are random (never zeros). Timing: >= 3 warm-up steps, then the median of
``--steps`` individually synchronised steps. MFU = achieved model FLOP/s / peak, with train FLOPs
= 6 x forward MACs per image and sample FLOPs = 2 x 2 x forward MACs per image-step.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import timing  # benchmarks/timing.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"XL/2R": "configs/dimr_xl_256.py", "G/2R": "configs/dimr_g_256.py",
           "XL/3R": "configs/dimr_xl_512.py", "S/2R": "configs/dimr_s_256.py"}


def build(case: str, args):
  """Compiles one case; returns (run, record, flops_per_item): ``run()`` does one step."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  sys.path.insert(0, REPO)
  from dimr_jax import config_utils, sampling, sharding, train
  from dimr_jax.tools import summary

  parts = case.split(":")
  model_name, kind, batch = parts[0], parts[1], int(parts[2])
  remat = parts[3] if len(parts) > 3 else "none"
  overrides = {"input.batch_size": batch, "model.remat": remat, "model.dtype": args.dtype,
               "input.dataset": "synthetic", "model.attention_impl": args.attention_impl,
               "model.scan_unroll": args.scan_unroll, "model.pallas_ops": args.pallas_ops}
  config = config_utils.load_config_file(os.path.join(REPO, CONFIGS[model_name]), overrides)
  mesh = sharding.make_mesh(config.mesh)
  macs = summary.count_macs(config.model)["total"]
  dev = jax.devices()[0]
  rng = np.random.default_rng(0)
  res = {"model": model_name, "kind": kind, "batch": batch, "dtype": args.dtype, "remat": remat,
         "device": dev.device_kind, "num_devices": jax.device_count(), "jax": jax.__version__,
         "attention_impl": args.attention_impl or "auto", "scan_unroll": args.scan_unroll,
         "pallas_ops": args.pallas_ops}
  m = config.model
  t0 = time.perf_counter()
  if kind == "train":
    tx = train.make_optimizer(config)
    gd = nnx.graphdef(train.abstract_model(config))
    abs_state = jax.eval_shape(functools.partial(train.init_state, config, tx), jax.random.key(0))
    sh = train.state_shardings(abs_state, mesh, config)
    state = jax.jit(functools.partial(train.init_state, config, tx), out_shardings=sh)(jax.random.key(0))
    step = train.build_train_step(config, gd, tx, mesh, sh, latent_moments=True)
    mean = rng.standard_normal((batch, m.image_size, m.image_size, m.channels), np.float32)
    logvar = rng.uniform(-4.0, -1.0, mean.shape).astype(np.float32)
    data_sh = sharding.batch_sharding(mesh)
    b = {"x": jax.device_put(np.concatenate([mean, logvar], -1), data_sh),
         "label": jax.device_put(rng.integers(0, 1000, batch).astype(np.int32), data_sh)}
    key = jax.random.key(1)

    def run():
      nonlocal state
      state, met = step(state, b, key)
      return met["loss"]

    flops_per_item = 6.0 * macs
  else:
    model = nnx.eval_shape(lambda: train.make_model(config, nnx.Rngs(params=0)))
    gd, abs_params = nnx.split(model)
    params = jax.jit(lambda k: nnx.state(train.make_model(config, nnx.Rngs(params=k))))(jax.random.key(0))
    y = jnp.asarray(rng.integers(0, 1000, batch).astype(np.int32))
    x = jnp.asarray(rng.standard_normal((batch, m.image_size, m.image_size, m.channels), np.float32))

    @jax.jit
    def sample_step(params, x, t):
      net = nnx.merge(gd, params)
      eps_fn = sampling.guided_eps_fn(net, y, cfg_scale=0.4, null_class=m.num_classes - 1,
                                      shared_time=True)  # as sample_images calls it
      eps = eps_fn(x, jnp.full((batch,), t))
      return 0.98 * x - 0.05 * eps  # a first-order DPM-Solver++ update's arithmetic

    state_x = {"x": x}

    def run():
      state_x["x"] = sample_step(params, state_x["x"], 0.5)
      return state_x["x"]

    flops_per_item = 2.0 * 2.0 * macs  # two forward passes (cond + uncond) per image-step
  jax.block_until_ready(run())
  res["compile_s"] = round(time.perf_counter() - t0, 1)
  return run, res, flops_per_item


def _one(case: str, args) -> dict:
  import jax
  run, res, flops_per_item = build(case, args)
  batch = res["batch"]
  dev = jax.devices()[0]
  times = timing.step_times(run, steps=args.steps, warmup=2)
  med = statistics.median(times)
  stats = dev.memory_stats() or {}
  peak_tflops = args.peak_tflops
  res.update(step_time_s=med, img_per_s=batch / med,
             peak_mem_gib=stats.get("peak_bytes_in_use", float("nan")) / 2**30,
             mfu=(batch / med * flops_per_item / (peak_tflops * 1e12)) if peak_tflops else None,
             peak_tflops=peak_tflops, timed_steps=len(times),
             step_time_min_s=min(times), step_time_max_s=max(times))
  return res


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--cases", default="XL/2R:train:64:none,XL/2R:train:128:none,XL/2R:train:256:dots,"
                 "G/2R:train:64:none,XL/2R:sample:125,G/2R:sample:125")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--attention_impl", default="")
  p.add_argument("--scan_unroll", type=int, default=0)
  p.add_argument("--pallas_ops", default="auto", help="model.pallas_ops: 'auto', '' or e.g. 'dwconv'")
  p.add_argument("--peak_tflops", type=float, default=0.0,
                 help="peak bf16 TFLOP/s for MFU (the H100 here measured 798 on a dense bf16 GEMM)")
  p.add_argument("--out", default="")
  p.add_argument("--timeout", type=int, default=400)
  p.add_argument("--one", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.one:
    print("RESULT " + json.dumps(_one(args.one, args)), flush=True)
    return 0
  records = []
  for case in [c for c in args.cases.split(",") if c]:
    cmd = [sys.executable, os.path.abspath(__file__), f"--one={case}", f"--steps={args.steps}",
           f"--dtype={args.dtype}", f"--peak_tflops={args.peak_tflops}",
           f"--attention_impl={args.attention_impl}", f"--scan_unroll={args.scan_unroll}",
           f"--pallas_ops={args.pallas_ops}"]
    t = time.perf_counter()
    try:
      # JAX preallocates 75% of GPU memory by default; benchmarks may use nearly all of it.
      env = dict(os.environ)
      env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
      r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
      lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
      if lines:
        rec = json.loads(lines[-1][len("RESULT "):])
      else:
        err = (r.stderr or r.stdout).strip().splitlines()
        oom = any("RESOURCE_EXHAUSTED" in l or "out of memory" in l.lower() for l in err)
        named = [l for l in err if "Error" in l and not l.startswith("jax._src")]
        msg = named[-1] if named else (err[-1] if err else f"rc={r.returncode}")
        rec = {"case": case, "error": "OOM" if oom else msg}
    except subprocess.TimeoutExpired:
      rec = {"case": case, "error": f"timeout after {args.timeout}s"}
    rec["wall_s"] = round(time.perf_counter() - t, 1)
    rec["date"] = datetime.date.today().isoformat()
    records.append(rec)
    print(_row(rec), flush=True)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(records, f, indent=1)
  print("\n" + table(records))
  return 0


def _row(r: dict) -> str:
  if "error" in r:
    return f"{r['case']}: {r['error']}"
  mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
  return (f"{r['model']:6s} {r['kind']:6s} b={r['batch']:<4d} remat={r['remat']:5s} {r['dtype']}: "
          f"{r['img_per_s']:8.1f} img/s  step {1e3 * r['step_time_s']:7.1f} ms  "
          f"peak {r['peak_mem_gib']:6.1f} GiB  MFU {mfu}  (compile {r['compile_s']}s) [{r['device']}]")


def table(records) -> str:
  head = "| model | kind | batch | remat | dtype | img/s | step ms | peak GiB | MFU | device |\n" \
         "|---|---|---|---|---|---|---|---|---|---|"
  rows = []
  for r in records:
    if "error" in r:
      rows.append(f"| {r['case']} | | | | | {r['error']} | | | | |")
      continue
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
    rows.append(f"| {r['model']} | {r['kind']} | {r['batch']} | {r['remat']} | {r['dtype']} | "
                f"{r['img_per_s']:.1f} | {1e3 * r['step_time_s']:.1f} | {r['peak_mem_gib']:.1f} | {mfu} | "
                f"{r['device']} |")
  return "\n".join([head] + rows)


if __name__ == "__main__":
  sys.exit(main())
