"""The Mosaic GPU GEMM + GEGLU kernel: its shape logic and CUDA lowering here, its numbers on a GPU.

Mosaic GPU's interpreter cannot run this kernel (collective scoped allocations), so on CPU the
kernel is lowered for CUDA (which runs Mosaic's layout inference: e.g. an ``erf`` in the epilogue
fails there) and its numbers are checked by the GPU-only test
(``JAX_PLATFORMS=cuda python -m pytest tests/test_geglu_gemm_mgpu.py``; needs an H100/H200).
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest
from flax import nnx

from dimr_jax.models import dimr as dimr_model
from dimr_jax.models import geglu_gemm_mgpu as gm
from dimr_jax.models import geglu_kernel as gk
from dimr_jax.models import layers
from tests.conftest import lower_for_cuda_or_skip

on_hopper = pytest.mark.skipif(not gm.available(),
                               reason="needs a Hopper GPU (run with JAX_PLATFORMS=cuda)")


def _inputs(rows, depth, hidden, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(k[0], (rows, depth), jnp.bfloat16)
  w01 = (jax.random.normal(k[1], (depth, 2 * hidden)) / np.sqrt(depth)).astype(jnp.bfloat16)
  b01 = (0.3 * jax.random.normal(k[2], (2 * hidden,))).astype(jnp.bfloat16)
  g = jax.random.normal(k[3], (rows, hidden), jnp.bfloat16)
  return x, w01, b01, g


def _unfused(x, w01, b01):
  """The model's GPU path (GEMM, then the GEGLU Pallas kernel): the GEMM rounded to bf16, the bias
  added and rounded, exact GELU and product in float32, one rounding."""
  h01 = jnp.matmul(x, w01, preferred_element_type=jnp.float32).astype(x.dtype)
  return gk.geglu(h01, b01, impl="pallas")


def test_gelu_epilogue_is_exact_gelu_in_float32():
  x = np.linspace(-10.0, 10.0, 40001, dtype=np.float32)
  want = x.astype(np.float64) * np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in x.astype(np.float64)])
  got = np.asarray(gm.gelu_epilogue(jnp.asarray(x)), np.float64)
  assert np.max(np.abs(got - want)) < 1e-6
  big = np.abs(want) > 1e-3
  assert np.max(np.abs(got - want)[big] / np.abs(want[big])) < 1e-5


def test_default_config_per_shape():
  # XL/G Transformer and G ConvNeXt MLPs: H a multiple of 128 -> 64 x 128 per warpgroup.
  for depth, hidden in ((960, 1920), (1152, 2304), (576, 1152)):
    cfg = gm.default_config(depth, hidden)
    assert (cfg.tile_m, cfg.tile_n, cfg.tile_k, cfg.stages) == (64, 128, 64, 3)
  cfg = gm.default_config(480, 960)  # XL ConvNeXt: K = 480 -> 32-wide K steps, a deeper ring
  assert (cfg.tile_m, cfg.tile_n, cfg.tile_k, cfg.stages) == (128, 64, 32, 6)
  assert gm.default_config(16, 32) is None and gm.default_config(100, 1920) is None


def test_shape_errors_name_the_problem():
  x, w01, b01, _ = _inputs(64, 128, 128)
  cfg = gm.Config()
  with pytest.raises(ValueError, match="does not fit x"):
    gm._check(x, w01[:64], b01, cfg)
  with pytest.raises(ValueError, match="b01"):
    gm._check(x, w01, b01[:10], cfg)
  with pytest.raises(ValueError, match="multiple of tile_n"):
    gm._check(x, w01[:, :96], b01[:96], cfg)
  with pytest.raises(ValueError, match="multiple of 8"):
    gm._check(x[:63], w01, b01, cfg)
  with pytest.raises(ValueError, match="bf16"):
    gm._check(x.astype(jnp.float32), w01, b01, cfg)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the off-Hopper error")
def test_resolve_pallas_ops_rejects_it_off_hopper():
  with pytest.raises(ValueError, match="Hopper"):
    layers.resolve_pallas_ops("geglu,geglu_gemm_mgpu", jnp.bfloat16)


@pytest.mark.parametrize("lead,depth,hidden", [((2, 257), 128, 256), ((4, 64), 96, 64)])
def test_lowers_for_cuda(lead, depth, hidden):
  """Both tilings (64 x 128 and 128 x 64 with 32-wide K steps), rows padded 514 -> 520."""
  x, w01, b01, _ = _inputs(int(np.prod(lead)), depth, hidden)
  x = x.reshape(*lead, depth)
  text = lower_for_cuda_or_skip(lambda x, w, b: gm.geglu_gemm(x, w, b), x, w01, b01)
  assert "mosaic_gpu" in text.lower()


# the schedule variants of the kernel (NOTES rows 40-41): none changes the arithmetic
VARIANTS = [dict(delay_release=1), dict(chain_tiles=True), dict(epi_chunks=2, out_slots=1),
            dict(epi_chunks=2), dict(cluster_m=True), dict(cluster_m=True, chain_tiles=True)]


@pytest.mark.parametrize("fields", VARIANTS, ids=str)
def test_variants_lower_for_cuda(fields):
  x, w01, b01, _ = _inputs(4112, 960, 1920)
  cfg = dataclasses.replace(gm.default_config(960, 1920), **fields)
  text = lower_for_cuda_or_skip(lambda x, w, b: gm.geglu_gemm(x, w, b, cfg), x, w01, b01)
  assert "mosaic_gpu" in text.lower()


def test_single_rounding_epilogue_lowers_for_cuda():
  x, w01, b01, _ = _inputs(4112, 1152, 2304)
  cfg = dataclasses.replace(gm.default_config(1152, 2304), round_like_unfused=False)
  text = lower_for_cuda_or_skip(lambda x, w, b: gm.geglu_gemm(x, w, b, cfg), x, w01, b01)
  assert "mosaic_gpu" in text.lower()


# the ping-pong schedule (NOTES row 49): per-warpgroup tiles, so its own tilings
PINGPONG = [dict(tile_m=128, tile_n=64, tile_k=32, stages=5),
            dict(tile_m=64, tile_n=128, tile_k=64, stages=2)]


@pytest.mark.parametrize("fields", PINGPONG, ids=str)
@pytest.mark.parametrize("depth,hidden", [(1152, 2304), (576, 1152)])
def test_pingpong_lowers_for_cuda(fields, depth, hidden):
  x, w01, b01, _ = _inputs(4112, depth, hidden)
  cfg = gm.Config(pingpong=True, **fields)
  text = lower_for_cuda_or_skip(lambda x, w, b: gm.geglu_gemm(x, w, b, cfg), x, w01, b01)
  assert "mosaic_gpu" in text.lower()


def test_pingpong_errors_name_the_problem():
  x, w01, b01, _ = _inputs(64, 1152, 2304)
  with pytest.raises(ValueError, match="pingpong=True takes none of"):
    gm._check(x, w01, b01, gm.Config(tile_m=64, tile_n=128, pingpong=True, chain_tiles=True))
  with pytest.raises(ValueError, match="stages >= 2"):
    gm._check(x, w01, b01, gm.Config(tile_m=64, tile_n=128, stages=1, pingpong=True))
  with pytest.raises(ValueError, match="shared memory"):  # 2 rings x 3 stages of 128x64x64
    gm._check(x, w01, b01, gm.Config(tile_m=128, tile_n=64, tile_k=64, stages=3, pingpong=True))


def test_variant_errors_name_the_problem():
  x, w01, b01, _ = _inputs(64, 128, 128)
  with pytest.raises(ValueError, match="epi_chunks"):
    gm._check(x, w01, b01, gm.Config(tile_n=64, epi_chunks=2))
  with pytest.raises(ValueError, match="delay_release"):
    gm._check(x, w01, b01, gm.Config(stages=2, delay_release=2))


@on_hopper
@pytest.mark.parametrize("fields", VARIANTS, ids=str)
def test_gpu_variants_equal_the_default_schedule(fields):
  """Bit-equal to the default schedule: the same K order per tile and the same epilogue. 4112 rows
  give every SM >= 2 tiles (chained pipelines) and an odd number of 256-row tiles (the cluster's
  second CTA past the end)."""
  x, w01, b01, _ = _inputs(4112, 960, 1920)
  base = gm.default_config(960, 1920)
  want = np.asarray(gm.geglu_gemm(x, w01, b01, base), np.float32)
  got = np.asarray(gm.geglu_gemm(x, w01, b01, dataclasses.replace(base, **fields)), np.float32)
  np.testing.assert_array_equal(got, want)


@on_hopper
@pytest.mark.parametrize("fields", PINGPONG, ids=str)
@pytest.mark.parametrize("depth,hidden", [(1152, 2304), (576, 1152), (960, 1920)])
def test_gpu_pingpong_matches_the_default_schedule(fields, depth, hidden):
  """The same epilogue on the same float32 sums (wgmma adds the K steps in order either way):
  equal to the cooperative kernel up to the accumulation order of the 32- vs 64-wide K steps.
  4112 rows: a partial last M tile and an odd tile count per CTA."""
  x, w01, b01, _ = _inputs(4112, depth, hidden)
  want = np.asarray(gm.geglu_gemm(x, w01, b01, gm.default_config(depth, hidden)), np.float32)
  got = np.asarray(gm.geglu_gemm(x, w01, b01, gm.Config(pingpong=True, **fields)), np.float32)
  assert np.isfinite(got).all()
  # one bf16 ulp where a float32 sum in another order rounds the other way, nowhere more
  np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)
  assert np.mean(got != want) < 0.02


@on_hopper
@pytest.mark.parametrize("depth,hidden", [(960, 1920), (576, 1152)])
def test_gpu_single_rounding_epilogue_is_closer_to_float32(depth, hidden):
  """``round_like_unfused=False`` skips the two intermediate bf16 roundings: no longer the unfused
  h, but at least as close to the float32 GEGLU of the same bf16 operands."""
  x, w01, b01, _ = _inputs(4112, depth, hidden)
  h01 = jnp.matmul(x.astype(jnp.float32), w01.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST) + b01.astype(jnp.float32)
  h0, h1 = jnp.split(h01, 2, axis=-1)
  exact = np.asarray(jax.nn.gelu(h0, approximate=False) * h1)
  base = gm.default_config(depth, hidden)
  err = {}
  for flag in (True, False):
    cfg = dataclasses.replace(base, round_like_unfused=flag)
    got = np.asarray(gm.geglu_gemm(x, w01, b01, cfg), np.float32)
    err[flag] = np.linalg.norm(got - exact) / np.linalg.norm(exact)
  assert err[False] <= err[True] and err[False] < 4e-3, err
  assert err[True] < 1e-2, err


@on_hopper
@pytest.mark.parametrize("rows,depth,hidden", [(514, 128, 256), (1024, 96, 64), (4112, 960, 1920)])
def test_gpu_matches_unfused_path_and_differentiates(rows, depth, hidden):
  x, w01, b01, g = _inputs(rows, depth, hidden)
  out, ref = gm.geglu_gemm(x, w01, b01), _unfused(x, w01, b01)
  assert out.shape == (rows, hidden) and out.dtype == jnp.bfloat16
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  # the same roundings in the same order: equal but for rare one-ulp flips (summation order, the
  # epilogue's approximate exp/rsqrt)
  np.testing.assert_allclose(out, ref, atol=2e-2, rtol=1e-2)
  assert np.mean(out != ref) < 0.01
  padded = gm.geglu_gemm(x, w01, b01, padded_rows=True)
  assert padded.shape == (-(-rows // 8) * 8, hidden)
  np.testing.assert_array_equal(np.asarray(padded[:rows], np.float32), out)

  def loss(f):
    return lambda *a: jnp.sum(f(*a).astype(jnp.float32) * g.astype(jnp.float32))
  got = jax.grad(loss(gm.geglu_gemm), argnums=(0, 1, 2))(x, w01, b01)
  want = jax.grad(loss(_unfused), argnums=(0, 1, 2))(x, w01, b01)
  for a, e in zip(got, want):
    a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
    assert np.linalg.norm(a - e) <= 1e-2 * np.linalg.norm(e)


@on_hopper
def test_gpu_model_sampling_path_uses_it_and_matches():
  """A bf16 model with 'geglu_gemm_mgpu' under one shared time (the samplers) against the same
  model without it; per-sample times (training) take the unchanged path."""
  spec = dict(variant="mu/2R", num_classes=11)
  base = dimr_model.DiMR(spec, dtype=jnp.bfloat16, pallas_ops="geglu", rngs=nnx.Rngs(params=0))
  fused = dimr_model.DiMR(spec, dtype=jnp.bfloat16, pallas_ops="geglu,geglu_gemm_mgpu",
                          rngs=nnx.Rngs(params=0))
  x, y = jax.random.normal(jax.random.key(7), (2, 32, 32, 4)), jnp.array([2, 9])
  t = jnp.float32(0.3)
  text = jax.jit(lambda x: fused(x, t, y)).lower(x).as_text()
  assert "mosaic_gpu" in text.lower()
  assert "mosaic_gpu" not in jax.jit(lambda x: fused(x, jnp.array([0.3, 0.5]), y)).lower(x).as_text().lower()
  for a, b in zip(base(x, t, y), fused(x, t, y)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(a)


@pytest.mark.parametrize("scan_unroll", [None, 1], ids=["python-loop", "rolled-scan"])
def test_transformer_stage_hands_the_mlps_flat_padded_rows(monkeypatch, scan_unroll):
  """Where the kernel runs (here faked by the XLA arithmetic, in float32), a Transformer stage
  pads its B*N tokens once into flat rows (Stage.flat_rows) instead of once per MLP; the model's
  outputs equal the unpadded path's, and every kernel call sees rows it takes (no pad of its own)."""
  calls = []

  def fake_kernel(x, w01, b01, cfg=None, *, padded_rows=False):
    calls.append(x.shape)
    assert padded_rows and x.shape[0] % gm.ROW_MULTIPLE == 0
    return gk.geglu(x @ w01.astype(x.dtype), b01, impl="xla")

  spec = dict(variant="mu/2R", num_classes=11)
  model = dimr_model.DiMR(spec, scan_unroll=scan_unroll, rngs=nnx.Rngs(params=0))
  x, y = jax.random.normal(jax.random.key(7), (2, 32, 32, 4)), jnp.array([2, 9])
  t = jnp.float32(0.3)
  want = model(x, t, y)
  monkeypatch.setattr(gm, "geglu_gemm", fake_kernel)
  monkeypatch.setattr(layers.GegluMLP, "uses_mgpu", lambda self, tau: tau.shape[0] == 1)
  stage = next(s for s in model.stages if s.is_transformer)
  tokens = stage.flat_rows(jnp.zeros((2, 65, 8)), jnp.zeros((1,)))
  assert tokens == (2, 65)  # 130 rows: not a multiple of 8
  got = model(x, t, y)
  assert len(calls) > 0 and all(c[0] % gm.ROW_MULTIPLE == 0 for c in calls)
  n = stage.max_height * stage.max_width + 1
  assert (-(-2 * n // 8) * 8, stage.pos_emb.shape[-1]) in calls  # the stage's padded rows
  for a, b in zip(want, got):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
  # per-sample times (training) keep the (B, N, C) path
  assert stage.flat_rows(jnp.zeros((2, 65, 8)), jnp.zeros((2,))) is None
