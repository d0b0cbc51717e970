"""Depthwise 7x7 conv of the ConvNeXt stages: the ways to compute it, timed on their own.

    python benchmarks/dwconv.py --batch=64 --dim=480

Variants: cuDNN's depthwise (grouped, one channel per group) convolution in NHWC and NCHW, the
same conv as a grouped convolution with ``g`` channels per group and a block-diagonal kernel
(g-fold more FLOPs, but tensor-core friendly), and shifted multiply-adds (the rejected change of
benchmarks/NOTES.md row 9: in the full model XLA fused the 49 slices poorly). Prints forward and
forward+backward (dx and dw) medians (ms) and the max difference to the depthwise result.

``--residual`` times the op the model runs, ``x + b + dwconv(x)``: XLA (cuDNN conv + fused adds)
against the Pallas kernels of ``dimr_jax/models/dwconv_kernel.py`` (GPU only; elsewhere only the
XLA line), at the kernels' default tiling, forward and forward+backward with both weight gradients.
``--tune`` sweeps their tiling instead: channel blocks 32..512 (need not divide C: the channels are
padded), row tiles 1..8, 4 or 8 warps, column tiles ``--col_tiles`` (default: the whole width),
leaving out tilings with more than 256 float32 accumulators per thread; it times the forward of
each, then forward+backward (wgrad 'xla' and 'pallas') of the ``--top`` fastest. ``--layers=L``
times L chained applications (x -> f(x)) in one jit and reports the time per application, so that
launch overhead does not hide a fraction-of-a-millisecond kernel.

    python benchmarks/dwconv.py --residual --tune --batch=250 --dim=480 --layers=10

``--mgpu`` times the Mosaic GPU kernel (``dwconv_mgpu.py``) instead, at ';'-separated launch
shapes ``auto`` or ``cb:rows``, each optionally suffixed ``:0`` (the plain launch) or ``:1`` (the
persistent one; unsuffixed: the module's default); the ``auto`` ones also forward+backward:

    python benchmarks/dwconv.py --residual --batch=250 --dim=480 --layers=10 --mgpu='auto:0;auto:1'
"""
import argparse
import functools
import os
import re
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timing import median_ms  # benchmarks/timing.py

from dimr_jax.models import dwconv_kernel, dwconv_mgpu

MGPU_SPEC = re.compile(r"(auto|(\d+):(\d+))(?::([01]))?")  # --mgpu's launch shapes


def shifts(x, w):
  """'SAME' depthwise correlation as k*k shifted multiply-adds in float32."""
  k = w.shape[0]
  p = k // 2
  _, hh, ww, _ = x.shape
  xp = jnp.pad(x, [(0, 0), (p, p), (p, p), (0, 0)]).astype(jnp.float32)
  w = w.astype(jnp.float32)
  return sum(xp[:, i:i + hh, j:j + ww, :] * w[i, j] for i in range(k) for j in range(k))


