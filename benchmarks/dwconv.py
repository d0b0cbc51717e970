"""Depthwise 7x7 conv of the ConvNeXt stages: the ways to compute it, timed on their own.

    python benchmarks/dwconv.py --batch=64 --dim=480

Variants: cuDNN's depthwise (grouped, one channel per group) convolution in NHWC and NCHW, the
same conv as a grouped convolution with ``g`` channels per group and a block-diagonal kernel
(g-fold more FLOPs, but tensor-core friendly), and shifted multiply-adds (the rejected change of
benchmarks/NOTES.md row 9: in the full model XLA fused the 49 slices poorly). Prints forward and
forward+backward (dx and dw) medians (ms) and the max difference to the depthwise result.

``--residual`` times the op the model runs, ``x + b + dwconv(x)``: XLA (cuDNN conv + fused adds)
against the Pallas kernels of ``dimr_jax/models/dwconv_kernel.py`` (GPU only); ``--tune`` sweeps
their tile sizes.
"""
import argparse

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dimr_jax.models import dwconv_kernel, pallas_util  # noqa: E402
from timing import median_ms  # benchmarks/timing.py


def shifts(x, w):
  """'SAME' depthwise correlation as k*k shifted multiply-adds in float32."""
  k = w.shape[0]
  p = k // 2
  _, hh, ww, _ = x.shape
  xp = jnp.pad(x, [(0, 0), (p, p), (p, p), (0, 0)]).astype(jnp.float32)
  w = w.astype(jnp.float32)
  return sum(xp[:, i:i + hh, j:j + ww, :] * w[i, j] for i in range(k) for j in range(k))


