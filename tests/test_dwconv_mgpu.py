"""The Mosaic GPU depthwise-conv kernel: launch shapes and CUDA lowering here, its numbers on a GPU.

The GPU tests run where the default device is a Hopper GPU
(``JAX_PLATFORMS=cuda python -m pytest tests/test_dwconv_mgpu.py``; needs an H100/H200).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimr_jax.models import dwconv_mgpu as dm
from tests.conftest import assert_mu_model_matches_xla, lower_for_cuda_or_skip

gpu_only = pytest.mark.skipif(not dm.available(),
                              reason="needs a Hopper GPU (run with JAX_PLATFORMS=cuda)")
both_launches = pytest.mark.parametrize("persistent", [False, True], ids=["plain", "persistent"])
CP_ASYNC_PTX = ("cp.async.cg.shared.global [$0], [$1], 16, $2;", "cp.async.commit_group;",
                "cp.async.wait_group 1;")  # the persistent launch's inline PTX


def _inputs(shape, seed=0, k=7):
  ks = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(ks[0], shape, jnp.bfloat16)
  w = 0.1 * jax.random.normal(ks[1], (k, k, shape[-1]), jnp.float32)
  b = jax.random.normal(ks[2], (shape[-1],), jnp.float32)
  return x, w, b


def test_plan_per_shape():
  # DiMR-XL / -G ConvNeXt stages at 256 px: 8 channels a CTA, two strips of 16 rows, 128 threads
  for c in (480, 576):
    p = dm.plan((250, 32, 32, c), 7)
    assert p == dm.Plan(cb=8, rows=16, strips=2) and p.threads(32) == 128
  # a 64x64 stage: 8 channels, 4 strips of 16 rows = 512 threads; 16 channels would be over the
  # shared-memory budget (70 x 70 x 16 bf16 = 157 KB)
  assert dm.plan((8, 64, 64, 480), 7) == dm.Plan(8, 16, 4)
  assert dm.plan((8, 64, 64, 480), 7, cb=16) is None
  # explicit launch shapes are honoured or refused
  assert dm.plan((2, 32, 32, 64), 7, cb=32, rows=8) == dm.Plan(32, 8, 4)
  assert dm.plan((2, 32, 32, 64), 7, rows=5) is None           # 5 does not divide 32
  # shapes it does not take: C not a multiple of 8, even kernel, a CTA of a partial warp
  assert dm.plan((2, 32, 32, 12), 7) is None
  assert dm.plan((2, 32, 32, 64), 4) is None
  assert dm.plan((2, 3, 3, 8), 3) is None   # 2 groups x 3 columns x (1 or 3) strips: no whole warp
  assert dm.plan((dm.MAX_GRID_Y + 1, 32, 32, 64), 7) is None  # one image per grid row
  # the persistent launch: opt-in, same launch shapes
  assert not dm.DEFAULT_PERSISTENT and not dm.plan((250, 32, 32, 480), 7).persistent
  assert dm.plan((250, 32, 32, 480), 7, persistent=True) == dm.Plan(8, 16, 2, persistent=True)
  assert dm.plan((2, 32, 32, 64), 7, cb=32, rows=8, persistent=True) == dm.Plan(32, 8, 4, True)


def test_errors_name_the_problem():
  x, w, b = _inputs((2, 32, 32, 16))
  with pytest.raises(ValueError, match="bf16"):
    dm.dwconv_residual(x.astype(jnp.float32), w, b)
  with pytest.raises(ValueError, match="do not fit"):
    dm.dwconv_residual(x, w[:, :, :8], b)
  with pytest.raises(ValueError, match="no launch shape"):
    dm.dwconv_residual(*_inputs((2, 32, 32, 12))[:1], w[..., :12], b[:12])


@both_launches
@pytest.mark.parametrize("shape,cb,rows", [((250, 32, 32, 480), None, None),
                                           ((3, 16, 16, 24), 8, 16)])
def test_lowers_for_cuda(shape, cb, rows, persistent):
  """Both launches build and lower here; the persistent one's cp.async copies are inline PTX (no
  nvvm dialect attribute: NOTES row 44), and the plain one has none of them."""
  x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  w = jax.ShapeDtypeStruct((7, 7, shape[-1]), jnp.float32)
  b = jax.ShapeDtypeStruct(shape[-1:], jnp.float32)
  text = lower_for_cuda_or_skip(
      lambda x, w, b: dm.dwconv_residual(x, w, b, cb=cb, rows=rows, persistent=persistent), x, w, b)
  assert "mosaic_gpu" in text.lower()
  # the kernel's module is embedded as bytecode, whose strings (the inline asm) read as text
  for asm in CP_ASYNC_PTX:
    assert (asm in text) == persistent, asm
  if not persistent:
    assert "cp.async" not in text


def test_reference_is_the_conv_plus_residual_and_bias():
  """The reference the GPU tests compare to: x + b + the 'SAME' depthwise correlation."""
  x, w, b = _inputs((1, 9, 9, 8), k=3)
  xf = np.asarray(x, np.float32)
  xp = np.pad(xf, ((0, 0), (1, 1), (1, 1), (0, 0)))
  want = xf + np.asarray(b)
  for i in range(3):
    for j in range(3):
      want = want + xp[:, i:i + 9, j:j + 9] * np.asarray(w.astype(jnp.bfloat16), np.float32)[i, j]
  got = np.asarray(dm.reference(x, w, b), np.float32)
  np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)


def _assert_close_bf16(got, want):
  """Within one bf16 rounding of the float32 reference (both round a float32 sum once; the sums'
  order differs)."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  np.testing.assert_array_less(np.abs(got - want), 2 ** -7 * np.abs(want) + 2e-3)
  assert np.mean(got == want) > 0.9


