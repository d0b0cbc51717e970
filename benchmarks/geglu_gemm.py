"""The GEGLU MLP's first half on its own: cuBLAS GEMM + GEGLU pass vs the fused GEMM kernels.

    python benchmarks/geglu_gemm.py --rows=66000 --depth=960 --hidden=1920 --tune
    python benchmarks/geglu_gemm.py --rows=64256 --depth=960 --hidden=1920 --mgpu="auto;64,128,64,3,8,0"

Shapes of DiMR-XL/2R: Transformer MLP (B*264, 960) -> 2x1920 (B*257 = 64250 rows when sampling,
padded to 64256 for the Mosaic kernel), ConvNeXt MLP (B*1024, 480) -> 2x960
(B = 250 for a guided sampling step of 125 images, 64 for a training step). Prints, per variant,
the forward median (ms) and its rate in TFLOP/s of the GEMM, max|diff| against the unfused path,
and (``--grad``) forward+backward. Variants: ``unfused`` is the model's path (cuBLAS ``x @ w01``
in bf16, then the GEGLU kernel with the bias); ``gemm only`` is the bare cuBLAS GEMM (what the
fused kernel must reach); ``fused ...`` are launch configurations of ``geglu_gemm_kernel``
(Triton); ``mgpu ...`` are tilings of the Mosaic GPU kernel ``geglu_gemm_mgpu`` (Hopper only,
forward only; ``--mgpu_no_gelu`` also times them with the GELU left out of the epilogue).
``--cupti`` times the kernels on the GPU (no dispatch overhead, which is ~0.25 ms of a ~1 ms call
timed by wall clock) and ``--rounds=N`` times every variant N times round-robin (the spread is
printed); use both to compare variants a few percent apart (NOTES row 40).
"""
import argparse
import functools
import os
import statistics
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dimr_jax.models import geglu_gemm_kernel, geglu_gemm_mgpu, geglu_kernel  # noqa: E402
from timing import median_ms  # benchmarks/timing.py  # noqa: E402


def unfused(x, w01, b01):
  h01 = jnp.matmul(x, w01, preferred_element_type=jnp.float32).astype(x.dtype)
  impl = "pallas" if jax.default_backend() == "gpu" else "xla"
  return geglu_kernel.geglu(h01, b01, impl=impl)


def gemm_only(x, w01, b01):
  return jnp.matmul(x, w01, preferred_element_type=jnp.float32).astype(x.dtype)


def _no_gelu(f, *args):
  saved, geglu_gemm_mgpu._gelu = geglu_gemm_mgpu._gelu, lambda v: v
  try:
    return f(*args)
  finally:
    geglu_gemm_mgpu._gelu = saved


def cupti_ms(f, *args, steps=20):
  """Median GPU time (ms) of the kernels ``f`` launches, from CUPTI (Mosaic GPU's profiler): no
  dispatch or synchronisation overhead, which is ~0.1-0.3 ms of the wall-clock time per call."""
  from jax.experimental.mosaic.gpu import profiler
  _, runtimes = profiler.measure(f, iterations=steps)(*args)
  return statistics.median(runtimes)


