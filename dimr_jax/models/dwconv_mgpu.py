"""The ConvNeXt block's ``x + b + dwconv(x)`` as a Mosaic GPU kernel staged in shared memory.

cuDNN's depthwise 7x7 conv moves its (250, 32, 32, 480) bf16 tensor at ~0.43 TB/s on an H100 (1.15
ms a call; 20 ms of a DiMR-XL/2R guided sampling step, 33 ms of a G/2R one: benchmarks/NOTES.md rows
41-42). Two Pallas Triton kernels that read every tap through the cache were no faster
(``dwconv_kernel.py``, NOTES rows 22 and 36). This one is written at the thread level with Mosaic
GPU's MLIR builders (``mosaic_gpu.as_gpu_kernel``), where shared memory and the registers are
explicit:

* A CTA takes one image and ``cb`` channels. Its threads copy the image's (H, W, cb) slice into
  shared memory as a zero-bordered (H + k - 1, W + k - 1, cb) tile: 16-byte vectors, each border
  pixel a zero (the load is clamped into the image and then replaced), so no tap needs a mask.
* A thread owns 4 channels of one output column over ``rows`` output rows (a row strip). For each
  kernel column dx it loads that column's k weights (4 channels each, float32) into registers, then
  walks the strip's rows + k - 1 input rows: one 8-byte shared-memory load and 4 conversions per
  input row, and a fused multiply-add into every output row the input row feeds. All of the strip's
  output rows accumulate in float32 registers; each input value is read from shared memory k times
  (once per dx), each weight once per strip, so most of the instructions (~3/4 by count) are FMAs.
* Lanes run 4 channels fastest, then columns: a warp's shared-memory loads and its global stores
  cover contiguous bytes (cb * 2 per pixel), so there are no bank conflicts and stores coalesce.
* The residual is folded in as 1 added to the centre tap (float32), the bias as the accumulators'
  start; one rounding to bf16 at the end (the XLA path rounds the conv and its sums separately, so
  the two differ by ~1 bf16 ulp in places; tests bound it).

Measured on an H100 (NOTES row 43): 0.563 ms against cuDNN's 1.18 at (250, 32, 32, 480), 2.1x;
XL/2R guided sampling +4.1%, XL/2R training +2.6%. Each CTA still waits out its own staging before
it computes, which leaves it ~2x off its FMA bound (a persistent, double-buffered launch is the
next step: NOTES row 44).

Training takes it both ways: a custom VJP runs the data gradient through the same kernel (the
transposed conv is the conv with the flipped kernel) and leaves the weight gradient to XLA
(cuDNN). Measured on an H200 against the forward-only version (NOTES row 46, same call each):
XL/2R training b128 420.1 -> 429.3 img/s, G/2R b64 204.1 -> 206.4. Needs an sm_90 GPU
(``available``); :func:`plan` says which shapes it takes (else the caller keeps XLA's conv).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from dimr_jax.models import dwconv_kernel, geglu_gemm_mgpu

Array = jax.Array
VEC = 4            # channels per thread: one 8-byte bf16 load, four float32 accumulators per row
SMEM_BUDGET = 100 * 1024  # bytes of input tile per CTA (two CTAs share an SM's 228 KiB)
MAX_ROWS = 16      # output rows per thread (float32 registers: rows * VEC accumulators)
DEFAULT_ROWS = 16  # measured fastest with cb=8 (benchmarks/NOTES.md row 43)
STAGE_BATCH = 8    # 16-byte global loads a thread keeps in flight while staging the tile
MAX_GRID_Y = 65535  # images per call: the grid's y extent (CUDA's limit)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static launch shape: ``cb`` channels per CTA, ``strips`` row strips of ``rows`` rows."""
  cb: int
  rows: int
  strips: int

  def threads(self, width: int) -> int:
    return self.cb // VEC * width * self.strips


def available() -> bool:
  """Mosaic GPU present and the default device a Hopper (sm_90) GPU: the GEMM kernel's check."""
  return geglu_gemm_mgpu.available()


