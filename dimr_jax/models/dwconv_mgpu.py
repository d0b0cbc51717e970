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
it computes, which leaves it ~2x off its FMA bound. A persistent, double-buffered launch
(``persistent=True``: CTAs walk the tiles and stage the next one by ``cp.async`` while computing
the current one) is written to close that gap; it stays opt-in (:data:`DEFAULT_PERSISTENT`) until
it has been measured on a GPU (NOTES row 44: its first version never built on jax 0.11.2).

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
DEFAULT_PERSISTENT = False  # the persistent launch is opt-in until measured (NOTES row 44)
DEFAULT_SMS = 132  # SMs of an H100 / H200 SXM, where the device does not say (CPU lowering tests)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static launch shape: ``cb`` channels per CTA, ``strips`` row strips of ``rows`` rows.

  ``persistent``: instead of one CTA per tile, ``ctas_per_sm`` CTAs per SM walk the tiles with
  two staging buffers each (see :func:`_build`). The two always fit an sm_90 CTA's 227 KiB: a
  buffer is the tile (at most :data:`SMEM_BUDGET`) rounded up to whole rounds of one 16-byte chunk
  per thread, at most 112 KiB. Where fewer than ``ctas_per_sm`` CTAs fit an SM (registers, shared
  memory), the rest wait for a free slot: still correct, but no longer one wave."""
  cb: int
  rows: int
  strips: int
  persistent: bool = False
  ctas_per_sm: int = 4

  def threads(self, width: int) -> int:
    return self.cb // VEC * width * self.strips


def available() -> bool:
  """Mosaic GPU present and the default device a Hopper (sm_90) GPU: the GEMM kernel's check."""
  return geglu_gemm_mgpu.available()


