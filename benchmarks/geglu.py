"""The GEGLU elementwise pass ``gelu(h0) * h1`` on its own: XLA's fusion vs the Pallas kernels.

    python benchmarks/geglu.py --rows=66000 --hidden=1920
    python benchmarks/geglu.py --rows=66000 --hidden=1920 --tune   # sweep the Pallas launch params

``h01`` is the (rows, 2*hidden) bf16 output of the w0|w1 GEMM. Prints forward and
forward+backward medians (ms) with the forward's achieved memory bandwidth, for XLA's exact (erf)
GELU, the tanh approximation and a plain product (to separate the erf cost from the memory
traffic), and for the Pallas Triton kernels of ``dimr_jax/models/geglu_kernel.py`` (hand-written
erfc, Pallas backward through a custom VJP). "fwd+bwd" is ``jax.grad`` of ``sum(f(h01) * g)``:
the forward's value is unused, so XLA should drop it (the Pallas forward is a side-effect-free
custom call) and every variant times the gradient pass (read h01 and g, write dh01). max|diff| is
against XLA's exact forward.

Pallas runs when the backend is a GPU (``--pallas=auto``); ``--pallas=on`` elsewhere runs it in
interpret mode (a correctness check of the script; the times mean nothing there).
"""
import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dimr_jax.models import geglu_kernel  # noqa: E402
from timing import median_ms  # benchmarks/timing.py  # noqa: E402


def xla_geglu(h01, approximate=False):
  h0, h1 = jnp.split(h01, 2, axis=-1)
  return jax.nn.gelu(h0, approximate=approximate) * h1


def plain_mul(h01):
  h0, h1 = jnp.split(h01, 2, axis=-1)
  return h0 * h1


def pallas_geglu(h01, bm=None, bh=256, num_warps=8):
  return geglu_kernel.geglu(h01, impl="pallas", bm=bm, bh=bh, num_warps=num_warps)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rows", type=int, default=66000)
  p.add_argument("--hidden", type=int, default=1920)
  p.add_argument("--pallas", choices=("auto", "on", "off"), default="auto",
                 help="time the Pallas kernels: auto = only on GPU; on = also interpreted on CPU")
  p.add_argument("--tune", action="store_true",
                 help="also sweep the Pallas (bm, bh, num_warps); bh is capped by H's power of 2")
  args = p.parse_args()
  k = jax.random.split(jax.random.key(0), 2)
  h01 = jax.random.normal(k[0], (args.rows, 2 * args.hidden), jnp.bfloat16)
  g = jax.random.normal(k[1], (args.rows, args.hidden), jnp.bfloat16)
  impls = {"xla exact": xla_geglu, "xla tanh": functools.partial(xla_geglu, approximate=True),
           "xla h0*h1": plain_mul}
  use_pallas = args.pallas == "on" or (args.pallas == "auto" and jax.default_backend() == "gpu")
  if use_pallas:
    impls["pallas"] = pallas_geglu
    if args.tune:
      seen = set()
      for bm in (16, 32, 64, 128):
        for bh in (64, 128, 256):
          bh_used = min(bh, args.hidden & -args.hidden)  # what geglu() uses: a power of 2 | H
          for nw in (4, 8):
            if (bm, bh_used, nw) not in seen:
              seen.add((bm, bh_used, nw))
              impls[f"pallas bm={bm} bh={bh_used} w={nw}"] = functools.partial(
                  pallas_geglu, bm=bm, bh=bh_used, num_warps=nw)
  ref = jax.jit(xla_geglu)(h01).astype(jnp.float32)
  fwd_bytes = h01.size * 2 + g.size * 2
  print(f"{jax.devices()[0].device_kind} h01={h01.shape} bf16")
  for name, f in impls.items():
    fwd = jax.jit(f)
    try:
      err = float(jnp.max(jnp.abs(fwd(h01).astype(jnp.float32) - ref)))
      ms = median_ms(fwd, h01)
      bwd = jax.jit(jax.grad(lambda h, f=f: jnp.sum((f(h) * g).astype(jnp.float32))))
      print(f"{name:14s} fwd {ms:7.3f} ms ({fwd_bytes / ms / 1e9:5.2f} TB/s)  max|diff| {err:.3g}"
            f"  fwd+bwd {median_ms(bwd, h01):7.3f} ms", flush=True)
    except Exception as e:  # a launch configuration Triton rejects: report it, go on with the sweep
      print(f"{name:14s} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)


if __name__ == "__main__":
  main()
