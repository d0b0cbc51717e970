"""GEGLU's elementwise pass ``gelu_exact(h0) * h1`` as Pallas (Triton) kernels, with a custom VJP.

The GEGLU MLP computes ``h01 = x @ [W0|W1] + b`` as one GEMM and then ``gelu(h0) * h1`` on the two
halves. On an H100 XLA's fused elementwise pass for that runs at ~1.2-1.6 TB/s (a (66000, 2x1920)
bf16 ``h01``: 0.657 ms forward, 1.141 ms forward+backward; benchmarks/geglu.py), about half of
memory speed. These kernels read each half once as a (bm, bh) tile, do the math in float32
registers and write the result once:

* forward: ``out = gelu(h0) * h1`` (..., H) from ``h01`` (..., 2H), the GEMM's bias added here
  (the model runs the GEMM without it: XLA had fused that add into its own gelu*mul pass, and as a
  pass of its own it cost more than the kernel saved; benchmarks/NOTES.md rows 19-20);
* backward: ``dh01 = [g * h1 * gelu'(h0), g * gelu(h0)]`` from ``h01`` and the cotangent ``g``
  (the residuals are ``h01``, which the GEMM produced anyway, and the bias), plus per-row-block
  column sums of ``dh01`` that XLA adds up to the bias gradient.

``h01`` is viewed as (M, 2, H) (a free reshape), so a (bm, 2, bh) block holds the matching column
tiles of both halves: no ``h0``/``h1`` copies are made, and the backward writes both halves of
``dh01`` in place of a concatenation.

Pallas' Triton lowering has no ``erf``, so the normal CDF is written out here from exp, a division
and a polynomial (:func:`normal_cdf`). It is built on ``erfc`` rather than ``erf`` (as
``jax.nn.gelu`` itself is: ``x/2 * erfc(-x/sqrt2)``), so ``gelu`` of negative inputs keeps its
relative accuracy far into the tail instead of cancelling in ``1 + erf``, and the backward reuses
its ``exp(-x^2/2)`` for the normal pdf.

``impl="xla"`` is the model's original expression, unchanged (bit-identical to it); on CPU the
Pallas kernels run in interpret mode, which is how the tests check them.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from dimr_jax.models import pallas_util as pu

Array = jax.Array

# erfc(a) = t * P(t) * exp(-a^2) for a >= 0, with t = 1 / (1 + _P * a) in (0, 1]. t * P(t) is a fit
# of the scaled complementary error function erfcx(a) = exp(a^2) erfc(a); in t it is smooth on the
# whole closed interval (erfcx(a) ~ 1/(a sqrt(pi)) as a -> inf, t -> 0), so one polynomial covers
# [0, inf) with no range split and no clamp. Fitted for this file (Chebyshev basis, Lawson-weighted
# least squares towards the minimax relative error, 20k Chebyshev points in t, then _P scanned):
# the relative error of t*P(t) against erfcx is 3.3e-8 with these float32-rounded coefficients,
# below float32's rounding, so the float32 evaluation error (a few ulp) is what is left; see the
# tests.
_P = 0.356
_ERFCX_POLY = (  # P(t) = sum_k c_k t^k, c_0 first; c_0 = _P / sqrt(pi) is the t -> 0 limit.
    2.0085148645e-01,
    2.0085287245e-01,
    1.8806528503e-01,
    1.6362347745e-01,
    1.1910472441e-01,
    1.2181329243e-01,
    -5.4519867013e-02,
    1.7786305317e-01,
    -1.5723542186e-01,
    3.9581100405e-02,
)
# The same in the variable x = a * sqrt(2) of the normal CDF, with its factor 1/2 folded in:
# Phi(-|x|) = erfc(|x|/sqrt2)/2 = t * (P(t)/2) * exp(-x^2/2), t = 1 / (1 + (_P/sqrt2) |x|).
_P_X = _P / math.sqrt(2.0)
_HALF_POLY = tuple(0.5 * c for c in _ERFCX_POLY)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _horner(coeffs: tuple[float, ...], t: Array) -> Array:
  acc = coeffs[-1] * t + coeffs[-2]
  for c in reversed(coeffs[:-2]):
    acc = acc * t + c
  return acc


def erfc_nonneg(a: Array) -> Array:
  """erfc(a) for a >= 0 (float32), with small relative error also in the tail (see _ERFCX_POLY)."""
  t = 1.0 / (1.0 + _P * a)
  return t * _horner(_ERFCX_POLY, t) * jnp.exp(-a * a)


def erf(x: Array) -> Array:
  """float32 erf from ops the Triton lowering has (abs, div, exp, mul/add, select).

  Max abs error 3.8e-7 against float64 on a dense grid over [-10, 10] (a few float32 ulp of 1;
  jax's own float32 erf on CPU: 3.1e-7); it is ``1 - erfc``, so near 0 the error is absolute, not
  relative. The kernels use :func:`normal_cdf` directly; this is the same approximation in erf's
  variable, for tests.
  """
  e = erfc_nonneg(jnp.abs(x))
  return jnp.where(x < 0, e - 1.0, 1.0 - e)


def normal_cdf(x: Array) -> tuple[Array, Array]:
  """(Phi(x), exp(-x^2/2)) in float32: the standard normal CDF and the pdf's unnormalised exp.

  Phi(-|x|) is the small side, computed directly (relative error <= 4e-6 measured down to
  x = -12.5, 1.2e-6 for |x| < 8; jax's erfc-based CDF: 1.5e-5), and Phi(|x|) = 1 - Phi(-|x|)
  (absolute error <= 2.2e-7). The exp is returned because gelu's derivative needs
  the pdf, exp(-x^2/2) / sqrt(2 pi), and it is the same exp.
  """
  t = 1.0 / (1.0 + _P_X * jnp.abs(x))
  ex = jnp.exp(-0.5 * x * x)
  tail = t * _horner(_HALF_POLY, t) * ex
  return jnp.where(x < 0, tail, 1.0 - tail), ex


def gelu_f32(x: Array) -> Array:
  """Exact (erf) GELU, x * Phi(x), of a float32 array with this file's Phi."""
  return x * normal_cdf(x)[0]


_BLOCK_ELEMS = 8192  # default elements per (bm, bh) half-block


class _Config(NamedTuple):
  """Static launch parameters (hashable: a nondiff argument of the custom VJP)."""
  bm: int
  bh: int
  num_warps: int
  num_stages: int
  interpret: bool


# The two halves' indices in the (bm, 2, bh) block. numpy scalars, not Python ints: jax 0.10's
# interpret-mode discharge of a masked load/store needs every index to have a .shape.
I0, I1 = np.int32(0), np.int32(1)


def add_bias(h0: Array, h1: Array, b_ref, dtype) -> tuple[Array, Array]:
  """Both GEMM-output halves plus their bias columns (row ``I0``/``I1`` of a (2, bh) bias
  block), as the GEMM+bias would give them: the sum rounded to the compute dtype (what XLA's path
  feeds gelu), then float32."""
  def one(h, i):
    b = b_ref[i, :].astype(jnp.float32)[None, :]
    return (h.astype(jnp.float32) + b).astype(dtype).astype(jnp.float32)
  return one(h0, I0), one(h1, I1)


def _halves(h_ref, b_ref, mask, dtype):
  """The two halves of a (bm, 2, bh) block with their bias added (:func:`add_bias`)."""
  return add_bias(pu.load(h_ref.at[:, I0, :], mask), pu.load(h_ref.at[:, I1, :], mask), b_ref,
                  dtype)


def _fwd_kernel(h_ref, b_ref, o_ref, *, rows: int):
  """o = gelu(h[:, 0] + b[0]) * (h[:, 1] + b[1]) on a (bm, 2, bh) block of the (M, 2, H) view."""
  bm, bh = o_ref.shape
  mask = pu.row_mask(rows, bm, bh)
  h0, h1 = _halves(h_ref, b_ref, mask, o_ref.dtype)
  pu.store(o_ref, (gelu_f32(h0) * h1).astype(o_ref.dtype), mask)


def _bwd_kernel(h_ref, b_ref, g_ref, o_ref, db_ref, *, rows: int):
  """o[:, 0] = g * h1 * gelu'(h0), o[:, 1] = g * gelu(h0); gelu'(x) = Phi(x) + x * pdf(x).

  Also this block's column sums of both halves (the bias gradient's partial sums, float32), so
  the bias gradient needs no second read of dh01. Masked rows load as zero and add nothing.
  """
  bm, bh = g_ref.shape
  mask = pu.row_mask(rows, bm, bh)
  h0, h1 = _halves(h_ref, b_ref, mask, o_ref.dtype)
  g = pu.load(g_ref, mask).astype(jnp.float32)
  cdf, ex = normal_cdf(h0)
  dgelu = cdf + h0 * ex * _INV_SQRT_2PI
  d0, d1 = g * h1 * dgelu, g * (h0 * cdf)
  pu.store(o_ref.at[:, I0, :], d0.astype(o_ref.dtype), mask)
  pu.store(o_ref.at[:, I1, :], d1.astype(o_ref.dtype), mask)
  db_ref[0, I0, :] = jnp.sum(d0, axis=0)
  db_ref[0, I1, :] = jnp.sum(d1, axis=0)


def _blocks(rows: int, hidden: int, cfg: _Config):
  """Grid and block specs; column blocks vary fastest so neighbouring programs share rows."""
  grid = (hidden // cfg.bh, pl.cdiv(rows, cfg.bm))
  pair = pl.BlockSpec((cfg.bm, 2, cfg.bh), lambda j, i: (i, 0, j))
  half = pl.BlockSpec((cfg.bm, cfg.bh), lambda j, i: (i, j))
  bias = pl.BlockSpec((2, cfg.bh), lambda j, i: (0, j))
  return grid, pair, half, bias


def _fwd_call(h01: Array, b01: Array, cfg: _Config) -> Array:
  rows, hidden = h01.shape[0], h01.shape[1] // 2
  grid, pair, half, bias = _blocks(rows, hidden, cfg)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, rows=rows),
      out_shape=jax.ShapeDtypeStruct((rows, hidden), h01.dtype),
      grid=grid, in_specs=[pair, bias], out_specs=half,
      compiler_params=pu.compiler_params(cfg.num_warps, cfg.num_stages),
      interpret=cfg.interpret, name="geglu_fwd",
  )(h01.reshape(rows, 2, hidden), b01.reshape(2, hidden))


def _bwd_call(h01: Array, b01: Array, g: Array, cfg: _Config) -> tuple[Array, Array]:
  """(dh01, dbias): dbias from the kernel's per-row-block column sums, summed here."""
  rows, hidden = h01.shape[0], h01.shape[1] // 2
  grid, pair, half, bias = _blocks(rows, hidden, cfg)
  partial = pl.BlockSpec((1, 2, cfg.bh), lambda j, i: (i, 0, j))
  dh, db = pl.pallas_call(
      functools.partial(_bwd_kernel, rows=rows),
      out_shape=(jax.ShapeDtypeStruct((rows, 2, hidden), h01.dtype),
                 jax.ShapeDtypeStruct((grid[1], 2, hidden), jnp.float32)),
      grid=grid, in_specs=[pair, bias, half], out_specs=(pair, partial),
      compiler_params=pu.compiler_params(cfg.num_warps, cfg.num_stages),
      interpret=cfg.interpret, name="geglu_bwd",
  )(h01.reshape(rows, 2, hidden), b01.reshape(2, hidden), g.astype(h01.dtype))
  return dh.reshape(rows, 2 * hidden), jnp.sum(db, axis=0).reshape(2 * hidden)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _geglu_pallas(h01: Array, b01: Array, cfg: _Config) -> Array:
  return _fwd_call(h01, b01, cfg)


def _geglu_pallas_fwd(h01: Array, b01: Array, cfg: _Config):
  return _fwd_call(h01, b01, cfg), (h01, b01)


def _geglu_pallas_bwd(cfg: _Config, res, g: Array):
  h01, b01 = res
  dh, db = _bwd_call(h01, b01, g, cfg)
  return dh, db.astype(b01.dtype)


_geglu_pallas.defvjp(_geglu_pallas_fwd, _geglu_pallas_bwd)


def geglu(h01: Array, bias: Array | None = None, *, impl: str = "xla", bm: int | None = None,
          bh: int = 256, num_warps: int = 8, num_stages: int = 1,
          interpret: bool | None = None) -> Array:
  """``gelu_exact(h0) * h1`` for ``h0, h1 = split(h01 + bias, 2, axis=-1)``: (..., 2H) -> (..., H).

  Args:
    h01: the w0|w1 GEMM output, any float dtype; the result has its dtype.
    bias: optional (2H,) bias of that GEMM. The Pallas kernels add it themselves (one pass over
      h01 instead of a GEMM epilogue or a separate add), rounding h01 + bias to h01.dtype first
      exactly as ``(h01 + bias).astype(dtype)`` would; its gradient is the row sum of dh01.
    impl: "xla": the model's original jnp expression (bf16 arrays go straight into jax.nn.gelu).
      "pallas": the Triton kernels above, float32 math rounded once to h01.dtype, with a Pallas
      backward through a custom VJP.
    bm: rows per block, a power of two; default: _BLOCK_ELEMS // (the column block), i.e. 8192
      elements per half-block, 32 per thread and operand at 8 warps (so the float32 temporaries
      stay in registers). Reduced to M rounded up to a power of two when M is smaller.
    bh: the largest column block; the one used is the largest power of two <= bh dividing H
      (Triton needs power-of-two blocks: H = 1920 gets 128, 2304 gets 256, 960 gets 64).
    num_warps, num_stages: Triton launch parameters (num_stages is moot: the kernels have no loop).
    interpret: Pallas interpret mode; default: on when the default backend is the CPU.
  """
  if bias is not None and bias.shape != (h01.shape[-1],):
    raise ValueError(f"geglu: bias {bias.shape} does not fit h01 {h01.shape} (want (2H,))")
  if impl == "xla":
    if bias is not None:
      h01 = (h01 + bias.astype(h01.dtype)).astype(h01.dtype)
    h0, h1 = jnp.split(h01, 2, axis=-1)
    return jax.nn.gelu(h0, approximate=False) * h1
  if impl != "pallas":
    raise ValueError(f"unknown geglu impl {impl!r} (expected 'xla' or 'pallas')")
  if h01.shape[-1] % 2:
    raise ValueError(f"geglu needs an even last dimension, got {h01.shape}")
  if bm is not None and (bm <= 0 or bm & (bm - 1)):
    raise ValueError(f"bm must be a power of two, got {bm}")
  lead, hidden = h01.shape[:-1], h01.shape[-1] // 2
  rows = math.prod(lead)
  if rows == 0 or hidden == 0:
    return jnp.zeros((*lead, hidden), h01.dtype)
  cfg = _config(rows, hidden, bm, bh, num_warps, num_stages, interpret)
  b01 = jnp.zeros((2 * hidden,), h01.dtype) if bias is None else bias.astype(h01.dtype)
  out = _geglu_pallas(h01.reshape(rows, 2 * hidden), b01, cfg)
  return out.reshape(*lead, hidden)


def _config(rows: int, hidden: int, bm: int | None, bh: int, num_warps: int, num_stages: int,
            interpret: bool | None) -> _Config:
  if interpret is None:
    interpret = pu.interpret_default()
  bh = pu.pow2_divisor(hidden, bh)
  if bm is None:
    bm = min(max(_BLOCK_ELEMS // bh, 16), 1024)
  return _Config(bm=min(bm, pu.next_pow2(rows)), bh=bh, num_warps=num_warps, num_stages=num_stages,
                 interpret=bool(interpret))


def geglu_backward(h01: Array, b01: Array, g: Array, *,
                   interpret: bool | None = None) -> tuple[Array, Array]:
  """(dh01, dbias) of :func:`geglu` (Pallas) at (M, 2H) ``h01`` and (2H,) bias for cotangent ``g``;
  the backward of kernels that produce ``h01`` themselves (``geglu_gemm_kernel``)."""
  rows, hidden = h01.shape[0], h01.shape[1] // 2
  cfg = _config(rows, hidden, None, 256, 8, 1, interpret)
  return _bwd_call(h01, b01.astype(h01.dtype), g, cfg)


def geglu_gemm_backward(x: Array, w01: Array, b01: Array, h01: Array, g: Array, *,
                        interpret: bool | None = None) -> tuple[Array, Array, Array]:
  """(dx, dw01, db01) of ``geglu(x @ w01 + b01)`` from the GEMM's (M, 2H) output ``h01`` (without
  the bias) and the cotangent ``g``: :func:`geglu_backward`, then the two GEMMs. The backward of
  the kernels that fuse the GEMM with the GEGLU (``geglu_gemm_kernel``, ``geglu_gemm_mgpu``)."""
  dh01, db = geglu_backward(h01, b01, g, interpret=interpret)
  acc = jnp.float32
  dx = jnp.matmul(dh01, w01.T, preferred_element_type=acc).astype(x.dtype)
  dw = jnp.matmul(x.T, dh01, preferred_element_type=acc).astype(w01.dtype)
  return dx, dw, db.astype(b01.dtype)
