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


@pytest.mark.parametrize("k,tiles", [(7, dict(row_tile=4, channel_block=8, wgrad="pallas")),
                                     (7, dict(row_tile=2, channel_block=16, wgrad="xla")),
                                     (3, dict(row_tile=8, channel_block=16, wgrad="pallas"))])
def test_forward_and_gradients_match_xla_in_float32(k, tiles):
  x, w, b, g = _inputs(jnp.float32, k=k)
  ours = lambda x, w, b: dwconv_kernel.dwconv_residual(x, w, b, wgrad_row_tile=2, **tiles)  # noqa: E731
  ref = dwconv_kernel.dwconv_residual_reference
  np.testing.assert_allclose(ours(x, w, b), ref(x, w, b), atol=5e-6, rtol=1e-6)
  got = jax.grad(_loss(ours, g), argnums=(0, 1, 2))(x, w, b)
  want = jax.grad(_loss(ref, g), argnums=(0, 1, 2))(x, w, b)
  for a, e, name in zip(got, want, ("dx", "dw", "db")):
    np.testing.assert_allclose(a, e, atol=1e-4 * float(jnp.abs(e).max()), err_msg=name)


def test_bfloat16_rounds_once_from_float32():
  x, w, b, _ = _inputs(jnp.bfloat16)
  got = dwconv_kernel.dwconv_residual(x, w, b, row_tile=4, channel_block=8).astype(jnp.float32)
  exact = dwconv_kernel.dwconv_residual_reference(
      *(a.astype(jnp.float32) for a in (x, w, b)))
  # one bf16 rounding of the float32 result: relative error <= 2^-8
  np.testing.assert_array_less(jnp.abs(got - exact), 2.0 ** -8 * jnp.abs(exact) + 1e-6)


def test_bad_shapes_and_unsupported_tilings_are_named():
  x, w, b, _ = _inputs(jnp.float32)
  with pytest.raises(ValueError, match="do not fit"):
    dwconv_kernel.dwconv_residual(x, w[:, :, :8], b)
  assert not dwconv_kernel.supported((2, 8, 12, 16), 7)   # width 12: not a power of two
  assert not dwconv_kernel.supported((2, 8, 16, 12), 7)   # 12 channels: no block of >= 8
  with pytest.raises(ValueError, match="no Triton tiling"):
    dwconv_kernel.dwconv_residual(jnp.zeros((1, 8, 12, 16)), w, b)


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
  assert layers.resolve_pallas_ops("auto", jnp.bfloat16) == (() if on_cpu else layers.AUTO_PALLAS_OPS)
  assert layers.resolve_pallas_ops("auto", jnp.float32) == ()
  with pytest.raises(ValueError, match="unknown op"):
    layers.resolve_pallas_ops("dwconv,flash", jnp.bfloat16)
