"""The model's scaled RMSNorm on its own: XLA's (checkpointed) expression vs the Pallas kernels.

    python benchmarks/rmsnorm.py --batch=250 --rows=264 --dim=960     # DiT-style token stage
    python benchmarks/rmsnorm.py --batch=250 --rows=1024 --dim=480    # a 32x32 pixel stage
    python benchmarks/rmsnorm.py --tune                       # sweep (bm, num_warps), bm_bwd

x is (batch, rows, dim) bf16 and scale (batch, dim) float32 (one time-dependent scale per sample;
``--shared`` gives (1, dim)). Prints the forward and forward+backward medians (ms) with their
achieved memory bandwidth, counting only the unavoidable traffic: forward reads x and writes y
(2 |x| bytes); forward+backward is ``jax.grad`` wrt (x, scale) of ``sum(f(x, scale) * g)`` with
the cotangent g an argument (a constant would be folded into the program), whose forward value is
unused, so it is the gradient pass: read x and g, write dx (3 |x| bytes). max|diff| is the
forward's against XLA, and dx's relative to max|dx| of XLA.

Pallas runs when the backend is a GPU (``--pallas=auto``); ``--pallas=on`` elsewhere runs it in
interpret mode (a correctness check of the script; the times mean nothing there).
"""
import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dimr_jax.models import rmsnorm_kernel  # noqa: E402
from timing import median_ms  # benchmarks/timing.py  # noqa: E402


def xla_norm(x, scale):
  return rmsnorm_kernel.scaled_rms_norm(x, scale, impl="xla")


def pallas_norm(x, scale, bm=None, bm_bwd=None, num_warps=8):
  return rmsnorm_kernel.scaled_rms_norm(x, scale, impl="pallas", bm=bm, bm_bwd=bm_bwd,
                                        num_warps=num_warps)


def xla_tap(x, scale):
  return x, xla_norm(x, scale)


def pallas_tap(x, scale, bm_bwd=None, num_warps=None):
  """The tapped norm with the kernel's own defaults where bm_bwd / num_warps are not given."""
  kw = {} if num_warps is None else {"num_warps": num_warps}
  return rmsnorm_kernel.scaled_rms_norm_tap(x, scale, bm_bwd=bm_bwd, **kw)


