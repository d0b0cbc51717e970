"""Attention variants for DiMR's odd shapes (257 tokens; head_dim 60 for XL, 72 for G), timed alone.

    python benchmarks/attention.py --batch=64 --dim=960 --heads=16
    python benchmarks/attention.py --batch=128 --dim=960 --heads=16 --chain=8   # split attention

Part 1 times the attention kernel alone (q, k, v given; forward + backward w.r.t. q, k, v);
part 2 times the whole attention sub-block (norm -> qkv -> attention -> projection, forward +
backward w.r.t. params and input) as the model runs it. Each line prints the median time and the
max |error| against a float32 XLA reference on the same inputs.
"""
from __future__ import annotations

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

Array = jax.Array

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


# ---------------------------------------------------------------------------------------------
# Split attention (benchmarks/NOTES.md row 34, rejected): cuDNN on the 256 block-aligned image
# tokens, the class token apart. The unmasked 256 x 256 kernel is ~40% faster than the masked 264
# one, but the slices, the logsumexp merge and the concatenation cost more than that.
# The query/key block that split_attention aligns the main part to (cuDNN's kernels tile 64/128
# tokens; 256 image tokens are whole tiles, 257 tokens cost a third, almost empty, row of tiles).
SPLIT_BLOCK = 64


def _softmax_attention(q: Array, k: Array, v: Array, scale: float, kv_len: int | None = None
                       ) -> tuple[Array, Array]:
  """Plain softmax attention in float32 over the first kv_len keys: (output f32, logsumexp).

  Output (B, T, H, D), logsumexp (B, T, H) of the scaled logits (natural log)."""
  kv_len = k.shape[1] if kv_len is None else kv_len
  s = jnp.einsum("bqhd,bkhd->bqhk", q[:, :, :, :], k[:, :kv_len],
                 preferred_element_type=jnp.float32) * scale
  lse = jax.nn.logsumexp(s, axis=-1)
  p = jnp.exp(s - lse[..., None])
  return jnp.einsum("bqhk,bkhd->bqhd", p, v[:, :kv_len].astype(jnp.float32)), lse


def _main_attention(q: Array, k: Array, v: Array, scale: float, kv_len: int | None, impl: str,
                    with_lse: bool):
  """The bulk of split_attention: cuDNN's fused kernel, or (impl 'xla', for tests) plain XLA.

  With ``with_lse`` also the logsumexp per (B, T, H). jax.nn.dot_product_attention hands it out
  rounded to the output dtype (bf16): see :func:`split_attention` for what that costs."""
  if impl != "cudnn":
    o, lse = _softmax_attention(q, k, v, scale, kv_len)
    return (o.astype(q.dtype), lse.astype(q.dtype)) if with_lse else o.astype(q.dtype)
  lengths = None
  if kv_len is not None and kv_len < k.shape[1]:
    lengths = jnp.full((q.shape[0],), kv_len, jnp.int32)
  return jax.nn.dot_product_attention(
      q, k, v, scale=scale, implementation="cudnn", key_value_seq_lengths=lengths,
      return_residual=with_lse)


def _split_queries(q, k, v, scale, seq_len, impl):
  """Differentiable form: the first m (block-aligned) queries by the fused kernel over all
  seq_len keys (q has m rows: whole tiles), the r = seq_len - m others by plain softmax."""
  m = seq_len // SPLIT_BLOCK * SPLIT_BLOCK
  o_main = _main_attention(q[:, :m], k, v, scale, seq_len, impl, False)
  o_rest, _ = _softmax_attention(q[:, m:seq_len], k, v, scale, seq_len)
  return _assemble(o_main, o_rest.astype(q.dtype), q.shape[1])


def _assemble(o_main: Array, o_rest: Array, n: int) -> Array:
  b, _, h, d = o_main.shape
  pad = jnp.zeros((b, n - o_main.shape[1] - o_rest.shape[1], h, d), o_main.dtype)
  return jnp.concatenate([o_main, o_rest, pad], axis=1)


