"""Depthwise 7x7 conv of the ConvNeXt stages: shifted multiply-adds vs the grouped convolution.

Kept as the record of a rejected change (benchmarks/NOTES.md): in the full model XLA fused the
49 shifted slices poorly and the sampling step got slower, so the model uses the convolution.

    python benchmarks/dwconv.py --batch=64 --dim=480

Prints forward and forward+backward medians (ms) of both, and their max difference.
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


def grouped_conv(x, w):
  k = w.shape[0]
  return jax.lax.conv_general_dilated(
      x, w[:, :, None, :], (1, 1), [(k // 2, k // 2)] * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1],
      preferred_element_type=jnp.float32)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--side", type=int, default=32)
  p.add_argument("--dim", type=int, default=480)
  args = p.parse_args()
  dt = jnp.bfloat16
  k = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k[0], (args.batch, args.side, args.side, args.dim), dt)
  w = jax.random.normal(k[1], (7, 7, args.dim), dt)
  g = jax.random.normal(k[2], x.shape, dt)
  impls = {
      "shifts(autodiff)": lambda x, w: shifts(x, w).astype(dt),
      "lax_grouped_conv": lambda x, w: grouped_conv(x, w).astype(dt),
  }
  ref = jax.jit(impls["lax_grouped_conv"])(x, w).astype(jnp.float32)
  print(f"{jax.devices()[0].device_kind} x={x.shape} bf16")
  for name, f in impls.items():
    fwd = jax.jit(f)
    err = float(jnp.max(jnp.abs(fwd(x, w).astype(jnp.float32) - ref)))
    bwd = jax.jit(jax.grad(lambda x, w: jnp.sum((f(x, w) * g).astype(jnp.float32)), argnums=(0, 1)))
    print(f"{name:22s} fwd {median_ms(fwd, x, w):7.3f} ms  fwd+bwd {median_ms(bwd, x, w):7.3f} ms  "
          f"max|diff| {err:.3g}", flush=True)


if __name__ == "__main__":
  main()
