"""Throughput of the real DiMR train step and of one guided sampling step, on whatever is present.

    python benchmarks/bench.py --cases=XL/2R:train:64:none,XL/2R:sample:125 --peak_tflops=798 \
        --out=benchmarks/results/h100.json

A case is ``MODEL:train:BATCH:REMAT[:UNROLL][@NDEV[:MODE]]`` or ``MODEL:sample:BATCH``. BATCH is
per device; UNROLL overrides ``--scan_unroll`` for the case (1: rolled block loops, which compile
much faster with remat); ``@NDEV:dp`` trains data-parallel on the first NDEV devices,
``@NDEV:fsdp`` shards the parameters, optimizer moments and EMA over them (the ``mesh.fsdp`` axis
of training). Each case runs in its own subprocess (clean peak-memory statistics, an OOM only
loses that case).

``--parallel_compile`` compiles all cases at once, each in a process that then exits, into a
private persistent compilation cache; the cases are then timed one after another from the cache,
so no two cases ever share the accelerators or their memory while timed. But XLA autotunes GPU
kernels by timing them while it compiles, and compiles side by side disturb those timings: an
XL/2R b128 train step compiled next to a sampling case ran at 226.5 img/s, compiled alone at
372.8 (benchmarks/NOTES.md row 27). Use it to probe what fits; quote times from sequential runs
(the default).

Train cases time the exact jitted step ``train.py`` uses (AdamW, EMA, posterior sampling,
multi-scale loss, donation); sample cases time one DPM-Solver update with classifier-free guidance
(cond + uncond in one 2B forward). Inputs are random (never zeros). Timing: >= 3 warm-up steps,
then the median of ``--steps`` individually synchronised steps. MFU = achieved model FLOP/s / peak
(of all devices of the case), with train FLOPs = 6 x forward MACs per image and sample FLOPs
= 2 x 2 x forward MACs per image-step.
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
           "XL/3R": "configs/dimr_xl_512.py", "S/2R": "configs/dimr_s_256.py",
           "mu": "configs/dimr_mu_digits.py"}
MODES = ("dp", "fsdp")


def parse_case(case: str) -> dict:
  """``MODEL:KIND:BATCH[:REMAT[:UNROLL]][@NDEV[:MODE]]`` -> its fields; BATCH is per device."""
  spec, _, where = case.partition("@")
  parts = spec.split(":")
  if not 3 <= len(parts) <= 5 or parts[0] not in CONFIGS or parts[1] not in ("train", "sample"):
    raise ValueError(f"bad case {case!r}: want MODEL:train:BATCH:REMAT[:UNROLL][@NDEV[:MODE]] or "
                     f"MODEL:sample:BATCH with MODEL in {sorted(CONFIGS)}")
  wparts = where.split(":") if where else []
  ints = [parts[2]] + parts[4:5] + wparts[:1]
  if not all(v.isdigit() for v in ints):
    raise ValueError(f"bad case {case!r}: BATCH, UNROLL and NDEV are whole numbers")
  ndev = int(wparts[0]) if wparts else 1
  mode = wparts[1] if len(wparts) > 1 else "dp"
  if mode not in MODES or ndev < 1:
    raise ValueError(f"bad case {case!r}: '@NDEV:MODE' wants NDEV >= 1 and MODE in {MODES}")
  if parts[1] == "sample" and ndev != 1:
    raise ValueError(f"bad case {case!r}: sample cases run on one device")
  return {"model": parts[0], "kind": parts[1], "batch": int(parts[2]),
          "remat": parts[3] if len(parts) > 3 else "none",
          "scan_unroll": int(parts[4]) if len(parts) > 4 else None, "num_devices": ndev, "mode": mode}


def mesh_config(ndev: int, mode: str) -> dict:
  """dp: every device holds all of the state; fsdp: the state is sharded over all of them."""
  return {"data": ndev, "fsdp": 1} if mode == "dp" else {"data": 1, "fsdp": ndev}


def mgpu_fields(spec: str) -> dict[int, dict[str, int]]:
  """'K:field=v,field=v;K:...' -> {K: {field: v}}: fields of the Mosaic GEMM + GEGLU kernel's
  Config to replace, per contraction depth K (960 / 480: XL's Transformer / ConvNeXt MLPs,
  1152 / 576: G's), so a kernel variant can be A/B'd in the model without changing its default."""
  import dataclasses
  sys.path.insert(0, REPO)
  from dimr_jax.models import geglu_gemm_mgpu
  names = {f.name for f in dataclasses.fields(geglu_gemm_mgpu.Config)}
  out = {}
  for part in filter(None, spec.split(";")):
    k, _, fields = part.partition(":")
    try:
      kv = dict(f.split("=") for f in fields.split(","))
      out[int(k)] = {f: int(v) for f, v in kv.items()}
    except ValueError:
      raise ValueError(f"bad --mgpu_fields part {part!r}: want K:field=INT[,field=INT]") from None
    if unknown := set(kv) - names:
      raise ValueError(f"bad --mgpu_fields part {part!r}: {sorted(unknown)} not in "
                       f"geglu_gemm_mgpu.Config ({sorted(names)})")
  return out


def _patch_mgpu_default(spec: str):
  import dataclasses
  fields = mgpu_fields(spec)  # (puts the repo on sys.path)
  from dimr_jax.models import geglu_gemm_mgpu
  default = geglu_gemm_mgpu.default_config

  def patched(depth, hidden):
    cfg = default(depth, hidden)
    return cfg if cfg is None or depth not in fields else dataclasses.replace(cfg, **fields[depth])
  geglu_gemm_mgpu.default_config = patched


def build(case: str, args):
  """Compiles one case without allocating its state.

  Returns (run, record, flops_per_item, devices): ``run()`` allocates the inputs on first use, then
  does one step. Compiling ahead of time (``lower().compile()``) allocates no state, so a
  compile-only process of ``--parallel_compile`` takes little accelerator memory.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  sys.path.insert(0, REPO)
  from dimr_jax import config_utils, sampling, sharding, train
  from dimr_jax.tools import summary

  fields = getattr(args, "mgpu_fields", "")  # profile_step.py's arguments may lack it
  if fields:
    _patch_mgpu_default(fields)
  c = parse_case(case)
  model_name, kind, batch, remat, ndev = c["model"], c["kind"], c["batch"], c["remat"], c["num_devices"]
  if jax.device_count() < ndev:
    raise ValueError(f"case {case!r} needs {ndev} devices but {jax.device_count()} are present")
  devices = jax.devices()[:ndev]
  gbatch = batch * ndev
  unroll = args.scan_unroll if c["scan_unroll"] is None else c["scan_unroll"]
  overrides = {"input.batch_size": gbatch, "model.remat": remat, "model.dtype": args.dtype,
               "input.dataset": "synthetic", "model.attention_impl": args.attention_impl,
               "model.scan_unroll": unroll, "model.pallas_ops": args.pallas_ops}
  overrides.update({f"mesh.{k}": v for k, v in mesh_config(ndev, c["mode"]).items()})
  config = config_utils.load_config_file(os.path.join(REPO, CONFIGS[model_name]), overrides)
  mesh = sharding.make_mesh(config.mesh, devices)
  macs = summary.count_macs(config.model)["total"]
  rng = np.random.default_rng(0)
  res = {"model": model_name, "kind": kind, "batch": batch, "global_batch": gbatch,
         "dtype": args.dtype, "remat": remat, "num_devices": ndev, "mode": c["mode"],
         "mesh": dict(mesh.shape), "device": devices[0].device_kind, "jax": jax.__version__,
         "attention_impl": args.attention_impl or "auto", "scan_unroll": unroll,
         "pallas_ops": args.pallas_ops, "mgpu_fields": fields,
         "env": {k: v for k, v in os.environ.items() if k.startswith(("XLA_", "NCCL_"))}}
  m = config.model
  t0 = time.perf_counter()
  if kind == "train":
    tx = train.make_optimizer(config)
    gd = nnx.graphdef(train.abstract_model(config))
    init = functools.partial(train.init_state, config, tx)
    abs_state = jax.eval_shape(init, jax.random.key(0))
    sh = train.state_shardings(abs_state, mesh, config)
    abs_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             abs_state, sh)
    key = jax.device_put(jax.random.key(1), sharding.replicated(mesh))
    mean = rng.standard_normal((gbatch, m.image_size, m.image_size, m.channels), np.float32)
    logvar = rng.uniform(-4.0, -1.0, mean.shape).astype(np.float32)
    data_sh = sharding.batch_sharding(mesh)
    b = {"x": jax.device_put(np.concatenate([mean, logvar], -1), data_sh),
         "label": jax.device_put(rng.integers(0, 1000, gbatch).astype(np.int32), data_sh)}
    init_c = jax.jit(init, out_shardings=sh).lower(jax.random.key(0)).compile()
    step = train.build_train_step(config, gd, tx, mesh, sh, latent_moments=True)
    with sharding.mesh_context(mesh):  # as the train loop traces it (per-device Pallas kernels)
      step_c = step.lower(abs_state, b, key).compile()
    box = {}

    def run():
      if "state" not in box:
        box["state"] = init_c(jax.random.key(0))
      box["state"], met = step_c(box["state"], b, key)
      return met["loss"]

    flops_per_item = 6.0 * macs
  else:
    model = nnx.eval_shape(lambda: train.make_model(config, nnx.Rngs(params=0)))
    gd, abs_params = nnx.split(model)
    make_params = jax.jit(lambda k: nnx.state(train.make_model(config, nnx.Rngs(params=k))))
    y = jnp.asarray(rng.integers(0, 1000, batch).astype(np.int32))
    x = jnp.asarray(rng.standard_normal((batch, m.image_size, m.image_size, m.channels), np.float32))

    @jax.jit
    def sample_step(params, x, t):
      net = nnx.merge(gd, params)
      eps_fn = sampling.guided_eps_fn(net, y, cfg_scale=0.4, null_class=m.num_classes - 1,
                                      shared_time=True)  # as sample_images calls it
      eps = eps_fn(x, jnp.full((batch,), t))
      return 0.98 * x - 0.05 * eps  # a first-order DPM-Solver++ update's arithmetic

    params_c = make_params.lower(jax.random.key(0)).compile()
    step_c = sample_step.lower(abs_params, x, 0.5).compile()
    box = {"x": x}

    def run():
      if "params" not in box:
        box["params"] = params_c(jax.random.key(0))
      box["x"] = step_c(box["params"], box["x"], 0.5)
      return box["x"]

    flops_per_item = 2.0 * 2.0 * macs  # two forward passes (cond + uncond) per image-step
  res["compile_s"] = round(time.perf_counter() - t0, 1)
  return run, res, flops_per_item, devices


