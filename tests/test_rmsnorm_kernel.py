"""Scaled RMSNorm Pallas kernels (interpret mode on CPU) against the model's XLA expression."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimr_jax.models import layers
from dimr_jax.models import rmsnorm_kernel as rk
from tests.conftest import lower_for_cuda_or_skip


def _f32(x):
  return np.asarray(jnp.asarray(x, jnp.float32))


def _inputs(shape, scale_rows, dtype, seed=0):
  """x, scale and a cotangent; x's first rows of sample 0 are tiny and one row of the last is 0.

  The tiny rows (rms ~ 1e-6) make the eps's placement visible: 1e-8 added to the rms changes them
  by 1%, inside the sqrt it would change them 100-fold, and without it by 1% the other way. The
  zero row checks that rms = 0 gives finite values (XLA's VJP gives NaN there; see
  test_zero_row). The scale is 1 + N(0, 1) / 2, so each column and sample scales differently.
  """
  rng = np.random.default_rng(seed)
  d = shape[-1]
  x = rng.standard_normal(shape).astype(np.float32)
  x = x.reshape(shape[0], -1, d)
  x[0, :3] *= 1e-6
  x = x.reshape(shape)
  scale = (1.0 + 0.5 * rng.standard_normal((scale_rows, d))).astype(np.float32)
  g = rng.standard_normal(shape).astype(np.float32)
  return jnp.asarray(x, dtype), jnp.asarray(scale), jnp.asarray(g, dtype)


@jax.jit
def _xla(x, s):
  return rk.scaled_rms_norm(x, s, impl="xla")


def _pallas_fn(bm=None, bm_bwd=None):
  return jax.jit(lambda x, s: rk.scaled_rms_norm(x, s, impl="pallas", bm=bm, bm_bwd=bm_bwd))


def _vjp(f, x, s, g):
  return jax.jit(lambda x, s, g: jax.vjp(f, x, s)[1](g))(x, s, g)


def _assert_rows_close(got, want, rtol):
  """|got - want| <= rtol * max|want| of each row (rows differ by up to 1e6 in size: tiny rows)."""
  got, want = _f32(got), _f32(want)
  assert got.shape == want.shape
  err = np.max(np.abs(got - want), axis=-1)
  ref = np.max(np.abs(want), axis=-1)
  assert np.all(err <= rtol * ref), f"max row-relative error {np.max(err / ref):.3g} > {rtol}"


def test_xla_impl_is_the_model_expression():
  x, s, _ = _inputs((2, 5, 7, 24), 2, jnp.bfloat16)
  model = jax.jit(lambda x, s: layers._scaled_rms_norm(x, layers._bcast(s, x)))
  np.testing.assert_array_equal(_f32(_xla(x, s)), _f32(model(x, s)))
  with pytest.raises(ValueError, match="impl"):
    rk.scaled_rms_norm(x, s, impl="cuda")


def test_bad_arguments():
  x, s, _ = _inputs((2, 5, 24), 2, jnp.float32)
  for bad in (s[:, :12], jnp.ones((3, 24)), s[0], jnp.ones((2, 1, 24))):
    for impl in ("xla", "pallas"):
      with pytest.raises(ValueError, match="does not fit"):
        rk.scaled_rms_norm(x, bad, impl=impl)
  with pytest.raises(ValueError, match="power of two"):
    rk.scaled_rms_norm(x, s, impl="pallas", bm=12)
  with pytest.raises(ValueError, match="power of two"):
    rk.scaled_rms_norm(x, s, impl="pallas", bm_bwd=0)


# (2, 37, 96): d = 96 -> dpad 128 (column mask); N = 37 rows, bm = 64 by default (one block, rows
# masked) or 8 (5 blocks, the last masked; backward 16: 3 blocks). (3, 8, 8, 48): pixels, N = 64,
# dpad 64; bm = 16 divides N (no masks at all).
_CASES = [((2, 37, 96), None, None), ((2, 37, 96), 8, 16), ((3, 8, 8, 48), 16, None)]


@pytest.mark.parametrize("shape,bm,bm_bwd", _CASES)
@pytest.mark.parametrize("shared", [False, True])
def test_forward_and_vjp_f32(shape, bm, bm_bwd, shared):
  x, s, g = _inputs(shape, 1 if shared else shape[0], jnp.float32, seed=1)
  f = _pallas_fn(bm, bm_bwd)
  y = f(x, s)
  assert y.shape == x.shape and y.dtype == x.dtype
  np.testing.assert_allclose(y, _xla(x, s), rtol=1e-6, atol=1e-6)
  dx, ds = _vjp(f, x, s, g)
  dx_ref, ds_ref = _vjp(_xla, x, s, g)
  assert ds.shape == s.shape and ds.dtype == s.dtype
  _assert_rows_close(dx, dx_ref, 1e-5)
  np.testing.assert_allclose(ds, ds_ref, rtol=1e-5, atol=1e-5 * float(np.abs(ds_ref).max()))


def test_forward_and_vjp_bf16():
  x, s, g = _inputs((2, 37, 96), 2, jnp.bfloat16, seed=2)
  f = _pallas_fn(8)
  xf, gf = x.astype(jnp.float32), g.astype(jnp.float32)
  # float32 math rounded once: within 1 bf16 ulp (2^-7 relative) of the float32 expression on the
  # same bf16 values, rounded to bf16.
  y = f(x, s)
  assert y.dtype == jnp.bfloat16
  exact = _f32(_xla(xf, s).astype(jnp.bfloat16))
  np.testing.assert_allclose(_f32(y), exact, rtol=2.0**-7, atol=1e-30)
  assert np.mean(_f32(y) != exact) < 1e-2
  np.testing.assert_array_equal(_f32(_xla(x, s)), exact)  # the model's path rounds once too
  dx, ds = _vjp(f, x, s, g)
  assert dx.dtype == jnp.bfloat16 and ds.dtype == jnp.float32
  dx_ref, ds_ref = _vjp(_xla, xf, s, gf)
  # dx is a difference of two terms, so where they cancel the float32 error is relative to the row,
  # not to the element; 1 ulp elsewhere.
  row = np.max(np.abs(_f32(dx_ref)), axis=-1, keepdims=True)
  assert np.all(np.abs(_f32(dx) - _f32(dx_ref.astype(jnp.bfloat16)))
                <= 2.0**-7 * np.abs(_f32(dx_ref)) + 1e-5 * row)
  np.testing.assert_allclose(ds, ds_ref, rtol=1e-5, atol=1e-5 * float(np.abs(ds_ref).max()))


def test_zero_row():
  """rms = 0: y = 0 and dx = g * s / eps, finite (XLA's autodiff of sqrt at 0 gives NaN)."""
  x, s, g = _inputs((2, 37, 96), 2, jnp.float32, seed=3)
  x = x.at[1, 5].set(0.0)
  f = _pallas_fn(8)
  np.testing.assert_array_equal(f(x, s)[1, 5], 0.0)
  dx, ds = _vjp(f, x, s, g)
  dx_ref, ds_ref = _vjp(_xla, x, s, g)
  np.testing.assert_allclose(dx[1, 5], g[1, 5] * s[1] / rk.EPS, rtol=1e-6)
  keep = np.ones((2, 37), bool)
  keep[1, 5] = False
  _assert_rows_close(_f32(dx)[keep], _f32(dx_ref)[keep], 1e-5)
  np.testing.assert_allclose(ds, ds_ref, rtol=1e-5, atol=1e-5 * float(np.abs(ds_ref).max()))


def test_dx_formula_is_the_derivative():
  """The backward's formula (module docstring), written in jnp, against autodiff in float32."""
  x, s, g = _inputs((2, 37, 96), 2, jnp.float32, seed=4)
  d = x.shape[-1]

  @jax.jit
  def formula(x, s, g):
    s = s[:, None, :]
    rms = jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True))
    r = 1.0 / (rms + rk.EPS)
    dx = r * (g * s) - x * (r * r / (d * rms)) * jnp.sum(g * s * x, axis=-1, keepdims=True)
    return dx, jnp.sum(g * x * r, axis=1)

  for got, want in zip(formula(x, s, g), _vjp(_xla, x, s, g)):
    _assert_rows_close(got, want, 1e-5)


