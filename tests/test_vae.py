"""SD KL-f8 autoencoder: official fixture (LDM and diffusers naming), key mapping, strict loading."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from dimr_jax import vae

# Small enough to be quick, but with every block kind: shortcut convs, 3 levels, attention at a level.
TINY = vae.VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=32, attn_resolutions=(16,))


def _nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


def _nchw(a):
  return np.transpose(np.asarray(a), (0, 3, 1, 2))


def _rule(meta):
  ns = {}
  exec(meta["weight_rule"]["python_source"], ns)  # noqa: S102 - the fixture's documented rule
  return ns


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
  meta = json.loads((fixtures_dir / "sd_vae_ldm_ref.json").read_text())
  data = np.load(fixtures_dir / "sd_vae_ldm_ref.npz", allow_pickle=False)
  wr = meta["weight_rule"]
  sd = _rule(meta)["rule_state_dict"](meta["state_dict_keys_shapes"], seed_offset=wr["seed_offset"],
                                      gain_4d=wr["gain_4d"], gain_2d=wr["gain_2d"])
  return meta, data, sd


@pytest.fixture(scope="module")
def sd_model(fixture):
  return vae.load_autoencoder(fixture[2])


def _tiny_sd(meta, cfg=TINY):
  return _rule(meta)["rule_state_dict"](vae.ldm_state_dict_shapes(cfg), seed_offset=3)


def test_config_and_keys_match_fixture(fixture, sd_model):
  meta, _, sd = fixture
  ref = vae.VAEConfig.from_ldm(meta["config"]["get_model_ddconfig"], meta["config"]["embed_dim"])
  assert sd_model.config == ref == vae.VAEConfig()
  assert vae.ldm_state_dict_shapes(ref) == sorted((k, tuple(s)) for k, s in meta["state_dict_keys_shapes"])
  assert meta["config"]["scale_factor"] == vae.SCALE_FACTOR
  assert sd_model.naming == "ldm" and len(sd) == meta["num_state_dict_tensors"]


def test_fixture_encode_decode(fixture, sd_model):
  _, d, _ = fixture
  moments = sd_model.encode_moments(_nhwc(d["input/image"]))
  assert moments.shape == (2, 8, 8, 8)
  np.testing.assert_allclose(_nchw(moments), d["encode/moments"], rtol=0, atol=1e-5)
  mean, logvar = np.split(np.asarray(moments), 2, axis=-1)
  std = np.exp(0.5 * np.clip(logvar, -30, 20))
  np.testing.assert_allclose(_nchw(std), d["encode/std"], rtol=0, atol=1e-5)
  # The sampling formula with the fixture's torch noise reproduces its encode() output.
  z = vae.SCALE_FACTOR * (mean + std * _nhwc(d["encode/noise_torch_seed"]))
  np.testing.assert_allclose(_nchw(z), d["encode/z_sample"], rtol=0, atol=1e-5)
  for name, zin in (("decode/z_fixed", d["input/z_fixed"]),
                    ("decode/z_mean_scaled", d["encode/z_mean_scaled"])):
    img = sd_model.decode(_nhwc(zin))
    assert img.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(_nchw(img), d[name], rtol=0, atol=1e-4, err_msg=name)


def test_sample_semantics(fixture, sd_model):
  _, d, _ = fixture
  moments = np.asarray(_nhwc(d["encode/moments"])).copy()
  moments[0, 0, 0, 4] = 100.0  # logvar clamped at 20 before exp
  key = jax.random.key(0)
  z = sd_model.sample(moments, key)
  mean, logvar = np.split(moments, 2, axis=-1)
  eps = np.asarray(jax.random.normal(key, mean.shape, jnp.float32))
  want = vae.SCALE_FACTOR * (mean + np.exp(0.5 * np.clip(logvar, -30, 20)) * eps)
  np.testing.assert_allclose(np.asarray(z), want, rtol=1e-6, atol=1e-6)
  assert z.shape == (2, 8, 8, 4)
  assert not np.allclose(np.asarray(sd_model.sample(moments, jax.random.key(1))), z)


def test_key_mapping_matches_diffusers_converter(fixture):
  meta, _, sd = fixture
  rows = meta["diffusers"]["key_mapping"]
  assert len(rows) == len(sd)
  for dkey, _, lkey, _ in rows:
    assert vae.ldm_key_to_diffusers(lkey, 4) == dkey
    assert vae.diffusers_key_to_ldm(dkey, 4) == lkey
  dsd = vae.ldm_to_diffusers(sd)
  assert {k: tuple(v.shape) for k, v in dsd.items()} == {r[0]: tuple(r[1]) for r in rows}
  back = vae.diffusers_to_ldm(dsd)
  assert back.keys() == sd.keys() and all(np.array_equal(back[k], sd[k]) for k in sd)


def test_diffusers_naming_loads_same_params(fixture, sd_model):
  meta, d, sd = fixture
  dsd = vae.ldm_to_diffusers(sd)
  # Pre-0.14 diffusers attention names as well as the current ones.
  old = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.")
          .replace("to_out.0.", "proj_attn."): v for k, v in dsd.items()}
  ref = jax.tree.leaves(sd_model.params)
  for variant in (dsd, old):
    m = vae.load_autoencoder(variant)
    assert m.naming == "diffusers" and m.config == sd_model.config
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(m.params), ref))
  # diffusers' own outputs on the same weights agree too (its SDPA attention differs by ~3e-6).
  mean = np.split(np.asarray(m.encode_moments(_nhwc(d["input/image"]))), 2, axis=-1)[0]
  np.testing.assert_allclose(_nchw(mean), d["diffusers/encode/mean"], rtol=0, atol=1e-5)


def test_missing_unexpected_and_shape_errors(fixture):
  meta, _, _ = fixture
  sd = _tiny_sd(meta)
  m = vae.load_autoencoder(sd)  # sized from the weights (resolution is bookkeeping only)
  assert vae.ldm_state_dict_shapes(m.config) == vae.ldm_state_dict_shapes(TINY)

  bad = dict(sd)
  del bad["decoder.mid.attn_1.k.bias"]
  bad["encoder.extra.weight"] = np.zeros(3, np.float32)
  bad["decoder.conv_out.bias"] = np.zeros(4, np.float32)
  with pytest.raises(vae.WeightLoadError) as e:
    vae.load_autoencoder(bad)
  msg = str(e.value)
  assert "missing keys (1)" in msg and "decoder.mid.attn_1.k.bias" in msg
  assert "unexpected keys (1)" in msg and "encoder.extra.weight" in msg
  assert "decoder.conv_out.bias: expected (3,), got (4,)" in msg

  # The same errors through the diffusers naming (reported under LDM names).
  dbad = vae.ldm_to_diffusers(sd)
  dbad["encoder.down_blocks.0.resnets.0.conv1.weight"] = np.zeros((32, 32, 1, 1), np.float32)
  del dbad["decoder.up_blocks.0.upsamplers.0.conv.bias"]
  with pytest.raises(vae.WeightLoadError, match=r"(?s)decoder\.up\.2\.upsample\.conv\.bias.*"
                     r"encoder\.down\.0\.block\.0\.conv1\.weight: expected \(32, 32, 3, 3\)"):
    vae.load_autoencoder(dbad)
  mixed = dict(sd)
  mixed["encoder.down_blocks.0.resnets.0.norm1.weight"] = sd["encoder.down.0.block.0.norm1.weight"]
  with pytest.raises(vae.WeightLoadError, match="mixes"):
    vae.load_autoencoder(mixed)


def test_sized_from_weights_and_file_formats(fixture, tmp_path):
  meta, _, _ = fixture
  cfg = vae.VAEConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=2, z_channels=3, embed_dim=3,
                      in_channels=1, out_ch=1, resolution=32, attn_resolutions=(32, 8))
  sd = _tiny_sd(meta, cfg)
  assert vae.config_from_state_dict(sd, resolution=32) == cfg
  dsd = vae.ldm_to_diffusers(sd)
  assert any(".attentions." in k and "down_blocks.0" in k for k in dsd)
  assert vae.diffusers_to_ldm(dsd).keys() == sd.keys()
  # A full LDM checkpoint: the VAE under first_stage_model., plus training-loss tensors to drop.
  full = tmp_path / "sd_full.safetensors"
  safetensors.numpy.save_file({f"first_stage_model.{k}": v for k, v in sd.items()}
                              | {"loss.logvar": np.zeros((1,), np.float32)}, str(full))
  np.savez(tmp_path / "vae.npz", **dsd)
  a = vae.load_autoencoder(full)
  b = vae.load_autoencoder(tmp_path / "vae.npz", cfg)
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))
  assert a.sha256 == vae.source_sha256(full) != b.sha256 and len(a.sha256) == 64
  x = np.random.default_rng(0).uniform(-1, 1, (1, 16, 24, 1)).astype(np.float32)
  moments = a.encode_moments(x)
  assert moments.shape == (1, 4, 6, 6)
  assert a.decode(a.sample(moments, jax.random.key(0))).shape == (1, 16, 24, 1)
