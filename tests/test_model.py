"""DiMR model: shapes, time handling, remat, stop-gradient, size table, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dimr_jax.models import dimr as dimr_model
from dimr_jax.models import layers


def _model(variant="mu/2R", **kw):
  return dimr_model.create_model(dict(variant=variant, num_classes=11, **kw))


def _perturb(model, seed=0):
  """Moves every TDP end point apart so outputs depend on time (the official init does not)."""
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [l + 0.3 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


@pytest.mark.parametrize("variant,size,shapes", [
    ("mu/2R", 32, [(2, 16, 16, 4), (2, 32, 32, 4)]),
    ("mu/3R", 32, [(2, 8, 8, 4), (2, 16, 16, 4), (2, 32, 32, 4)]),
    ("mu/1R", 16, [(2, 16, 16, 4)]),
])
def test_forward_shapes_low_res_first(variant, size, shapes):
  m = _model(variant, image_size=size)
  outs = m(jnp.ones((2, size, size, 4)), jnp.array([0.0, 1.0]), jnp.array([1, 10]))
  assert [o.shape for o in outs] == shapes
  assert all(bool(jnp.all(jnp.isfinite(o))) for o in outs)


@pytest.mark.parametrize("scan_unroll", [None, 1])  # the Python block loop and the rolled scan
def test_shared_and_per_sample_time_agree(scan_unroll):
  spec = dimr_model.model_spec_from_config(dict(variant="mu/2R", num_classes=11))
  m = _perturb(dimr_model.DiMR(spec, scan_unroll=scan_unroll, rngs=nnx.Rngs(params=0)))
  x = jax.random.normal(jax.random.key(1), (3, 32, 32, 4))
  y = jnp.array([0, 3, 10])
  shared = m(x, jnp.float32(1.5), y)  # one scalar time: norm scales folded into the GEMMs
  per_sample = m(x, jnp.full((3,), 1.5), y)
  for a, b in zip(shared, per_sample):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # And time actually matters after the TDP end points moved apart.
  other = m(x, jnp.array([1.5, -3.0, 4.0]), y)
  assert float(jnp.abs(other[-1][1] - shared[-1][1]).max()) > 1e-3
  np.testing.assert_allclose(other[-1][0], shared[-1][0], atol=1e-5)


def test_fresh_model_is_time_independent():
  m = _model()
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 4))
  a = m(x, jnp.array([-4.0, -4.0]), jnp.array([1, 2]))
  b = m(x, jnp.array([4.0, 4.0]), jnp.array([1, 2]))
  np.testing.assert_allclose(a[-1], b[-1], atol=1e-6)


def test_batch_elements_are_independent():
  m = _perturb(_model())
  x = jax.random.normal(jax.random.key(2), (3, 32, 32, 4))
  t = jnp.array([-2.0, 0.5, 3.0])
  y = jnp.array([1, 2, 3])
  full = m(x, t, y)[-1]
  one = m(x[1:2], t[1:2], y[1:2])[-1]
  np.testing.assert_allclose(full[1:2], one, atol=2e-5)


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_remat_same_values_and_grads(remat):
  base = _perturb(_model(variant="mu/2R"))
  other = _perturb(dimr_model.create_model(dict(variant="mu/2R", num_classes=11), remat=remat))
  x = jax.random.normal(jax.random.key(3), (2, 32, 32, 4))
  t, y = jnp.array([0.1, -1.0]), jnp.array([4, 5])

  def loss(m):
    return sum(jnp.mean(o ** 2) for o in m(x, t, y))

  g1 = nnx.grad(loss)(base)
  g2 = nnx.grad(loss)(other)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_block_grad_to_lowres_stops_gradient_into_low_stage():
  x = jax.random.normal(jax.random.key(4), (2, 32, 32, 4))
  t, y = jnp.array([0.1, -1.0]), jnp.array([4, 5])
  for stop in (False, True):
    m = _perturb(_model(block_grad_to_lowres=stop))
    g = nnx.grad(lambda m: jnp.mean(m(x, t, y)[-1] ** 2))(m)  # high-res loss only
    g_low = jax.tree.leaves(nnx.state(g)["stages"][0])
    low_norm = sum(float(jnp.sum(a ** 2)) for a in g_low)
    assert (low_norm == 0.0) == stop


def test_variant_table_exact_param_counts():
  counts = {v: dimr_model.count_params(dimr_model.abstract_model(dict(variant=v)))
            for v in ("XL/2R", "G/2R", "XL/3R")}
  assert counts["XL/2R"] == 505_046_408
  assert counts["G/2R"] == 1_056_352_904
  assert abs(counts["XL/3R"] - 525.03e6) / 525.03e6 < 1e-3
  s, m, l = (dimr_model.count_params(dimr_model.abstract_model(dict(variant=f"{v}/2R")))
             for v in "SML")
  assert s < m < l < counts["XL/2R"]


def test_released_specs_match_official_configs(fixtures_dir):
  import json
  man = json.loads((fixtures_dir / "dimr_official_manifest.json").read_text())
  for name, variant in (("DiMR-XL/2R", "XL/2R"), ("DiMR-G/2R", "G/2R")):
    official = man["models"][name]["model_args_as_in_config"]
    ours = dimr_model.decode_variant(variant, image_size=32)
    assert ours == official


@pytest.mark.parametrize("bad,match", [
    (dict(variant="XXL/2R"), "unknown DiMR variant"),
    (dict(variant="XL/5R"), "unknown DiMR variant"),
    (dict(variant="mu/2R", norm_type="BN"), "unknown norm_type"),
    (dict(variant="mu/2R", image_size=31), "not divisible"),
])
def test_bad_config_errors(bad, match):
  with pytest.raises(ValueError, match=match):
    dimr_model.create_model(bad)


def test_bad_remat_error():
  with pytest.raises(ValueError, match="unknown remat policy"):
    dimr_model.create_model(dict(variant="mu/2R"), remat="sometimes")


@pytest.mark.parametrize("norm_type", ["LN", "RMSN", "PLAIN_LN"])
def test_other_norm_types_run(norm_type):
  m = _model(norm_type=norm_type)
  outs = m(jnp.ones((1, 32, 32, 4)), jnp.array([0.0]), jnp.array([1]))
  assert outs[-1].shape == (1, 32, 32, 4)


def test_pixel_shuffle_channel_order():
  r, c = 2, 3
  x = jnp.arange(r * r * c, dtype=jnp.float32).reshape(1, 1, 1, r * r * c)
  y = layers.pixel_shuffle(x, r)
  for i in range(r):
    for j in range(r):
      np.testing.assert_array_equal(y[0, i, j], x[0, 0, 0, (i * r + j) * c:(i * r + j + 1) * c])


def _loss_and_grads(m, x, t, y):
  def loss(m):
    return sum(jnp.mean(o ** 2) for o in m(x, t, y))
  return nnx.value_and_grad(loss)(m)


def _assert_same_model_function(a, b, atol=1e-5):
  x = jax.random.normal(jax.random.key(7), (2, 32, 32, 4))
  t, y = jnp.array([0.3, -2.0]), jnp.array([2, 9])
  for oa, ob in zip(a(x, t, y), b(x, t, y)):
    np.testing.assert_allclose(oa, ob, atol=atol, rtol=1e-5)
  (la, ga), (lb, gb) = _loss_and_grads(a, x, t, y), _loss_and_grads(b, x, t, y)
  np.testing.assert_allclose(la, lb, rtol=1e-5)
  for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(u, v, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("remat", ["none", "block"])
def test_rolled_scan_and_unrolled_loop_agree(remat):
  """The rolled lax.scan (TPU default) and the Python loop (GPU/CPU default) are one function."""
  spec = dict(variant="mu/2R", num_classes=11)
  loop = _perturb(dimr_model.DiMR(spec, remat=remat, rngs=nnx.Rngs(params=0)))
  rolled = _perturb(dimr_model.DiMR(spec, remat=remat, scan_unroll=1, rngs=nnx.Rngs(params=0)))
  _assert_same_model_function(loop, rolled)


@pytest.mark.parametrize("scan_unroll", [None, 1])
def test_padded_transformer_tokens_change_nothing(scan_unroll):
  """Padding the Transformer stage's tokens (done for cuDNN attention) is invisible: padded tokens
  are masked as keys and dropped, so values and gradients equal the unpadded model's."""
  spec = dict(variant="mu/2R", num_classes=11)
  plain = _perturb(dimr_model.DiMR(spec, scan_unroll=scan_unroll, rngs=nnx.Rngs(params=0)))
  padded = _perturb(dimr_model.DiMR(spec, scan_unroll=scan_unroll, rngs=nnx.Rngs(params=0)))
  assert padded.stages[0].is_transformer
  padded.stages[0].token_multiple = 8  # mu/2R: 8*8+1 = 65 tokens -> 72
  _assert_same_model_function(plain, padded)


