"""Times ``r + (h @ W + b)``, the ConvNeXt MLP's last GEMM and residual add: XLA (cuBLAS GEMM, then
the add as a pass of its own) against the Mosaic GPU kernel with both in its epilogue
(``dimr_jax/models/dense_residual_mgpu.py``) at the given tilings.

  python benchmarks/dense_residual.py --rows=256000 --depth=960 --width=480          # XL sampling
  python benchmarks/dense_residual.py --rows=256000 --depth=1152 --width=576         # G sampling
  python benchmarks/dense_residual.py ... --mgpu="auto;128,128,64,4;64,192,64,4"     # tilings

A tiling is ``tile_m,tile_n,tile_k,stages[,grid_tile_width]``. Each line is the median of 20
synchronised calls of L chained applications in one jit, per application. Each application has a
weight of its own and its output, the next one's residual, passes an optimization barrier: with
one shared W, XLA computes the loop-invariant GEMM once and fuses the L adds into one pass (the
first GPU run of this script timed exactly that, 0.08 ms "per application"; NOTES row 45), and in
the model every block's sum is materialised for the next block's conv anyway.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dimr_jax.models import dense_residual_mgpu as dr  # noqa: E402
from timing import median_ms  # noqa: E402  (benchmarks/timing.py)


def parse_tiling(spec: str) -> dr.Config | None:
  if spec == "auto":
    return None
  try:
    vals = [int(v) for v in spec.split(",")]
    keys = ("tile_m", "tile_n", "tile_k", "stages", "grid_tile_width")
    if not 4 <= len(vals) <= len(keys):
      raise ValueError
  except ValueError:
    raise SystemExit(f"dense_residual.py: error: bad --mgpu tiling {spec!r}: want 'auto' or "
                     "'tile_m,tile_n,tile_k,stages[,grid_tile_width]' (e.g. 128,128,64,3)")
  return dr.Config(**dict(zip(keys, vals)))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rows", type=int, default=256000)
  ap.add_argument("--depth", type=int, default=960)
  ap.add_argument("--width", type=int, default=480)
  ap.add_argument("--layers", type=int, default=10)
  ap.add_argument("--mgpu", default="auto", help="';'-separated tilings, or 'auto'")
  args = ap.parse_args()
  configs = [(s, parse_tiling(s)) for s in filter(None, args.mgpu.split(";"))]

  dt = jnp.bfloat16
  k = jax.random.split(jax.random.key(0), 4)
  h = jax.random.normal(k[0], (args.rows, args.depth), dt)
  # a weight per application (see the docstring); the single-call checks use the first
  ws = (jax.random.normal(k[1], (args.layers, args.depth, args.width))
        / args.depth ** 0.5).astype(dt)
  w = ws[0]
  b = 0.3 * jax.random.normal(k[2], (args.width,), jnp.float32)
  r = jax.random.normal(k[3], (args.rows, args.width), dt)

  def xla(h, w, b, r):  # the model's path: layers.Dense in bf16, then the block's add
    return r + (jnp.matmul(h, w, preferred_element_type=jnp.float32).astype(dt) + b.astype(dt))

  def chained(f):
    def run(h, ws, b, r):
      for i in range(args.layers):
        r = jax.lax.optimization_barrier(f(h, ws[i], b, r))
      return r
    return jax.jit(run)

  flops = 2 * args.rows * args.depth * args.width
  ref = jax.jit(xla)(h, w, b, r).astype(jnp.float32)
  print(f"{jax.devices()[0].device_kind} r + (h @ W + b): h ({args.rows}, {args.depth}), "
        f"W ({args.depth}, {args.width}), bf16; per application of {args.layers} chained in one "
        "jit", flush=True)

  def measure(name, f):
    try:
      err = float(jnp.max(jnp.abs(jax.jit(f)(h, w, b, r).astype(jnp.float32) - ref)))
      ms = median_ms(chained(f), h, ws, b, r) / args.layers
      print(f"{name:52s} {ms:7.3f} ms ({flops / ms / 1e9:6.1f} TFLOP/s)  max|diff| {err:.3g}",
            flush=True)
    except Exception as e:  # a tiling that does not fit: report and go on
      print(f"{name:52s} failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}", flush=True)

  measure("xla gemm+b, then +r", xla)
  if not dr.available():
    print("(the Mosaic GPU kernel needs a Hopper GPU)")
    return
  for spec, cfg in configs:
    shown = cfg or dr.default_config(args.depth, args.width)
    measure(f"mgpu {spec} -> {shown}",
            lambda h, w, b, r, cfg=cfg: dr.dense_residual(h, w, b, r, cfg))


if __name__ == "__main__":
  main()