def depthwise(x, w, layout="NHWC"):
  k = w.shape[0]
  pad = [(k // 2, k // 2)] * 2
  if layout == "NCHW":
    return jax.lax.conv_general_dilated(
        x, w.transpose(2, 0, 1)[:, None], (1, 1), pad,
        dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=x.shape[1],
        preferred_element_type=jnp.float32)
  return jax.lax.conv_general_dilated(
      x, w[:, :, None, :], (1, 1), pad,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1],
      preferred_element_type=jnp.float32)


def block_diagonal(x, w, g):
  """The depthwise conv as a grouped conv with g channels per group (kernel zero off-diagonal)."""
  k, c = w.shape[0], w.shape[-1]
  mask = (jnp.arange(g)[:, None] == jnp.arange(c)[None, :] % g).astype(w.dtype)  # (g, C)
  kbd = w[:, :, None, :] * mask
  return jax.lax.conv_general_dilated(
      x, kbd, (1, 1), [(k // 2, k // 2)] * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c // g,
      preferred_element_type=jnp.float32)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--side", type=int, default=32)
  p.add_argument("--dim", type=int, default=480)
  p.add_argument("--groups", default="8,16,32")
  p.add_argument("--shifts", action="store_true", help="also time the shifted multiply-adds")
  p.add_argument("--residual", action="store_true", help="time x + b + dwconv(x): XLA vs Pallas")
  p.add_argument("--tune", action="store_true", help="with --residual: sweep Pallas tile sizes")
  p.add_argument("--col_tiles", default="", help="with --tune: column tiles to sweep (default: W)")
  p.add_argument("--top", type=int, default=4,
                 help="with --tune: time forward+backward for this many of the fastest forwards")
  p.add_argument("--conv_dtypes", default="",
                 help="with --residual: also time the conv with operands cast to these dtypes")
  p.add_argument("--layers", type=int, default=1,
                 help="with --residual: time L chained applications in one jit, report per one")
  p.add_argument("--mgpu", default="",
                 help="with --residual: time the Mosaic GPU kernel (dwconv_mgpu.py) instead of the "
                      "Triton ones, at these ';'-separated launch shapes 'cb:rows' or 'auto', "
                      "each optionally ':0' (plain) or ':1' (persistent launch)")
  args = p.parse_args()
  for spec in filter(None, args.mgpu.split(";")):
    if not MGPU_SPEC.fullmatch(spec):
      p.error(f"bad --mgpu launch shape {spec!r}: want 'cb:rows' (e.g. 8:16) or 'auto', "
              "optionally ':0' (plain) or ':1' (persistent), e.g. 8:16:1 or auto:1")
  if args.residual:
    return residual(args)
  dt = jnp.bfloat16
  k = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k[0], (args.batch, args.side, args.side, args.dim), dt)
  w = jax.random.normal(k[1], (7, 7, args.dim), dt)
  g = jax.random.normal(k[2], x.shape, dt)
  nchw = lambda a: a.transpose(0, 3, 1, 2)
  # name -> (fn, input transform, output transform back to NHWC)
  impls = {"depthwise NHWC": (depthwise, None)}
  impls["depthwise NCHW"] = (lambda x, w: depthwise(x, w, "NCHW"), nchw)
  for gs in [int(s) for s in args.groups.split(",") if s]:
    if args.dim % gs == 0:
      impls[f"block-diag g={gs}"] = (lambda x, w, gs=gs: block_diagonal(x, w, gs), None)
  if args.shifts:
    impls["shifts(autodiff)"] = (shifts, None)
  ref = jax.jit(depthwise)(x, w).astype(dt).astype(jnp.float32)
  print(f"{jax.devices()[0].device_kind} x={x.shape} bf16")
  for name, (f, tin) in impls.items():
    xi, gi = (x, g) if tin is None else (tin(x), tin(g))
    fwd = jax.jit(lambda x, w, f=f: f(x, w).astype(dt))
    out = fwd(xi, w).astype(jnp.float32)
    out = out if tin is None else out.transpose(0, 2, 3, 1)
    err = float(jnp.max(jnp.abs(out - ref)))
    bwd = jax.jit(jax.grad(lambda x, w, gi, f=f: jnp.sum((f(x, w).astype(dt) * gi).astype(jnp.float32)),
                           argnums=(0, 1)))
    print(f"{name:18s} fwd {median_ms(fwd, xi, w):7.3f} ms  fwd+bwd {median_ms(bwd, xi, w, gi):7.3f} ms  "
          f"max|diff| {err:.3g}", flush=True)


def sweep_tilings(shape, col_tiles):
  """The --tune tilings, as the kernel will run them, leaving out those whose accumulators
  (th * tw * bc float32 values over 32 * warps threads) are far past what registers hold."""
  tilings, skipped = set(), 0
  for bc in (32, 64, 128, 256, 512):
    for th in (1, 2, 4, 8):
      for nw in (4, 8):
        for tw in col_tiles:
          t = dwconv_kernel.tiling(shape, th, tw, bc, nw)
          if t[0] * t[1] * t[2] > 256 * 32 * nw:
            skipped += 1
          else:
            tilings.add(t)
  return sorted(tilings), skipped


def residual(args):
  """x + b + dwconv(x), the op of the ConvNeXt block: XLA's conv + adds vs the Pallas kernels."""
  dt = jnp.bfloat16
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (args.batch, args.side, args.side, args.dim), dt)
  w = (0.1 * jax.random.normal(k[1], (7, 7, args.dim))).astype(dt)
  b = jax.random.normal(k[2], (args.dim,), dt)
  g = jax.random.normal(k[3], x.shape, dt)
  n_layers = args.layers

  def xla(x, w, b):  # the model's XLA path (layers.Conv): bf16 conv output + bias, then x + that
    return x + (dwconv_kernel.depthwise_same(x, w, dt) + b)

  def pallas(tiles=(None,) * 4, **kw):
    th, tw, bc, nw = tiles
    return lambda x, w, b: dwconv_kernel.dwconv_residual(
        x, w, b, row_tile=th, col_tile=tw, channel_block=bc, num_warps=nw, **kw)

  def chained(f):  # x -> f(x), L times, unrolled in one jit
    def run(x, w, b):
      for _ in range(n_layers):
        x = f(x, w, b)
      return x
    return run

  ref = jax.jit(dwconv_kernel.dwconv_residual_reference)(x, w, b).astype(jnp.float32)
  moved = 2 * x.size * 2

  def measure(name, f, fwd=True, bwd=False):
    """Prints one line of per-application medians (ms); returns the forward's, None if it failed."""
    try:
      line, ms = f"{name:44s}", None
      if fwd:
        one = jax.jit(f)
        err = float(jnp.max(jnp.abs(one(x, w, b).astype(jnp.float32) - ref)))
        ms = median_ms(jax.jit(chained(f)) if n_layers > 1 else one, x, w, b) / n_layers
        line += f" fwd {ms:7.3f} ms ({moved / ms / 1e9:5.2f} TB/s)  max|diff| {err:.3g}"
      if bwd:
        grad = jax.jit(jax.grad(
            lambda x, w, b, g: jnp.sum((chained(f)(x, w, b) * g).astype(jnp.float32)),
            argnums=(0, 1, 2)))
        line += f"  fwd+bwd {median_ms(grad, x, w, b, g) / n_layers:7.3f} ms"
      print(line, flush=True)
      return ms
    except Exception as e:  # noqa: BLE001 - a tiling Triton rejects: report, go on with the sweep
      print(f"{name:44s} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
      return None

  print(f"{jax.devices()[0].device_kind} x + b + dwconv(x), x={x.shape} bf16 "
        f"(ideal traffic {moved / 1e9:.3f} GB); per application of {n_layers} chained in one jit",
        flush=True)
  measure("xla conv+b+x", xla, bwd=True)
  for name in filter(None, args.conv_dtypes.split(",")):  # cuDNN's kernel for other dtypes
    cdt = jnp.dtype(name)

    def xla_in(x, w, b, cdt=cdt):  # the conv's operands cast (in the model: by the op before)
      return x + (dwconv_kernel.depthwise_same(x.astype(cdt), w, cdt).astype(dt) + b)
    measure(f"xla conv({name})+b+x", xla_in)
  if jax.default_backend() != "gpu":
    print("(Pallas kernels: GPU only)")
    return
  if args.mgpu:
    for spec in filter(None, args.mgpu.split(";")):
      _, cb, rows, pers = MGPU_SPEC.fullmatch(spec).groups()
      kw = {"cb": None if cb is None else int(cb), "rows": None if rows is None else int(rows),
            "persistent": None if pers is None else pers == "1"}
      pl_ = dwconv_mgpu.plan(x.shape, 7, **kw)
      run = functools.partial(dwconv_mgpu.dwconv_residual, **kw)
      measure(f"mgpu {spec} -> {pl_}", run, bwd=spec.startswith("auto"))
    return

  def label(t):
    th, tw, bc, nw = t
    return f"pallas th={th} tw={tw} bc={bc} warps={nw} ({th * tw * bc // (32 * nw)} acc/thr)"

  default = dwconv_kernel.tiling(x.shape)
  if not args.tune:
    measure(label(default) + " default", pallas(default), bwd=True)
    measure("  same, wgrad=pallas", pallas(default, wgrad="pallas"), fwd=False, bwd=True)
    return
  col_tiles = [int(s) for s in args.col_tiles.split(",") if s] or [args.side]
  tilings, skipped = sweep_tilings(x.shape, col_tiles)
  print(f"{len(tilings)} tilings (left out: {skipped} over 256 accumulators per thread); "
        f"default {default}", flush=True)
  fwd_ms = {t: measure(label(t), pallas(t)) for t in tilings}
  best = sorted((ms, t) for t, ms in fwd_ms.items() if ms is not None)[:args.top]
  for _, t in best:
    for wg in ("xla", "pallas"):
      measure(f"{label(t)} wgrad={wg}", pallas(t, wgrad=wg), fwd=False, bwd=True)


if __name__ == "__main__":
  main()