def test_grad_under_jit():
  x, s, g = _inputs((3, 8, 8, 48), 3, jnp.float32, seed=5)
  s1 = s[:1]

  def loss(x, s, s1, impl):
    y = rk.scaled_rms_norm(x, s, impl=impl, **({"bm": 16} if impl == "pallas" else {}))
    z = rk.scaled_rms_norm(y * 2.0 + x, s1, impl=impl)  # a second norm with a shared scale
    return jnp.sum(z * g) + jnp.sum(y ** 2)

  grad = lambda impl: jax.jit(jax.grad(  # noqa: E731
      lambda x, s, s1: loss(x, s, s1, impl), argnums=(0, 1, 2)))(x, s, s1)
  for got, want in zip(grad("pallas"), grad("xla")):
    _assert_rows_close(got, want, 2e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU check of the CUDA lowering")
@pytest.mark.parametrize("scale_rows", [4, 1])
def test_lowers_to_triton_for_cuda(scale_rows):
  """Every op of both kernels has a Triton lowering (lowered for CUDA here; compiled on a GPU)."""
  x = jax.ShapeDtypeStruct((4, 264, 960), jnp.bfloat16)
  s = jax.ShapeDtypeStruct((scale_rows, 960), jnp.float32)

  def fwd_bwd(x, s):
    return jax.grad(lambda x, s: jnp.sum(
        rk.scaled_rms_norm(x, s, impl="pallas", interpret=False).astype(jnp.float32)),
                    argnums=(0, 1))(x, s)

  text = lower_for_cuda_or_skip(fwd_bwd, x, s)
  assert text.count("__gpu$xla.gpu.triton") == 2
