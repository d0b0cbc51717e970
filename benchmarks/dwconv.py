"""Depthwise 7x7 conv of the ConvNeXt stages: the ways to compute it, timed on their own.

    python benchmarks/dwconv.py --batch=64 --dim=480

Variants: cuDNN's depthwise (grouped, one channel per group) convolution in NHWC and NCHW, the
same conv as a grouped convolution with ``g`` channels per group and a block-diagonal kernel
(g-fold more FLOPs, but tensor-core friendly), and shifted multiply-adds (the rejected change of
benchmarks/NOTES.md row 9: in the full model XLA fused the 49 slices poorly). Prints forward and
forward+backward (dx and dw) medians (ms) and the max difference to the depthwise result.
"""
import argparse

import jax
import jax.numpy as jnp

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
  args = p.parse_args()
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


if __name__ == "__main__":
  main()
