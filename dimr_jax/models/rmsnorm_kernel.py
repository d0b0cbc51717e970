"""The model's scaled RMSNorm as Pallas (Triton) kernels, with a custom VJP.

DiMR's TD-RMSNorm computes, per row of the last axis (float32 statistics, result in x's dtype)::

    y = (x / (sqrt(mean(x^2)) + 1e-8) * scale).astype(x.dtype)

with the eps added to the RMS outside the sqrt, as the official code does. ``x`` is (B, ..., d)
(tokens (B, L, d) or pixels (B, H, W, d)); its middle axes are flattened to N rows per sample.
``scale`` is float32 (B, d), one vector per sample because it depends on the sample's time, or
(1, d) when the whole batch shares one time (the samplers).

XLA's version (``impl="xla"``, the model's expression) is rematerialised with ``jax.checkpoint``
so that its float32 temporaries are not saved for the backward; the backward then recomputes the
forward's reduction and runs several fusions over x. These kernels do each direction in one pass
over HBM, with the row statistics kept in float32 registers:

* forward: one read of x, one write of y;
* backward: one read of x and of the cotangent g, one write of dx, plus per-program float32
  partial column sums of ``g * xhat`` (tiny: one row per program) that XLA sums to ``dscale``.

The only residuals are x and scale (no float32 copies), which is what the checkpoint buys the XLA
version, without its recomputation.

The gradient, with ``rms = sqrt(mean(x^2))``, ``r = 1 / (rms + eps)``, ``xhat = x * r`` and the
cotangent ``g`` (all per row, d = the row length)::

    dx     = r * (g*s) - x * (r^2 / (d * rms)) * sum_cols(g * s * x)
    dscale = sum over the rows of each sample of g * xhat

(d rms / d x = x / (d * rms) and d r / d rms = -r^2.) A zero row has rms = 0, where the second term
is 0/0; its limit is 0 (the sum vanishes with x) and the kernel uses that, where XLA's autodiff of
``sqrt`` at 0 gives NaN.

Triton blocks must have power-of-two sizes but d (960, 480, 1152, 576, 1920) is not one, so a
(bm, dpad) tile with dpad = next_pow2(d) is loaded with a column mask; Pallas' Triton lowering
does not mask partial blocks itself, so rows past N (when bm does not divide N) are masked too.
On CPU the kernels run in Pallas interpret mode, which is how the tests check them.

Measured on an H100 (benchmarks/NOTES.md row 23): faster than XLA's norm on their own (fwd+bwd
0.335 -> 0.196 ms at (64, 1024, 480)), but slower inside the model, where XLA fuses the norm with
the residual add before it and a custom call cannot be fused: the model uses them only when asked
(``model.pallas_ops='rmsnorm'``).

Hence a backward-only variant, :func:`scaled_rms_norm_tap` (``model.pallas_ops='rmsnorm_bwd'``):
its forward is the XLA expression (not rematerialised: the custom VJP saves x and scale only), so
XLA still fuses it with the residual add; its backward is the kernel above. It also returns x
itself, so that a pre-norm block ``x + f(norm(x))`` hands it the residual stream's gradient too:
the kernel adds that to dx in float32 before its one store (``dx = g_res + r*(g*s) - x*proj``)
instead of XLA adding the two bf16 gradients in another pass over HBM. On its own it beats
XLA's (fwd+bwd 0.334 -> 0.277 ms at (128, 264, 960)); in the XL/2R b128 train step it measured
slower, 344.1 vs 374.4 img/s in one call (214.4 in another): the GEMMs around it changed and ran
slower, not the clock (benchmarks/NOTES.md rows 32-33; cause not found): opt-in only.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from dimr_jax.models import pallas_util as pu

Array = jax.Array

EPS = 1e-8  # added to the RMS, outside the sqrt (official DiMR)
_BLOCK_ELEMS = 8192  # default elements per (bm, dpad) tile
# The tapped backward's defaults: 4096-element tiles, 2 warps. Fastest or near it at both XL
# shapes on an H100 (benchmarks/rmsnorm.py --tap, results/h100_rmsnorm_tap_2026-11-25.txt):
# (128, 264, 960) fwd+bwd 0.344 ms at the old default (8 rows, 8 warps) -> 0.277; (128, 1024, 480)
# 0.603 -> 0.499 (XLA: 0.334 and 0.595).
_TAP_BLOCK_ELEMS, _TAP_WARPS = 4096, 2
# A block dimension squeezed out of the kernel's refs (the sample axis); older jax spells it None.
_SQUEEZED = getattr(pl, "squeezed", None)


# ------------------------------------------------------------------------------------------------
# XLA: the model's expression (layers.py uses these two for its RMS norms).


def rms_normalize(x: Array) -> Array:
  """x / (||x||_2 / sqrt(d) + 1e-8), eps added to the RMS (outside the sqrt) as the official code."""
  xf = x.astype(jnp.float32)
  rms = jnp.sqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True))
  return xf / (rms + EPS)


def _scaled(x: Array, scale: Array) -> Array:
  return (rms_normalize(x) * scale).astype(x.dtype)


# Rematerialised as in the model: its float32 intermediates would otherwise be saved for the
# backward pass.
@jax.named_scope("norm")
@jax.checkpoint
def scaled_rms_norm_xla(x: Array, scale: Array) -> Array:
  """(rms_normalize(x) * scale) in x.dtype, scale broadcastable to x (rematerialised)."""
  return _scaled(x, scale)


def _bcast(v: Array, x: Array) -> Array:
  """(B, C) -> (B, 1, ..., 1, C) to broadcast against x of rank >= 2."""
  return v.reshape(v.shape[:1] + (1,) * (x.ndim - 2) + v.shape[1:])


# ------------------------------------------------------------------------------------------------
# Pallas.


class _Config(NamedTuple):
  """Static launch parameters (hashable: a nondiff argument of the custom VJP)."""
  bm: int  # rows per forward tile
  bm_bwd: int  # rows per backward tile
  num_warps: int
  num_stages: int
  interpret: bool


def _tile_mask(rows: int, d: int, bm: int, dpad: int) -> Array | None:
  """Elements of this program's (bm, dpad) tile that exist (None when the tile is all inside).

  Columns >= d are the padding up to a power of two; rows >= N exist only in the last row block
  when bm does not divide N. Pallas' Triton lowering masks neither, and the masked-off elements
  must load as 0 so that they add nothing to the row and column sums.
  """
  mask = pu.row_mask(rows, bm, dpad)
  if dpad != d:
    cols = lax.broadcasted_iota(jnp.int32, (bm, dpad), 1) < d
    mask = cols if mask is None else mask & cols
  return mask


def _load_scale(s_ref, d: int) -> Array:
  """The (1, dpad) scale row of this program's sample, 0 in the padding columns, float32."""
  dpad = s_ref.shape[-1]
  mask = None if dpad == d else lax.broadcasted_iota(jnp.int32, (1, dpad), 1) < d
  return pu.load(s_ref, mask).astype(jnp.float32)