def plan(x_shape: tuple[int, ...], kernel_size: int, *, cb: int | None = None,
         rows: int | None = None, persistent: bool | None = None) -> Plan | None:
  """The launch shape for an NHWC input, or None where the kernel does not apply.

  Needs an odd kernel, at most :data:`MAX_GRID_Y` images, C a multiple of a channel block cb in (32,
  16, 8) whose bordered tile fits :data:`SMEM_BUDGET`, and a row strip (a divisor of H, at most
  :data:`MAX_ROWS`) such that the CTA has a whole number of warps and at most 1024 threads.
  Defaults: the narrowest cb (8) and strips of :data:`DEFAULT_ROWS` rows or the nearest that fit,
  the fastest measured on an H100 at DiMR-XL's and -G's shapes (``benchmarks/dwconv.py --residual
  --mgpu``; NOTES row 43). ``persistent`` (default :data:`DEFAULT_PERSISTENT`) picks the
  persistent launch; it takes the same shapes.
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
      p = Plan(cb_, r, h // r, DEFAULT_PERSISTENT if persistent is None else persistent)
      if p.threads(w) % 32 == 0 and p.threads(w) <= 1024:
        return p
  return None


def _build(x_shape: tuple[int, ...], k: int, p: Plan):
  """The kernel for x (B, H, W, C) bf16, w (k*k, C) float32 (centre tap + 1), bias (C,) float32.

  A tile is one (image, channel block). Plain launch: one CTA per tile, grid (C / cb, B); it stages
  the tile by loads into registers and stores to shared memory, then computes it. Persistent launch
  (``p.persistent``): ``ctas_per_sm`` CTAs per SM (a 1-D grid) walk the tiles, each with two
  shared-memory buffers; the next tile's copies (``cp.async``, 16 bytes each, border chunks
  zero-filled by a source size of 0) are in flight while the current tile is computed, so a CTA
  does not wait out its own staging. The ``cp.async`` instructions are inline PTX: the nvvm
  dialect's copy op takes a cache-modifier attribute, and the textual form of that attribute
  f7c362b parsed is not accepted by jaxlib 0.11.2's MLIR (NOTES row 44). The plain launch emits
  none of the persistent code.
  """
  import jax.experimental.mosaic.gpu as mgpu
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, gpu, llvm
  from jax._src.lib.mlir.dialects import math as mmath
  from jax.experimental.mosaic.gpu import utils as mu

  n, h, w, c = x_shape
  halo = k - 1
  hp, wp = h + halo, w + halo
  cb, rows = p.cb, p.rows
  groups = cb // VEC
  nthreads = p.threads(w)
  chunks = cb // 8                       # 16-byte vectors per pixel of the tile
  stage_iters = -(-(hp * wp * chunks) // nthreads)
  buf_elems = stage_iters * nthreads * 8  # the tile plus slack for the last round of chunks
  ncb = c // cb
  tiles = n * ncb
  if p.persistent:
    sms = getattr(jax.devices()[0], "core_count", None) or DEFAULT_SMS
    grid = (min(tiles, sms * p.ctas_per_sm), 1, 1)
  else:
    grid = (ncb, n, 1)

  def body(ctx, x_ref, w_ref, b_ref, y_ref, smem):
    del ctx
    i32, i64 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64)
    bf16, f32 = ir.BF16Type.get(), ir.F32Type.get()
    v8bf, v4bf = ir.VectorType.get((8,), bf16), ir.VectorType.get((VEC,), bf16)
    v4f = ir.VectorType.get((VEC,), f32)
    ci = lambda v: mu.c(v, i32)
    cl = lambda v: mu.c(v, i64)

    tid = arith.index_cast(i32, gpu.thread_id(gpu.Dimension.x))
    if p.persistent:
      bid = arith.index_cast(i32, gpu.block_id(gpu.Dimension.x))  # this CTA's first tile
    else:  # the grid's x picks the channel block, its y the image
      cblk = arith.index_cast(i32, gpu.block_id(gpu.Dimension.x))
      img = arith.index_cast(i64, gpu.block_id(gpu.Dimension.y))
      c0 = arith.muli(cblk, ci(cb))
    x_ptr, y_ptr = mu.memref_ptr(x_ref), mu.memref_ptr(y_ref)
    w_ptr, b_ptr, s_ptr = mu.memref_ptr(w_ref), mu.memref_ptr(b_ref), mu.memref_ptr(smem)

    def chunk_sources(c0, img_base):
      """Per staging round: (tile chunk index, inside the image?, clamped global address) of
      smem[(r * wp + q) * cb + j*8 : +8] = x[img, r - k//2, q - k//2, c0 + j*8 : +8]. A border
      chunk's address is clamped into the image (its data is then replaced by zeros); chunks past
      the tile (idx >= hp * wp * chunks) land in the buffer's slack: their row is past the image,
      so they take the border's path."""
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
        yield idx, inside, mu.getelementptr(x_ptr, [off], bf16)

    def stage_sync(c0, img_base, buf_ptr):
      """The plain launch's staging: unrolled, up to STAGE_BATCH loads issued before their stores
      (a loop would wait out each load's latency in turn), border chunks stored as zeros."""
      zero8 = mu.c(0.0, v8bf)
      loaded = []
      for n_done, (idx, inside, src) in enumerate(chunk_sources(c0, img_base), 1):
        loaded.append((idx, inside, llvm.load(v8bf, src)))
        if len(loaded) == STAGE_BATCH or n_done == stage_iters:
          for idx_, inside_, v in loaded:
            llvm.store(arith.select(inside_, v, zero8),
                       mu.getelementptr(buf_ptr, [arith.muli(idx_, ci(8))], bf16))
          loaded = []

    def compute(c0, img_base, buf_ptr):
      """y[img, row0 + o, col, ch : ch+4] for this thread's strip, from the staged tile."""
      # this thread: channels c0 + g*4 .. +4 of column col, output rows strip*rows .. +rows
      g = arith.remui(tid, ci(groups))
      col = arith.remui(arith.divui(tid, ci(groups)), ci(w))
      strip = arith.divui(tid, ci(groups * w))
      row0 = arith.muli(strip, ci(rows))
      ch = arith.addi(c0, arith.muli(g, ci(VEC)))
      # tile element of (padded row row0, padded column col, channel g*4); taps add static offsets
      t_base = arith.addi(arith.muli(arith.addi(arith.muli(row0, ci(wp)), col), ci(cb)),
                          arith.muli(g, ci(VEC)))
      t_ptr = mu.getelementptr(buf_ptr, [t_base], bf16)
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
      # store: y[img, row0 + o, col, ch:ch+4]
      y_base = arith.addi(img_base, arith.extui(i64, arith.addi(
          arith.muli(arith.addi(arith.muli(row0, ci(w)), col), ci(c)), ch)))
      y0 = mu.getelementptr(y_ptr, [y_base], bf16)
      for o in range(rows):
        llvm.store(arith.truncf(v4bf, accs[o]), mu.getelementptr(y0, [o * w * c], bf16))

    if not p.persistent:
      img_base = arith.muli(img, cl(h * w * c))  # element offset of this image (int64)
      stage_sync(c0, img_base, s_ptr)
      gpu.barrier()
      compute(c0, img_base, s_ptr)
      return

    # --- persistent: tiles bid, bid + grid, ... in turn; tile t = img * ncb + channel block, the
    # plain grid's order. Iteration i computes from buffer i % 2 while tile i + 1's copies fill
    # the other one.
    def ptx(asm, operands=(), constraints=""):
      """Inline PTX without results. Used instead of the nvvm dialect's ops so that no dialect
      attribute (whose syntax and builders change between jaxlib versions) is involved."""
      llvm.inline_asm(None, list(operands), asm, constraints, has_side_effects=True)

    lt = lambda a, b: arith.cmpi(arith.CmpIPredicate.slt, a, b)
    ptr_global = llvm.PointerType.get(address_space=1)

    def tile_coords(t):
      """(first channel, element offset of the image (int64)) of tile t."""
      c0 = arith.muli(arith.remui(t, ci(ncb)), ci(cb))
      return c0, arith.muli(arith.extui(i64, arith.divui(t, ci(ncb))), cl(h * w * c))

    def stage_async(c0, img_base, buf_ptr):
      """stage_sync's copies as cp.async.cg (16 bytes, through L2 only) without waiting for them:
      operands the 32-bit shared address, the global address and the source size, 16 bytes inside
      the image and 0 (the 16 bytes zero-filled) for a border chunk."""
      for idx, inside, src in chunk_sources(c0, img_base):
        dst = mu.getelementptr(buf_ptr, [arith.muli(idx, ci(8))], bf16)
        ptx("cp.async.cg.shared.global [$0], [$1], 16, $2;",
            [llvm.ptrtoint(i32, dst), llvm.addrspacecast(ptr_global, src),
             arith.select(inside, ci(16), ci(0))], "r,l,r")

    stage_async(*tile_coords(bid), s_ptr)  # bid < grid <= tiles: every CTA has a first tile
    ptx("cp.async.commit_group;")

    @mu.fori(ci(-(-tiles // grid[0])), ())
    def _tiles(i, carry):
      t = arith.addi(bid, arith.muli(i, ci(grid[0])))
      t_next = arith.addi(t, ci(grid[0]))
      parity = arith.remui(i, ci(2))
      cur = mu.getelementptr(s_ptr, [arith.muli(parity, ci(buf_elems))], bf16)
      nxt = mu.getelementptr(s_ptr, [arith.muli(arith.subi(ci(1), parity), ci(buf_elems))], bf16)
      with mu.when(lt(t_next, ci(tiles))):
        stage_async(*tile_coords(t_next), nxt)
      ptx("cp.async.commit_group;")   # one group per iteration (empty past the last tile) ...
      ptx("cp.async.wait_group 1;")   # ... so all but the newest, i.e. tile t's, have landed
      gpu.barrier()                   # for every thread of the CTA
      with mu.when(lt(t, ci(tiles))):
        compute(*tile_coords(t), cur)
      gpu.barrier()                   # every read of `cur` done before it is refilled
      return carry

  from jax._src.interpreters import mlir
  with mlir.make_ir_context(), ir.Location.unknown():  # the builders above need a context
    return mgpu.as_gpu_kernel(
        body, grid=grid, block=(nthreads, 1, 1),
        in_shape=(jax.ShapeDtypeStruct(x_shape, jnp.bfloat16),
                  jax.ShapeDtypeStruct((k * k, c), jnp.float32),
                  jax.ShapeDtypeStruct((c,), jnp.float32)),
        out_shape=jax.ShapeDtypeStruct(x_shape, jnp.bfloat16),
        smem_scratch_shape=jax.ShapeDtypeStruct(((2 if p.persistent else 1) * buf_elems,),
                                                jnp.bfloat16),
        kernel_name="dwconv_residual_mgpu")


@functools.cache
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
                    rows: int | None = None, persistent: bool | None = None) -> Array:
  """``x + b + depthwise_conv(x, w)`` ('SAME', stride 1) for bf16 NHWC x; w (k, k, C), bias (C,).

  ``cb``, ``rows`` and ``persistent`` pick the launch (:func:`plan`); the data gradient runs the
  same launch. Raises ValueError naming the misfit where :func:`plan` has no launch shape for the
  input."""
  k = w.shape[0]
  if x.dtype != jnp.bfloat16:
    raise ValueError(f"dwconv_mgpu: bf16 input only, got {x.dtype}")
  if w.shape != (k, k, x.shape[-1]) or bias.shape != (x.shape[-1],):
    raise ValueError(f"dwconv_mgpu: kernel {w.shape} / bias {bias.shape} do not fit input "
                     f"{x.shape} (want (k, k, C) and (C,))")
  p = plan(x.shape, k, cb=cb, rows=rows, persistent=persistent)
  if p is None:
    raise ValueError(f"dwconv_mgpu: no launch shape for input {x.shape} with a {k}x{k} kernel "
                     f"(cb={cb}, rows={rows}, persistent={persistent}): C must be a multiple of 8 "
                     "and the bordered tile fit in shared memory; use XLA's convolution for this "
                     "shape")
  return _dwconv(x, w, bias, p)
