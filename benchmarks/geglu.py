"""The GEGLU elementwise pass ``gelu(h0) * h1`` on its own, as XLA fuses it.

    python benchmarks/geglu.py --rows=66000 --hidden=1920

``h01`` is the (rows, 2*hidden) bf16 output of the w0|w1 GEMM. Prints forward and
forward+backward medians (ms) with the achieved memory bandwidth, for exact (erf) GELU, the tanh
approximation and a plain product (to separate the erf cost from the memory traffic).
(A Pallas Triton version could not be timed: its lowering has no ``erf``; benchmarks/NOTES.md.)
"""
import argparse
import functools

import jax
import jax.numpy as jnp

from timing import median_ms  # benchmarks/timing.py


def xla_geglu(h01, approximate=False):
  h0, h1 = jnp.split(h01, 2, axis=-1)
  return jax.nn.gelu(h0, approximate=approximate) * h1


def plain_mul(h01):
  h0, h1 = jnp.split(h01, 2, axis=-1)
  return h0 * h1


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rows", type=int, default=66000)
  p.add_argument("--hidden", type=int, default=1920)
  args = p.parse_args()
  k = jax.random.split(jax.random.key(0), 2)
  h01 = jax.random.normal(k[0], (args.rows, 2 * args.hidden), jnp.bfloat16)
  g = jax.random.normal(k[1], (args.rows, args.hidden), jnp.bfloat16)
  impls = {"xla exact": xla_geglu, "xla tanh": functools.partial(xla_geglu, approximate=True),
           "xla h0*h1": plain_mul}
  ref = jax.jit(xla_geglu)(h01).astype(jnp.float32)
  fwd_bytes = h01.size * 2 + g.size * 2
  print(f"{jax.devices()[0].device_kind} h01={h01.shape} bf16")
  for name, f in impls.items():
    fwd = jax.jit(f)
    err = float(jnp.max(jnp.abs(fwd(h01).astype(jnp.float32) - ref)))
    ms = median_ms(fwd, h01)
    bwd = jax.jit(jax.grad(lambda h, f=f: jnp.sum((f(h) * g).astype(jnp.float32))))
    print(f"{name:14s} fwd {ms:7.3f} ms ({fwd_bytes / ms / 1e9:5.2f} TB/s)  max|diff| {err:.3g}"
          f"  fwd+bwd {median_ms(bwd, h01):7.3f} ms", flush=True)


if __name__ == "__main__":
  main()