def _row_stats(x: Array, d: int) -> tuple[Array, Array]:
  """(rms, rms + eps) of each row of a float32 (bm, dpad) tile, as (bm, 1); padding loads as 0."""
  rms = jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True) / d)
  return rms, rms + EPS


def _fwd_kernel(x_ref, s_ref, y_ref, *, rows: int, d: int):
  """y = x / (rms + eps) * s on one (bm, dpad) tile of one sample."""
  bm, dpad = y_ref.shape
  mask = _tile_mask(rows, d, bm, dpad)
  x = pu.load(x_ref, mask).astype(jnp.float32)
  _, denom = _row_stats(x, d)
  # A division (not a reciprocal times x) as XLA's expression, so float32 results agree closely.
  y = x / denom * _load_scale(s_ref, d)
  pu.store(y_ref, y.astype(y_ref.dtype), mask)


def _bwd_kernel(x_ref, s_ref, g_ref, *refs, rows: int, d: int):
  """dx of one tile (module docstring) and the tile's column sums of g * xhat into ds_ref.

  ``refs`` is (dx_ref, ds_ref), or (res_ref, dx_ref, ds_ref) when a residual gradient is added to
  dx (in float32, before the one store). ds_ref is this program's (1, dpad) row of the float32
  partial sums; the padding columns hold 0 (x and g load as 0 there), so it is stored unmasked and
  sliced off outside.
  """
  *res, dx_ref, ds_ref = refs
  bm, dpad = dx_ref.shape
  mask = _tile_mask(rows, d, bm, dpad)
  x = pu.load(x_ref, mask).astype(jnp.float32)
  g = pu.load(g_ref, mask).astype(jnp.float32)
  s = _load_scale(s_ref, d)
  rms, denom = _row_stats(x, d)
  r = 1.0 / denom
  gs = g * s
  # r^2 / (d rms) * sum(g s x); the limit for a zero row (rms = 0, so x = 0 and the sum = 0) is 0.
  coef = jnp.where(rms > 0.0, r * r / (d * jnp.where(rms > 0.0, rms, 1.0)), 0.0)
  proj = jnp.sum(gs * x, axis=1, keepdims=True) * coef
  dx = r * gs - x * proj
  if res:
    dx = pu.load(res[0], mask).astype(jnp.float32) + dx
  pu.store(dx_ref, dx.astype(dx_ref.dtype), mask)
  ds_ref[...] = jnp.sum(g * (x / denom), axis=0, keepdims=True)


