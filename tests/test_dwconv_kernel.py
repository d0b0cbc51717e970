"""The Pallas depthwise-conv kernels (run in Pallas' interpret mode on CPU) against XLA's conv."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dimr_jax.models import dwconv_kernel, layers


def _inputs(dtype, shape=(2, 8, 16, 16), k=7, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(ks[0], shape, dtype)
  w = (0.2 * jax.random.normal(ks[1], (k, k, shape[-1]))).astype(dtype)
  b = jax.random.normal(ks[2], (shape[-1],), dtype)
  g = jax.random.normal(ks[3], shape, dtype)
  return x, w, b, g


def _loss(fn, g):
  return lambda x, w, b: jnp.sum(fn(x, w, b).astype(jnp.float32) * g.astype(jnp.float32))


# The first three: channel blocks dividing C (no padding, no mask). The others pad C to a multiple
# of the block and mask the last block's store: 24 channels in blocks of 16 (the second half-empty),
# 40 in one block of 64 with column tiles, the weight-gradient kernel in blocks of 16 of those 64.
@pytest.mark.parametrize("k,shape,tiles", [
    (7, (2, 8, 16, 16), dict(row_tile=4, channel_block=8, wgrad="pallas")),
    (7, (2, 8, 16, 16), dict(row_tile=2, channel_block=16, wgrad="xla")),
    (3, (2, 8, 16, 16), dict(row_tile=8, channel_block=16, wgrad="pallas")),
    (7, (2, 8, 8, 24), dict(row_tile=2, channel_block=16, wgrad="xla")),
    (3, (2, 8, 8, 24), dict(row_tile=2, channel_block=16, wgrad="pallas")),
    (3, (2, 8, 16, 40), dict(row_tile=1, col_tile=8, channel_block=64, wgrad="pallas",
                             wgrad_channel_block=16)),
    (3, (2, 8, 16, 40), dict(row_tile=2, col_tile=8, channel_block=64, wgrad="xla"))])
def test_forward_and_gradients_match_xla_in_float32(k, shape, tiles):
  x, w, b, g = _inputs(jnp.float32, shape=shape, k=k)
  ours = lambda x, w, b: dwconv_kernel.dwconv_residual(x, w, b, wgrad_row_tile=2, **tiles)  # noqa: E731
  ref = dwconv_kernel.dwconv_residual_reference
  np.testing.assert_allclose(ours(x, w, b), ref(x, w, b), atol=5e-6, rtol=1e-6)
  got = jax.grad(_loss(ours, g), argnums=(0, 1, 2))(x, w, b)
  want = jax.grad(_loss(ref, g), argnums=(0, 1, 2))(x, w, b)
  for a, e, name in zip(got, want, ("dx", "dw", "db")):
    np.testing.assert_allclose(a, e, atol=1e-4 * float(jnp.abs(e).max()), err_msg=name)


def _kernel_primitives(fn, *args):
  """Names of the primitives inside the pallas_calls that ``fn(*args)`` traces to."""
  def walk(jaxpr, inside):
    for e in jaxpr.eqns:
      if inside:
        yield e.primitive.name
      for v in e.params.values():
        for sub in v if isinstance(v, (tuple, list)) else (v,):
          sub = getattr(sub, "jaxpr", sub)
          if hasattr(sub, "eqns"):
            yield from walk(sub, inside or e.primitive.name == "pallas_call")
  return set(walk(jax.make_jaxpr(fn)(*args).jaxpr, False))


@pytest.mark.parametrize("channel_block,masked", [(8, False), (16, True)])
def test_partial_channel_block_masks_its_store(channel_block, masked):
  """Interpret mode pads a blocked output to whole blocks, so a missing mask would pass the tests
  above and write into the next pixel's channels on the GPU: check that the store is masked."""
  x, w, b, _ = _inputs(jnp.float32, shape=(2, 8, 8, 24))
  prims = _kernel_primitives(
      lambda x, w, b: dwconv_kernel.dwconv_residual(x, w, b, channel_block=channel_block), x, w, b)
  assert ("masked_swap" in prims) == masked and ("swap" in prims) != masked, prims


@pytest.mark.parametrize("shape,tiles", [((2, 8, 16, 16), dict(row_tile=4, channel_block=8)),
                                         ((2, 8, 8, 24), dict(row_tile=2, channel_block=16))])
def test_bfloat16_rounds_once_from_float32(shape, tiles):
  x, w, b, _ = _inputs(jnp.bfloat16, shape=shape)
  got = dwconv_kernel.dwconv_residual(x, w, b, **tiles).astype(jnp.float32)
  exact = dwconv_kernel.dwconv_residual_reference(
      *(a.astype(jnp.float32) for a in (x, w, b)))
  # one bf16 rounding of the float32 result: relative error <= 2^-8
  np.testing.assert_array_less(jnp.abs(got - exact), 2.0 ** -8 * jnp.abs(exact) + 1e-6)