def _token_counts(model, t):
  """Token counts of the 3-D (B, N, C) arrays in the model's jaxpr at time t."""
  x, y = jnp.zeros((2, 32, 32, 4)), jnp.array([2, 9])
  jaxpr = jax.make_jaxpr(lambda x: model(x, t, y))(x)
  return {v.aval.shape[1] for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars
          if getattr(v.aval, "ndim", 0) == 3}


def test_shared_time_leaves_transformer_tokens_unpadded():
  """With one time for the whole batch (the samplers) the cuDNN token padding is skipped; with
  per-sample times it is done. Either way the function is the unpadded model's."""
  spec = dict(variant="mu/2R", num_classes=11)
  plain = _perturb(dimr_model.DiMR(spec, rngs=nnx.Rngs(params=0)))
  padded = _perturb(dimr_model.DiMR(spec, rngs=nnx.Rngs(params=0)))
  padded.stages[0].token_multiple = 8  # mu/2R at 32x32: 16*16+1 = 257 tokens -> 264
  assert 264 in _token_counts(padded, jnp.array([0.3, -2.0]))
  assert 264 not in _token_counts(padded, jnp.float32(0.3))
  x, y = jax.random.normal(jax.random.key(7), (2, 32, 32, 4)), jnp.array([2, 9])
  for t in (jnp.float32(0.3), jnp.array([0.3, 0.3])):
    for oa, ob in zip(plain(x, t, y), padded(x, t, y)):
      np.testing.assert_allclose(oa, ob, atol=1e-5, rtol=1e-5)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="cuDNN attention needs a GPU (run with JAX_PLATFORMS=cuda)")