def parse_mgpu(spec, depth, hidden):
  """'tm,tn,tk,stages[,width[,minor_n]][,key=value...]' -> Config ('default' = Config(),
  'auto,key=value' = default_config with those fields replaced); keys are Config's other fields
  (delay_release, chain_tiles, epi_chunks, out_slots, cluster_m, round_like_unfused,
  pingpong)."""
  import dataclasses
  toks = spec.split(",")
  kw = {k: int(v) for k, v in (t.split("=") for t in toks if "=" in t)}
  pos = [t for t in toks if "=" not in t]
  if pos == ["default"]:
    return geglu_gemm_mgpu.Config(**kw)
  if pos == ["auto"]:
    return dataclasses.replace(geglu_gemm_mgpu.default_config(depth, hidden), **kw)
  v = [int(t) for t in pos]
  return geglu_gemm_mgpu.Config(*v[:4], grid_tile_width=v[4] if len(v) > 4 else 1,
                                grid_minor_n=bool(v[5]) if len(v) > 5 else True, **kw)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rows", type=int, default=66000)
  p.add_argument("--depth", type=int, default=960)
  p.add_argument("--hidden", type=int, default=1920)
  p.add_argument("--tune", action="store_true", help="sweep (bm, bn, bk, num_warps, num_stages)")
  p.add_argument("--grad", action="store_true", help="also time forward+backward")
  p.add_argument("--mgpu_no_gelu", action="store_true",
                 help="also time each --mgpu tiling with the GELU left out of its epilogue")
  p.add_argument("--mgpu", default="", help="Mosaic GPU kernel tilings to time, "
                 "'tm,tn,tk,stages[,width[,minor_n]][,field=value...]' separated by ';' "
                 "(geglu_gemm_mgpu.Config), 'default' (Config()) or 'auto[,field=value...]' "
                 "(default_config)")
  p.add_argument("--cupti", action="store_true",
                 help="time the kernels on the GPU (CUPTI) instead of synchronised wall-clock calls")
  p.add_argument("--rounds", type=int, default=1,
                 help="time every variant this many times, round-robin; report the median")
  args = p.parse_args()
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (args.rows, args.depth), jnp.bfloat16)
  w01 = (jax.random.normal(k[1], (args.depth, 2 * args.hidden)) / args.depth ** 0.5).astype(jnp.bfloat16)
  b01 = (0.1 * jax.random.normal(k[2], (2 * args.hidden,))).astype(jnp.bfloat16)
  g = jax.random.normal(k[3], (args.rows, args.hidden), jnp.bfloat16)
  impls = {"unfused": unfused, "gemm only": gemm_only,
           "fused default": geglu_gemm_kernel.geglu_gemm}
  if args.tune:
    for bm, bn, bk, nw, ns in [(128, 64, 64, 4, 3), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3),
                               (128, 64, 32, 4, 4), (64, 64, 64, 4, 3), (128, 128, 32, 8, 4),
                               (256, 64, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 3),
                               (128, 32, 64, 4, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 3)]:
      impls[f"fused {bm}x{bn}x{bk} w{nw} s{ns}"] = functools.partial(
          geglu_gemm_kernel.geglu_gemm, bm=bm, bn=bn, bk=bk, num_warps=nw, num_stages=ns)
  for spec in filter(None, args.mgpu.split(";")):
    cfg = parse_mgpu(spec, args.depth, args.hidden)  # 'auto': the model's choice for this shape
    impls[f"mgpu {cfg.tile_m}x{cfg.tile_n}x{cfg.tile_k} s{cfg.stages} w{cfg.grid_tile_width}"
          f"{'' if cfg.grid_minor_n else ' minor-M'}"
          f"{f' dr{cfg.delay_release}' if cfg.delay_release else ''}"
          f"{' chain' if cfg.chain_tiles else ''}"
          f"{f' epi{cfg.epi_chunks}' if cfg.epi_chunks > 1 else ''}"
          f"{' cluster-M' if cfg.cluster_m else ''}"
          f"{'' if cfg.round_like_unfused else ' 1-round'}"
          f"{' pingpong' if cfg.pingpong else ''}"] = functools.partial(
              geglu_gemm_mgpu.geglu_gemm, cfg=cfg)
  if args.mgpu_no_gelu:  # the epilogue's cost: time the same kernels with gelu = identity
    for name in [n for n in impls if n.startswith("mgpu")]:
      impls[name + " no-gelu"] = functools.partial(_no_gelu, impls[name])
  flops = 2.0 * args.rows * args.depth * 2 * args.hidden
  ref = jax.jit(unfused)(x, w01, b01).astype(jnp.float32)
  print(f"{jax.devices()[0].device_kind} x={x.shape} w01={w01.shape} bf16"
        f"{f', {args.rounds} rounds' if args.rounds > 1 else ''}", flush=True)
  compiled, times = {}, {}
  for name, f in impls.items():
    fwd = jax.jit(f)
    try:
      out = fwd(x, w01, b01)
      err = "n/a" if out.shape != ref.shape else f"{float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))):.3g}"
      compiled[name], times[name] = (fwd, err, f), []
    except Exception as e:  # a launch configuration Triton rejects: report it, go on
      print(f"{name:26s} failed: {type(e).__name__}: {str(e).splitlines()[0][:140]}", flush=True)
      if os.environ.get("GEGLU_GEMM_TRACEBACK"):
        import traceback
        traceback.print_exc()
  # round-robin: every variant is timed once per round, so a drift of the clock under sustained
  # load (or a neighbour's noise) reaches all of them alike instead of the last ones in the list
  timer = cupti_ms if args.cupti else median_ms
  for _ in range(args.rounds):
    for name, (fwd, _, _) in compiled.items():
      times[name].append(timer(fwd, x, w01, b01))
  for name, (fwd, err, f) in compiled.items():
    ms = statistics.median(times[name])
    spread = f" (rounds {min(times[name]):.3f}-{max(times[name]):.3f})" if args.rounds > 1 else ""
    line = (f"{name:26s} fwd {ms:7.3f} ms ({flops / ms / 1e9:6.1f} TFLOP/s){spread}"
            f"  max|diff| {err}")
    if args.grad and name != "gemm only" and not name.startswith("mgpu"):
      loss = lambda x, w, b, f=f: jnp.sum((f(x, w, b) * g).astype(jnp.float32))
      line += f"  fwd+bwd {median_ms(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), x, w01, b01):7.3f} ms"
    print(line, flush=True)


if __name__ == "__main__":
  main()
