"""Depthwise k x k convolution + bias + residual as Pallas (Triton) kernels, with a custom VJP.

DiMR's ConvNeXt block starts with ``x + dwconv(x) + b`` (7x7, one channel per group, 'SAME').
cuDNN's depthwise convolution runs far below memory speed on an H100 (~0.9 ms per launch inside a
DiMR-XL sampling step for a (250, 32, 32, 480) bf16 tensor that a memory-speed pass would move in
~0.2 ms; ~8% of the step). These kernels compute the op as k*k shifted multiply-adds in float32
registers, reading each shifted tile through the cache, and fold the residual and the bias in.
Measured, they are no faster: 1.20 ms at the best tiling vs 1.31 ms for XLA's conv + adds on
their own, slower inside the model (benchmarks/NOTES.md row 22), so the model uses them only when
asked (``model.pallas_ops='dwconv'``). They are kept, tested, as the starting point of a kernel
that reuses its input tile from shared memory.

* forward ``y = x + b + dwconv(x, w)``: one program per (image, row tile, channel block); the input
  is zero-padded by k//2 once (one XLA pad), so every tap is a plain non-negative slice and no
  load needs a mask. The residual is the centre tap.
* input gradient ``dx = g + dwconv(g, w[::-1, ::-1])``: the same kernel (a correlation's adjoint is
  the correlation with the flipped kernel), bias zero.
* weight/bias gradients: one program per (image, channel block) accumulates, for every tap, the
  sum over the image of ``xpad_shifted * g`` in float32; the per-image partials are summed by XLA.

Tilings Triton accepts: :func:`supported`. The model's float32 path always keeps
``lax.conv_general_dilated``, which the fixture-equivalence tests pin. On CPU they run in Pallas'
interpret mode, which is how the tests check them against the XLA convolution.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dimr_jax.models import pallas_util as pu

Array = jax.Array


def _is_pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def supported(x_shape: tuple[int, ...], kernel_size: int) -> bool:
  """Triton blocks need power-of-two extents: the image width, a row tile, a channel block >= 8."""
  _, h, w, c = x_shape
  return (kernel_size % 2 == 1 and _is_pow2(w) and pu.pow2_divisor(h, 8) >= 2
          and pu.pow2_divisor(c, 64) >= 8)


def _conv_kernel(xp_ref, w_ref, b_ref, o_ref, *, k: int, th: int, bc: int):
  """o[b, rows, :, cblk] = xp[centre] + bias + sum_ij w[i, j] * xp[b, rows + i, j:j + W, cblk].

  Each padded input row of the tile's window is loaded k times (once per column shift) and used
  for every kernel row it meets, so a tile of th output rows does (th + k - 1) * k loads instead
  of th * k * k; the th accumulators stay in registers.
  """
  b, r, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  width = o_ref.shape[2]
  row0, cs = r * th, pl.ds(c * bc, bc)
  p = k // 2
  taps = [[w_ref[i, j, cs].astype(jnp.float32) for j in range(k)] for i in range(k)]
  bias = b_ref[cs].astype(jnp.float32)
  accs = [None] * th
  for hr in range(th + k - 1):          # padded input row row0 + hr
    for j in range(k):
      xv = xp_ref[b, row0 + hr, pl.ds(j, width), cs].astype(jnp.float32)  # (W, bc)
      for i in range(k):
        o = hr - i                      # the output row (within the tile) this tap feeds
        if not 0 <= o < th:
          continue
        term = xv * taps[i][j]
        if i == p and j == p:
          term = term + xv              # the residual: the centre tap is x itself
        accs[o] = term + bias if accs[o] is None else accs[o] + term
  for o in range(th):
    o_ref[b, row0 + o, :, cs] = accs[o].astype(o_ref.dtype)


def _grad_w_kernel(xp_ref, g_ref, o_ref, *, k: int, th: int, bc: int):
  """o[b, i*k + j, cblk] = sum_{h,w} xp[b, h + i, w + j, cblk] * g[b, h, w, cblk]; o[b, k*k] = sum g."""
  b, c = pl.program_id(0), pl.program_id(1)
  height, width = g_ref.shape[1], g_ref.shape[2]
  cs = pl.ds(c * bc, bc)

  def row_tile(r, accs):
    row0 = r * th
    gv = g_ref[b, pl.ds(row0, th), :, cs].astype(jnp.float32)
    new = [accs[-1] + jnp.sum(gv, axis=(0, 1))]
    for i in range(k):
      for j in range(k):
        xv = xp_ref[b, pl.ds(row0 + i, th), pl.ds(j, width), cs].astype(jnp.float32)
        new.insert(-1, accs[i * k + j] + jnp.sum(xv * gv, axis=(0, 1)))
    return tuple(new)

  zeros = tuple(jnp.zeros((bc,), jnp.float32) for _ in range(k * k + 1))
  accs = jax.lax.fori_loop(0, height // th, row_tile, zeros)
  for t, a in enumerate(accs):
    o_ref[b, t, cs] = a


def _pad(x: Array, p: int) -> Array:
  return jnp.pad(x, [(0, 0), (p, p), (p, p), (0, 0)])


def _conv_call(xp: Array, w: Array, bias: Array, out_shape, *, row_tile: int, channel_block: int,
               num_warps: int) -> Array:
  n, h, width, c = out_shape
  k = w.shape[0]
  th, bc = pu.pow2_divisor(h, row_tile), pu.pow2_divisor(c, channel_block)
  kernel = functools.partial(_conv_kernel, k=k, th=th, bc=bc)
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct(out_shape, xp.dtype), grid=(n, h // th, c // bc),
      compiler_params=pu.compiler_params(num_warps), interpret=pu.interpret_default(),
      name="dwconv_residual")(xp, w, bias)


def _grad_w_call(xp: Array, g: Array, k: int, *, row_tile: int, channel_block: int,
                 num_warps: int) -> Array:
  n, h, _, c = g.shape
  th, bc = pu.pow2_divisor(h, row_tile), pu.pow2_divisor(c, channel_block)
  kernel = functools.partial(_grad_w_kernel, k=k, th=th, bc=bc)
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((n, k * k + 1, c), jnp.float32), grid=(n, c // bc),
      compiler_params=pu.compiler_params(num_warps), interpret=pu.interpret_default(),
      name="dwconv_grad_w")(xp, g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dwconv_residual(x: Array, w: Array, bias: Array, tiles: tuple) -> Array:
  return _fwd(x, w, bias, tiles)[0]


def _fwd(x, w, bias, tiles):
  row_tile, channel_block, num_warps = tiles[:3]
  xp = _pad(x, w.shape[0] // 2)
  y = _conv_call(xp, w, bias, x.shape, row_tile=row_tile, channel_block=channel_block,
                 num_warps=num_warps)
  return y, (xp, w, bias)


def _grad_w_xla(xp: Array, g: Array, w: Array) -> Array:
  """dL/dw through XLA's (cuDNN's) weight-gradient convolution of the 'VALID' conv over xp."""
  def conv(w):
    return jax.lax.conv_general_dilated(
        xp, w[:, :, None, :], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=xp.shape[-1], preferred_element_type=xp.dtype)
  return jax.vjp(conv, w)[1](g)[0]


def _bwd(tiles, res, g):
  row_tile, channel_block, num_warps, wgrad_row_tile, wgrad = tiles
  xp, w, bias = res
  k = w.shape[0]
  g = g.astype(xp.dtype)
  dx = _conv_call(_pad(g, k // 2), w[::-1, ::-1], jnp.zeros_like(bias), g.shape,
                  row_tile=row_tile, channel_block=channel_block, num_warps=num_warps)
  if wgrad == "xla":
    db = jnp.sum(g, axis=(0, 1, 2), dtype=jnp.float32).astype(bias.dtype)
    return dx, _grad_w_xla(xp, g, w), db
  partial = _grad_w_call(xp, g, k, row_tile=wgrad_row_tile, channel_block=channel_block,
                         num_warps=num_warps).sum(axis=0)
  dw = partial[:k * k].reshape(w.shape).astype(w.dtype)
  return dx, dw, partial[k * k].astype(bias.dtype)


_dwconv_residual.defvjp(_fwd, _bwd)


def dwconv_residual(x: Array, w: Array, bias: Array, *, row_tile: int = 8, channel_block: int = 32,
                    num_warps: int = 4, wgrad_row_tile: int = 4, wgrad: str = "xla") -> Array:
  """``x + b + depthwise_conv(x, w)`` ('SAME', stride 1), NHWC; w is (k, k, C), bias (C,).

  Accumulates in float32 and rounds once to x.dtype. Tile sizes are rounded down to powers of two
  dividing the extent; see :func:`supported` for the shapes Triton accepts. ``wgrad``: the weight
  gradient by XLA's convolution ('xla') or by the Pallas reduction kernel ('pallas').
  """
  if wgrad not in ("xla", "pallas"):
    raise ValueError(f"dwconv_residual: wgrad must be 'xla' or 'pallas', got {wgrad!r}")
  k = w.shape[0]
  if w.shape != (k, k, x.shape[-1]) or bias.shape != (x.shape[-1],):
    raise ValueError(f"dwconv_residual: kernel {w.shape} / bias {bias.shape} do not fit input "
                     f"{x.shape} (want (k, k, C) and (C,))")
  if not supported(x.shape, k):
    raise ValueError(f"dwconv_residual: input {x.shape} with a {k}x{k} kernel has no Triton tiling "
                     "(needs a power-of-two width, an even height and C divisible by 8)")
  tiles = (row_tile, channel_block, num_warps, wgrad_row_tile, wgrad)
  return _dwconv_residual(x, w.astype(x.dtype), bias.astype(x.dtype), tiles)


def dwconv_residual_reference(x: Array, w: Array, bias: Array) -> Array:
  """The same op through XLA's convolution, float32 accumulation, one rounding (for tests)."""
  k = w.shape[0]
  y = jax.lax.conv_general_dilated(
      x, w[:, :, None, :].astype(x.dtype), (1, 1), [(k // 2, k // 2)] * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1],
      preferred_element_type=jnp.float32)
  return (y + bias.astype(jnp.float32) + x.astype(jnp.float32)).astype(x.dtype)


__all__ = ["dwconv_residual", "dwconv_residual_reference", "supported"]
