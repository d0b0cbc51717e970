"""Depthwise k x k convolution + bias + residual as Pallas (Triton) kernels, with a custom VJP.

DiMR's ConvNeXt block starts with ``x + dwconv(x) + b`` (7x7, one channel per group, 'SAME').
cuDNN's depthwise convolution runs far below memory speed on an H100 (~0.9 ms per launch inside a
DiMR-XL sampling step for a (250, 32, 32, 480) bf16 tensor that a memory-speed pass would move in
~0.2 ms; ~8% of the step). These kernels compute the op as k*k shifted multiply-adds in float32
registers, reading each shifted tile through the cache, and fold the residual and the bias in.
Measured, they are no faster than cuDNN: the first version (channel blocks dividing C) 1.20 ms at
its best tiling vs 1.31 ms for XLA's conv + adds, slower inside the model (benchmarks/NOTES.md row
22); the wide channel blocks below, timed with 10 chained calls per jit, 1.133 ms at the best
tiling timed (th=2, bc=32, 8 warps; the sweep reached row tiles 1 and 2 only) vs cuDNN's 1.129 at
(250, 32, 32, 480), and slower the wider the block (NOTES row 36). So the model uses them only when asked (``model.pallas_ops='dwconv'``); they
are kept, tested, as the starting point of a kernel that reuses its input tile from shared memory.

* forward ``y = x + b + dwconv(x, w)``: one program per (image, row tile, column tile, channel
  block); the input is zero-padded once (one XLA pad) by k//2 rows and columns and, in channels, up
  to Cp, the next multiple of the channel block, so every tap is a plain non-negative slice and no
  load needs a mask. The residual is the centre tap. The output keeps its C channels: only the
  store of the last channel block is masked, where the block does not divide C.
* input gradient ``dx = g + dwconv(g, w[::-1, ::-1])``: the same kernel (a correlation's adjoint is
  the correlation with the flipped kernel), bias zero, on g padded the same way.
* weight/bias gradients: one program per (image, channel block) accumulates, for every tap, the
  sum over the image of ``xpad_shifted * g`` in float32 (g read from the padded g of dx); the
  per-image partials are summed by XLA. Or XLA's weight-gradient convolution (``wgrad='xla'``).

Wide channel blocks. The first version's channel block was a power of two dividing C: for DiMR-XL's
C=480 at most 32 channels, 64 bytes of a pixel whose stride is 960 bytes, so every (W, bc) tile
load touched W cache lines half used; that was the hypothesis for its 1.20 ms against the 0.16 ms
that its memory traffic needs at (250, 32, 32, 480), and the measurement refuted it (bc=128: 1.40-
1.52 ms, bc=512: 5.5-6.9 ms): the per-tap shifted loads, not line use, bound the kernel. Padding
the channels to Cp lets the block be
any power of two >= 8 (for bc >= 64 each pixel's slice of the padded input is a whole number of
128-byte lines). The price is (Cp - C) / C more loads, of zeros: 480 -> 512 is 7% for any bc from
64 to 512; 576 -> 576 (bc 64), 640 (128, 11%), 768 (256, 33%) or 1024 (512, 78%).

Registers. A program holds th * tw * bc float32 accumulators over 32 * num_warps threads. The
first version's tilings with 64 of them per thread (th=4 bc=32 2 warps, th=8 bc=32 4 warps) ran
4-6x slower than those with 16-32 (``benchmarks/results/h100_dwconv_pallas_2026-11-24.txt``),
as register spills would; :func:`tiling`'s defaults keep to 32. A column tile tw < W is what lets
a wide channel block keep more than one row (row reuse: (th + k - 1) * k tile loads per th output
rows instead of th * k * k) inside that budget. The taps are loaded where first used, so that a
tap need be live only across the th rows that use it rather than the whole program.

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


_ACCS_PER_THREAD = 32  # float32 accumulators per thread that the default tiling keeps to


def _is_pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def _pow2_floor(n: int) -> int:
  return 1 << (max(1, n).bit_length() - 1)


def supported(x_shape: tuple[int, ...], kernel_size: int) -> bool:
  """An odd kernel (a centred 'SAME' window) and a power-of-two image width; any H and C.

  Triton blocks need power-of-two extents. Row and column tiles are powers of two dividing H and
  W (down to 1) and the channels are padded to a multiple of the channel block (any power of two
  >= 8), so H and C are free; the width is not, because the weight-gradient kernel reads whole
  rows (and a width with a small power-of-two divisor would leave only narrow column tiles).
  """
  _, _, w, _ = x_shape
  return kernel_size % 2 == 1 and _is_pow2(w)


def tiling(x_shape: tuple[int, ...], row_tile: int | None = None, col_tile: int | None = None,
           channel_block: int | None = None,
           num_warps: int | None = None) -> tuple[int, int, int, int]:
  """The (th, tw, bc, num_warps) the kernels run for an input of ``x_shape`` (NHWC).

  Given sizes are rounded down to powers of two: th and tw to ones dividing H and W, bc into
  [8, next_pow2(C)] (wider than the padded C would only add zeros); bc need not divide C. Missing
  ones default to what measured fastest on an H100 among the tilings timed (NOTES row 36; row
  tiles 1 and 2): 8 warps, bc = the largest power
  of two <= 64 dividing C (64 if that is < 8; 32 for C=480, 64 for C=576: no padding), tw = W, and
  th up to 2 while th * tw * bc / (32 * warps) stays <= 32 float32 accumulators per thread (tw
  shrinks first where even one row is over): (2, 32, 32, 8) and (2, 32, 64, 8) for DiMR-XL's and
  -G's 32x32 ConvNeXt stages (1.133 and 1.306 ms at batch 250).
  """
  _, h, w, c = x_shape
  cap = max(8, pu.next_pow2(c))
  nw = 8 if num_warps is None else num_warps
  if channel_block is None:
    channel_block = pu.pow2_divisor(c, 64) if pu.pow2_divisor(c, 64) >= 8 else 64
  bc = min(cap, max(8, _pow2_floor(channel_block)))
  budget = _ACCS_PER_THREAD * 32 * nw  # accumulators per program
  tw = pu.pow2_divisor(w, max(1, budget // bc) if col_tile is None else col_tile)
  th = pu.pow2_divisor(h, min(2, max(1, budget // (tw * bc))) if row_tile is None else row_tile)
  return th, tw, bc, nw


def _conv_kernel(xp_ref, w_ref, b_ref, o_ref, *, k: int, channels: int):
  """o[rows, cols, cblk] = xp[centre] + bias + sum_ij w[i, j] * xp[b, rows + i, cols + j, cblk].

  o_ref is this program's (th, tw, bc) output block; xp, w and b are the whole arrays, padded to
  Cp channels. Each padded input row of the tile's window is loaded k times (once per column
  shift) and used for every kernel row it meets, so a tile of th output rows does (th + k - 1) * k
  loads instead of th * k * k; the th accumulators stay in registers. Only the output, which has
  C channels, needs a mask (in the last channel block, where bc does not divide C).
  """
  th, tw, bc = o_ref.shape
  b, r, s, c = (pl.program_id(a) for a in range(4))
  row0, col0, cs = r * th, s * tw, pl.ds(c * bc, bc)
  p = k // 2
  bias = b_ref[cs].astype(jnp.float32)
  taps = {}
  accs = [None] * th
  for hr in range(th + k - 1):          # padded input row row0 + hr
    for j in range(k):
      xv = xp_ref[b, row0 + hr, pl.ds(col0 + j, tw), cs].astype(jnp.float32)  # (tw, bc)
      for i in range(k):
        o = hr - i                      # the output row (within the tile) this tap feeds
        if not 0 <= o < th:
          continue
        if (i, j) not in taps:          # loaded at its first use (see the module docstring)
          taps[i, j] = w_ref[i, j, cs].astype(jnp.float32)
        term = xv * taps[i, j]
        if i == p and j == p:
          term = term + xv              # the residual: the centre tap is x itself
        accs[o] = term + bias if accs[o] is None else accs[o] + term
  mask = pu.block_mask(channels, bc, (tw, bc), 1, 3)
  for o in range(th):  # (an array index: interpret mode's masked store rejects a Python int)
    pu.store(o_ref.at[jnp.int32(o)], accs[o].astype(o_ref.dtype), mask)


def _grad_w_kernel(xp_ref, gp_ref, o_ref, *, k: int, th: int, bc: int):
  """o[b, i*k + j, cblk] = sum_{h,w} xp[b, h + i, w + j, cblk] * g[b, h, w, cblk]; o[b, k*k] = sum g.

  g is read from gp, the cotangent padded like xp (the input of dx's kernel): g = gp[:, p:-p, p:-p].
  """
  b, c = pl.program_id(0), pl.program_id(1)
  p = k // 2
  height, width = gp_ref.shape[1] - 2 * p, gp_ref.shape[2] - 2 * p
  cs = pl.ds(c * bc, bc)

  def row_tile(r, accs):
    row0 = r * th
    gv = gp_ref[b, pl.ds(row0 + p, th), pl.ds(p, width), cs].astype(jnp.float32)
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


def _pad(x: Array, p: int, channels: int) -> Array:
  """x zero-padded by p rows and columns on each side and to ``channels`` channels: one XLA pad."""
  return jnp.pad(x, [(0, 0), (p, p), (p, p), (0, channels - x.shape[-1])])


def _conv_call(xp: Array, w: Array, bias: Array, out_shape, tiles: tuple) -> Array:
  """The forward kernel over the padded input xp (Cp channels) with w, bias padded to Cp."""
  n, h, width, c = out_shape
  th, tw, bc, num_warps = tiles
  kernel = functools.partial(_conv_kernel, k=w.shape[0], channels=c)
  # The inputs stay whole arrays (the tap windows overlap). The output is one (th, tw, bc) block
  # per program, which in the last channel block runs past C: the kernel masks that store (Pallas'
  # Triton lowering does not), and interpret mode pads the array to whole blocks.
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct(out_shape, xp.dtype),
      grid=(n, h // th, width // tw, xp.shape[-1] // bc),
      out_specs=pl.BlockSpec((None, th, tw, bc), lambda b, r, s, c: (b, r, s, c)),
      compiler_params=pu.compiler_params(num_warps), interpret=pu.interpret_default(),
      name="dwconv_residual")(xp, w, bias)


def _grad_w_call(xp: Array, gp: Array, k: int, *, row_tile: int, channel_block: int,
                 num_warps: int) -> Array:
  """Per-image float32 partials (n, k*k + 1, Cp): the k*k taps' weight gradients, then db."""
  n, _, _, cp = xp.shape
  kernel = functools.partial(_grad_w_kernel, k=k, th=row_tile, bc=channel_block)
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((n, k * k + 1, cp), jnp.float32),
      grid=(n, cp // channel_block),
      compiler_params=pu.compiler_params(num_warps), interpret=pu.interpret_default(),
      name="dwconv_grad_w")(xp, gp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dwconv_residual(x: Array, w: Array, bias: Array, tiles: tuple) -> Array:
  return _fwd(x, w, bias, tiles)[0]


def _fwd(x, w, bias, tiles):
  k, c, bc = w.shape[0], x.shape[-1], tiles[2]
  cp = -(-c // bc) * bc
  xp = _pad(x, k // 2, cp)
  wp, bp = jnp.pad(w, [(0, 0), (0, 0), (0, cp - c)]), jnp.pad(bias, [(0, cp - c)])
  return _conv_call(xp, wp, bp, x.shape, tiles[:4]), (xp, wp, bias)


def _grad_w_xla(xp: Array, g: Array, gp: Array, wp: Array) -> Array:
  """dL/dw (k, k, Cp) through XLA's (cuDNN's) weight-gradient convolution.

  Without channel padding: of the 'VALID' conv over xp, cotangent g. With it, g has C channels and
  xp Cp: then of the conv over xp with k//2 more zero padding, whose cotangent is gp (dx's input,
  zero outside g); the same sums, over 2 * (k//2) more (zero) rows and columns, instead of one
  more pass over g to pad its channels.
  """
  cot, pad = (g, 0) if xp.shape[-1] == g.shape[-1] else (gp, wp.shape[0] // 2)

  def conv(w):
    return jax.lax.conv_general_dilated(
        xp, w[:, :, None, :], (1, 1), [(pad, pad)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=xp.shape[-1], preferred_element_type=xp.dtype)
  return jax.vjp(conv, wp)[1](cot)[0]


def _bwd(tiles, res, g):
  wgrad_row_tile, wgrad_channel_block, wgrad = tiles[4:]
  xp, wp, bias = res
  k, c = wp.shape[0], g.shape[-1]
  g = g.astype(xp.dtype)
  gp = _pad(g, k // 2, xp.shape[-1])
  dx = _conv_call(gp, wp[::-1, ::-1], jnp.zeros(xp.shape[-1:], xp.dtype), g.shape, tiles[:4])
  if wgrad == "xla":
    db = jnp.sum(g, axis=(0, 1, 2), dtype=jnp.float32).astype(bias.dtype)
    return dx, _grad_w_xla(xp, g, gp, wp)[:, :, :c], db
  partial = _grad_w_call(xp, gp, k, row_tile=wgrad_row_tile, channel_block=wgrad_channel_block,
                         num_warps=tiles[3]).sum(axis=0)[:, :c]
  dw = partial[:k * k].reshape(k, k, c).astype(wp.dtype)
  return dx, dw, partial[k * k].astype(bias.dtype)


_dwconv_residual.defvjp(_fwd, _bwd)


def dwconv_residual(x: Array, w: Array, bias: Array, *, row_tile: int | None = None,
                    col_tile: int | None = None, channel_block: int | None = None,
                    num_warps: int | None = None, wgrad_row_tile: int = 4,
                    wgrad_channel_block: int = 32, wgrad: str = "xla") -> Array:
  """``x + b + depthwise_conv(x, w)`` ('SAME', stride 1), NHWC; w is (k, k, C), bias (C,).

  Accumulates in float32 and rounds once to x.dtype. The forward and dx tiling (row_tile,
  col_tile, channel_block, num_warps): :func:`tiling` (rounded to powers of two, defaults by a
  register budget); see :func:`supported` for the shapes Triton accepts. ``wgrad``: the weight
  gradient by XLA's convolution ('xla') or by the Pallas reduction kernel ('pallas'), whose
  channel block is its own (``wgrad_channel_block``, rounded down to a power of two >= 8 and at
  most bc, so that it divides the padded C): its k*k + 1 per-tap accumulators would not fit in
  registers at the forward's wide blocks.
  """
  if wgrad not in ("xla", "pallas"):
    raise ValueError(f"dwconv_residual: wgrad must be 'xla' or 'pallas', got {wgrad!r}")
  k = w.shape[0]
  if w.shape != (k, k, x.shape[-1]) or bias.shape != (x.shape[-1],):
    raise ValueError(f"dwconv_residual: kernel {w.shape} / bias {bias.shape} do not fit input "
                     f"{x.shape} (want (k, k, C) and (C,))")
  if not supported(x.shape, k):
    raise ValueError(f"dwconv_residual: input {x.shape} with a {k}x{k} kernel has no Triton tiling "
                     "(needs an odd kernel size and a power-of-two width)")
  th, tw, bc, nw = tiling(x.shape, row_tile, col_tile, channel_block, num_warps)
  wgrad_tiles = (pu.pow2_divisor(x.shape[1], wgrad_row_tile),
                 min(bc, max(8, _pow2_floor(wgrad_channel_block))), wgrad)
  tiles = (th, tw, bc, nw, *wgrad_tiles)
  return _dwconv_residual(x, w.astype(x.dtype), bias.astype(x.dtype), tiles)


def depthwise_same(x: Array, w: Array, out_dtype) -> Array:
  """XLA's (cuDNN's) 'SAME' depthwise correlation of NHWC x with w (k, k, C) cast to x's dtype."""
  k = w.shape[0]
  return jax.lax.conv_general_dilated(
      x, w[:, :, None, :].astype(x.dtype), (1, 1), [(k // 2, k // 2)] * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1],
      preferred_element_type=out_dtype)


def dwconv_residual_reference(x: Array, w: Array, bias: Array) -> Array:
  """The same op through XLA's convolution, float32 accumulation, one rounding (for tests)."""
  y = depthwise_same(x, w, jnp.float32)
  return (y + bias.astype(jnp.float32) + x.astype(jnp.float32)).astype(x.dtype)


__all__ = ["depthwise_same", "dwconv_residual", "dwconv_residual_reference", "supported", "tiling"]