def test_gpu_cudnn_unpadded_tokens_values_and_gradients():
  """GPU, bf16 with cuDNN attention vs the float32 XLA model, same parameters: per-image times pad
  the Transformer's 257 tokens to 264; one shared time runs cuDNN's forward on the 257 unpadded
  tokens, and differentiating that goes through the padded custom-VJP fallback."""
  spec = dict(variant="mu/2R", num_classes=11)
  f32 = dimr_model.DiMR(spec, attention_impl="xla", pallas_ops="", rngs=nnx.Rngs(params=0))
  bf16 = dimr_model.DiMR(spec, dtype=jnp.bfloat16, attention_impl="cudnn", rngs=nnx.Rngs(params=0))
  nnx.update(bf16, nnx.state(_perturb(f32), nnx.Param))
  assert bf16.stages[0].token_multiple == 8
  x, y = jax.random.normal(jax.random.key(7), (2, 32, 32, 4)), jnp.array([2, 9])
  shared, per_sample = jnp.float32(0.3), jnp.array([0.3, -2.0])
  assert 264 not in _token_counts(bf16, shared) and 264 in _token_counts(bf16, per_sample)
  for t in (per_sample, shared):
    for a, b in zip(f32(x, t, y), bf16(x, t, y)):
      assert _rel(a, b) < 2e-2
    ga, gb = (jax.grad(lambda x, m=m: sum(jnp.sum(o ** 2) for o in m(x, t, y)))(x) for m in (f32, bf16))
    assert _rel(ga, gb) < 5e-2


def test_attention_head_dim_padding_and_token_mask():
  """attention(): padded query rows/keys beyond seq_len are ignored (XLA mask path)."""
  k = jax.random.split(jax.random.key(3), 3)
  q, kk, v = (jax.random.normal(kx, (2, 13, 2, 6)) for kx in k)
  ref = layers.attention(q[:, :9], kk[:, :9], v[:, :9], "xla")
  out = layers.attention(q, kk, v, "xla", seq_len=9)
  np.testing.assert_allclose(out[:, :9], ref, atol=1e-6)



def test_skip_linear_on_parts_equals_linear_of_concatenation():
  dense = layers.Dense(10, 4, rngs=nnx.Rngs(params=0))
  dense.bias[...] = jnp.arange(4.0)
  k = jax.random.split(jax.random.key(6), 2)
  a, b = jax.random.normal(k[0], (2, 3, 6)), jax.random.normal(k[1], (2, 3, 4))
  np.testing.assert_allclose(dense.on_concatenation([a, b]), dense(jnp.concatenate([a, b], -1)),
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="width 9"):
    dense.on_concatenation([a, b[..., :3]])
