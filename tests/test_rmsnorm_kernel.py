"""Scaled RMSNorm Pallas kernels (interpret mode on CPU) against the model's XLA expression."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dimr_jax.models import dimr as dimr_model
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
    for impl in ("xla", "pallas", "pallas_bwd"):
      with pytest.raises(ValueError, match="does not fit"):
        rk.scaled_rms_norm(x, bad, impl=impl)
  for impl in ("pallas", "pallas_bwd"):
    with pytest.raises(ValueError, match="power of two"):
      rk.scaled_rms_norm(x, s, impl=impl, bm=12)
    with pytest.raises(ValueError, match="power of two"):
      rk.scaled_rms_norm(x, s, impl=impl, bm_bwd=0)


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
  _assert_bf16_grads_close(dx, ds, *_vjp(_xla, xf, s, gf))


def _assert_bf16_grads_close(dx, ds, dx_ref, ds_ref):
  """bf16 dx within 1 ulp of the float32 reference's rounding, plus float32 error relative to the
  row where dx's two terms cancel; dscale (float32) to 1e-5."""
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


# ------------------------------------------------------------------------------------------------
# scaled_rms_norm_tap: XLA's forward, the Pallas backward with the residual gradient added.


def _tap_fn(bm=None, bm_bwd=None):
  return jax.jit(lambda x, s: rk.scaled_rms_norm_tap(x, s, bm=bm, bm_bwd=bm_bwd))


@jax.jit
def _tap_ref(x, s):
  """What the tap replaces: x feeding both a residual add and the model's XLA norm."""
  return x, rk.scaled_rms_norm_xla(x, rk._bcast(s, x))


def _tap_vjp(f, x, s, gx, gy):
  return jax.jit(lambda x, s, gx, gy: jax.vjp(f, x, s)[1]((gx, gy)))(x, s, gx, gy)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shared", [False, True])
def test_tap_forward_is_the_xla_expression(dtype, shared):
  x, s, _ = _inputs((2, 5, 7, 24), 1 if shared else 2, dtype, seed=6)
  x_out, y = _tap_fn()(x, s)
  want = jax.jit(lambda x, s: rk.scaled_rms_norm_xla(x, rk._bcast(s, x)))(x, s)
  assert y.dtype == dtype and x_out.dtype == dtype
  np.testing.assert_array_equal(_f32(y), _f32(want))
  np.testing.assert_array_equal(_f32(x_out), _f32(x))
  y_only = jax.jit(lambda x, s: rk.scaled_rms_norm(x, s, impl="pallas_bwd"))(x, s)
  np.testing.assert_array_equal(_f32(y_only), _f32(want))


@pytest.mark.parametrize("shape,bm,bm_bwd", _CASES)
@pytest.mark.parametrize("shared", [False, True])
def test_tap_vjp_f32(shape, bm, bm_bwd, shared):
  x, s, gy = _inputs(shape, 1 if shared else shape[0], jnp.float32, seed=7)
  gx = jax.random.normal(jax.random.key(8), shape)
  dx, ds = _tap_vjp(_tap_fn(bm, bm_bwd), x, s, gx, gy)
  dx_ref, ds_ref = _tap_vjp(_tap_ref, x, s, gx, gy)
  assert dx.shape == x.shape and ds.shape == s.shape and ds.dtype == s.dtype
  _assert_rows_close(dx, dx_ref, 1e-5)
  np.testing.assert_allclose(ds, ds_ref, rtol=1e-5, atol=1e-5 * float(np.abs(ds_ref).max()))


def test_tap_vjp_bf16():
  x, s, gy = _inputs((2, 37, 96), 2, jnp.bfloat16, seed=9)
  gx = jax.random.normal(jax.random.key(10), x.shape, jnp.bfloat16)
  dx, ds = _tap_vjp(_tap_fn(8), x, s, gx, gy)
  assert dx.dtype == jnp.bfloat16 and ds.dtype == jnp.float32
  f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
  # The kernel adds g_x to dx in float32 and rounds once, so the same bound holds.
  _assert_bf16_grads_close(dx, ds, *_tap_vjp(_tap_ref, f32(x), s, f32(gx), f32(gy)))


