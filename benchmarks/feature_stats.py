"""Times the features handed to the next stage: the concatenation of a stage's input and block
outputs plus each token's layer-norm mean and 1/std over it (what the folded upsampler norm of
the next stage reads), XLA (the model's concatenate + ``layers.layer_norm_stats``) against the
Pallas kernel (``dimr_jax/models/feature_stats_kernel.py``).

  python benchmarks/feature_stats.py --pieces=57 --dim=1152 --rows=64250 --piece_rows=64256  # G
  python benchmarks/feature_stats.py --pieces=41 --dim=960 --rows=64250 --piece_rows=64256   # XL

(G/2R and XL/2R guided sampling of 125 images: 250 x 257 tokens, the Transformer stage's flat
rows padded to a multiple of 8.) Median of 20 synchronised calls; the GB/s count one read of the
pieces and one write of the concatenation.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dimr_jax.models import feature_stats_kernel as fk  # noqa: E402
from dimr_jax.models import layers  # noqa: E402
from timing import median_ms  # noqa: E402  (benchmarks/timing.py)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--pieces", type=int, default=57)
  ap.add_argument("--dim", type=int, default=1152)
  ap.add_argument("--rows", type=int, default=64250)
  ap.add_argument("--piece_rows", type=int, default=64256)
  args = ap.parse_args()
  rows = args.rows
  keys = jax.random.split(jax.random.key(0), args.pieces)
  pieces = [jax.random.normal(k, (args.piece_rows, args.dim), jnp.bfloat16) + 0.1 * i
            for i, k in enumerate(keys)]

  @jax.jit
  def xla(ps):  # the model's path (Stage._feature_list without the kernel, then the upsampler)
    cat = jnp.concatenate([p[:rows] for p in ps], axis=-1)
    mean, inv = layers.layer_norm_stats(cat)
    return cat, mean[:, 0], inv[:, 0]

  kernel = jax.jit(lambda ps: fk.feature_stats(ps, rows))
  want = xla(pieces)
  got = kernel(pieces)
  same_cat = bool(jnp.array_equal(want[0], got[0]))
  err_mean = float(jnp.max(jnp.abs(want[1] - got[1])))
  err_inv = float(jnp.max(jnp.abs(want[2] / got[2] - 1)))
  gbytes = 2 * rows * args.pieces * args.dim * 2 / 1e9
  print(f"{jax.devices()[0].device_kind}: {args.pieces} pieces ({args.piece_rows}, {args.dim}) bf16,"
        f" {rows} rows -> ({rows}, {args.pieces * args.dim}) + stats; {gbytes:.2f} GB moved")
  print(f"kernel vs xla: concatenation equal {same_cat}, max|d mean| {err_mean:.3g}, "
        f"max rel d inv {err_inv:.3g}")
  for name, f in (("xla concatenate + reduce", xla), ("pallas feature_stats", kernel)):
    ms = median_ms(f, pieces)
    print(f"{name:28s} {ms:7.3f} ms  ({gbytes / ms:6.2f} TB/s)", flush=True)
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), atol=1e-4)


if __name__ == "__main__":
  main()
