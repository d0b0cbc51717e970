"""The features' concatenation + layer-norm statistics kernel (Pallas interpret mode on CPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimr_jax.models import dimr as dimr_model
from dimr_jax.models import feature_stats_kernel as fk
from dimr_jax.models import layers
from tests.conftest import assert_mu_model_matches_xla, lower_for_cuda_or_skip


def _pieces(n, rows, d, seed=0):
  """n bf16 (rows, d) pieces with their own offsets and scales (a mean that is not ~0)."""
  ks = jax.random.split(jax.random.key(seed), n)
  return [(jax.random.normal(k, (rows, d)) * (0.5 + i) + 0.3 * i).astype(jnp.bfloat16)
          for i, k in enumerate(ks)]


def _reference(pieces, rows):
  cat = jnp.concatenate([p[:rows] for p in pieces], axis=-1)
  mean, inv = layers.layer_norm_stats(cat)
  return cat, mean[:, 0], inv[:, 0]


@pytest.mark.parametrize("n,piece_rows,rows,d", [
    (5, 50, 50, 96),      # chunk 32, rows not a multiple of the row block
    (3, 70, 64, 960),     # XL's width (chunk 64); pieces longer than the rows that count
    (4, 19, 13, 1152),    # G's width (chunk 128)
])
def test_matches_concatenate_and_layer_norm_stats(n, piece_rows, rows, d):
  pieces = _pieces(n, piece_rows, d)
  cat, mean, inv = fk.feature_stats(pieces, rows)
  want_cat, want_mean, want_inv = _reference(pieces, rows)
  assert cat.shape == (rows, n * d) and cat.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(cat, np.float32), np.asarray(want_cat, np.float32))
  np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(inv, want_inv, rtol=1e-4)


def test_gradient_matches_xla():
  pieces, rows = _pieces(3, 21, 64, seed=1), 17
  wr = jax.random.normal(jax.random.key(2), (rows,))

  def loss(ps, kernel):
    cat, mean, inv = fk.feature_stats(ps, rows) if kernel else _reference(ps, rows)
    return (jnp.sum(jnp.sin(cat.astype(jnp.float32))) + jnp.sum(mean * wr)
            + jnp.sum(inv * wr[::-1]))

  got = jax.grad(loss)(pieces, True)
  want = jax.grad(loss)(pieces, False)
  for g, w in zip(got, want, strict=True):
    assert g.shape == w.shape == (21, 64)
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert np.all(g[rows:] == 0)  # rows past `rows` do not count
    assert np.linalg.norm(g - w) <= 1e-2 * np.linalg.norm(w)


def test_bad_pieces_are_named():
  with pytest.raises(ValueError, match="every piece must be"):
    fk.feature_stats([jnp.zeros((8, 16), jnp.bfloat16), jnp.zeros((8, 32), jnp.bfloat16)])
  with pytest.raises(ValueError, match="every piece must be"):
    fk.feature_stats([jnp.zeros((8, 16), jnp.bfloat16)], rows=9)


def test_lowers_to_one_triton_kernel_for_cuda():
  pieces = [jax.ShapeDtypeStruct((64256, 1152), jnp.bfloat16)] * 57
  txt = lower_for_cuda_or_skip(lambda ps: fk.feature_stats(ps, 64250, interpret=False), pieces)
  assert txt.count("__gpu$xla.gpu.triton") == 1
  assert "concatenate" not in txt  # the kernel writes the concatenation itself


def _kernel_calls(model, x, t, y):
  jaxpr = str(jax.make_jaxpr(lambda a, b, c: model(a, b, c))(x, t, y))
  return jaxpr.count("name=feature_stats")


def test_model_uses_it_for_a_shared_time_only():
  """With pallas_ops='feature_stats' the Transformer stage hands its features and their
  statistics to the upsampler through the kernel when the batch shares one time (sampling), and
  the model's outputs and gradients stay those of the XLA path; per-sample times keep XLA."""
  from flax import nnx
  model = dimr_model.DiMR(dict(variant="mu/2R", num_classes=11), dtype=jnp.bfloat16,
                          pallas_ops="feature_stats", rngs=nnx.Rngs(params=0))
  x, y = jax.random.normal(jax.random.key(7), (2, 32, 32, 4)), jnp.array([2, 9])
  # one per stage (the last stage's features are unused and dropped by XLA, as its concatenate
  # was before)
  assert _kernel_calls(model, x, jnp.float32(0.3), y) == 2
  assert _kernel_calls(model, x, jnp.array([0.3, 0.7]), y) == 0
  assert_mu_model_matches_xla("feature_stats", scan_unroll=None, remat="none", out_rtol=2e-2)