def depthwise(x, w, layout="NHWC"):
  k = w.shape[0]
  pad = [(k // 2, k // 2)] * 2
  if layout == "NCHW":
    return jax.lax.conv_general_dilated(
        x, w.transpose(2, 0, 1)[:, None], (1, 1), pad,
        dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=x.shape[1],
        preferred_element_type=jnp.float32)
  return jax.lax.conv_general_dilated(
      x, w[:, :, None, :], (1, 1), pad,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1],
      preferred_element_type=jnp.float32)


def block_diagonal(x, w, g):
  """The depthwise conv as a grouped conv with g channels per group (kernel zero off-diagonal)."""
  k, c = w.shape[0], w.shape[-1]
  mask = (jnp.arange(g)[:, None] == jnp.arange(c)[None, :] % g).astype(w.dtype)  # (g, C)
  kbd = w[:, :, None, :] * mask
  return jax.lax.conv_general_dilated(
      x, kbd, (1, 1), [(k // 2, k // 2)] * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c // g,
      preferred_element_type=jnp.float32)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--side", type=int, default=32)
  p.add_argument("--dim", type=int, default=480)
  p.add_argument("--groups", default="8,16,32")
  p.add_argument("--shifts", action="store_true", help="also time the shifted multiply-adds")
  p.add_argument("--residual", action="store_true", help="time x + b + dwconv(x): XLA vs Pallas")
  p.add_argument("--tune", action="store_true", help="with --residual: sweep Pallas tile sizes")
  args = p.parse_args()
  if args.residual:
    return residual(args)
  dt = jnp.bfloat16
  k = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k[0], (args.batch, args.side, args.side, args.dim), dt)
  w = jax.random.normal(k[1], (7, 7, args.dim), dt)
  g = jax.random.normal(k[2], x.shape, dt)
  nchw = lambda a: a.transpose(0, 3, 1, 2)  # noqa: E731
  # name -> (fn, input transform, output transform back to NHWC)
  impls = {"depthwise NHWC": (depthwise, None)}
  impls["depthwise NCHW"] = (lambda x, w: depthwise(x, w, "NCHW"), nchw)
  for gs in [int(s) for s in args.groups.split(",") if s]:
    if args.dim % gs == 0:
      impls[f"block-diag g={gs}"] = (lambda x, w, gs=gs: block_diagonal(x, w, gs), None)
  if args.shifts:
    impls["shifts(autodiff)"] = (shifts, None)
  ref = jax.jit(depthwise)(x, w).astype(dt).astype(jnp.float32)
  print(f"{jax.devices()[0].device_kind} x={x.shape} bf16")
  for name, (f, tin) in impls.items():
    xi, gi = (x, g) if tin is None else (tin(x), tin(g))
    fwd = jax.jit(lambda x, w, f=f: f(x, w).astype(dt))
    out = fwd(xi, w).astype(jnp.float32)
    out = out if tin is None else out.transpose(0, 2, 3, 1)
    err = float(jnp.max(jnp.abs(out - ref)))
    bwd = jax.jit(jax.grad(lambda x, w, gi, f=f: jnp.sum((f(x, w).astype(dt) * gi).astype(jnp.float32)),
                           argnums=(0, 1)))
    print(f"{name:18s} fwd {median_ms(fwd, xi, w):7.3f} ms  fwd+bwd {median_ms(bwd, xi, w, gi):7.3f} ms  "
          f"max|diff| {err:.3g}", flush=True)


def residual(args):
  """x + b + dwconv(x), the op of the ConvNeXt block: XLA's conv + adds vs the Pallas kernels."""
  dt = jnp.bfloat16
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (args.batch, args.side, args.side, args.dim), dt)
  w = (0.1 * jax.random.normal(k[1], (7, 7, args.dim))).astype(dt)
  b = jax.random.normal(k[2], (args.dim,), dt)
  g = jax.random.normal(k[3], x.shape, dt)

  def xla(x, w, b):  # the model's XLA path (layers.Conv): bf16 conv output + bias, then x + that
    y = jax.lax.conv_general_dilated(
        x, w[:, :, None, :], (1, 1), [(3, 3)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1], preferred_element_type=dt)
    return x + (y + b)

  def pallas(**kw):
    return lambda x, w, b: dwconv_kernel.dwconv_residual(x, w, b, **kw)

  eff = lambda n, cap: pallas_util.pow2_divisor(n, cap)  # noqa: E731  (the tile actually used)
  tiles = [(8, 32, 4)]
  if args.tune:
    tiles = sorted({(eff(args.side, th), eff(args.dim, bc), nw)
                    for th in (2, 4, 8, 16) for bc in (16, 32, 64) for nw in (2, 4, 8)})
  impls = {"xla conv+b+x": (xla, True)}
  if jax.default_backend() == "gpu":
    for th, bc, nw in tiles:
      impls[f"pallas th={th} bc={bc} warps={nw}"] = (
          pallas(row_tile=th, channel_block=bc, num_warps=nw), not args.tune)
    for wg in ("xla", "pallas"):
      impls[f"pallas default, wgrad={wg}"] = (pallas(wgrad=wg), True)
  ref = jax.jit(dwconv_kernel.dwconv_residual_reference)(x, w, b).astype(jnp.float32)
  moved = 2 * x.size * 2
  print(f"{jax.devices()[0].device_kind} x + b + dwconv(x), x={x.shape} bf16 "
        f"(ideal traffic {moved / 1e9:.3f} GB)")
  for name, (f, with_bwd) in impls.items():
    fwd = jax.jit(f)
    try:
      err = float(jnp.max(jnp.abs(fwd(x, w, b).astype(jnp.float32) - ref)))
      ms = median_ms(fwd, x, w, b)
      line = f"{name:34s} fwd {ms:7.3f} ms ({moved / ms / 1e9:5.2f} TB/s)  max|diff| {err:.3g}"
      if with_bwd:
        bwd = jax.jit(jax.grad(lambda x, w, b, g, f=f: jnp.sum((f(x, w, b) * g).astype(jnp.float32)),
                               argnums=(0, 1, 2)))
        line += f"  fwd+bwd {median_ms(bwd, x, w, b, g):7.3f} ms"
      print(line, flush=True)
    except Exception as e:  # a tiling Triton rejects: report and go on with the sweep
      print(f"{name:34s} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)


if __name__ == "__main__":
  main()
