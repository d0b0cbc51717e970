"""GEGLU Pallas kernels (interpret mode on CPU) against the XLA expression and float64 truth."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from dimr_jax.models import geglu_kernel as gk
from tests.conftest import lower_for_cuda_or_skip


def _f32(x):
  return np.asarray(jnp.asarray(x, jnp.float32))


def _inputs(shape, dtype, seed=0):
  """h01 ~ 1.5 N(0, 1) (reaching |h0| ~ 7, both GELU tails) and a cotangent for the output."""
  rng = np.random.default_rng(seed)
  h01 = jnp.asarray(1.5 * rng.standard_normal(shape, np.float32), dtype)
  g = jnp.asarray(rng.standard_normal((*shape[:-1], shape[-1] // 2), np.float32), dtype)
  return h01, g


# Everything jitted: eager op-by-op dispatch compiles each op and would dominate these tests' time.
_xla = jax.jit(lambda h: gk.geglu(h, impl="xla"))
_pallas = jax.jit(lambda h: gk.geglu(h, impl="pallas"))


@jax.jit
def _f32_reference(h01):
  """The XLA expression on float32 copies: what the kernel computes before its single rounding."""
  return gk.geglu(h01.astype(jnp.float32), impl="xla")


def _vjp(f, h01, g):
  return jax.jit(lambda h, g: jax.vjp(f, h)[1](g)[0])(h01, g)


def test_erf_and_normal_cdf_accuracy():
  # erf is 1 - erfc(|x|): max abs error 3.8e-7 measured (a few float32 ulp of 1; jax's own float32
  # erf is at 3.1e-7 against float64 on CPU).
  x = np.linspace(-10.0, 10.0, 400_001, dtype=np.float32)
  x = np.concatenate([x, np.float32([0.0, -0.0, 1e-30, 30.0, -30.0, 1e30, -1e30, np.inf, -np.inf])])
  got = np.asarray(jax.jit(gk.erf)(x), np.float64)
  assert np.max(np.abs(got - scipy.special.erf(x.astype(np.float64)))) < 5e-7
  assert np.max(np.abs(got - _f32(jax.scipy.special.erf(x)))) < 6e-7
  assert got[-9] == 0.0 and got[-2] == 1.0 and got[-1] == -1.0
  # The normal CDF keeps its relative accuracy in the lower tail (the point of building on erfc):
  # 4e-6 down to Phi(-12.5) ~ 4e-36 (below 1e-38 XLA's CPU flushes subnormals), where
  # 1 + erf(x/sqrt2) would have no correct digits at all.
  x = np.linspace(-12.5, 12.5, 200_001, dtype=np.float32)
  cdf, ex = jax.jit(gk.normal_cdf)(x)
  truth = scipy.special.ndtr(x.astype(np.float64))
  assert np.max(np.abs(np.asarray(cdf, np.float64) - truth) / truth) < 1e-5
  np.testing.assert_allclose(ex, np.exp(-0.5 * x.astype(np.float64) ** 2), rtol=1e-5, atol=1e-37)


def test_gelu_matches_jax_nn_gelu_float32():
  x = np.linspace(-15.0, 15.0, 200_001, dtype=np.float32)
  ref = jax.jit(lambda v: jax.nn.gelu(v, approximate=False))(x)
  np.testing.assert_allclose(jax.jit(gk.gelu_f32)(x), ref, rtol=2e-5, atol=5e-7)
  edge = np.float32([0.0, -0.0, np.inf, -np.inf, np.nan, -1e30, 1e30])
  np.testing.assert_array_equal(jax.jit(gk.gelu_f32)(edge),
                                jax.jit(lambda v: jax.nn.gelu(v, approximate=False))(edge))


def test_xla_impl_is_the_model_expression():
  h01, _ = _inputs((8, 64), jnp.bfloat16)

  @jax.jit
  def model_expression(h01):  # GegluMLP's code before geglu_kernel existed
    h0, h1 = jnp.split(h01, 2, axis=-1)
    return jax.nn.gelu(h0, approximate=False) * h1

  np.testing.assert_array_equal(_f32(_xla(h01)), _f32(model_expression(h01)))
  with pytest.raises(ValueError, match="impl"):
    gk.geglu(h01, impl="cuda")


# Default blocks of 8192 elements. (1000, 2*192): bh = 64, bm = 128, a (3, 8) grid whose last row
# block is masked; (2, 37, 2*128): leading dims flattened to 74 rows, bh = 128, bm = 64, masked;
# (128, 2*96): bh = 32, bm = 128 divides M (no mask).
@pytest.mark.parametrize("shape", [(1000, 2 * 192), (2, 37, 2 * 128)])
def test_forward_bf16(shape):
  h01, _ = _inputs(shape, jnp.bfloat16)
  got = _f32(_pallas(h01))
  assert got.shape == (*shape[:-1], shape[-1] // 2)
  # float32 math rounded once: equal to the float32 expression rounded to bf16 but for the odd
  # rounding boundary (at most 1 bf16 ulp, <= 2^-7 relative).
  exact = _f32(_f32_reference(h01).astype(jnp.bfloat16))
  np.testing.assert_allclose(got, exact, rtol=2.0**-7, atol=1e-30)
  assert np.mean(got != exact) < 1e-3
  # The model's bf16 XLA expression rounds in between (on CPU its mean error against the float32
  # expression is ~1.6e-3 here, the kernel's ~1.0e-3, for outputs of mean magnitude ~0.7); a wrong
  # formula would be far off (swapped halves: ~0.7).
  xla = _f32(_xla(h01))
  np.testing.assert_allclose(got, xla, rtol=2e-2, atol=1e-2)
  assert np.mean(np.abs(got - xla)) < 2e-3


@pytest.mark.parametrize("shape", [(2, 37, 2 * 128), (128, 2 * 96)])
def test_forward_and_vjp_f32(shape):
  h01, g = _inputs(shape, jnp.float32, seed=1)
  np.testing.assert_allclose(_pallas(h01), _xla(h01), rtol=2e-6, atol=1e-6)
  np.testing.assert_allclose(_vjp(_pallas, h01, g), _vjp(_xla, h01, g), rtol=1e-5, atol=1e-5)


def test_vjp_bf16():
  h01, g = _inputs((1000, 2 * 192), jnp.bfloat16, seed=2)
  dh = _vjp(_pallas, h01, g)
  assert dh.dtype == jnp.bfloat16 and dh.shape == h01.shape
  dh = _f32(dh)
  # Against the float32 VJP of the same bf16 values, rounded once: within 1 bf16 ulp.
  ref = _f32(_vjp(_f32_reference, h01, g.astype(jnp.float32)).astype(jnp.bfloat16))
  np.testing.assert_allclose(dh, ref, rtol=2.0**-7, atol=1e-30)
  # Against the model's bf16 XLA VJP: loose, but a wrong derivative or a swapped half is not.
  xla = _f32(_vjp(_xla, h01, g))
  np.testing.assert_allclose(dh, xla, rtol=3e-2, atol=3e-2)
  assert np.mean(np.abs(dh - xla)) < 2e-3


def test_grad_under_jit():
  h01, g = _inputs((2, 37, 2 * 128), jnp.float32, seed=3)

  def loss(h, impl):
    return jnp.sum(gk.geglu(h, impl=impl) * g) + jnp.sum(gk.geglu(h, impl=impl) ** 2)

  got = jax.jit(jax.grad(lambda h: loss(h, "pallas")))(h01)
  ref = jax.jit(jax.grad(lambda h: loss(h, "xla")))(h01)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_bias_is_added_in_the_kernel(dtype, tol):
  """geglu(h, b) == geglu(h + b) with the sum rounded as the model rounds it; grads incl. bias."""
  h01, g = _inputs((3, 50, 2 * 64), dtype, seed=4)
  bias = jnp.asarray(np.random.default_rng(5).standard_normal(2 * 64), dtype)
  f = jax.jit(lambda h, b, impl: gk.geglu(h, b, impl=impl), static_argnums=2)
  got, want = _f32(f(h01, bias, "pallas")), _f32(f(h01, bias, "xla"))
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
  grads = lambda impl: jax.jit(jax.grad(  # noqa: E731
      lambda h, b: jnp.sum(gk.geglu(h, b, impl=impl).astype(jnp.float32) * g), argnums=(0, 1)))(
          h01, bias)
  for a, e in zip(grads("pallas"), grads("xla")):
    a, e = _f32(a), _f32(e)
    np.testing.assert_allclose(a, e, rtol=tol, atol=tol * max(1.0, float(np.abs(e).max())))
  with pytest.raises(ValueError, match="does not fit"):
    gk.geglu(h01, bias[:64], impl="pallas")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU check of the CUDA lowering")
def test_lowers_to_triton_for_cuda():
  """Every op of both kernels has a Triton lowering (lowered for CUDA here; compiled on a GPU)."""
  h01 = jax.ShapeDtypeStruct((1000, 2 * 1920), jnp.bfloat16)

  def fwd_bwd(h):
    return jax.grad(lambda h: jnp.sum(gk.geglu(h, impl="pallas", interpret=False)
                                      .astype(jnp.float32)))(h)

  text = lower_for_cuda_or_skip(fwd_bwd, h01)
  assert text.count("__gpu$xla.gpu.triton") == 2


def test_model_runs_the_kernel_per_device_under_a_mesh():
  """Under ``jax.set_mesh`` (the train loop's) the GEGLU kernel runs per device in a shard_map
  over the batch: XLA does not partition a Pallas custom call and would gather the whole batch
  onto every device. Values and gradients equal the single-device call; the opt-in kernels fall
  back to XLA's ops; a batch the mesh does not divide takes XLA's GEGLU."""
  from flax import nnx
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from dimr_jax.models import layers
  if len(jax.devices()) < 8 or not hasattr(jax, "set_mesh"):
    pytest.skip("needs 8 (fake CPU) devices and jax.set_mesh")
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
  mlp = layers.GegluMLP(16, 32, "TDRMSN", dtype=jnp.float32, rngs=nnx.Rngs(params=0),
                        pallas_ops=("geglu", "geglu_gemm", "rmsnorm"))
  x = jax.random.normal(jax.random.key(1), (8, 5, 16))
  tau = jax.random.normal(jax.random.key(2), (8, 16))

  def loss(m, x, tau):
    return jnp.sum(m.residual(x, tau) ** 2)

  grad = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))
  want_l, (want_gm, want_gx) = grad(mlp, x, tau)
  xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
  with jax.set_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(lambda x: mlp.residual(x, tau))(xs))
    got_l, (got_gm, got_gx) = grad(mlp, xs, tau)
    odd = str(jax.make_jaxpr(lambda x: mlp.residual(x, tau[:6]))(x[:6]))
  assert "shard_map" in jaxpr and jaxpr.count("pallas_call") == 1  # the GEGLU kernel only
  assert "pallas_call" not in odd  # 6 rows over 8 devices: XLA's GEGLU
  np.testing.assert_allclose(got_l, want_l, rtol=1e-5)
  np.testing.assert_allclose(got_gx, want_gx, rtol=1e-4, atol=1e-6)
  for a, e in zip(jax.tree.leaves(nnx.state(got_gm)), jax.tree.leaves(nnx.state(want_gm))):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-6)