@gpu_only
@both_launches
@pytest.mark.parametrize("shape,k,cb,rows", [
    ((250, 32, 32, 480), 7, None, None),   # DiMR-XL's ConvNeXt stage (sampling batch)
    ((4, 32, 32, 576), 7, None, None),     # DiMR-G's
    ((3, 32, 32, 64), 7, 32, 8),           # wider channel block, four strips
    ((250, 32, 32, 480), 7, 16, 8),        # the 16-channel, 8-row launch the sweep times
    ((2, 64, 64, 24), 7, None, None),      # 64x64 (8-channel blocks), C not a power of two
    ((5, 16, 16, 40), 3, 8, 4),            # 3x3 kernel, short strips
    ((1000, 8, 8, 16), 7, None, None),     # 2000 small tiles: persistent CTAs walk 3 or 4 each
])
def test_gpu_matches_reference(shape, k, cb, rows, persistent):
  x, w, b = _inputs(shape, k=k)
  w = w.astype(jnp.bfloat16)  # the model hands over the kernel in its compute dtype
  got = jax.jit(lambda x, w, b: dm.dwconv_residual(x, w, b, cb=cb, rows=rows,
                                                   persistent=persistent))(x, w, b)
  _assert_close_bf16(got, dm.reference(x, w, b))


@gpu_only
@both_launches
def test_gpu_gradients_match_the_reference(persistent):
  """dx from the kernel (the same launch as the forward) run on the flipped taps, dw and db from
  XLA."""
  x, w, b = _inputs((2, 32, 32, 32))
  g = jax.random.normal(jax.random.key(5), x.shape, jnp.bfloat16)
  loss = lambda f: lambda x, w, b: jnp.sum((f(x, w, b) * g).astype(jnp.float32))
  kernel = functools.partial(dm.dwconv_residual, persistent=persistent)
  got = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(x, w, b)
  want = jax.jit(jax.grad(loss(dm.reference), argnums=(0, 1, 2)))(x, w, b)
  for a, e in zip(got, want):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32),
                               rtol=2e-2, atol=2e-2)


