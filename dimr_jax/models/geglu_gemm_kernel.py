"""The GEGLU MLP's first GEMM with the GEGLU in its epilogue, as one Pallas (Triton) kernel.

``h = gelu_exact(x @ W0 + b0) * (x @ W1 + b1)`` where the model otherwise runs ``h01 = x @ [W0|W1]``
(cuBLAS, writes (M, 2H)) and then the GEGLU pass of ``geglu_kernel`` (reads (M, 2H), writes (M, H)).
Here one program computes a (bm, bn) tile of both ``x @ W0`` and ``x @ W1`` (two float32
accumulators over the K loop; ``[W0|W1]`` is viewed as (K, 2, H) so both column tiles come from one
block) and applies the GEGLU to them in registers:

* without differentiation (sampling) only ``h`` is written: (M, 2H) of GEMM output is never
  written nor read back;
* under differentiation the forward also writes ``h01`` (the pre-bias GEMM output, rounded as the
  GEMM rounds it), the residual that ``geglu_kernel``'s backward kernel takes; the backward is that
  kernel (dh01 and the bias-gradient partial sums) plus two XLA GEMMs for dx and d[W0|W1].

The arithmetic is the unfused path's: float32 accumulation, the GEMM result rounded to the compute
dtype, the bias added and rounded again, the GEGLU in float32 (:func:`geglu_kernel.gelu_f32`).

Opt-in only (``model.pallas_ops='geglu_gemm'``): on an H100 (benchmarks/NOTES.md row 26) its K loop
runs well below cuBLAS. At the ConvNeXt shape (256000 x 480 -> 2 x 960) the fused kernel beat
cuBLAS + GEGLU pass (1.561 vs 1.733 ms); at the Transformer shape (66000 x 960 -> 2 x 1920) it lost
(1.310 vs 1.219 ms), and XL/2R guided sampling fell from 553.4 to 520.4 image-steps/s.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from dimr_jax.models import geglu_kernel as gk
from dimr_jax.models import pallas_util as pu

Array = jax.Array

I0, I1 = gk.I0, gk.I1  # the halves' indices (numpy scalars: see geglu_kernel)


class _Config(NamedTuple):
  bm: int
  bn: int
  bk: int
  num_warps: int
  num_stages: int
  interpret: bool


def _kernel(x_ref, w_ref, b_ref, *out_refs, rows: int, depth: int, bk: int, save_h01: bool):
  """One (bm, bn) tile of h (and of both halves of h01): K loop of two dots, GEGLU epilogue."""
  o_ref = out_refs[0]
  bm, bn = o_ref.shape
  row_ok = pu.row_mask(rows, bm, bk)

  def body(k, accs):
    a0, a1 = accs
    ks = pl.ds(pl.multiple_of(k * bk, bk), bk)
    xb = pu.load(x_ref.at[:, ks], row_ok)
    a0 = a0 + pu.dot(xb, w_ref[ks, I0, :])
    a1 = a1 + pu.dot(xb, w_ref[ks, I1, :])
    return a0, a1

  zero = jnp.zeros((bm, bn), jnp.float32)
  a0, a1 = lax.fori_loop(0, depth // bk, body, (zero, zero))
  dt = o_ref.dtype
  h0, h1 = a0.astype(dt), a1.astype(dt)  # the GEMM's own rounding of h01
  mask = pu.row_mask(rows, bm, bn)
  if save_h01:
    h_ref = out_refs[1]
    pu.store(h_ref.at[:, I0, :], h0, mask)
    pu.store(h_ref.at[:, I1, :], h1, mask)
  f0, f1 = gk.add_bias(h0, h1, b_ref, dt)  # exactly the unfused kernel's bias rounding
  pu.store(o_ref, (gk.gelu_f32(f0) * f1).astype(dt), mask)


def _call(x: Array, w01: Array, b01: Array, cfg: _Config, save_h01: bool):
  rows, depth = x.shape
  hidden = w01.shape[1] // 2
  grid = (hidden // cfg.bn, pl.cdiv(rows, cfg.bm))
  out_shape = [jax.ShapeDtypeStruct((rows, hidden), x.dtype)]
  out_specs = [pl.BlockSpec((cfg.bm, cfg.bn), lambda j, i: (i, j))]
  if save_h01:
    out_shape.append(jax.ShapeDtypeStruct((rows, 2, hidden), x.dtype))
    out_specs.append(pl.BlockSpec((cfg.bm, 2, cfg.bn), lambda j, i: (i, 0, j)))
  outs = pl.pallas_call(
      functools.partial(_kernel, rows=rows, depth=depth, bk=cfg.bk, save_h01=save_h01),
      out_shape=tuple(out_shape), grid=grid,
      in_specs=[pl.BlockSpec((cfg.bm, depth), lambda j, i: (i, 0)),
                pl.BlockSpec((depth, 2, cfg.bn), lambda j, i: (0, 0, j)),
                pl.BlockSpec((2, cfg.bn), lambda j, i: (0, j))],
      out_specs=tuple(out_specs),
      compiler_params=pu.compiler_params(cfg.num_warps, cfg.num_stages),
      interpret=cfg.interpret, name="geglu_gemm",
  )(x, w01.reshape(depth, 2, hidden), b01.reshape(2, hidden))
  if save_h01:
    return outs[0], outs[1].reshape(rows, 2 * hidden)
  return outs[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _geglu_gemm(x: Array, w01: Array, b01: Array, cfg: _Config) -> Array:
  return _call(x, w01, b01, cfg, save_h01=False)


def _fwd(x, w01, b01, cfg):
  h, h01 = _call(x, w01, b01, cfg, save_h01=True)
  return h, (x, w01, b01, h01)


def _bwd(cfg, res, g):
  return gk.geglu_gemm_backward(*res, g, interpret=cfg.interpret)


_geglu_gemm.defvjp(_fwd, _bwd)


def geglu_gemm(x: Array, w01: Array, b01: Array, *, bm: int = 128, bn: int = 64,
               bk: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
               interpret: bool | None = None) -> Array:
  """``gelu_exact(h0) * h1`` for ``h0, h1 = split(x @ w01 + b01)``: (..., K) -> (..., H).

  Args:
    x: (..., K) activations in the compute dtype.
    w01: (K, 2H) the w0|w1 kernels side by side, in the compute dtype.
    b01: (2H,) their biases.
    bm, bn: output tile (powers of two); bn is reduced to the largest power of two dividing H.
    bk: K step (a power of two dividing K; reduced to the largest such one <= bk).
    num_warps, num_stages: Triton launch parameters (num_stages pipelines the K loop's loads).
    The defaults of bk, num_warps and num_stages are the fastest of the H100 sweep
    (results/h100_geglu_gemm_2026-11-24.txt): K >= 768: 64, 8, 3; smaller K: 32, 4, 4.
    interpret: Pallas interpret mode; default: on when the default backend is the CPU.
  """
  depth = x.shape[-1]
  if w01.ndim != 2 or w01.shape[0] != depth or w01.shape[1] % 2:
    raise ValueError(f"geglu_gemm: w01 {w01.shape} does not fit x {x.shape} (want (K, 2H))")
  hidden = w01.shape[1] // 2
  if b01.shape != (2 * hidden,):
    raise ValueError(f"geglu_gemm: b01 {b01.shape} does not fit w01 {w01.shape} (want (2H,))")
  wide = depth >= 768
  bk = bk or (64 if wide else 32)
  num_warps = num_warps or (8 if wide else 4)
  num_stages = num_stages or (3 if wide else 4)
  for name, v in (("bm", bm), ("bn", bn), ("bk", bk)):
    if v <= 0 or v & (v - 1):
      raise ValueError(f"geglu_gemm: {name} must be a power of two, got {v}")
  bk = pu.pow2_divisor(depth, bk)
  if bk < 16:
    raise ValueError(f"geglu_gemm: K={depth} has no power-of-two step >= 16 (tensor cores)")
  lead = x.shape[:-1]
  rows = math.prod(lead)
  if interpret is None:
    interpret = pu.interpret_default()
  cfg = _Config(bm=min(bm, max(16, pu.next_pow2(rows))), bn=pu.pow2_divisor(hidden, bn), bk=bk,
                num_warps=num_warps, num_stages=num_stages, interpret=bool(interpret))
  dt = x.dtype
  h = _geglu_gemm(x.reshape(rows, depth), w01.astype(dt), b01.astype(dt), cfg)
  return h.reshape(*lead, hidden)