def _one(case: str, args) -> dict | None:
  if args.cache_dir:  # --parallel_compile: executables go through JAX's persistent cache
    import jax
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  run, res, flops_per_item, devices = build(case, args)
  if args.compile_only:
    return None
  gbatch = res["global_batch"]
  times = timing.step_times(run, steps=args.steps, warmup=3)
  med = statistics.median(times)
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", float("nan")) for d in devices]
  peak_tflops = args.peak_tflops
  res.update(step_time_s=med, img_per_s=gbatch / med, img_per_s_per_device=gbatch / med / len(devices),
             peak_mem_gib=max(peaks) / 2**30,
             mfu=(gbatch / med * flops_per_item / (peak_tflops * 1e12 * len(devices)))
             if peak_tflops else None,
             peak_tflops=peak_tflops, timed_steps=len(times),
             step_time_min_s=min(times), step_time_max_s=max(times))
  return res


def _error(case: str, text: str, rc) -> dict:
  err = text.strip().splitlines()
  oom = any("RESOURCE_EXHAUSTED" in l or "out of memory" in l.lower() for l in err)
  named = [l for l in err if "Error" in l and not l.startswith("jax._src")]
  msg = named[-1] if named else (err[-1] if err else f"rc={rc}")
  return {"case": case, "error": "OOM" if oom else msg}


