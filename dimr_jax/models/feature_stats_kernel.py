"""The features handed up to the next stage: concatenation and layer-norm statistics in one pass.

A stage hands the next one its input and every block output, concatenated along channels (the
official ``torch.cat(ext, -1)``: 57 x 1152 = 65,664 channels per token for G/2R, 41 x 960 for
XL). With one time for the whole batch (the samplers) the next stage's upsampler folds its TD-LN
into its Linear (``PixelShuffleUpsample._folded_norm_linear``) and needs only each token's mean
and 1/std over those channels, besides the concatenation itself for its GEMM.

XLA makes both in one fusion that reads the pieces through the concatenate and writes the
concatenation; that fusion ran at ~1.5 TB/s on an H200 (11.2 ms of a G/2R guided sampling step,
``results/h200_profile_g_sample_head_2026-12-04.txt``), where the bytes allow ~4 ms: the
concatenate's per-element operand selection is what it pays for. This Pallas (Triton) kernel
does the same work as plain copies: a program takes ``bm`` rows, walks the pieces in order and
their columns in power-of-two chunks (Triton tiles must be powers of two; 1152 = 9 x 128,
960 = 15 x 64), stores each chunk at its place in the concatenation, and adds its float32 row
sums and sums of squares; the statistics are then ``layers.layer_norm_stats``'s expression
(E[x^2] - mean^2 in float32, clamped at 0).

The pieces may have more rows than are wanted (a Transformer stage's flat rows are padded to a
multiple of 8, ``Stage.flat_rows``): ``rows`` says how many count, so no piece is sliced (a copy)
first. The backward (custom VJP) is plain XLA: the split of the concatenation's cotangent plus
the statistics' gradient. The model calls this only where the time is batch-shared (sampling) and
with ``model.pallas_ops`` 'feature_stats'; on CPU it runs in Pallas' interpret mode (tests).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from dimr_jax.models import pallas_util as pu

Array = jax.Array

EPS = 1e-5  # PixelShuffleUpsample's TD-LN (layers.layer_norm_stats' default)
_TILE_ELEMS = 4096  # elements per (bm, chunk) copy
_NUM_WARPS = 4


def _chunk(d: int) -> int:
  """Columns per copy: the largest power of two <= 128 dividing the piece width."""
  return pu.pow2_divisor(d, 128)


def _kernel(*refs, rows: int, d: int, chunk: int, eps: float):
  *x_refs, o_ref, mean_ref, inv_ref = refs
  bm = mean_ref.shape[0]
  total = d * len(x_refs)
  mask = pu.block_mask(rows, bm, (bm, chunk), 0, 0)
  zeros = jnp.zeros((bm,), jnp.float32)
  s1, s2 = zeros, zeros
  for l, x_ref in enumerate(x_refs):
    def body(j, carry, x_ref=x_ref, l=l):
      a1, a2 = carry
      start = pl.multiple_of(j * chunk, chunk)
      v = pu.load(x_ref.at[:, pl.ds(start, chunk)], mask)
      pu.store(o_ref.at[:, pl.ds(l * d + start, chunk)], v, mask)
      vf = v.astype(jnp.float32)
      return a1 + jnp.sum(vf, axis=1), a2 + jnp.sum(vf * vf, axis=1)

    s1, s2 = lax.fori_loop(0, d // chunk, body, (s1, s2))
  mean = s1 / total
  var = jnp.maximum(s2 / total - mean * mean, 0.0)
  rmask = pu.block_mask(rows, bm, (bm,), 0, 0)
  pu.store(mean_ref, mean, rmask)
  pu.store(inv_ref, lax.rsqrt(var + eps), rmask)


def _check(pieces: Sequence[Array], rows: int) -> int:
  if not pieces:
    raise ValueError("feature_stats: no pieces to concatenate")
  d, dt = pieces[0].shape[-1], pieces[0].dtype
  for p in pieces:
    if p.ndim != 2 or p.shape[1] != d or p.dtype != dt or p.shape[0] < rows:
      raise ValueError(f"feature_stats: every piece must be (>= {rows}, {d}) {dt}; got "
                       f"{[(q.shape, str(q.dtype)) for q in pieces]}")
  return d


def _call(pieces: tuple[Array, ...], rows: int, eps: float,
          interpret: bool) -> tuple[Array, Array, Array]:
  d = _check(pieces, rows)
  chunk = _chunk(d)
  bm = max(1, min(_TILE_ELEMS // chunk, pu.next_pow2(rows)))
  total = d * len(pieces)
  in_spec = pl.BlockSpec((bm, d), lambda i: (i, 0))
  return pl.pallas_call(
      functools.partial(_kernel, rows=rows, d=d, chunk=chunk, eps=eps),
      out_shape=(jax.ShapeDtypeStruct((rows, total), pieces[0].dtype),
                 jax.ShapeDtypeStruct((rows,), jnp.float32),
                 jax.ShapeDtypeStruct((rows,), jnp.float32)),
      grid=(pl.cdiv(rows, bm),), in_specs=[in_spec] * len(pieces),
      out_specs=(pl.BlockSpec((bm, total), lambda i: (i, 0)),
                 pl.BlockSpec((bm,), lambda i: (i,)), pl.BlockSpec((bm,), lambda i: (i,))),
      compiler_params=pu.compiler_params(_NUM_WARPS), interpret=interpret,
      name="feature_stats",
  )(*pieces)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _feature_stats(pieces, rows, eps, interpret, piece_rows):
  del piece_rows
  return _call(pieces, rows, eps, interpret)


def _fwd(pieces, rows, eps, interpret, piece_rows):
  del piece_rows
  cat, mean, inv = _call(pieces, rows, eps, interpret)
  return (cat, mean, inv), (cat, mean, inv)


def _bwd(rows, eps, interpret, piece_rows, res, g):
  """d/dx of (cat, mean, inv): the cotangent of cat, plus g_mean / D and, with
  inv = (E[x^2] - mean^2 + eps)^-1/2, d inv / dx = -inv^3 (x - mean) / D. Split back into the
  pieces; rows past ``rows`` get zeros."""
  del eps, interpret
  cat, mean, inv = res
  g_cat, g_mean, g_inv = g
  total = cat.shape[1]
  coef_x = (-g_inv * inv ** 3 / total)[:, None]
  const = (g_mean / total)[:, None] - coef_x * mean[:, None]
  dx = g_cat.astype(jnp.float32) + const + coef_x * cat.astype(jnp.float32)
  dx = dx.astype(cat.dtype)
  d = total // len(piece_rows)
  out = []
  for l, r in enumerate(piece_rows):
    dl = dx[:, l * d:(l + 1) * d]
    out.append(jnp.pad(dl, ((0, r - rows), (0, 0))) if r > rows else dl)
  return (tuple(out),)


_feature_stats.defvjp(_fwd, _bwd)


def feature_stats(pieces: Sequence[Array], rows: int | None = None, *, eps: float = EPS,
                  interpret: bool | None = None) -> tuple[Array, Array, Array]:
  """``(concatenate(pieces[:rows], -1), mean, 1/sqrt(var + eps))`` of every row, in one pass.

  Args:
    pieces: L arrays (R_l, d) of one dtype, R_l >= rows.
    rows: how many leading rows count (default: the first piece's).
    eps: added to the variance (the upsampler's TD-LN: 1e-5).
    interpret: Pallas interpret mode (default: on CPU).

  Returns:
    (rows, L*d) concatenation in the pieces' dtype, and (rows,) float32 mean and 1/std over its
    L*d channels, as ``layers.layer_norm_stats`` computes them.
  """
  pieces = tuple(pieces)
  rows = pieces[0].shape[0] if rows is None else rows
  interpret = pu.interpret_default() if interpret is None else interpret
  return _feature_stats(pieces, rows, eps, interpret, tuple(p.shape[0] for p in pieces))
