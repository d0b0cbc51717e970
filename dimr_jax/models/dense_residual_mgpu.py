"""A Linear layer with its bias and the block's residual add in the epilogue: ``r + (h @ W + b)``.

The ConvNeXt blocks' MLPs end in ``x + w2(g)``. XLA leaves that add as a pass of its own: cuBLAS
could take ``x`` as the GEMM's addend only by writing over it, and ``x`` is still read by the
block's norm; the next op, the depthwise-conv kernel (a custom call), cannot fuse it either. The
pass reads two (B*H*W, C) bf16 tensors and writes one: 0.31 ms per block at DiMR-XL's sampling
shape, 6.3 ms of an XL guided sampling step (benchmarks/NOTES.md row 42). Here the GEMM's
epilogue adds the bias and the residual tile and writes the sum, so the GEMM's own output is never
written.

The kernel is a Hopper GEMM built like :mod:`geglu_gemm_mgpu` (whose notes on Mosaic GPU apply):
persistent CTAs walking the output tiles, one warpgroup issuing TMA copies of the h and W tiles into
a ring of shared-memory stages, two compute warpgroups issuing ``wgmma`` with float32 accumulators,
each owning ``tile_m`` rows of the CTA tile. At the start of a tile each compute warpgroup issues a
TMA copy of its residual tile into the shared-memory slot its output will leave from, so the load
runs under the tile's K loop; the epilogue waits for it, adds, and stores the slot by TMA.

Shapes: rows a multiple of 8 and N of 16 (tiled TMA descriptors), K a multiple of the K step. N
need not be a multiple of the column tile: W is zero-padded to whole tiles (a copy of the small
weight), the last tile's residual loads past N read zeros (TMA zero-fills) and its stores past N
are dropped, so DiMR-XL's N = 480 runs as four 128-wide tiles.

Arithmetic: the XLA path's roundings, ``round(round(round(h @ W) + b) + r)`` in the compute dtype,
each sum taken in float32. A custom VJP gives the backward by XLA (``dh = g @ W^T``,
``dW = h^T @ g``, ``db = sum g``, ``dr = g``), so training takes the kernel's forward.
Needs a Hopper GPU (sm_90); on CPU the tests lower it for CUDA and check the model's use of it with
the kernel faked.

Status (NOTES row 45): correct on an H200 (the GPU tests pass), but not faster. At XL's sampling
shape (256000, 960) -> 480 it takes 0.660 ms (358 TFLOP/s), at G's (256000, 1152) -> 576 0.698 ms
(487 TFLOP/s); cuBLAS at ~700 TFLOP/s plus the add pass at memory speed would be ~0.51 and ~0.69
ms (an estimate: that run's XLA line was not a valid measurement, see benchmarks/dense_residual.py).
So it is opt-in only (``pallas_ops='...,dense_residual_mgpu'``), not in 'auto', and not timed in
the model. The likely loss at XL is the 128-wide column tiles (N = 480: a quarter of the last
tile idle) and the epilogue, which no tile's K loop overlaps.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from dimr_jax.models import geglu_gemm_mgpu

Array = jax.Array
ROW_MULTIPLE = geglu_gemm_mgpu.ROW_MULTIPLE
available = geglu_gemm_mgpu.available


@dataclasses.dataclass(frozen=True)
class Config:
  """Static launch parameters: a CTA computes (2 * tile_m, tile_n) of the output (one tile_m-row
  half per compute warpgroup), the K loop in ``tile_k`` steps through ``stages`` shared-memory
  slots; the tiles are walked N-fastest (``grid_minor_n``) in bands ``grid_tile_width`` wide."""
  tile_m: int = 128
  tile_n: int = 128
  tile_k: int = 64
  stages: int = 3
  grid_minor_n: bool = True
  grid_tile_width: int = 1


def default_config(depth: int, width: int) -> Config | None:
  """The tiling for K = depth, N = width, or None where the kernel does not apply (K not a
  multiple of 32, N not of 16). N that is a multiple of 192 but not of 128 (DiMR-G's 576) takes
  64 x 192 tiles per warpgroup (no column wasted), everything else 128 x 128 (XL's 480: four
  tiles, the last one a quarter empty)."""
  if depth % 32 or width % 16:
    return None
  tk = 64 if depth % 64 == 0 else 32
  if width % 128 and width % 192 == 0:
    return Config(tile_m=64, tile_n=192, tile_k=tk, stages=4 if tk == 64 else 8)
  return Config(tile_m=128, tile_n=128, tile_k=tk, stages=3 if tk == 64 else 6)


def _check(h: Array, w: Array, b: Array, r: Array, cfg: Config) -> None:
  rows, depth = h.shape
  if w.ndim != 2 or w.shape[0] != depth:
    raise ValueError(f"dense_residual_mgpu: kernel {w.shape} does not fit input {h.shape}")
  width = w.shape[1]
  if b.shape != (width,) or r.shape != (rows, width):
    raise ValueError(f"dense_residual_mgpu: bias {b.shape} / residual {r.shape} do not fit the "
                     f"output ({rows}, {width})")
  if rows % ROW_MULTIPLE:
    raise ValueError(f"dense_residual_mgpu: {rows} rows, want a multiple of {ROW_MULTIPLE}")
  if depth % cfg.tile_k or cfg.tile_n % 64 or width % 16:
    raise ValueError(f"dense_residual_mgpu: K={depth} must be a multiple of tile_k={cfg.tile_k}, "
                     f"tile_n={cfg.tile_n} of 64 and N={width} of 16")
  if not h.dtype == w.dtype == r.dtype == jnp.bfloat16:
    raise ValueError(f"dense_residual_mgpu: bf16 operands only, got h {h.dtype}, kernel "
                     f"{w.dtype}, residual {r.dtype}")


def _call(h: Array, w: Array, b: Array, r: Array, cfg: Config) -> Array:
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu
  _check(h, w, b, r, cfg)
  rows, depth = h.shape
  width = w.shape[1]
  dt = h.dtype
  tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
  cta_m = 2 * tm
  m_iters, n_iters, k_iters = pl.cdiv(rows, cta_m), pl.cdiv(width, tn), depth // tk
  num_sms = getattr(jax.devices()[0], "core_count", 132)
  stages = min(cfg.stages, k_iters)
  itemsize = jnp.dtype(dt).itemsize

  def transforms(cols):
    swizzle = plgpu.find_swizzle(cols * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))

  # the residual and output tiles: TMA descriptors tile the global array itself, so their
  # swizzle must divide N (480 = 15 x 32: 64-byte swizzle); the kernel W is padded to whole tiles
  io_transforms = transforms(math.gcd(width, tn))

  def spec(shape, index_map, cols):
    return plgpu.BlockSpec(shape, index_map, transforms=transforms(cols),
                           memory_space=plgpu.SMEM)

  def pipeline(body, context):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(k_iters,), memory_registers=40,
        in_specs=[spec((cta_m, tk), lambda k: (0, k), tk),
                  spec((tk, tn), lambda k: (k, 0), tk)],
        wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=stages,
        compute_context=context)

  def kernel(h_gmem, w_gmem, b_gmem, r_gmem, out_gmem):
    unused = lambda *_, **__: None

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(unused, unused).get_allocations(h_gmem, w_gmem),
        io_smem=plgpu.SMEM((2, tm, tn), dt, transforms=io_transforms),
        b_smem=plgpu.SMEM((n_iters * tn,), jnp.float32),
        barriers=plgpu.Barrier(num_barriers=3),  # [0]: the bias; [1 + wg]: the residual tiles
        collective_axes="wg")
    def _scope(allocs, io_smem, b_smem, barriers):
      wg = lax.axis_index("wg")

      @pl.when(wg == 0)
      def _():  # one bulk copy of the (zero-padded) float32 bias
        plgpu.copy_gmem_to_smem(b_gmem, b_smem, barriers.at[0],
                                oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)

      plgpu.barrier_wait(barriers.at[0])

      @plgpu.nd_loop((m_iters * n_iters,), collective_axes="grid")
      def _tiles(info):
        (lin,) = info.index
        m_idx, n_idx = plgpu.planar_snake(lin, (m_iters, n_iters), 1 if cfg.grid_minor_n else 0,
                                          cfg.grid_tile_width)
        rows_cta = pl.ds(m_idx * cta_m, cta_m)
        rows_wg = pl.ds(wg * tm, tm)
        cols = pl.ds(n_idx * tn, tn)

        def context(run):
          # this warpgroup's slot is free once the previous tile's store has read it; then its
          # residual tile lands there while the K loop runs
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          plgpu.copy_gmem_to_smem(r_gmem.at[rows_cta, cols].at[rows_wg], io_smem.at[wg],
                                  barriers.at[1 + wg])

          @functools.partial(pl.run_scoped, acc=plgpu.ACC((tm, tn), jnp.float32))
          def _acc(acc):
            run(acc)
            f32 = jnp.float32
            bias = b_smem[pl.ds(n_idx * tn, tn)]
            y = (acc[...].astype(dt).astype(f32)
                 + lax.broadcast_in_dim(bias, (tm, tn), (1,))).astype(dt).astype(f32)
            plgpu.barrier_wait(barriers.at[1 + wg])
            io_smem[wg] = (y + io_smem[wg].astype(f32)).astype(dt)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(io_smem.at[wg], out_gmem.at[rows_cta, cols].at[rows_wg])

        def mma(_, h_smem, w_smem, acc):
          plgpu.wgmma(acc, h_smem.at[rows_wg], w_smem)
          plgpu.wgmma_wait(0)
          return acc

        pipeline(mma, context)(h_gmem.at[rows_cta, :], w_gmem.at[:, cols], allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  f = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((rows, width), dt),
      grid=(num_sms,), grid_names=("grid",), num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
  pad = n_iters * tn - width
  b_pad = jnp.pad(b.astype(dt).astype(jnp.float32), (0, pad))
  return f(h, jnp.pad(w, ((0, 0), (0, pad))), b_pad, r)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _dense_residual(h, w, b, r, cfg):
  return _call(h, w, b, r, cfg)


def _fwd(h, w, b, r, cfg):
  return _call(h, w, b, r, cfg), (h, w, b)


def _bwd(cfg, res, g):
  """XLA's GEMMs: the gradients of ``r + (h @ W + b)`` (the roundings pass gradients through)."""
  del cfg
  h, w, b = res
  dh = jnp.matmul(g, w.T, preferred_element_type=jnp.float32).astype(h.dtype)
  dw = jnp.matmul(h.T, g, preferred_element_type=jnp.float32).astype(w.dtype)
  db = jnp.sum(g.astype(jnp.float32), axis=0).astype(b.dtype)
  return dh, dw, db, g


_dense_residual.defvjp(_fwd, _bwd)


def applies(depth: int, width: int, rows: int) -> bool:
  """Whether :func:`dense_residual` takes this shape (a default tiling and rows a multiple of 8)."""
  return rows % ROW_MULTIPLE == 0 and default_config(depth, width) is not None


def dense_residual(h: Array, w: Array, b: Array, r: Array, cfg: Config | None = None) -> Array:
  """``r + (h @ w + b)`` for bf16 h (..., K), w (K, N), b (N,) and r (..., N), rounded as the XLA
  path rounds (the GEMM, its bias add and the residual add each to bf16)."""
  lead, depth = h.shape[:-1], h.shape[-1]
  width = w.shape[-1]
  rows = math.prod(lead)
  if r.shape != (*lead, width):
    raise ValueError(f"dense_residual_mgpu: residual {r.shape} does not fit the output "
                     f"{(*lead, width)}")
  if cfg is None:
    cfg = default_config(depth, width) or Config()  # Config(): _check names the misfit
  out = _dense_residual(h.reshape(rows, depth), w.astype(h.dtype), b, r.reshape(rows, width), cfg)
  return out.reshape(*lead, width)