def _specs(n_scale: int, dpad: int, bm: int):
  """Blocks of the (B, N, d) views: a (bm, dpad) tile of sample b, and sample b's scale row."""
  tile = pl.BlockSpec((_SQUEEZED, bm, dpad), lambda b, i: (b, i, 0))
  if n_scale == 1:
    scale = pl.BlockSpec((1, dpad), lambda b, i: (0, 0))
  else:
    scale = pl.BlockSpec((1, dpad), lambda b, i: (b, 0))
  return tile, scale


def _fwd_call(x: Array, scale: Array, cfg: _Config) -> Array:
  batch, rows, d = x.shape
  dpad = pu.next_pow2(d)
  tile, sspec = _specs(scale.shape[0], dpad, cfg.bm)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, rows=rows, d=d),
      out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
      grid=(batch, pl.cdiv(rows, cfg.bm)), in_specs=[tile, sspec], out_specs=tile,
      compiler_params=pu.compiler_params(cfg.num_warps, cfg.num_stages),
      interpret=cfg.interpret, name="rmsnorm_fwd",
  )(x, scale)


def _bwd_call(x: Array, scale: Array, g: Array, cfg: _Config,
              g_res: Array | None = None) -> tuple[Array, Array]:
  """(dx, dscale) of (B, N, d) x for the cotangent g. ``g_res`` (x's shape), if given, is added to
  dx in the kernel: the gradient of a residual stream that x also feeds."""
  batch, rows, d = x.shape
  dpad = pu.next_pow2(d)
  tile, sspec = _specs(scale.shape[0], dpad, cfg.bm_bwd)
  nblk = pl.cdiv(rows, cfg.bm_bwd)
  part = pl.BlockSpec((_SQUEEZED, 1, dpad), lambda b, i: (b, i, 0))
  extra = () if g_res is None else (g_res.astype(x.dtype),)
  dx, partial_ds = pl.pallas_call(
      functools.partial(_bwd_kernel, rows=rows, d=d),
      out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype),
                 jax.ShapeDtypeStruct((batch, nblk, dpad), jnp.float32)),
      grid=(batch, nblk), in_specs=[tile, sspec, tile] + [tile] * len(extra),
      out_specs=(tile, part),
      compiler_params=pu.compiler_params(cfg.num_warps, cfg.num_stages),
      interpret=cfg.interpret, name="rmsnorm_bwd",
  )(x, scale, g.astype(x.dtype), *extra)
  ds = jnp.sum(partial_ds[:, :, :d], axis=1)  # (B, d)
  if scale.shape[0] == 1:
    ds = jnp.sum(ds, axis=0, keepdims=True)
  return dx, ds.astype(scale.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm_pallas(x: Array, scale: Array, cfg: _Config) -> Array:
  return _fwd_call(x, scale, cfg)


def _rms_norm_pallas_fwd(x: Array, scale: Array, cfg: _Config):
  return _fwd_call(x, scale, cfg), (x, scale)


def _rms_norm_pallas_bwd(cfg: _Config, res, g: Array):
  x, scale = res
  return _bwd_call(x, scale, g, cfg)


_rms_norm_pallas.defvjp(_rms_norm_pallas_fwd, _rms_norm_pallas_bwd)


# The backward-only variant: XLA's forward (fusible with the residual add), the Pallas backward.


def _rows_view(a: Array) -> Array:
  """(B, ..., d) -> (B, N, d), the kernels' layout."""
  return a.reshape(a.shape[0], -1, a.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm_tap(x: Array, scale: Array, cfg: _Config) -> tuple[Array, Array]:
  return x, _scaled(x, _bcast(scale, x))


def _rms_norm_tap_fwd(x: Array, scale: Array, cfg: _Config):
  return _rms_norm_tap(x, scale, cfg), (x, scale)


def _rms_norm_tap_bwd(cfg: _Config, res, cts):
  x, scale = res
  g_x, g_y = cts
  dx, ds = _bwd_call(_rows_view(x), scale, _rows_view(g_y), cfg, g_res=_rows_view(g_x))
  return dx.reshape(x.shape), ds


_rms_norm_tap.defvjp(_rms_norm_tap_fwd, _rms_norm_tap_bwd)


def _check_scale(x: Array, scale: Array) -> None:
  if x.ndim < 2:
    raise ValueError(f"scaled_rms_norm: x must be (B, ..., d), got shape {x.shape}")
  batch, d = x.shape[0], x.shape[-1]
  if scale.ndim != 2 or scale.shape[1] != d or scale.shape[0] not in (1, batch):
    raise ValueError(f"scaled_rms_norm: scale {scale.shape} does not fit x {x.shape} "
                     f"(want ({batch}, {d}) per sample or (1, {d}) shared)")


def _config(x: Array, bm: int | None, bm_bwd: int | None, num_warps: int, num_stages: int,
            interpret: bool | None) -> _Config:
  """The kernels' launch parameters for x (defaults: :func:`scaled_rms_norm`)."""
  for name, b in (("bm", bm), ("bm_bwd", bm_bwd)):
    if b is not None and (b <= 0 or b & (b - 1)):
      raise ValueError(f"{name} must be a power of two, got {b}")
  rows = math.prod(x.shape[1:-1])
  if interpret is None:
    interpret = pu.interpret_default()
  if bm is None:
    bm = max(1, _BLOCK_ELEMS // pu.next_pow2(x.shape[-1]))
  bm_bwd = bm if bm_bwd is None else bm_bwd
  return _Config(bm=min(bm, pu.next_pow2(rows)), bm_bwd=min(bm_bwd, pu.next_pow2(rows)),
                 num_warps=num_warps, num_stages=num_stages, interpret=bool(interpret))


@jax.named_scope("norm")
def scaled_rms_norm_tap(x: Array, scale: Array, *, bm: int | None = None,
                        bm_bwd: int | None = None, num_warps: int = _TAP_WARPS,
                        num_stages: int = 1, interpret: bool | None = None
                        ) -> tuple[Array, Array]:
  """``(x, scaled_rms_norm_xla(x, scale))`` with the Pallas backward, for ``x + f(norm(x))``.

  The forward is XLA's expression (XLA fuses it with whatever produced x, typically the residual
  add), without jax.checkpoint: the custom VJP saves only x and scale. The backward takes the
  cotangents (g_x, g_y) of both outputs and returns ``(g_x + dx, dscale)`` from one kernel launch,
  the residual-stream gradient g_x added to the norm's dx in float32 inside the kernel. A caller
  computes ``x, xn = scaled_rms_norm_tap(x, scale)`` and then ``x + f(xn)``, so that g_x is the
  gradient of that add.

  Arguments as :func:`scaled_rms_norm`; bm matters only as the default of bm_bwd (the forward is
  XLA's), which here defaults to 4096 // dpad rows with 2 warps (measured, see _TAP_BLOCK_ELEMS).
  """
  _check_scale(x, scale)
  if bm is None and bm_bwd is None:
    bm_bwd = max(1, _TAP_BLOCK_ELEMS // pu.next_pow2(x.shape[-1]))
  cfg = _config(x, bm, bm_bwd, num_warps, num_stages, interpret)
  if x.size == 0:
    return x, jnp.zeros(x.shape, x.dtype)
  return _rms_norm_tap(x, scale, cfg)


def scaled_rms_norm(x: Array, scale: Array, *, impl: str = "xla", bm: int | None = None,
                    bm_bwd: int | None = None, num_warps: int | None = None, num_stages: int = 1,
                    interpret: bool | None = None) -> Array:
  """``(x_f32 / (sqrt(mean(x_f32^2, -1)) + 1e-8) * scale).astype(x.dtype)``.

  Args:
    x: (B, ..., d), any float dtype (bf16 in the model); the middle axes are N rows per sample.
    scale: (B, d) per-sample scale (time-dependent) or (1, d) shared by the batch; float32.
    impl: "xla": the model's expression (what layers.py runs, including its
      jax.checkpoint). "pallas": the Triton kernels of this module with a Pallas backward through a
      custom VJP whose residuals are x and scale only. "pallas_bwd": XLA's forward with the Pallas
      backward (:func:`scaled_rms_norm_tap` without its x output).
    bm: rows per tile, a power of two; default _BLOCK_ELEMS // dpad (dpad = d rounded up to a power
      of two): 8 for d = 960 (dpad 1024), 16 for 480, 4 for 1152/1920 (dpad 2048). Reduced to N
      rounded up to a power of two when N is smaller.
    bm_bwd: rows per backward tile (default: bm). Each backward program writes one float32 row of
      dscale partial sums, 4 * dpad bytes per bm_bwd * d elements of x, written and then read back
      by XLA's sum: ~ (8 / (6 * bm_bwd)) * (dpad / d) of the backward's own traffic (read x and g,
      write dx, bf16): 18% at bm_bwd = 8 and d = 960, 4.5% at 32, so a larger backward tile may
      pay if it does not spill registers (benchmarks/rmsnorm.py --tune).
    num_warps, num_stages: Triton launch parameters (num_stages is moot: the kernels have no loop);
      num_warps defaults to 8, or to the tap's tuned default for "pallas_bwd".
    interpret: Pallas interpret mode; default: on when the default backend is the CPU.
  """
  if impl == "pallas_bwd":  # the tap's own defaults unless given
    kw = {} if num_warps is None else {"num_warps": num_warps}
    return scaled_rms_norm_tap(x, scale, bm=bm, bm_bwd=bm_bwd, num_stages=num_stages,
                               interpret=interpret, **kw)[1]
  kernel_kw = dict(bm=bm, bm_bwd=bm_bwd, num_warps=8 if num_warps is None else num_warps,
                   num_stages=num_stages, interpret=interpret)
  _check_scale(x, scale)
  if impl == "xla":
    return scaled_rms_norm_xla(x, _bcast(scale, x))
  if impl != "pallas":
    raise ValueError(f"unknown scaled_rms_norm impl {impl!r} "
                     "(expected 'xla', 'pallas' or 'pallas_bwd')")
  cfg = _config(x, **kernel_kw)
  if x.size == 0:
    return jnp.zeros(x.shape, x.dtype)
  return _rms_norm_pallas(_rows_view(x), scale, cfg).reshape(x.shape)