def tap_grad_fn(f):
  """d/d(x, scale) of sum(y * g) + sum(x_out * g2) for (x_out, y) = f(x, scale): the norm of a
  pre-norm residual block, the residual stream's gradient g2 included (what 'rmsnorm_bwd' fuses)."""
  def loss(x, s, g, g2):
    xo, y = f(x, s)
    return jnp.sum((y * g).astype(jnp.float32)) + jnp.sum((xo * g2).astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def grad_fn(f):
  """d/d(x, scale) of sum(f(x, scale) * g), g an argument."""
  return jax.jit(jax.grad(lambda x, s, g: jnp.sum((f(x, s) * g).astype(jnp.float32)),
                          argnums=(0, 1)))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=250)
  p.add_argument("--rows", type=int, default=264, help="rows per sample (tokens or H*W pixels)")
  p.add_argument("--dim", type=int, default=960)
  p.add_argument("--shared", action="store_true", help="one (1, dim) scale for the whole batch")
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
  p.add_argument("--pallas", choices=("auto", "on", "off"), default="auto",
                 help="time the Pallas kernels: auto = only on GPU; on = also interpreted on CPU")
  p.add_argument("--tune", action="store_true",
                 help="also sweep the Pallas (bm, num_warps) and the backward's bm_bwd")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--tap", action="store_true",
                 help="time the backward of (x, norm(x)) with the residual gradient: XLA vs the "
                      "'rmsnorm_bwd' kernel over (bm_bwd, num_warps)")
  args = p.parse_args()
  dtype = jnp.dtype(args.dtype)
  k = jax.random.split(jax.random.key(0), 3)
  shape = (args.batch, args.rows, args.dim)
  x = jax.random.normal(k[0], shape, dtype)
  scale = 1.0 + 0.1 * jax.random.normal(k[1], (1 if args.shared else args.batch, args.dim))
  g = jax.random.normal(k[2], shape, dtype)

  if args.tap:
    return time_tap(args, x, scale, g, k)
  impls = {"xla": xla_norm}
  use_pallas = args.pallas == "on" or (args.pallas == "auto" and jax.default_backend() == "gpu")
  if use_pallas:
    impls["pallas"] = pallas_norm
    if args.tune:
      dpad = 1 << (args.dim - 1).bit_length()
      for bm in (1, 2, 4, 8, 16, 32, 64):
        if not 512 <= bm * dpad <= 32768:
          continue
        for nw in (2, 4, 8, 16):  # the same bm for both kernels (the fwd time is bm's)
          impls[f"pallas bm={bm} w={nw}"] = functools.partial(pallas_norm, bm=bm, num_warps=nw)
      for bm_bwd in (16, 32, 64):  # larger backward tiles: fewer dscale partial rows
        if bm_bwd * dpad <= 65536:
          for nw in (8, 16):
            impls[f"pallas bm_bwd={bm_bwd} w={nw}"] = functools.partial(
                pallas_norm, bm_bwd=bm_bwd, num_warps=nw)

  ref = jax.jit(xla_norm)(x, scale).astype(jnp.float32)
  dx_ref = grad_fn(xla_norm)(x, scale, g)[0].astype(jnp.float32)
  dx_max = float(jnp.max(jnp.abs(dx_ref)))
  nbytes = x.size * dtype.itemsize
  print(f"{jax.devices()[0].device_kind} x={shape} {dtype.name} scale={scale.shape} f32")
  for name, f in impls.items():
    fwd, bwd = jax.jit(f), grad_fn(f)
    try:
      err = float(jnp.max(jnp.abs(fwd(x, scale).astype(jnp.float32) - ref)))
      dx_err = float(jnp.max(jnp.abs(bwd(x, scale, g)[0].astype(jnp.float32) - dx_ref))) / dx_max
      ms = median_ms(fwd, x, scale, steps=args.steps)
      ms_b = median_ms(bwd, x, scale, g, steps=args.steps)
      print(f"{name:22s} fwd {ms:7.3f} ms ({2 * nbytes / ms / 1e9:5.2f} TB/s)"
            f"  fwd+bwd {ms_b:7.3f} ms ({3 * nbytes / ms_b / 1e9:5.2f} TB/s)"
            f"  max|diff| {err:.3g}  dx rel {dx_err:.3g}", flush=True)
    except Exception as e:  # a launch configuration Triton rejects: report it, go on with the sweep
      print(f"{name:22s} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)


def time_tap(args, x, scale, g, k):
  """fwd+bwd of the tapped norm: XLA's autodiff vs XLA forward + the Pallas backward kernel."""
  g2 = jax.random.normal(jax.random.fold_in(k[2], 1), x.shape, x.dtype)
  dpad = 1 << (args.dim - 1).bit_length()
  impls = {"xla tap": xla_tap, "rmsnorm_bwd default": pallas_tap}
  for bm in (1, 2, 4, 8, 16, 32):
    if 512 <= bm * dpad <= 32768:
      for nw in (1, 2, 4, 8):
        impls[f"rmsnorm_bwd bm={bm} w={nw}"] = functools.partial(pallas_tap, bm_bwd=bm, num_warps=nw)
  ref = tap_grad_fn(xla_tap)(x, scale, g, g2)[0].astype(jnp.float32)
  ref_max = float(jnp.max(jnp.abs(ref)))
  nbytes = x.size * x.dtype.itemsize
  print(f"{jax.devices()[0].device_kind} tap x={x.shape} {x.dtype.name} scale={scale.shape} "
        "(fwd+bwd; ideal traffic: fwd read x + write y, bwd read x, g, g2 + write dx = 6 x)")
  for name, f in impls.items():
    try:
      fb = tap_grad_fn(f)
      err = float(jnp.max(jnp.abs(fb(x, scale, g, g2)[0].astype(jnp.float32) - ref))) / ref_max
      ms = median_ms(fb, x, scale, g, g2, steps=args.steps)
      print(f"{name:26s} fwd+bwd {ms:7.3f} ms ({6 * nbytes / ms / 1e9:5.2f} TB/s)  dx rel {err:.3g}",
            flush=True)
    except Exception as e:  # a launch configuration Triton rejects: report it, go on
      print(f"{name:26s} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)


if __name__ == "__main__":
  main()