def test_bad_shapes_and_unsupported_tilings_are_named():
  x, w, b, _ = _inputs(jnp.float32)
  with pytest.raises(ValueError, match="do not fit"):
    dwconv_kernel.dwconv_residual(x, w[:, :, :8], b)
  assert not dwconv_kernel.supported((2, 8, 12, 16), 7)   # width 12: not a power of two
  assert not dwconv_kernel.supported((2, 8, 16, 16), 4)   # even kernel: no centred window
  for c in (12, 480, 576):                                # channels are padded to the block
    assert dwconv_kernel.supported((2, 8, 16, c), 7)
  with pytest.raises(ValueError, match="no Triton tiling"):
    dwconv_kernel.dwconv_residual(jnp.zeros((1, 8, 12, 16)), w, b)


def test_tiling_defaults_keep_the_register_budget():
  for shape in [(250, 32, 32, 480), (128, 32, 32, 480), (64, 32, 32, 576), (2, 8, 8, 16),
                (1, 64, 256, 1024)]:
    th, tw, bc, nw = dwconv_kernel.tiling(shape)
    assert th * tw * bc <= 32 * (32 * nw) and shape[1] % th == 0 and shape[2] % tw == 0, shape
  assert dwconv_kernel.tiling((250, 32, 32, 480)) == (2, 32, 32, 8)     # measured best (NOTES 36)
  assert dwconv_kernel.tiling((250, 32, 32, 576)) == (2, 32, 64, 8)
  assert dwconv_kernel.tiling((2, 8, 8, 12)) == (2, 8, 16, 8)            # no divisor >= 8: padded
  assert dwconv_kernel.tiling((2, 8, 8, 12), channel_block=4) == (2, 8, 8, 8)   # blocks >= 8
  assert dwconv_kernel.tiling((2, 8, 8, 40), 3, 64, 100, 4) == (2, 8, 64, 4)     # rounded down
  assert dwconv_kernel.tiling((2, 8, 8, 480), channel_block=512)[2] == 512      # need not divide


@pytest.mark.parametrize("kind", ["convnext", "transformer"])
def test_blocks_with_pallas_ops_match_xla_path(kind):
  """The model's blocks give the same output and gradients with every Pallas kernel on or off."""
  def block(ops):
    if kind == "transformer":
      return layers.TransformerBlock(16, 32, 2, "TDRMSN", dtype=jnp.float32,
                                     rngs=nnx.Rngs(params=3), pallas_ops=ops)
    return layers.ConvNeXtBlock(16, 32, 7, "TDRMSN", dtype=jnp.float32, rngs=nnx.Rngs(params=3),
                                pallas_ops=ops)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 16) if kind == "convnext" else (2, 12, 16))
  tau = jax.random.uniform(jax.random.key(2), (2, 1))  # per-image time: a (B, d) norm scale

  def run(ops):
    m = block(ops)
    gd, params = nnx.split(m)
    f = lambda p, x: jnp.sum(nnx.merge(gd, p)(x, tau) ** 2)  # noqa: E731
    return nnx.merge(gd, params)(x, tau), jax.grad(f, argnums=(0, 1))(params, x)

  (y0, (gp0, gx0)), (y1, (gp1, gx1)) = run(()), run(layers.PALLAS_OPS)
  np.testing.assert_allclose(y1, y0, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(gx1, gx0, atol=2e-4 * float(jnp.abs(gx0).max()))
  for a, e in zip(jax.tree.leaves(gp1), jax.tree.leaves(gp0)):
    np.testing.assert_allclose(a, e, atol=2e-4 * (float(jnp.abs(e).max()) + 1e-6))


def test_pallas_ops_resolution():
  assert layers.resolve_pallas_ops("", jnp.bfloat16) == ()
  assert layers.resolve_pallas_ops("rmsnorm,geglu, dwconv", jnp.float32) == ("dwconv", "geglu",
                                                                             "rmsnorm")
  on_cpu = jax.default_backend() == "cpu"
  assert layers.resolve_pallas_ops("auto", jnp.bfloat16) == (() if on_cpu else layers.auto_pallas_ops())
  assert on_cpu or set(layers.AUTO_PALLAS_OPS) <= set(layers.auto_pallas_ops())
  assert layers.resolve_pallas_ops("auto", jnp.float32) == ()
  with pytest.raises(ValueError, match="unknown op"):
    layers.resolve_pallas_ops("dwconv,flash", jnp.bfloat16)