def plan(x_shape: tuple[int, ...], kernel_size: int, *, cb: int | None = None,
         rows: int | None = None) -> Plan | None:
  """The launch shape for an NHWC input, or None where the kernel does not apply.

  Needs an odd kernel, at most :data:`MAX_GRID_Y` images, C a multiple of a channel block cb in (32,
  16, 8) whose bordered tile fits :data:`SMEM_BUDGET`, and a row strip (a divisor of H, at most
  :data:`MAX_ROWS`) such that the CTA has a whole number of warps and at most 1024 threads.
  Defaults: the narrowest cb (8) and strips of :data:`DEFAULT_ROWS` rows or the nearest that fit,
  the fastest measured on an H100 at DiMR-XL's and -G's shapes (``benchmarks/dwconv.py --residual
  --mgpu``; NOTES row 43).
  """
  if len(x_shape) != 4 or kernel_size % 2 != 1 or x_shape[0] > MAX_GRID_Y:
    return None
  _, h, w, c = x_shape
  halo = kernel_size - 1
  cbs = [cb] if cb is not None else [8, 16, 32]
  for cb_ in cbs:
    if cb_ % VEC or c % cb_ or (h + halo) * (w + halo) * cb_ * 2 > SMEM_BUDGET:
      continue
    cands = [rows] if rows is not None else sorted(range(1, MAX_ROWS + 1),
                                                   key=lambda r: (abs(r - DEFAULT_ROWS), -r))
    for r in cands:
      if not r or h % r or r > MAX_ROWS:
        continue
      p = Plan(cb_, r, h // r)
      if p.threads(w) % 32 == 0 and p.threads(w) <= 1024:
        return p
  return None


def _build(x_shape: tuple[int, ...], k: int, p: Plan):
  """The kernel for x (B, H, W, C) bf16, w (k*k, C) float32 (centre tap + 1), bias (C,) float32."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, gpu, llvm
  from jax._src.lib.mlir.dialects import math as mmath
  import jax.experimental.mosaic.gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mu

  n, h, w, c = x_shape
  halo = k - 1
  hp, wp = h + halo, w + halo
  cb, rows = p.cb, p.rows
  groups = cb // VEC
  nthreads = p.threads(w)
  chunks = cb // 8                       # 16-byte vectors per pixel of the tile
  stage_total = hp * wp * chunks
  stage_iters = -(-stage_total // nthreads)

  def body(ctx, x_ref, w_ref, b_ref, y_ref, smem):
    del ctx
    i32, i64 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64)
    bf16, f32 = ir.BF16Type.get(), ir.F32Type.get()
    v8bf, v4bf = ir.VectorType.get((8,), bf16), ir.VectorType.get((VEC,), bf16)
    v4f = ir.VectorType.get((VEC,), f32)
    ci = lambda v: mu.c(v, i32)
    cl = lambda v: mu.c(v, i64)

    tid = arith.index_cast(i32, gpu.thread_id(gpu.Dimension.x))
    cblk = arith.index_cast(i32, gpu.block_id(gpu.Dimension.x))
    img = arith.index_cast(i64, gpu.block_id(gpu.Dimension.y))
    c0 = arith.muli(cblk, ci(cb))
    x_ptr, y_ptr = mu.memref_ptr(x_ref), mu.memref_ptr(y_ref)
    w_ptr, b_ptr, s_ptr = mu.memref_ptr(w_ref), mu.memref_ptr(b_ref), mu.memref_ptr(smem)
    img_base = arith.muli(img, cl(h * w * c))  # element offset of this image (int64)

    # --- stage the bordered tile:
    #     smem[(r * wp + q) * cb + j*8 : +8] = x[img, r - k//2, q - k//2, c0 + j*8 : +8]
    # Unrolled, up to STAGE_BATCH loads issued before their stores (a loop would wait out each
    # load's latency in turn). Chunks past the tile (idx >= hp * wp * chunks) land in the buffer's
    # slack as zeros: their row is past the image, so they take the border's path.
    zero8 = mu.c(0.0, v8bf)
    loaded = []
    for it in range(stage_iters):
      idx = arith.addi(ci(it * nthreads), tid)
      j = arith.remui(idx, ci(chunks))
      pix = arith.divui(idx, ci(chunks))
      r = arith.subi(arith.divui(pix, ci(wp)), ci(k // 2))
      q = arith.subi(arith.remui(pix, ci(wp)), ci(k // 2))
      inside = functools.reduce(arith.andi, [
          arith.cmpi(arith.CmpIPredicate.sge, r, ci(0)),
          arith.cmpi(arith.CmpIPredicate.slt, r, ci(h)),
          arith.cmpi(arith.CmpIPredicate.sge, q, ci(0)),
          arith.cmpi(arith.CmpIPredicate.slt, q, ci(w))])
      rc = arith.select(inside, r, ci(0))
      qc = arith.select(inside, q, ci(0))
      off = arith.addi(arith.muli(arith.addi(arith.muli(rc, ci(w)), qc), ci(c)),
                       arith.addi(c0, arith.muli(j, ci(8))))
      off = arith.addi(img_base, arith.extui(i64, off))
      loaded.append((idx, inside, llvm.load(v8bf, mu.getelementptr(x_ptr, [off], bf16))))
      if len(loaded) == STAGE_BATCH or it == stage_iters - 1:
        for idx_, inside_, v in loaded:
          llvm.store(arith.select(inside_, v, zero8),
                     mu.getelementptr(s_ptr, [arith.muli(idx_, ci(8))], bf16))
        loaded = []

    gpu.barrier()

    # --- this thread: channels c0 + g*4 .. +4 of column col, output rows strip*rows .. +rows
    g = arith.remui(tid, ci(groups))
    col = arith.remui(arith.divui(tid, ci(groups)), ci(w))
    strip = arith.divui(tid, ci(groups * w))
    row0 = arith.muli(strip, ci(rows))
    ch = arith.addi(c0, arith.muli(g, ci(VEC)))
    # tile element of (padded row row0, padded column col, channel g*4); taps add static offsets
    t_base = arith.addi(arith.muli(arith.addi(arith.muli(row0, ci(wp)), col), ci(cb)),
                        arith.muli(g, ci(VEC)))
    t_ptr = mu.getelementptr(s_ptr, [t_base], bf16)
    wch_ptr = mu.getelementptr(w_ptr, [ch], f32)
    bias = llvm.load(v4f, mu.getelementptr(b_ptr, [ch], f32))
    accs = [bias] * rows
    for dx in range(k):
      wts = [llvm.load(v4f, mu.getelementptr(wch_ptr, [(dy * k + dx) * c], f32))
             for dy in range(k)]
      for i in range(rows + halo):        # padded input row row0 + i
        xv = llvm.load(v4bf, mu.getelementptr(t_ptr, [(i * wp + dx) * cb], bf16))
        xv = arith.extf(v4f, xv)
        for dy in range(k):
          o = i - dy
          if 0 <= o < rows:
            accs[o] = mmath.fma(wts[dy], xv, accs[o])
    # --- store: y[img, row0 + o, col, ch:ch+4]
    y_base = arith.addi(img_base, arith.extui(i64, arith.addi(
        arith.muli(arith.addi(arith.muli(row0, ci(w)), col), ci(c)), ch)))
    y0 = mu.getelementptr(y_ptr, [y_base], bf16)
    for o in range(rows):
      llvm.store(arith.truncf(v4bf, accs[o]), mu.getelementptr(y0, [o * w * c], bf16))

  from jax._src.interpreters import mlir
  with mlir.make_ir_context(), ir.Location.unknown():  # the builders above need a context
    return mgpu.as_gpu_kernel(
        body, grid=(c // cb, n, 1), block=(nthreads, 1, 1),
        in_shape=(jax.ShapeDtypeStruct(x_shape, jnp.bfloat16),
                  jax.ShapeDtypeStruct((k * k, c), jnp.float32),
                  jax.ShapeDtypeStruct((c,), jnp.float32)),
        out_shape=jax.ShapeDtypeStruct(x_shape, jnp.bfloat16),
        smem_scratch_shape=jax.ShapeDtypeStruct((stage_iters * nthreads * 8,), jnp.bfloat16),
        kernel_name="dwconv_residual_mgpu")


@functools.lru_cache(maxsize=None)
def _kernel(x_shape: tuple[int, ...], k: int, p: Plan):
  return _build(x_shape, k, p)


def _taps(w: Array) -> Array:
  """(k, k, C) kernel -> (k*k, C) float32 taps with the residual folded into the centre tap."""
  k = w.shape[0]
  return w.astype(jnp.float32).at[k // 2, k // 2].add(1.0).reshape(k * k, -1)


# ``x + b + dwconv(x)`` through XLA's convolution, float32 accumulation, one rounding (tests)
reference = dwconv_kernel.dwconv_residual_reference


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dwconv(x, w, bias, p):
  return _kernel(x.shape, w.shape[0], p)(x, _taps(w), bias.astype(jnp.float32))


def _fwd(x, w, bias, p):
  return _dwconv(x, w, bias, p), (x, w, bias)


def _bwd(p, res, g):
  """The data gradient by the same kernel, the weight and bias gradients by XLA.

  The transpose of a 'SAME' stride-1 correlation with an odd kernel is the correlation with the
  kernel flipped in both spatial axes, and the residual's identity is its own transpose, so
  ``dx = g + dwconv(g, flip(w))`` is this kernel run on g with the flipped taps (centre + 1) and no
  bias: one float32 sum rounded once (XLA's path rounds cuDNN's dgrad, then its sum with g). The
  weight gradient is cuDNN's (XLA's backward-filter conv of the model's bf16 path), the bias
  gradient a float32 sum of g.
  """
  x, w, bias = res
  k = w.shape[0]
  dx = _kernel(g.shape, k, p)(g.astype(jnp.bfloat16), _taps(w[::-1, ::-1]),
                              jnp.zeros(bias.shape, jnp.float32))
  _, vjp_w = jax.vjp(lambda w_: dwconv_kernel.depthwise_same(x, w_, x.dtype), w)
  (dw,) = vjp_w(g.astype(x.dtype))
  db = jnp.sum(g.astype(jnp.float32), axis=(0, 1, 2)).astype(bias.dtype)
  return dx.astype(x.dtype), dw, db


_dwconv.defvjp(_fwd, _bwd)


def dwconv_residual(x: Array, w: Array, bias: Array, *, cb: int | None = None,
                    rows: int | None = None) -> Array:
  """``x + b + depthwise_conv(x, w)`` ('SAME', stride 1) for bf16 NHWC x; w (k, k, C), bias (C,).

  Raises ValueError naming the misfit where :func:`plan` has no launch shape for the input."""
  k = w.shape[0]
  if x.dtype != jnp.bfloat16:
    raise ValueError(f"dwconv_mgpu: bf16 input only, got {x.dtype}")
  if w.shape != (k, k, x.shape[-1]) or bias.shape != (x.shape[-1],):
    raise ValueError(f"dwconv_mgpu: kernel {w.shape} / bias {bias.shape} do not fit input "
                     f"{x.shape} (want (k, k, C) and (C,))")
  p = plan(x.shape, k, cb=cb, rows=rows)
  if p is None:
    raise ValueError(f"dwconv_mgpu: no launch shape for input {x.shape} with a {k}x{k} kernel "
                     f"(cb={cb}, rows={rows}): C must be a multiple of 8 and the bordered tile fit "
                     "in shared memory; use XLA's convolution for this shape")
  return _dwconv(x, w, bias, p)
