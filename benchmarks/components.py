"""Where the XL/2R train step spends its time: forward+backward of each part, timed alone.

    python benchmarks/components.py --batch=64

Prints the median time of jitted value_and_grad of: the Transformer stage, the ConvNeXt stage
(with its upsampler), one depthwise 7x7 conv, one GEGLU MLP, one attention, and the optimizer update.
"""
import argparse
import functools
import sys
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dimr_jax import config_utils, train  # noqa: E402
from dimr_jax.models import layers  # noqa: E402
from timing import median_ms  # noqa: E402  (benchmarks/timing.py)


def timeit(name, f, *args, steps=10):
  print(f"{name:40s} {median_ms(jax.jit(f), *args, steps=steps):8.2f} ms", flush=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--config", default="configs/dimr_xl_256.py")
  p.add_argument("--attention_impl", default="")
  p.add_argument("--scan_unroll", type=int, default=0)
  args = p.parse_args()
  b = args.batch
  cfg = config_utils.load_config_file(args.config, {
      "model.dtype": "bfloat16", "model.attention_impl": args.attention_impl,
      "model.scan_unroll": args.scan_unroll})
  print(f"attention_impl={args.attention_impl or 'auto'} scan_unroll={args.scan_unroll}")
  model = train.make_model(cfg, nnx.Rngs(params=0))
  dt = jnp.bfloat16
  key = jax.random.key(0)
  x = jax.random.normal(key, (b, 32, 32, 4))
  tau = jax.random.uniform(key, (b, 1), minval=-1, maxval=1)
  y = jax.random.randint(key, (b,), 0, 1000)
  s0, s1 = model.stages[0], model.stages[1]
  g0, p0 = nnx.split(s0)
  g1, p1 = nnx.split(s1)
  out0, feats = s0(x, y, tau, None)

  def loss0(p):
    o, f = nnx.merge(g0, p)(x, y, tau, None)
    f = f if isinstance(f, list) else [f]  # channel chunks (unrolled stages) or one array
    return jnp.mean(o.astype(jnp.float32) ** 2) + sum(jnp.mean(c.astype(jnp.float32) ** 2) for c in f)

  def loss1(p, feats):
    o, _ = nnx.merge(g1, p)(x, y, tau, feats)
    return jnp.mean(o.astype(jnp.float32) ** 2)

  timeit("stage0 Transformer fwd", lambda p: loss0(p), p0)
  timeit("stage0 Transformer fwd+bwd", jax.grad(loss0), p0)
  timeit("stage1 ConvNeXt+upsample fwd", lambda p, f: loss1(p, f), p1, feats)
  timeit("stage1 ConvNeXt+upsample fwd+bwd", jax.grad(loss1, argnums=(0, 1)), p1, feats)
  h = jax.random.normal(key, (b, 32, 32, 480), dt)
  conv = layers.Conv(480, 480, 7, padding=((3, 3), (3, 3)), groups=480, dtype=dt, rngs=nnx.Rngs(0))
  gc, pc = nnx.split(conv)
  timeit("x21 dwconv7 fwd+bwd (one)", jax.grad(lambda p, h: jnp.sum(nnx.merge(gc, p)(h).astype(jnp.float32)), argnums=(0, 1)), pc, h)
  mlp = layers.GegluMLP(480, 960, "TDRMSN", dtype=dt, rngs=nnx.Rngs(0))
  gm, pm = nnx.split(mlp)
  timeit("x21 conv-stage MLP fwd+bwd (one)", jax.grad(lambda p, h: jnp.sum(nnx.merge(gm, p)(h, tau).astype(jnp.float32)), argnums=(0, 1)), pm, h)
  ht = jax.random.normal(key, (b, 257, 960), dt)
  blk = layers.TransformerBlock(960, 1920, 16, "TDRMSN", dtype=dt, rngs=nnx.Rngs(0),
                               attention_impl=args.attention_impl or None)
  gb, pb = nnx.split(blk)
  timeit("x39 transformer block fwd+bwd (one)", jax.grad(lambda p, h: jnp.sum(nnx.merge(gb, p)(h, tau).astype(jnp.float32)), argnums=(0, 1)), pb, ht)
  att = blk.block1
  ga, pa = nnx.split(att)
  timeit("x39 attention fwd+bwd (one)", jax.grad(lambda p, h: jnp.sum(nnx.merge(ga, p)(h, tau).astype(jnp.float32)), argnums=(0, 1)), pa, ht)
  params = nnx.state(model, nnx.Param)
  tx = train.make_optimizer(cfg)
  opt = tx.init(params)

  def upd(params, opt, g):
    u, opt = tx.update(g, opt, params)
    p2 = optax.apply_updates(params, u)
    ema = jax.tree.map(lambda e, q: 0.9999 * e + 1e-4 * q, params, p2)
    return p2, opt, ema
  timeit("optimizer + EMA update", upd, params, opt, params)


if __name__ == "__main__":
  main()
