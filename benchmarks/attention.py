"""Attention variants for DiMR's odd shapes (257 tokens; head_dim 60 for XL, 72 for G), timed alone.

    python benchmarks/attention.py --batch=64 --dim=960 --heads=16

Part 1 times the attention kernel alone (q, k, v given; forward + backward w.r.t. q, k, v);
part 2 times the whole attention sub-block (norm -> qkv -> attention -> projection, forward +
backward w.r.t. params and input) as the model runs it. Each line prints the median time and the
max |error| against a float32 XLA reference on the same inputs.
"""
import argparse
import functools
import os
import sys
import traceback

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dimr_jax.models import layers  # noqa: E402
from timing import median_ms  # noqa: E402  (benchmarks/timing.py)

# On CPU the cuDNN variants run through XLA instead (checks the padding/masking arithmetic).
CUDNN = "cudnn" if jax.default_backend() == "gpu" else "xla"


def reference(q, k, v):
  f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
  return jax.nn.dot_product_attention(f32(q), f32(k), f32(v), scale=q.shape[-1] ** -0.5,
                                      implementation="xla")


def cudnn_lengths(q, k, v, pad_to):
  """Pads N to ``pad_to`` and masks through query/key_value_seq_lengths."""
  b, n, _, hd = q.shape
  pad = [(0, 0), (0, pad_to - n), (0, 0), (0, -hd % 8)]
  qp, kp, vp = (jnp.pad(a, pad) for a in (q, k, v))
  lengths = jnp.full((b,), n, jnp.int32)
  o = jax.nn.dot_product_attention(qp, kp, vp, scale=hd ** -0.5, implementation="cudnn",
                                   query_seq_lengths=lengths, key_value_seq_lengths=lengths)
  return o[:, :n, :, :hd]


def cudnn_channel_mask(q, k, v, pad_to):
  """Pads N and head_dim; padded keys are masked by one extra head channel (q=1, k=-1e4)."""
  b, n, h, hd = q.shape
  hdp = hd + 1 + (-(hd + 1) % 8)
  pad = [(0, 0), (0, pad_to - n), (0, 0), (0, hdp - hd)]
  qp, kp, vp = (jnp.pad(a, pad) for a in (q, k, v))
  qp = qp.at[..., hd].set(1)
  kmask = jnp.where(jnp.arange(pad_to) >= n, -1e4, 0.0).astype(k.dtype)
  kp = kp.at[..., hd].set(kmask[None, :, None])
  o = jax.nn.dot_product_attention(qp, kp, vp, scale=hd ** -0.5, implementation=CUDNN)
  return o[:, :n, :, :hd]


def cudnn_nomask(q, k, v, pad_to):
  """Unmasked (wrong when pad_to > n): the kernel's cost without any masking."""
  b, n, _, hd = q.shape
  q, k, v = (a[:, :pad_to] for a in (q, k, v))
  pad = [(0, 0), (0, max(pad_to - n, 0)), (0, 0), (0, -hd % 8)]
  qp, kp, vp = (jnp.pad(a, pad) for a in (q, k, v))
  o = jax.nn.dot_product_attention(qp, kp, vp, scale=hd ** -0.5, implementation=CUDNN)
  return jnp.pad(o[:, :n, :, :hd], [(0, 0), (0, max(n - pad_to, 0)), (0, 0), (0, 0)])


def xla(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, implementation="xla")


def xla_bf16_einsum(q, k, v):
  """Logits and probabilities in bf16 (softmax statistics in f32)."""
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
  p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def pallas_triton(q, k, v, pad_to, block):
  from jax.experimental.pallas.ops.gpu import attention as pa
  b, n, _, hd = q.shape
  pad = [(0, 0), (0, pad_to - n), (0, 0), (0, 0)]
  qp, kp, vp = (jnp.pad(a, pad) for a in (q, k, v))
  seg = jnp.broadcast_to((jnp.arange(pad_to) >= n).astype(jnp.int32), (b, pad_to))
  bs = pa.BlockSizes(block_q=block, block_k=block, block_q_dkv=32, block_kv_dkv=32,
                     block_q_dq=32, block_kv_dq=32)
  o = pa.mha(qp, kp, vp, seg, sm_scale=hd ** -0.5, block_sizes=bs)
  return o[:, :n]


