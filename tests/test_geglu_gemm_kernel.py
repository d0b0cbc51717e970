"""The fused GEMM + GEGLU kernel (interpret mode on CPU) against the unfused path it replaces."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dimr_jax.models import geglu_gemm_kernel as gg
from dimr_jax.models import geglu_kernel as gk
from dimr_jax.models import layers
from tests.conftest import lower_for_cuda_or_skip


def _inputs(rows, depth, hidden, dtype, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(k[0], (rows, depth), dtype)
  w01 = (jax.random.normal(k[1], (depth, 2 * hidden)) / np.sqrt(depth)).astype(dtype)
  b01 = (0.1 * jax.random.normal(k[2], (2 * hidden,))).astype(dtype)
  g = jax.random.normal(k[3], (rows, hidden), dtype)
  return x, w01, b01, g


def _unfused(x, w01, b01):
  h01 = jnp.matmul(x, w01, preferred_element_type=jnp.float32).astype(x.dtype)
  return gk.geglu(h01, b01, impl="pallas")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows", [256, 200])  # 200: a partial (masked) last row block
def test_forward_and_grads_match_unfused(dtype, rows):
  x, w01, b01, g = _inputs(rows, 96, 64, dtype)
  kw = dict(bm=64, bn=32, bk=32)
  out, ref = gg.geglu_gemm(x, w01, b01, **kw), _unfused(x, w01, b01)
  assert out.dtype == dtype and out.shape == (rows, 64)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  # bf16: the same roundings in the same order, so equal up to the GEMM's summation order.
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)

  def loss(f):
    return lambda x, w, b: jnp.sum(f(x, w, b).astype(jnp.float32) * g.astype(jnp.float32))

  got = jax.grad(loss(lambda *a: gg.geglu_gemm(*a, **kw)), argnums=(0, 1, 2))(x, w01, b01)
  want = jax.grad(loss(_unfused), argnums=(0, 1, 2))(x, w01, b01)
  for a, e in zip(got, want):
    a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
    np.testing.assert_allclose(a, e, atol=tol * max(1.0, np.abs(e).max()), rtol=tol)


def test_leading_dims_and_bad_shapes():
  x, w01, b01, _ = _inputs(2 * 40, 64, 32, jnp.float32)
  out = gg.geglu_gemm(x.reshape(2, 40, 64), w01, b01, bm=32, bn=32, bk=32)
  np.testing.assert_allclose(out.reshape(80, 32), _unfused(x, w01, b01), atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="does not fit"):
    gg.geglu_gemm(x, w01[:32], b01)
  with pytest.raises(ValueError, match="does not fit"):
    gg.geglu_gemm(x, w01, b01[:10])
  with pytest.raises(ValueError, match="power of two"):
    gg.geglu_gemm(x, w01, b01, bm=48)
  with pytest.raises(ValueError, match="no power-of-two step"):
    gg.geglu_gemm(x[:, :60], w01[:60], b01)  # K = 60 = 4 * 15: no step of 16 or more


def test_mlp_fused_equals_unfused():
  """GegluMLP with pallas_ops=geglu_gemm gives the output and gradients of the unfused MLP."""
  kw = dict(dim=32, hidden=64, norm_type="TDRMSN", dtype=jnp.float32)
  a = layers.GegluMLP(**kw, rngs=nnx.Rngs(params=1), pallas_ops=("geglu",))
  b = layers.GegluMLP(**kw, rngs=nnx.Rngs(params=1), pallas_ops=("geglu_gemm",))
  x = jax.random.normal(jax.random.key(2), (2, 24, 32))
  tau = jax.random.normal(jax.random.key(3), (2, 32))

  def run(m):
    gd, st = nnx.split(m)
    f = lambda st, x: jnp.sum(jnp.sin(nnx.merge(gd, st)(x, tau)))
    return f(st, x), jax.grad(f, argnums=(0, 1))(st, x)

  (la, (ga, gxa)), (lb, (gb, gxb)) = run(a), run(b)
  np.testing.assert_allclose(la, lb, rtol=1e-5)
  np.testing.assert_allclose(gxa, gxb, atol=1e-5, rtol=1e-5)
  for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(u, v, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU check of the CUDA lowering")
def test_lowers_to_triton_for_cuda():
  """Forward without differentiation: the fused kernel only; with it: fused forward + GEGLU backward."""
  x = jax.ShapeDtypeStruct((66000, 960), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((960, 3840), jnp.bfloat16)
  b = jax.ShapeDtypeStruct((3840,), jnp.bfloat16)
  fwd = lambda x, w, b: gg.geglu_gemm(x, w, b, interpret=False)
  grad = jax.grad(lambda x, w, b: jnp.sum(fwd(x, w, b).astype(jnp.float32)), argnums=(0, 1, 2))
  assert lower_for_cuda_or_skip(fwd, x, w, b).count("__gpu$xla.gpu.triton") == 1
  text = lower_for_cuda_or_skip(grad, x, w, b)
  assert text.count("__gpu$xla.gpu.triton") == 2 and 'name = "geglu_bwd"' in text


def test_narrow_option_selects_by_width():
  """'geglu_gemm_narrow' fuses only the MLPs narrower than GEGLU_GEMM_NARROW_BELOW (ConvNeXt)."""
  def fused(dim, ops):
    return layers.GegluMLP(dim, 2 * dim, "TDRMSN", dtype=jnp.bfloat16, rngs=nnx.Rngs(params=0),
                           pallas_ops=ops).fused_gemm

  wide = layers.GEGLU_GEMM_NARROW_BELOW
  assert fused(480, ("geglu", "geglu_gemm_narrow")) and not fused(wide, ("geglu", "geglu_gemm_narrow"))
  assert fused(wide, ("geglu_gemm",)) and not fused(480, ("geglu",))
  assert layers.resolve_pallas_ops("geglu,geglu_gemm_narrow", jnp.bfloat16) == ("geglu", "geglu_gemm_narrow")