class _Case:
  """``bench.py --one=CASE`` in its own process, its output in files (no pipe can fill up)."""

  def __init__(self, case: str, args, tmp: str, name: str, cache_dir: str = "",
               compile_only: bool = False):
    self.case, self.t0 = case, time.perf_counter()
    self.out_path, self.err_path = os.path.join(tmp, name + ".out"), os.path.join(tmp, name + ".err")
    cmd = [sys.executable, os.path.abspath(__file__), f"--one={case}", f"--steps={args.steps}",
           f"--dtype={args.dtype}", f"--peak_tflops={args.peak_tflops}",
           f"--attention_impl={args.attention_impl}", f"--scan_unroll={args.scan_unroll}",
           f"--pallas_ops={args.pallas_ops}", f"--cache_dir={cache_dir}",
           f"--mgpu_fields={args.mgpu_fields}"]
    env = dict(os.environ)
    # JAX preallocates 75% of GPU memory by default; benchmarks may use nearly all of it.
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    # NVLink multicast (NVLS) stays off in NCCL: on shared hosts it can take the GPUs down.
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    if compile_only:
      cmd.append("--compile_only")
      # Side by side, none may take a memory pool (a pool is never given back while it lives).
      env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
      self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)

  def wait(self, timeout: float) -> dict:
    """The case's record, or ``{'case', 'error'}``; kills it past ``timeout`` seconds."""
    try:
      self.proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      return {"case": self.case, "error": f"timeout after {round(time.perf_counter() - self.t0)}s"}
    with open(self.out_path) as f:
      out = f.read()
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    if lines:
      return json.loads(lines[-1][len("RESULT "):])
    if self.proc.returncode == 0:
      return {"case": self.case}
    with open(self.err_path) as f:
      return _error(self.case, f.read() or out, self.proc.returncode)