class PaddedAttention(nnx.Module):
  """Candidate module layout: tokens padded once, q/k/v from three head-padded GEMMs."""

  def __init__(self, base: layers.Attention, pad_to: int, fused_qkv: bool):
    self.base, self.pad_to, self.fused_qkv = base, pad_to, fused_qkv

  def __call__(self, x, tau):
    m = self.base
    b, n, d = x.shape
    h = m.num_heads
    hd = d // h
    hdp = hd + 1 + (-(hd + 1) % 8)
    xn = m.norm(x, tau).astype(m.query_key_value.dtype)
    xn = jnp.pad(xn, [(0, 0), (0, self.pad_to - n), (0, 0)])
    w = m.query_key_value.kernel[...].astype(xn.dtype).reshape(d, 3, h, hd)
    w = jnp.pad(w, [(0, 0), (0, 0), (0, 0), (0, hdp - hd)])
    bias = jnp.zeros((3, self.pad_to, hdp), xn.dtype)
    bias = bias.at[0, :, hd].set(1).at[1, n:, hd].set(-1e4)
    if self.fused_qkv:
      qkv = jnp.einsum("bnd,dkhe->bnkhe", xn, w)
      q, k, v = (qkv[:, :, i] + bias[i][None, :, None] for i in range(3))
    else:
      q, k, v = (jnp.einsum("bnd,dhe->bnhe", xn, w[:, i]) + bias[i][None, :, None] for i in range(3))
    o = jax.nn.dot_product_attention(q, k, v, scale=hd ** -0.5, implementation=CUDNN)
    wo = m.dense.kernel[...].astype(xn.dtype).reshape(h, hd, d)
    wo = jnp.pad(wo, [(0, 0), (0, hdp - hd), (0, 0)])
    out = jnp.einsum("bnhe,hed->bnd", o, wo) + m.dense.bias[...].astype(xn.dtype)
    return out[:, :n]


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--tokens", type=int, default=257)
  p.add_argument("--dim", type=int, default=960)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--steps", type=int, default=20)
  args = p.parse_args()
  b, n, d, h = args.batch, args.tokens, args.dim, args.heads
  hd = d // h
  dt = jnp.bfloat16
  ks = jax.random.split(jax.random.key(0), 8)
  q, k, v, do = (jax.random.normal(kk, (b, n, h, hd), dt) for kk in ks[:4])
  ref = reference(q, k, v)
  print(f"device {jax.devices()[0].device_kind}  b={b} n={n} heads={h} head_dim={hd}", flush=True)
  print("-- kernel alone: fwd / fwd+bwd (ms), max|err| vs f32")
  variants = {"xla": xla, "xla_bf16_einsum": xla_bf16_einsum}
  for pt in (264, 272, 288, 320):
    variants[f"cudnn_lengths_{pt}"] = functools.partial(cudnn_lengths, pad_to=pt)
    variants[f"cudnn_chmask_{pt}"] = functools.partial(cudnn_channel_mask, pad_to=pt)
  for pt in (256, 320):
    variants[f"cudnn_nomask_{pt}(wrong)"] = functools.partial(cudnn_nomask, pad_to=pt)
  variants["pallas_triton_320_b64"] = functools.partial(pallas_triton, pad_to=320, block=64)
  variants["pallas_triton_264_b8"] = functools.partial(pallas_triton, pad_to=264, block=8)
  for name, f in variants.items():
    try:
      fwd = jax.jit(f)
      err = float(jnp.max(jnp.abs(fwd(q, k, v).astype(jnp.float32) - ref)))
      g = jax.jit(jax.grad(lambda q, k, v: jnp.sum((f(q, k, v) * do).astype(jnp.float32)),
                           argnums=(0, 1, 2)))
      print(f"{name:28s} {median_ms(fwd, q, k, v, steps=args.steps, warmup=2):7.3f} "
            f"{median_ms(g, q, k, v, steps=args.steps, warmup=2):7.3f}  err {err:.2e}", flush=True)
    except Exception as e:  # noqa: BLE001 - report and go on with the next variant
      msg = str(e).strip().splitlines()
      print(f"{name:28s} FAILED: {type(e).__name__}: {msg[0][:160] if msg else ''}", flush=True)

  print("-- attention sub-block (norm, qkv, attention, proj): fwd / fwd+bwd (ms), max|err| vs xla")
  x = jax.random.normal(ks[4], (b, n, d), dt)
  tau = jax.random.uniform(ks[5], (b, 1), minval=-1, maxval=1)
  dy = jax.random.normal(ks[6], (b, n, d), dt)
  base_x = layers.Attention(d, h, "TDRMSN", dtype=dt, rngs=nnx.Rngs(0), attention_impl="xla")
  mods = {"module_xla": base_x,
          "module_current_cudnn": layers.Attention(d, h, "TDRMSN", dtype=dt, rngs=nnx.Rngs(0),
                                                   attention_impl="cudnn")}
  for pt in (264, 272, 320):
    for fused in (False, True):
      mods[f"module_padded_{pt}_{'fused' if fused else '3dots'}"] = PaddedAttention(
          layers.Attention(d, h, "TDRMSN", dtype=dt, rngs=nnx.Rngs(0), attention_impl="cudnn"),
          pt, fused)
  ref_out = None
  for name, mod in mods.items():
    try:
      gd, st = nnx.split(mod)
      fwd = jax.jit(lambda st, x: nnx.merge(gd, st)(x, tau))
      out = fwd(st, x).astype(jnp.float32)
      if ref_out is None:
        ref_out = out
      err = float(jnp.max(jnp.abs(out - ref_out)))
      g = jax.jit(jax.grad(lambda st, x: jnp.sum((nnx.merge(gd, st)(x, tau) * dy).astype(jnp.float32)),
                           argnums=(0, 1)))
      print(f"{name:28s} {median_ms(fwd, st, x, steps=args.steps, warmup=2):7.3f} "
            f"{median_ms(g, st, x, steps=args.steps, warmup=2):7.3f}  err {err:.2e}", flush=True)
    except Exception as e:  # noqa: BLE001
      msg = str(e).strip().splitlines()
      print(f"{name:28s} FAILED: {type(e).__name__}: {msg[0][:160] if msg else ''}", flush=True)
      if os.environ.get("DEBUG"):
        traceback.print_exc()


if __name__ == "__main__":
  main()
