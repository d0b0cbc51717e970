"""The Mosaic GPU GEMM with bias + residual epilogue: shape logic and CUDA lowering here, the
model's use of it with the kernel faked, its numbers on a GPU.

The GPU tests run where the default device is a Hopper GPU
(``JAX_PLATFORMS=cuda python -m pytest tests/test_dense_residual_mgpu.py``; needs an H100/H200).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimr_jax.models import dense_residual_mgpu as dr
from dimr_jax.models import layers
from tests.conftest import assert_mu_model_matches_xla, lower_for_cuda_or_skip

on_hopper = pytest.mark.skipif(not dr.available(),
                               reason="needs a Hopper GPU (run with JAX_PLATFORMS=cuda)")


def _inputs(rows, depth, width, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  h = jax.random.normal(k[0], (rows, depth), jnp.bfloat16)
  w = (jax.random.normal(k[1], (depth, width)) / np.sqrt(depth)).astype(jnp.bfloat16)
  b = 0.3 * jax.random.normal(k[2], (width,), jnp.float32)
  r = jax.random.normal(k[3], (rows, width), jnp.bfloat16)
  return h, w, b, r


def _xla(h, w, b, r):
  """The model's XLA path: ``r + Dense(h)`` with the GEMM, its bias add and the sum each rounded."""
  y = jnp.matmul(h, w, preferred_element_type=jnp.float32).astype(h.dtype)
  return r + (y + b.astype(h.dtype))


def test_default_config_per_shape():
  cfg = dr.default_config(960, 480)   # XL ConvNeXt w2: four 128-wide column tiles
  assert (cfg.tile_m, cfg.tile_n, cfg.tile_k) == (128, 128, 64)
  cfg = dr.default_config(1152, 576)  # G: three 192-wide ones
  assert (cfg.tile_m, cfg.tile_n, cfg.tile_k) == (64, 192, 64)
  assert dr.default_config(96, 64).tile_k == 32
  assert dr.default_config(100, 64) is None and dr.default_config(64, 40) is None
  assert dr.applies(960, 480, 256000) and not dr.applies(960, 480, 64250)


def test_shape_errors_name_the_problem():
  h, w, b, r = _inputs(64, 128, 64)
  cfg = dr.Config()
  with pytest.raises(ValueError, match="does not fit input"):
    dr._check(h, w[:64], b, r, cfg)
  with pytest.raises(ValueError, match="residual"):
    dr._check(h, w, b, r[:, :32], cfg)
  with pytest.raises(ValueError, match="multiple of 8"):
    dr._check(h[:60], w, b, r[:60], cfg)
  with pytest.raises(ValueError, match="bf16"):
    dr._check(h, w, b, r.astype(jnp.float32), cfg)
  with pytest.raises(ValueError, match="does not fit the output"):
    dr.dense_residual(h, w, b, r[:32])


@pytest.mark.parametrize("rows,depth,width", [(512, 960, 480), (256, 1152, 576), (520, 96, 48)])
def test_lowers_for_cuda(rows, depth, width):
  """XL's N = 480 (64-byte swizzled residual tiles, W padded to 512), G's 576, a 32-wide K step."""
  args = _inputs(rows, depth, width)
  text = lower_for_cuda_or_skip(dr.dense_residual, *args)
  assert "mosaic_gpu" in text.lower()


def _fake_call(calls):
  """The kernel as XLA arithmetic on exactly its operands (bf16 h, W, r; float32 bias)."""
  def call(h, w, b, r, cfg):
    assert h.dtype == w.dtype == r.dtype == jnp.bfloat16 and b.dtype == jnp.float32
    calls.append((h.shape, w.shape))
    return _xla(h, w, b.astype(h.dtype), r)
  return call


@pytest.mark.parametrize("shared_time", [False, True], ids=["train", "sample"])
@pytest.mark.parametrize("scan_unroll,remat", [(None, "none"), (1, "block")],
                         ids=["python-loop", "rolled-scan-remat"])
def test_model_convnext_mlps_use_it_where_asked(monkeypatch, shared_time, scan_unroll, remat):
  """pallas_ops='dense_residual_mgpu' routes every ConvNeXt block's ``x + w2(g)`` (and only
  those) through the kernel, faked by XLA arithmetic; outputs and gradients stay the XLA path's."""
  calls = []
  monkeypatch.setattr(dr, "available", lambda: True)
  monkeypatch.setattr(dr, "_call", _fake_call(calls))

  def one_convnext_block():  # mu/2R's one ConvNeXt block (K = 32, N = 16); no Transformer MLP
    assert calls == [((2 * 32 * 32, 32), (32, 16))]

  # gradients 5%: XLA's bf16 bias-gradient sums over the 2048 rows are ~1% off, the kernel's
  # float32 ones not
  assert_mu_model_matches_xla("dense_residual_mgpu", scan_unroll=scan_unroll, remat=remat,
                              shared_time=shared_time, out_rtol=1e-2, grad_rtol=5e-2,
                              after_forward=one_convnext_block)


def test_backward_is_the_xla_paths(monkeypatch):
  """dh, dW, dr as the XLA path's; db the float32 column sum of g (XLA's own rounds to bf16)."""
  monkeypatch.setattr(dr, "_call", _fake_call([]))
  h, w, b, r = _inputs(64, 64, 48)
  g = jax.random.normal(jax.random.key(3), r.shape, jnp.bfloat16)
  loss = lambda f: lambda *a: jnp.sum((f(*a) * g).astype(jnp.float32))  # noqa: E731
  got = jax.grad(loss(dr.dense_residual), argnums=(0, 1, 2, 3))(h, w, b, r)
  want = jax.grad(loss(_xla), argnums=(0, 1, 2, 3))(h, w, b, r)
  want = (want[0], want[1], jnp.sum(g.astype(jnp.float32), axis=0), want[3])
  for a, e in zip(got, want):
    assert a.dtype == e.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the off-Hopper error")
def test_resolve_pallas_ops_rejects_it_off_hopper():
  with pytest.raises(ValueError, match="Hopper"):
    layers.resolve_pallas_ops("dense_residual_mgpu", jnp.bfloat16)


@on_hopper
@pytest.mark.parametrize("rows,depth,width", [
    (256000, 960, 480),   # DiMR-XL's ConvNeXt w2 at the sampling batch
    (131072, 1152, 576),  # DiMR-G's at a training batch of 128
    (1000, 96, 48),       # a partial row tile, a 32-wide K step, a column tile mostly past N
])
def test_gpu_matches_xla(rows, depth, width):
  h, w, b, r = _inputs(rows, depth, width)
  got = np.asarray(jax.jit(dr.dense_residual)(h, w, b, r), np.float32)
  want = np.asarray(jax.jit(_xla)(h, w, b, r), np.float32)
  # each side rounds three times; the GEMMs sum in different orders
  np.testing.assert_array_less(np.abs(got - want), 2 ** -6 * np.abs(want) + 2e-2)
  assert np.mean(got == want) > 0.9