def run_cases(cases: list[str], args) -> list[dict]:
  """Runs each case in its own subprocess; prints one line per case as it finishes.

  With ``--parallel_compile`` every case first compiles in a process of its own, all at once,
  into a private persistent compilation cache, and exits (giving back the GPU memory its
  autotuning took); then the cases run one at a time, loading their executables from the cache.
  """
  import tempfile
  for c in cases:
    parse_case(c)  # a typo fails here, before anything compiles
  records = []
  with tempfile.TemporaryDirectory() as tmp:
    cache, compiled = "", {}
    if args.parallel_compile:
      cache = os.path.join(tmp, "cache")
      t0 = time.perf_counter()
      procs = [_Case(c, args, tmp, f"compile{i}", cache, compile_only=True)
               for i, c in enumerate(cases)]
      for i, p in enumerate(procs):
        compiled[i] = p.wait(args.timeout - (time.perf_counter() - t0))
        compiled[i]["parallel_compile_s"] = round(time.perf_counter() - p.t0, 1)
    for i, case in enumerate(cases):
      if "error" in compiled.get(i, {}):
        rec = compiled[i]
      else:
        p = _Case(case, args, tmp, f"run{i}", cache)
        rec = p.wait(args.timeout)
        rec["wall_s"] = round(time.perf_counter() - p.t0, 1)
        if i in compiled:
          rec["parallel_compile_s"] = compiled[i]["parallel_compile_s"]
      rec["date"] = datetime.date.today().isoformat()
      records.append(rec)
      print(_row(rec), flush=True)
      if getattr(args, "jsonl", ""):  # survives a run cut short
        with open(args.jsonl, "a") as f:
          f.write(json.dumps(rec) + "\n")
  return records


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--cases", default="XL/2R:train:64:none,XL/2R:train:128:none,XL/2R:train:256:dots,"
                 "G/2R:train:64:none,XL/2R:sample:125,G/2R:sample:125")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--attention_impl", default="")
  p.add_argument("--scan_unroll", type=int, default=0)
  p.add_argument("--pallas_ops", default="auto", help="model.pallas_ops: 'auto', '' or e.g. 'dwconv'")
  p.add_argument("--mgpu_fields", default="",
                 help="A/B a variant of the Mosaic GEMM + GEGLU kernel: 'K:field=v,...;K:...' "
                 "replaces those geglu_gemm_mgpu.Config fields of its default tiling at depth K")
  p.add_argument("--peak_tflops", type=float, default=0.0,
                 help="peak bf16 TFLOP/s for MFU (the H100 here measured 798 on a dense bf16 GEMM)")
  p.add_argument("--out", default="")
  p.add_argument("--timeout", type=int, default=400)
  p.add_argument("--jsonl", default="", help="also append each record here as it finishes")
  p.add_argument("--parallel_compile", action="store_true",
                 help="compile all cases at once (own processes, a shared compilation cache), "
                 "then time them one at a time; side-by-side autotuning can pick slow kernels, "
                 "so use it for fit probes and confirm times sequentially")
  p.add_argument("--one", default="", help=argparse.SUPPRESS)
  p.add_argument("--cache_dir", default="", help=argparse.SUPPRESS)
  p.add_argument("--compile_only", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.one:
    res = _one(args.one, args)
    if res is not None:
      print("RESULT " + json.dumps(res), flush=True)
    return 0
  try:
    mgpu_fields(args.mgpu_fields)
  except ValueError as e:
    p.error(str(e))  # one line and exit 2, before anything compiles
  cases = [c for c in args.cases.split(",") if c]
  for c in cases:
    try:
      parse_case(c)
    except ValueError as e:
      p.error(str(e))  # one line and exit 2, before anything compiles
  records = run_cases(cases, args)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(records, f, indent=1)
  print("\n" + table(records))
  return 0


def _where(r: dict) -> str:
  return "1" if r.get("num_devices", 1) == 1 else f"{r['num_devices']} {r['mode']}"


def _row(r: dict) -> str:
  if "error" in r:
    return f"{r['case']}: {r['error']}"
  mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
  return (f"{r['model']:6s} {r['kind']:6s} dev={_where(r):7s} b={r['batch']:<4d} remat={r['remat']:5s} "
          f"{r['dtype']}: {r['img_per_s']:8.1f} img/s  step {1e3 * r['step_time_s']:7.1f} ms  "
          f"peak {r['peak_mem_gib']:6.1f} GiB  MFU {mfu}  (compile {r['compile_s']}s) [{r['device']}]")


def table(records) -> str:
  """Markdown table; batch and peak memory are per device, img/s is for all devices together."""
  head = "| model | kind | devices | batch/dev | remat | dtype | img/s | step ms | peak GiB/dev | MFU | device |\n" \
         "|---|---|---|---|---|---|---|---|---|---|---|"
  rows = []
  for r in records:
    if "error" in r:
      rows.append(f"| {r['case']} | | | | | | {r['error']} | | | | |")
      continue
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
    rows.append(f"| {r['model']} | {r['kind']} | {_where(r)} | {r['batch']} | {r['remat']} | {r['dtype']} | "
                f"{r['img_per_s']:.1f} | {1e3 * r['step_time_s']:.1f} | {r['peak_mem_gib']:.1f} | {mfu} | "
                f"{r['device']} |")
  return "\n".join([head] + rows)


if __name__ == "__main__":
  sys.exit(main())
