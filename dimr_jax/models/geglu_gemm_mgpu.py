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
ROW_MULTIPLE = 8  # rows of x the kernel takes: Mosaic's tiled TMA descriptors use 8-row tiles


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
  of the GEMM; ``stages`` is the depth of the shared-memory ring of K steps. The schedule options
  after ``grid_tile_width`` leave the arithmetic unchanged (bit-equal results, GPU tests); on the
  H100 none of them measured faster in the model (benchmarks/NOTES.md row 40), so they are off by
  default and kept for tuning on other parts (``benchmarks/geglu_gemm.py --mgpu``)."""
  tile_m: int = 128
  tile_n: int = 64
  tile_k: int = 64
  stages: int = 3
  grid_minor_n: bool = True   # walk the tiles N-fastest (x tile reused by consecutive CTAs)
  grid_tile_width: int = 1
  # Keep the wgmma groups of this many K steps in flight (their ring slots released that much
  # later) instead of waiting for each step's wgmma before the next is issued.
  delay_release: int = 0
  # Chain the per-tile pipelines (``emit_pipeline_warp_specialized``'s ``pipeline_state``): the
  # TMA warpgroup fetches the next tile's first K steps while the compute warpgroups are still in
  # this tile's epilogue, instead of waiting for them to finish the K loop. Used where every SM
  # walks >= 2 tiles, the K steps are a multiple of ``stages`` and ``delay_release`` is 0.
  chain_tiles: bool = False
  # The epilogue in this many column chunks per warpgroup, each stored by its own TMA copy from
  # one of two shared-memory slots, so a chunk's store overlaps the next chunk's arithmetic and
  # fewer float32 temporaries are live at once.
  epi_chunks: int = 1
  # Shared-memory slots the chunks rotate through (<= epi_chunks): one slot halves the output
  # buffer (room for one more ring stage) at the cost of waiting for each chunk's store.
  out_slots: int = 2
  # Pair CTAs into clusters of two along M that share the W0/W1 tiles: each K step's W tiles are
  # read from L2 once and multicast by TMA into both CTAs' shared memory (a CTA reads 1/3 fewer
  # bytes per step), the pair walking M tiles 2i and 2i+1 of one column block.
  cluster_m: bool = False
  # Round like the unfused path (the GEMM result to the compute dtype, then the biased sum again,
  # both halves) before the GELU, so the kernel's h is the unfused h but for the approximate
  # exp/rsqrt. Off: the float32 accumulators plus the bias go straight into the GELU and only h
  # is rounded (four float32 -> bf16 conversions fewer per output element, closer to the float32
  # result; conversions issue at a quarter of the FMA rate, and the epilogue is not overlapped
  # with the next tile's wgmma).
  round_like_unfused: bool = True
  # Ping-pong schedule (:func:`_call_pingpong`): each compute warpgroup walks tiles of its own
  # (``tile_m`` x ``tile_n`` of h, a ring of ``stages`` K steps per warpgroup), so one warpgroup's
  # epilogue runs while the other's wgmma keep the tensor cores busy; the cooperative default
  # leaves them idle for the whole epilogue (~15-20% of the kernel at G's ConvNeXt shape).
  pingpong: bool = False


def _epilogue(a0: Array, a1: Array, b0: Array, b1: Array, cfg: Config, dt) -> Array:
  """h from the float32 accumulators of x W0, x W1 and the bias chunks (float32, broadcast over
  rows), rounded as :attr:`Config.round_like_unfused` says."""
  f32 = jnp.float32
  f0, f1 = a0, a1
  if cfg.round_like_unfused:
    f0, f1 = f0.astype(dt).astype(f32), f1.astype(dt).astype(f32)
  f0 = f0 + lax.broadcast_in_dim(b0, f0.shape, (1,))
  f1 = f1 + lax.broadcast_in_dim(b1, f1.shape, (1,))
  if cfg.round_like_unfused:
    f0, f1 = f0.astype(dt).astype(f32), f1.astype(dt).astype(f32)
  return (_gelu(f0) * f1).astype(dt)


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
  if rows % ROW_MULTIPLE:
    raise ValueError(f"geglu_gemm_mgpu: {rows} rows, want a multiple of {ROW_MULTIPLE} "
                     "(geglu_gemm pads them)")
  if cfg.tile_n % cfg.epi_chunks or (cfg.tile_n // cfg.epi_chunks) % 64:
    raise ValueError(f"geglu_gemm_mgpu: epi_chunks={cfg.epi_chunks} must split tile_n={cfg.tile_n}"
                     " into chunks of a multiple of 64 columns")
  if cfg.delay_release >= cfg.stages:
    raise ValueError(f"geglu_gemm_mgpu: delay_release={cfg.delay_release} needs more stages than "
                     f"{cfg.stages}")
  if hidden % cfg.tile_n or depth % cfg.tile_k:
    raise ValueError(f"geglu_gemm_mgpu: H={hidden} must be a multiple of tile_n={cfg.tile_n} and "
                     f"K={depth} of tile_k={cfg.tile_k}; use the Triton/XLA path for this shape")
  if cfg.pingpong:
    if cfg.delay_release or cfg.chain_tiles or cfg.cluster_m or cfg.epi_chunks != 1:
      raise ValueError("geglu_gemm_mgpu: pingpong=True takes none of delay_release, chain_tiles, "
                       "cluster_m, epi_chunks (its own schedule)")
    if cfg.stages < 2:  # a K step's slot is released one step late
      raise ValueError(f"geglu_gemm_mgpu: pingpong needs stages >= 2, got {cfg.stages}")
    need = _pingpong_smem_bytes(hidden, cfg)
    if need > SMEM_BYTES:
      raise ValueError(f"geglu_gemm_mgpu: pingpong with tile {cfg.tile_m}x{cfg.tile_n}x"
                       f"{cfg.tile_k} and {cfg.stages} stages per ring needs {need} bytes of "
                       f"shared memory (> {SMEM_BYTES}); use fewer stages or a smaller tile_k")
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
  ncl = 2 if cfg.cluster_m else 1  # CTAs per cluster
  m_iters, n_iters, k_iters = pl.cdiv(rows, ncl * cta_m), hidden // tn, depth // tk
  num_sms = getattr(jax.devices()[0], "core_count", 132)  # H100 SXM: 132 SMs
  num_clusters = num_sms // ncl
  stages = min(cfg.stages, k_iters)  # the pipeline shrinks its ring to the K steps itself
  chain = (cfg.chain_tiles and cfg.delay_release == 0 and k_iters % stages == 0
           and m_iters * n_iters >= 2 * num_clusters)
  ec = tn // cfg.epi_chunks  # columns per epilogue chunk
  swizzle = plgpu.find_swizzle(tk * jnp.dtype(dt).itemsize * 8)
  in_transforms = (plgpu.TilingTransform((8, swizzle // jnp.dtype(dt).itemsize)),
                   plgpu.SwizzleTransform(swizzle))
  out_swizzle = plgpu.find_swizzle(ec * jnp.dtype(dt).itemsize * 8)
  out_transforms = (plgpu.TilingTransform((8, out_swizzle // jnp.dtype(dt).itemsize)),
                    plgpu.SwizzleTransform(out_swizzle))
  out_slots = max(1, min(cfg.out_slots, cfg.epi_chunks))

  def spec(shape, index_map, shared=False):
    return plgpu.BlockSpec(shape, index_map, transforms=in_transforms, memory_space=plgpu.SMEM,
                           delay_release=cfg.delay_release,
                           collective_axes=("cluster",) if shared else ())

  def pipeline(body, context, state=None):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(k_iters,), memory_registers=40,
        in_specs=[spec((cta_m, tk), lambda k: (0, k)),
                  spec((tk, tn), lambda k: (k, 0), cfg.cluster_m),
                  spec((tk, tn), lambda k: (k, 0), cfg.cluster_m)],
        wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=stages,
        compute_context=context, pipeline_state=state)

  def kernel(x_gmem, w_gmem, b_gmem, out_gmem):
    unused = lambda *_, **__: None

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(unused, unused).get_allocations(x_gmem, w_gmem, w_gmem),
        out_smem=plgpu.SMEM((2, out_slots, tm, ec), dt, transforms=out_transforms),
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

      @plgpu.nd_loop((m_iters * n_iters,), collective_axes="grid")
      def _tiles(info):
        (lin,) = info.index
        m_idx, n_idx = plgpu.planar_snake(lin, (m_iters, n_iters), 1 if cfg.grid_minor_n else 0,
                                          cfg.grid_tile_width)
        if cfg.cluster_m:  # the pair's second CTA takes the next M tile (past the end: TMA
          m_idx = m_idx * 2 + lax.axis_index("cluster")  # loads zeros, its stores are dropped)
        rows_cta = pl.ds(m_idx * cta_m, cta_m)
        rows_wg = pl.ds(wg * tm, tm)
        state = None
        if chain:  # START on this SM's first tile, STOP on its last (each SM has >= 2)
          state = jnp.where(info.local_index == 0, int(plgpu.PipelinePipeline.START),
                            jnp.where(info.local_index == info.num_local_steps - 1,
                                      int(plgpu.PipelinePipeline.STOP),
                                      int(plgpu.PipelinePipeline.STEADY)))

        def context(run):
          @functools.partial(pl.run_scoped, acc0=plgpu.ACC((tm, tn), jnp.float32),
                             acc1=plgpu.ACC((tm, tn), jnp.float32))
          def _accs(acc0, acc1):
            run((acc0, acc1))
            if cfg.delay_release:
              plgpu.wgmma_wait(0)
            f32 = jnp.float32
            a0, a1 = acc0[...], acc1[...]
            for c in range(cfg.epi_chunks):
              cc = slice(c * ec, (c + 1) * ec)
              b0 = b_smem[pl.ds(n_idx * tn + c * ec, ec)].astype(f32)
              b1 = b_smem[pl.ds(hidden + n_idx * tn + c * ec, ec)].astype(f32)
              h = _epilogue(a0[:, cc], a1[:, cc], b0, b1, cfg, dt)
              slot = c % out_slots
              # the store that last read this slot has finished reading it
              plgpu.wait_smem_to_gmem(out_slots - 1 if c else 0, wait_read_only=True)
              out_smem[wg, slot] = h
              plgpu.commit_smem()
              plgpu.copy_smem_to_gmem(
                  out_smem.at[wg, slot],
                  out_gmem.at[rows_cta, pl.ds(n_idx * tn + c * ec, ec)].at[rows_wg])

        def mma(_, x_smem, w0_smem, w1_smem, accs):
          acc0, acc1 = accs
          plgpu.wgmma(acc0, x_smem.at[rows_wg], w0_smem)
          plgpu.wgmma(acc1, x_smem.at[rows_wg], w1_smem)
          plgpu.wgmma_wait(2 * cfg.delay_release)  # two wgmma groups per K step
          return accs

        pipeline(mma, context, state)(
            x_gmem.at[rows_cta, :], w_gmem.at[:, pl.ds(n_idx * tn, tn)],
            w_gmem.at[:, pl.ds(hidden + n_idx * tn, tn)], allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  cluster = dict(cluster=(2,), cluster_names=("cluster",)) if cfg.cluster_m else {}
  f = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((rows, hidden), dt),
      grid=(num_clusters,), grid_names=("grid",), **cluster, num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
                                           approx_math=True))
  return f(x, w01, b01)


SMEM_BYTES = 227 * 1024  # Hopper's largest dynamic shared memory per CTA


def _pingpong_smem_bytes(hidden: int, cfg: Config) -> int:
  stage = (cfg.tile_m * cfg.tile_k + 2 * cfg.tile_k * cfg.tile_n) * 2  # bf16 x, W0, W1 tiles
  return 2 * cfg.stages * stage + 2 * cfg.tile_m * cfg.tile_n * 2 + 2 * hidden * 2 + 1024


def _call_pingpong(x: Array, w01: Array, b01: Array, cfg: Config) -> Array:
  """The ping-pong schedule: warpgroups 0 and 1 compute, 2 issues the TMA copies.

  The CTA's output tiles (``lin = cta + j * num_ctas``) go alternately to compute warpgroup
  ``j % 2``, each with its own ring of ``stages`` shared-memory slots (so every barrier is waited
  on by one warpgroup only, which keeps Mosaic's per-thread phase bits right). The memory
  warpgroup fills the rings in tile order; it reaches tile j+1 when tile j's last K steps are in
  flight, so warpgroup (j+1) % 2 runs its K loop while warpgroup j % 2 is in its epilogue (the
  overlap the cooperative schedule lacks). Each warpgroup holds (tile_m, tile_n) float32
  accumulators of x W0 and of x W1 and keeps each K step's wgmma in flight while it waits for
  the next step's tiles (a slot is released one step late, hence ``stages >= 2``); the epilogue
  is :func:`_epilogue`, stored by TMA from the warpgroup's own shared-memory slot.
  """
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu
  rows, depth, hidden = _check(x, w01, b01, cfg)
  dt = x.dtype
  tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
  m_iters, n_iters, k_iters = pl.cdiv(rows, tm), hidden // tn, depth // tk
  n_tiles = m_iters * n_iters
  num_ctas = getattr(jax.devices()[0], "core_count", 132)
  per_cta = pl.cdiv(n_tiles, num_ctas)  # tiles of the busiest CTA (the others skip the last)
  stages = cfg.stages
  swizzle = plgpu.find_swizzle(tk * jnp.dtype(dt).itemsize * 8)
  in_transforms = (plgpu.TilingTransform((8, swizzle // jnp.dtype(dt).itemsize)),
                   plgpu.SwizzleTransform(swizzle))
  w_transforms = in_transforms  # as the cooperative kernel's W tiles
  out_swizzle = plgpu.find_swizzle(tn * jnp.dtype(dt).itemsize * 8)
  out_transforms = (plgpu.TilingTransform((8, out_swizzle // jnp.dtype(dt).itemsize)),
                    plgpu.SwizzleTransform(out_swizzle))
  compute_regs = 232  # (512 - 40) / 2 rounded down to a multiple of 8
  memory_regs = 40

  def tile_of(j):
    lin = lax.axis_index("grid") + j * num_ctas
    m_idx, n_idx = plgpu.planar_snake(lin, (m_iters, n_iters), 1 if cfg.grid_minor_n else 0,
                                      cfg.grid_tile_width)
    return lin < n_tiles, m_idx, n_idx

  def kernel(x_gmem, w_gmem, b_gmem, out_gmem):
    @functools.partial(
        pl.run_scoped,
        x_smem=plgpu.SMEM((2, stages, tm, tk), dt, transforms=in_transforms),
        w0_smem=plgpu.SMEM((2, stages, tk, tn), dt, transforms=w_transforms),
        w1_smem=plgpu.SMEM((2, stages, tk, tn), dt, transforms=w_transforms),
        out_smem=plgpu.SMEM((2, tm, tn), dt, transforms=out_transforms),
        b_smem=plgpu.SMEM((2 * hidden,), dt),
        loaded=plgpu.Barrier(num_arrivals=3, num_barriers=2 * stages),
        consumed=plgpu.Barrier(num_arrivals=1, num_barriers=2 * stages),
        b_barrier=plgpu.Barrier(num_barriers=1),
        collective_axes="wg")
    def _scope(x_smem, w0_smem, w1_smem, out_smem, b_smem, loaded, consumed, b_barrier):
      wg = lax.axis_index("wg")

      @pl.when(wg == 2)
      def _memory():
        plgpu.set_max_registers(memory_regs, action="decrease")
        plgpu.copy_gmem_to_smem(b_gmem, b_smem, b_barrier.at[0],
                                oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)

        @pl.loop(0, per_cta)
        def _tile(j):
          valid, m_idx, n_idx = tile_of(j)
          ring = lax.rem(j, 2)

          @pl.when(valid)
          def _():
            @pl.loop(0, k_iters)
            def _step(s):
              use = lax.div(j, 2) * k_iters + s  # the ring's use count
              slot = lax.rem(use, stages)
              bar = ring * stages + slot

              @pl.when(use >= stages)
              def _():  # the warpgroup has finished reading this slot's previous use
                plgpu.barrier_wait(consumed.at[bar])

              ks = pl.ds(s * tk, tk)
              plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(m_idx * tm, tm), ks],
                                      x_smem.at[ring, slot], loaded.at[bar])
              plgpu.copy_gmem_to_smem(w_gmem.at[ks, pl.ds(n_idx * tn, tn)],
                                      w0_smem.at[ring, slot], loaded.at[bar])
              plgpu.copy_gmem_to_smem(w_gmem.at[ks, pl.ds(hidden + n_idx * tn, tn)],
                                      w1_smem.at[ring, slot], loaded.at[bar])

      @pl.when(wg < 2)
      def _compute():
        plgpu.set_max_registers(compute_regs, action="increase")
        plgpu.barrier_wait(b_barrier.at[0])

        @pl.loop(0, pl.cdiv(per_cta, 2))
        def _tile(i):
          j = 2 * i + wg
          valid, m_idx, n_idx = tile_of(j)

          @pl.when(jnp.logical_and(valid, j < per_cta))
          def _():
            @functools.partial(pl.run_scoped, acc0=plgpu.ACC((tm, tn), jnp.float32),
                               acc1=plgpu.ACC((tm, tn), jnp.float32))
            def _accs(acc0, acc1):
              use0 = i * k_iters  # this warpgroup's ring uses before this tile

              @pl.loop(0, k_iters)
              def _step(s):
                slot = lax.rem(use0 + s, stages)
                plgpu.barrier_wait(loaded.at[wg * stages + slot])
                plgpu.wgmma(acc0, x_smem.at[wg, slot], w0_smem.at[wg, slot])
                plgpu.wgmma(acc1, x_smem.at[wg, slot], w1_smem.at[wg, slot])
                # this step's two wgmma groups stay in flight (a warpgroup mostly runs its K loop
                # alone, so waiting for them would leave the tensor cores idle at every step);
                # the previous step's are done, so its slot goes back to the memory warpgroup
                plgpu.wgmma_wait(2)

                @pl.when(s > 0)
                def _():
                  plgpu.barrier_arrive(consumed.at[wg * stages + lax.rem(use0 + s - 1, stages)])

              plgpu.wgmma_wait(0)
              plgpu.barrier_arrive(consumed.at[wg * stages + lax.rem(use0 + k_iters - 1, stages)])

              f32 = jnp.float32
              b0 = b_smem[pl.ds(n_idx * tn, tn)].astype(f32)
              b1 = b_smem[pl.ds(hidden + n_idx * tn, tn)].astype(f32)
              h = _epilogue(acc0[...], acc1[...], b0, b1, cfg, dt)
              plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last store read the slot
              out_smem[wg] = h
              plgpu.commit_smem()
              plgpu.copy_smem_to_gmem(out_smem.at[wg],
                                      out_gmem.at[pl.ds(m_idx * tm, tm), pl.ds(n_idx * tn, tn)])

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  f = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((rows, hidden), dt),
      grid=(num_ctas,), grid_names=("grid",), num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
                                           approx_math=True))
  return f(x, w01, b01)


def _run(x, w01, b01, cfg):
  return (_call_pingpong if cfg.pingpong else _call)(x, w01, b01, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _geglu_gemm(x, w01, b01, cfg):
  return _run(x, w01, b01, cfg)


def _fwd(x, w01, b01, cfg):
  return _run(x, w01, b01, cfg), (x, w01, b01)


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
      250 x 257 = 64250 -> 64256; the model's Transformer stages hand over rows already
      padded, ``Stage.flat_rows``). With ``padded_rows=True`` the result
      is returned as those (M8, H) rows, for a caller whose next GEMM can take them and slice
      after it (a slice here would copy the whole (M, H) output); otherwise it is sliced back to
      (..., H).
  """
  lead, depth = x.shape[:-1], x.shape[-1]
  rows = math.prod(lead)
  if cfg is None:
    cfg = default_config(depth, w01.shape[-1] // 2) or Config()  # Config(): _check names the misfit
  rows8 = -(-rows // ROW_MULTIPLE) * ROW_MULTIPLE
  dt = x.dtype
  x2 = x.reshape(rows, depth)
  if rows8 != rows:
    x2 = jnp.pad(x2, ((0, rows8 - rows), (0, 0)))
  h = _geglu_gemm(x2, w01.astype(dt), b01.astype(dt), cfg)
  if padded_rows:
    return h
  return h[:rows].reshape(*lead, h.shape[-1])