def test_tap_zero_residual_gradient_is_the_pallas_backward():
  """g_x = 0 (a zeros cotangent, as when only y is used): the full Pallas VJP's values exactly."""
  x, s, g = _inputs((2, 37, 96), 2, jnp.float32, seed=11)
  dx, ds = _tap_vjp(_tap_fn(8, 16), x, s, jnp.zeros_like(x), g)
  dx_ref, ds_ref = _vjp(_pallas_fn(8, 16), x, s, g)
  np.testing.assert_array_equal(dx, dx_ref)
  np.testing.assert_array_equal(ds, ds_ref)
  dx_y, ds_y = _vjp(lambda x, s: rk.scaled_rms_norm(x, s, impl="pallas_bwd", bm=8, bm_bwd=16),
                    x, s, g)
  np.testing.assert_array_equal(dx_y, dx_ref)
  np.testing.assert_array_equal(ds_y, ds_ref)


def test_tap_empty_input():
  x, s = jnp.zeros((2, 0, 24), jnp.bfloat16), jnp.ones((2, 24))
  (x_out, y), vjp = jax.vjp(rk.scaled_rms_norm_tap, x, s)
  assert x_out.shape == y.shape == x.shape and y.dtype == x.dtype
  dx, ds = vjp((x_out, y))
  assert dx.shape == x.shape and ds.shape == s.shape and not np.any(_f32(ds))


def _perturbed_dimr(dtype, pallas_ops):
  """A tiny DiMR (one Transformer and one ConvNeXt stage) whose norm scales depend on t."""
  m = dimr_model.create_model(dict(variant="mu/2R", num_classes=11), dtype=dtype,
                              pallas_ops=pallas_ops)
  state = nnx.state(m, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  nnx.update(m, jax.tree.unflatten(treedef, [
      l + 0.3 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]))
  return m


def test_model_with_pallas_backward():
  """pallas_ops='rmsnorm_bwd' in bfloat16: the same forward bit for bit, and parameter gradients
  as close to the float32 model's as those of the XLA path.

  Not compared with the XLA path's directly: in bf16 this tiny model's bias gradients are sums
  over pixels that mostly cancel, up to 40% off float32 on either path, and the paths round
  differently (the kernel adds the residual stream's gradient in float32, XLA in bf16), so they
  can differ from each other as much. Both are held to the float32 model's gradients instead.
  """
  x = jax.random.normal(jax.random.key(12), (2, 32, 32, 4))
  t, y = jnp.array([0.3, -2.0]), jnp.array([2, 9])

  def run(dtype, pallas_ops):
    gd, st = nnx.split(_perturbed_dimr(dtype, pallas_ops))

    def loss(st):
      outs = nnx.merge(gd, st)(x, t, y)
      return sum(jnp.mean(o ** 2) for o in outs), outs
    return jax.jit(jax.grad(loss, has_aux=True))(st)

  grads_f32, _ = run(jnp.float32, "")
  grads_xla, outs_xla = run(jnp.bfloat16, "")
  grads_pallas, outs_pallas = run(jnp.bfloat16, "rmsnorm_bwd")
  for a, b in zip(outs_xla, outs_pallas):
    np.testing.assert_array_equal(a, b)
  leaves = [jax.tree.leaves(g) for g in (grads_f32, grads_xla, grads_pallas)]
  assert len(set(map(len, leaves))) == 1
  for f, a, b in zip(*leaves):
    f, a, b = (np.asarray(v, np.float64) for v in (f, a, b))
    err_xla, err_pallas = (np.linalg.norm(v - f) / np.linalg.norm(f) for v in (a, b))
    assert err_pallas <= 1.5 * err_xla + 1e-2, (err_pallas, err_xla)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU check of the CUDA lowering")
def test_tap_lowers_to_triton_for_cuda():
  """The tap's forward is XLA's and its backward the one Triton kernel, residual input included."""
  x = jax.ShapeDtypeStruct((4, 264, 960), jnp.bfloat16)
  s = jax.ShapeDtypeStruct((4, 960), jnp.float32)

  def fwd_bwd(x, s):
    def loss(x, s):
      x_out, xn = rk.scaled_rms_norm_tap(x, s, interpret=False)
      return jnp.sum((x_out * xn).astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1))(x, s)

  text = lower_for_cuda_or_skip(fwd_bwd, x, s)
  assert text.count("__gpu$xla.gpu.triton") == 1 and 'name = "rmsnorm_bwd"' in text