def _split_keys_and_queries(q, k, v, scale, seq_len, impl):
  """Forward-only form: the fused kernel on the m x m block-aligned part (no masking, no partial
  tile), the r = seq_len - m leftover keys merged in through the kernel's logsumexp, and the
  leftover queries by plain softmax."""
  m = seq_len // SPLIT_BLOCK * SPLIT_BLOCK
  qm = q[:, :m]
  o_main, lse_main = _main_attention(qm, k[:, :m], v[:, :m], scale, None, impl, True)
  # logits of the main queries against the r leftover keys, (B, m, H, r), in f32
  s_rest = jnp.einsum("bqhd,bkhd->bqhk", qm, k[:, m:seq_len],
                      preferred_element_type=jnp.float32) * scale
  lse_main = lse_main.astype(jnp.float32)
  lse = jnp.logaddexp(lse_main, jax.nn.logsumexp(s_rest, axis=-1))
  o = (jnp.exp(lse_main - lse)[..., None] * o_main.astype(jnp.float32)
       + jnp.einsum("bqhk,bkhd->bqhd", jnp.exp(s_rest - lse[..., None]),
                    v[:, m:seq_len].astype(jnp.float32)))
  o_rest, _ = _softmax_attention(q[:, m:seq_len], k, v, scale, seq_len)
  return _assemble(o.astype(q.dtype), o_rest.astype(q.dtype), q.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _split_attention(q, k, v, scale, seq_len, impl):
  return _split_keys_and_queries(q, k, v, scale, seq_len, impl)


def _split_attention_fwd(q, k, v, scale, seq_len, impl):
  # Under differentiation: the query-split form, whose pullback is the fused kernel's own.
  out, pullback = jax.vjp(
      functools.partial(_split_queries, scale=scale, seq_len=seq_len, impl=impl), q, k, v)
  return out, pullback


def _split_attention_bwd(scale, seq_len, impl, pullback, g):
  del scale, seq_len, impl
  return pullback(g)


_split_attention.defvjp(_split_attention_fwd, _split_attention_bwd)


def split_attention(q: Array, k: Array, v: Array, scale: float, seq_len: int, impl: str = "cudnn"
                    ) -> Array:
  """Softmax attention of DiMR's 256 + 1 tokens with the odd token kept off the fused kernel.

  (B, N, H, D) -> (B, N, H, D); tokens [0, seq_len) are real, rows past seq_len of the output
  are zero. With m = seq_len rounded down to a multiple of SPLIT_BLOCK (256 of 257), cuDNN's
  kernel tiles m tokens in whole tiles where the 257th token (padded to 264) costs it a third row
  and column of 128-token tiles. The r = seq_len - m leftover tokens (the class token) go apart:

  * evaluated without differentiation (sampling): the kernel runs the m x m part unmasked; the
    leftover keys are merged through its logsumexp (exact softmax algebra), the leftover queries
    attend all keys by plain softmax. JAX's API returns the logsumexp rounded to the output dtype;
    an error e in it moves the merge weight a (of the main part) by a(1-a)e, i.e. at most
    ~0.25 * 2^-8 * |o_main - v_rest| for a bf16 logsumexp near 8: within bf16 output rounding.
  * under differentiation (training): the m main queries attend all seq_len keys in the kernel
    (masked, m x 264: whole query tiles) with the kernel's own backward; the leftover queries by
    plain softmax. (The logsumexp route has no backward in JAX's API.)

  ``impl='xla'`` runs the same algebra with XLA pieces (how the CPU tests check it).
  """
  return _split_attention(q, k, v, scale, seq_len, impl)



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


def chained(args):
  """``--chain=L``: the model's layout (tokens padded to a multiple of 8, head_dim to one of 8,
  ``seq_len`` real tokens), L attention calls chained in one jit (q of call l+1 = output of call
  l), so a ~0.1 ms kernel is not hidden by per-call dispatch. Prints ms per call."""
  b, n, d, h, chain = args.batch, args.tokens, args.dim, args.heads, args.chain
  hd = d // h
  hdp, npad = hd + (-hd % 8), n + (-n % 8)
  dt = jnp.bfloat16
  ks = jax.random.split(jax.random.key(0), 4)
  pad = [(0, 0), (0, npad - n), (0, 0), (0, hdp - hd)]
  q, k, v, do = (jnp.pad(jax.random.normal(kk, (b, n, h, hd), dt), pad) for kk in ks)
  scale = hd ** -0.5
  impl = "cudnn" if jax.default_backend() == "gpu" else "xla"

  def ref(q, k, v):
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    o, _ = _softmax_attention(f32(q), f32(k), f32(v), scale, n)
    return o.at[:, n:].set(0)

  variants = {
      "current (cudnn, 264 masked)": lambda q, k, v: layers.attention(
          q, k, v, impl, scale=scale, seq_len=n),
      "split (fwd: m x m + lse; bwd: m x 264)": lambda q, k, v: split_attention(
          q, k, v, scale, n, impl),
      "query split (m x 264 masked)": lambda q, k, v: _split_queries(
          q, k, v, scale=scale, seq_len=n, impl=impl),
      "unmasked m x m (wrong; bound)": lambda q, k, v: jnp.pad(jax.nn.dot_product_attention(
          q[:, :n // 64 * 64], k[:, :n // 64 * 64], v[:, :n // 64 * 64], scale=scale,
          implementation=impl), [(0, 0), (0, npad - n // 64 * 64), (0, 0), (0, 0)]),
  }
  exact = ref(q, k, v)
  print(f"device {jax.devices()[0].device_kind}  b={b} tokens={n} (padded {npad}) heads={h} "
        f"head_dim={hd} (padded {hdp}), {chain} chained calls per jit; ms per call", flush=True)
  for name, f in variants.items():
    try:
      def fwd(q, k, v, f=f):
        for _ in range(chain):
          q = f(q, k, v)
        return q
      def loss(q, k, v, f=f):
        return jnp.sum((fwd(q, k, v, f) * do).astype(jnp.float32))
      err = float(jnp.max(jnp.abs(jax.jit(f)(q, k, v)[:, :n].astype(jnp.float32) - exact[:, :n])))
      fj, gj = jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      t_f = median_ms(fj, q, k, v, steps=args.steps, warmup=2) / chain
      t_g = median_ms(gj, q, k, v, steps=args.steps, warmup=2) / chain
      print(f"{name:40s} fwd {t_f:7.4f}  fwd+bwd {t_g:7.4f}  max|err| vs f32 {err:.2e}", flush=True)
    except Exception as e:  # noqa: BLE001 - report and go on with the next variant
      msg = str(e).strip().splitlines()
      print(f"{name:40s} FAILED: {type(e).__name__}: {msg[0][:200] if msg else ''}", flush=True)
      if os.environ.get("DEBUG"):
        traceback.print_exc()


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--tokens", type=int, default=257)
  p.add_argument("--dim", type=int, default=960)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--chain", type=int, default=0,
                 help="> 0: time the model-layout variants (split attention) chained this often")
  args = p.parse_args()
  if args.chain:
    return chained(args)
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
