"""The GEGLU MLP's first GEMM with the GEGLU in its epilogue, as a Mosaic GPU (Hopper) kernel.

``h = gelu_exact(x @ W0 + b0) * (x @ W1 + b1)`` in one kernel, for sampling (no differentiation):
the (M, 2H) GEMM output is never written to memory nor read back, which is what the unfused path
(cuBLAS GEMM, then ``geglu_kernel``'s elementwise pass) spends ~20 ms of an XL/2R guided sampling
step on (benchmarks/NOTES.md rows 29, 37).

Why Mosaic GPU and not Triton: row 26's fused Pallas *Triton* kernel ran its K loop below cuBLAS at
the Transformer shape, so the saved pass did not pay. This kernel is built like a Hopper GEMM:
persistent (one CTA per SM walking the output tiles), warp-specialised (one warpgroup issues TMA
copies of the x and W tiles into a ring of shared-memory stages, two compute warpgroups issue
``wgmma`` on them), with float32 accumulators in registers. Each compute warpgroup owns ``tile_m``
rows of a CTA tile and keeps *two* accumulators, the matching ``tile_n`` columns of ``x @ W0`` and of
``x @ W1``, so the GEGLU is applied in registers once the K loop ends.

Rows need not be a multiple of the tile: TMA loads past the end of ``x`` are zero-filled and TMA
stores past the end of ``h`` are dropped by the hardware. They must be a multiple of 8 (Mosaic
builds tiled TMA descriptors with 8-row tiles), so :func:`geglu_gemm` pads sampling's
M = 250 x 257 = 64250 to 64256. H must be a multiple of ``tile_n`` and K of ``tile_k``.

The arithmetic is the unfused path's: float32 accumulation, the GEMM result rounded to the compute
dtype, the bias added and rounded again, then ``gelu(f0) * f1`` in float32 (:func:`gelu_epilogue`,
whose approximate exp and rsqrt flip the final bf16 rounding of under 1% of the elements) and one
rounding.

The model uses it where nothing is differentiated (``GegluMLP`` with ``pallas_ops``
'geglu_gemm_mgpu' and a batch-shared time, i.e. the samplers). A differentiated call still works
(custom VJP: h01 recomputed by one more GEMM, then ``geglu_kernel``'s backward), but is not what
training should run. Needs a Hopper GPU (sm_90) and jax's Mosaic GPU backend; Mosaic GPU's
interpreter cannot run this kernel (collective scoped allocations), so on CPU the tests check its
shape logic and lower it for CUDA (which runs Mosaic's layout inference); its numbers are checked
by the GPU-only tests.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from dimr_jax.models import geglu_kernel as gk

Array = jax.Array


def gelu_epilogue(x: Array) -> Array:
  """float32 exact GELU, ``x * Phi(x)``, as the epilogue computes it: ``geglu_kernel``'s erfc fit
  (Mosaic GPU has no erf) with the reciprocal 1/y taken as rsqrt(y)^2 and the kernel compiled
  with ``approx_math``, so exp and rsqrt are single hardware instructions (MUFU; ~2 ulp) instead
  of an IEEE division and a software exp, each a sequence of instructions; the epilogue is not
  overlapped with the next tile's wgmma, so its length shows in the kernel's time. Relative
  error of Phi ~1e-6, far below the bf16 rounding of the result (tests)."""
  y = 1.0 + gk._P_X * jnp.abs(x)
  r = lax.rsqrt(y)
  t = r * r
  tail = t * gk._horner(gk._HALF_POLY, t) * jnp.exp(-0.5 * x * x)
  return x * jnp.where(x < 0, tail, 1.0 - tail)


# a module attribute so benchmarks/geglu_gemm.py can swap in the identity to time the GEMM alone
_gelu = gelu_epilogue


@dataclasses.dataclass(frozen=True)
class Config:
  """Static launch parameters. A CTA computes (2 * tile_m, tile_n) of h, i.e. (2 tile_m, 2 tile_n)
  of the GEMM; ``stages`` is the depth of the shared-memory ring of K steps."""
  tile_m: int = 128
  tile_n: int = 64
  tile_k: int = 64
  stages: int = 3
  grid_minor_n: bool = True   # walk the tiles N-fastest (x tile reused by consecutive CTAs)
  grid_tile_width: int = 1


def available() -> bool:
  """Mosaic GPU present and the default device a Hopper (sm_90) GPU."""
  try:
    import jax.experimental.pallas.mosaic_gpu  # noqa: F401
  except ImportError:
    return False
  dev = jax.devices()[0]
  return dev.platform == "gpu" and getattr(dev, "compute_capability", "") == "9.0"


def _check(x: Array, w01: Array, b01: Array, cfg: Config) -> tuple[int, int, int]:
  rows, depth = x.shape
  if w01.ndim != 2 or w01.shape[0] != depth or w01.shape[1] % 2:
    raise ValueError(f"geglu_gemm_mgpu: w01 {w01.shape} does not fit x {x.shape} (want (K, 2H))")
  hidden = w01.shape[1] // 2
  if b01.shape != (2 * hidden,):
    raise ValueError(f"geglu_gemm_mgpu: b01 {b01.shape} does not fit w01 {w01.shape} (want (2H,))")
  if rows % 8:
    raise ValueError(f"geglu_gemm_mgpu: {rows} rows, want a multiple of 8 (geglu_gemm pads them)")
  if hidden % cfg.tile_n or depth % cfg.tile_k:
    raise ValueError(f"geglu_gemm_mgpu: H={hidden} must be a multiple of tile_n={cfg.tile_n} and "
                     f"K={depth} of tile_k={cfg.tile_k}; use the Triton/XLA path for this shape")
  if x.dtype != jnp.bfloat16 or w01.dtype != x.dtype:
    raise ValueError(f"geglu_gemm_mgpu: bf16 operands only, got x {x.dtype}, w01 {w01.dtype}")
  return rows, depth, hidden


def _call(x: Array, w01: Array, b01: Array, cfg: Config) -> Array:
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu
  rows, depth, hidden = _check(x, w01, b01, cfg)
  dt = x.dtype
  tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
  cta_m = 2 * tm
  m_iters, n_iters, k_iters = pl.cdiv(rows, cta_m), hidden // tn, depth // tk
  swizzle = plgpu.find_swizzle(tk * jnp.dtype(dt).itemsize * 8)
  in_transforms = (plgpu.TilingTransform((8, swizzle // jnp.dtype(dt).itemsize)),
                   plgpu.SwizzleTransform(swizzle))
  out_swizzle = plgpu.find_swizzle(tn * jnp.dtype(dt).itemsize * 8)
  out_transforms = (plgpu.TilingTransform((8, out_swizzle // jnp.dtype(dt).itemsize)),
                    plgpu.SwizzleTransform(out_swizzle))

  def spec(shape, index_map):
    return plgpu.BlockSpec(shape, index_map, transforms=in_transforms, memory_space=plgpu.SMEM)

  def pipeline(body, context):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(k_iters,), memory_registers=40,
        in_specs=[spec((cta_m, tk), lambda k: (0, k)),
                  spec((tk, tn), lambda k: (k, 0)),
                  spec((tk, tn), lambda k: (k, 0))],
        wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=cfg.stages,
        compute_context=context)

  def kernel(x_gmem, w_gmem, b_gmem, out_gmem):
    unused = lambda *_, **__: None

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(unused, unused).get_allocations(x_gmem, w_gmem, w_gmem),
        out_smem=plgpu.SMEM((2, tm, tn), dt, transforms=out_transforms),
        b_smem=plgpu.SMEM((2 * hidden,), dt),
        b_barrier=plgpu.Barrier(num_barriers=1),
        collective_axes="wg")
    def _scope(allocs, out_smem, b_smem, b_barrier):
      wg = lax.axis_index("wg")

      @pl.when(wg == 0)
      def _():  # one bulk copy of the whole bias (not a tiled TMA copy: no 256-element box limit)
        plgpu.copy_gmem_to_smem(b_gmem, b_smem, b_barrier.at[0],
                                oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)

      plgpu.barrier_wait(b_barrier.at[0])  # the bias has landed before any epilogue reads it

      @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
      def _tiles(info):
        (lin,) = info.index
        m_idx, n_idx = plgpu.planar_snake(lin, (m_iters, n_iters), 1 if cfg.grid_minor_n else 0,
                                          cfg.grid_tile_width)
        rows_cta = pl.ds(m_idx * cta_m, cta_m)
        rows_wg = pl.ds(wg * tm, tm)
        cols0 = pl.ds(n_idx * tn, tn)
        cols1 = pl.ds(hidden + n_idx * tn, tn)

        def context(run):
          @functools.partial(pl.run_scoped, acc0=plgpu.ACC((tm, tn), jnp.float32),
                             acc1=plgpu.ACC((tm, tn), jnp.float32))
          def _accs(acc0, acc1):
            run((acc0, acc1))
            f32 = jnp.float32
            b0 = b_smem[cols0].astype(f32)
            b1 = b_smem[cols1].astype(f32)
            f0 = (acc0[...].astype(dt).astype(f32)
                  + lax.broadcast_in_dim(b0, (tm, tn), (1,))).astype(dt).astype(f32)
            f1 = (acc1[...].astype(dt).astype(f32)
                  + lax.broadcast_in_dim(b1, (tm, tn), (1,))).astype(dt).astype(f32)
            h = (_gelu(f0) * f1).astype(dt)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            out_smem[wg] = h
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[rows_cta, cols0].at[rows_wg])

        def mma(_, x_smem, w0_smem, w1_smem, accs):
          acc0, acc1 = accs
          plgpu.wgmma(acc0, x_smem.at[rows_wg], w0_smem)
          plgpu.wgmma(acc1, x_smem.at[rows_wg], w1_smem)
          plgpu.wgmma_wait(0)
          return accs

        pipeline(mma, context)(x_gmem.at[rows_cta, :], w_gmem.at[:, cols0], w_gmem.at[:, cols1],
                               allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  num_sms = getattr(jax.devices()[0], "core_count", 132)  # H100 SXM: 132 SMs
  f = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((rows, hidden), dt),
      grid=(num_sms,), grid_names=("sm",), num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
                                           approx_math=True))
  return f(x, w01, b01)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _geglu_gemm(x, w01, b01, cfg):
  return _call(x, w01, b01, cfg)


def _fwd(x, w01, b01, cfg):
  return _call(x, w01, b01, cfg), (x, w01, b01)


def _bwd(cfg, res, g):
  """Correct, not fast: the kernel saves no h01, so the backward recomputes it with one more GEMM
  (the model picks this kernel only for a batch-shared time, i.e. sampling, where nothing is
  differentiated; training keeps the GEMM + GEGLU-kernel path)."""
  del cfg
  x, w01, b01 = res
  h01 = jnp.matmul(x, w01, preferred_element_type=jnp.float32).astype(x.dtype)
  return gk.geglu_gemm_backward(x, w01, b01, h01, g)


_geglu_gemm.defvjp(_fwd, _bwd)


def default_config(depth: int, hidden: int) -> Config | None:
  """The tiling for this shape, or None where the kernel does not apply (H not a multiple of 64,
  K not of 32). Two tilings, from the H100 sweep (results/h100_geglu_gemm_mgpu_tune_*): at the
  XL shapes they were the fastest timed, though rankings moved by ~5% between machines; at G's
  shapes only the N-minor walk of the 64 x 128 tiling was timed (1.408 / 1.636 ms against
  1.712 / 2.112 unfused). A 4-wide grid walk measured slower in the model (NOTES row 39)."""
  if hidden % 64 or depth % 32:
    return None
  tk = 64 if depth % 64 == 0 else 32
  stages = 3 if tk == 64 else 6  # the ring fills the shared memory either way
  if hidden % 128 == 0:  # 64 rows x 128 columns per warpgroup
    return Config(tile_m=64, tile_n=128, tile_k=tk, stages=stages, grid_minor_n=False,
                  grid_tile_width=8)
  return Config(tile_m=128, tile_n=64, tile_k=tk, stages=stages, grid_minor_n=True,
                grid_tile_width=8)


def geglu_gemm(x: Array, w01: Array, b01: Array, cfg: Config | None = None, *,
               padded_rows: bool = False) -> Array:
  """``gelu_exact(h0) * h1`` for ``h0, h1 = split(x @ w01 + b01)``: (..., K) -> (..., H).

  Args:
    x: (..., K) bf16 activations.
    w01: (K, 2H) the w0|w1 kernels side by side (cast to x's dtype).
    b01: (2H,) their biases (cast to x's dtype).
    cfg: tiling (see :class:`Config`); default :func:`default_config`.
    padded_rows: the kernel's TMA descriptors need a row count that is a multiple of 8 (a tiled
      copy), so x's M = prod(leading dims) rows are zero-padded up to one here (sampling's
      250 x 257 = 64250 -> 64256; ``GegluMLP`` pads before its norm instead, so that XLA can fuse
      the pad there, and passes rows already padded). With ``padded_rows=True`` the result
      is returned as those (M8, H) rows, for a caller whose next GEMM can take them and slice
      after it (a slice here would copy the whole (M, H) output); otherwise it is sliced back to
      (..., H).
  """
  lead, depth = x.shape[:-1], x.shape[-1]
  rows = math.prod(lead)
  if cfg is None:
    cfg = default_config(depth, w01.shape[-1] // 2) or Config()  # Config(): _check names the misfit
  rows8 = -(-rows // 8) * 8
  dt = x.dtype
  x2 = x.reshape(rows, depth)
  if rows8 != rows:
    x2 = jnp.pad(x2, ((0, rows8 - rows), (0, 0)))
  h = _geglu_gemm(x2, w01.astype(dt), b01.astype(dt), cfg)
  if padded_rows:
    return h
  return h[:rows].reshape(*lead, h.shape[-1])