def _fake_kernel(x_shape, k, p):
  """XLA arithmetic on exactly the operands the kernel is handed (bf16 x, float32 taps with the
  residual in the centre tap, float32 bias), one rounding at the end, as the kernel does."""
  assert p == dm.plan(x_shape, k, persistent=p.persistent)

  def run(x, taps, bias):
    assert x.shape == x_shape and x.dtype == jnp.bfloat16
    assert taps.shape == (k * k, x.shape[-1]) and taps.dtype == bias.dtype == jnp.float32
    y = jax.lax.conv_general_dilated(
        x.astype(jnp.float32), taps.reshape(k, k, 1, -1), (1, 1), [(k // 2, k // 2)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1],
        precision="highest")
    return (y + bias).astype(jnp.bfloat16)
  return run


@pytest.mark.parametrize("k,persistent", [(7, False), (3, False), (7, True)])
def test_backward_runs_the_kernel_on_the_flipped_taps(monkeypatch, k, persistent):
  """dx = g + conv(g, flip(w)) through the kernel (faked), dw and db by XLA: all three equal the
  float32 reference's gradients to bf16 precision. A kernel that is not symmetric makes a missing
  or wrong flip fail. The data gradient runs the forward's launch (plain or persistent)."""
  calls = []

  def counting(x_shape, k_, p):
    calls.append((x_shape, p.persistent))
    return _fake_kernel(x_shape, k_, p)

  monkeypatch.setattr(dm, "_kernel", counting)
  x, w, b = _inputs((2, 16, 16, 16), seed=3, k=k)
  w = w + jnp.arange(k, dtype=jnp.float32)[:, None, None] * 0.05  # rows differ: not symmetric
  g = jax.random.normal(jax.random.key(5), x.shape, jnp.bfloat16)
  loss = lambda f: lambda x, w, b: jnp.sum((f(x, w, b) * g).astype(jnp.float32))
  wb = w.astype(jnp.bfloat16)
  got = jax.grad(loss(functools.partial(dm.dwconv_residual, persistent=persistent)),
                 argnums=(0, 1, 2))(x, wb, b)
  # float32 throughout: the exact gradients, which the kernel's dx rounds once
  want = jax.grad(loss(dm.reference), argnums=(0, 1, 2))(x.astype(jnp.float32),
                                                        wb.astype(jnp.float32), b)
  assert calls == [(x.shape, persistent)] * 2  # the forward and the data gradient
  _assert_close_bf16(got[0], want[0].astype(jnp.bfloat16))
  assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got[1], np.float32), np.asarray(want[1]), rtol=2e-2,
                             atol=2e-2 * float(jnp.abs(want[1]).max()))
  np.testing.assert_allclose(np.asarray(got[2]), np.asarray(want[2]), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("scan_unroll,remat", [(None, "none"), (1, "block")],
                         ids=["python-loop", "rolled-scan-remat"])
def test_model_convnext_blocks_use_it_where_asked(monkeypatch, scan_unroll, remat):
  """pallas_ops='dwconv_mgpu' routes every ConvNeXt block's x + b + dwconv(x) through the kernel
  (faked here by XLA arithmetic on exactly what the kernel is handed: bf16 x, float32 taps with the
  residual in the centre tap, float32 bias), and the model's output and gradients stay those of the
  XLA path within bf16 rounding."""
  shapes = []

  def fake_kernel(x_shape, k, p):
    shapes.append(x_shape)
    return _fake_kernel(x_shape, k, p)

  monkeypatch.setattr(dm, "available", lambda: True)
  monkeypatch.setattr(dm, "_kernel", fake_kernel)

  def every_call_full_size():
    assert shapes and all(s[1:3] == (32, 32) for s in shapes)

  assert_mu_model_matches_xla("dwconv_mgpu", scan_unroll=scan_unroll, remat=remat, out_rtol=2e-2,
                              grad_rtol=5e-2, after_forward=every_call_full_size)
