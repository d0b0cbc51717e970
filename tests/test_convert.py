"""Official checkpoint conversion: fixture equivalence, manifest coverage, bad input, .pth reading."""
import json

import numpy as np
import pytest

from dimr_jax import convert, weights
from tests import torch_pickle_writer

FIXTURES = ["dimr_tiny_2r", "dimr_tiny_2r_perturbed"]


def _load(fixtures_dir, name):
  d = np.load(fixtures_dir / f"{name}.npz", allow_pickle=False)
  meta = json.loads((fixtures_dir / f"{name}.json").read_text())
  sd = {k[len("param/"):]: d[k] for k in d.files if k.startswith("param/")}
  return d, meta, sd


def _nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_outputs_match_official(fixtures_dir, name):
  d, meta, sd = _load(fixtures_dir, name)
  apply = convert.load_official(sd, meta["config_passed_to_MRModel"])
  x, y = _nhwc(d["input/x"]), d["input/y"]
  same = d["input/log_snr_same"]
  # The shared-time case twice: per image, and as one scalar (the samplers' call, which folds the
  # time-dependent norm scales into the GEMM weights).
  for prefix, t in (("output", d["input/log_snr"]), ("output_same_t", same),
                    ("output_same_t", np.asarray(same).reshape(-1)[0])):
    outs = apply(x, t, y)
    n_out = len([k for k in d.files if k.startswith(prefix + "/")])
    assert len(outs) == n_out
    for i, o in enumerate(outs):
      np.testing.assert_allclose(np.asarray(o), _nhwc(d[f"{prefix}/{i}"]), atol=1e-5, rtol=1e-5,
                                 err_msg=f"{name} {prefix}/{i}")
  outs = apply(_nhwc(d["loss/xt"]), d["loss/log_snr"], y)
  for o in outs:
    ref = _nhwc(d[f"loss/pred_{o.shape[1]}"])
    np.testing.assert_allclose(np.asarray(o), ref, atol=1e-5, rtol=1e-5)


# '': XLA only (the CPU/TPU path); 'geglu': the GPU default in bf16; all kernels (opt-in);
# 'rmsnorm_bwd': the norm's Pallas backward under XLA's forward. Off GPU the Pallas kernels run in
# interpret mode: the same arithmetic the GPU compiles.
@pytest.mark.parametrize("pallas_ops", ["", "geglu", "geglu_gemm", "dwconv,geglu,rmsnorm",
                                        "rmsnorm_bwd", "geglu,rmsnorm_bwd"])
def test_bf16_path_close_to_float32(fixtures_dir, pallas_ops):
  import jax.numpy as jnp
  d, meta, sd = _load(fixtures_dir, "dimr_tiny_2r_perturbed")
  f32 = convert.load_official(sd, meta["config_passed_to_MRModel"], pallas_ops="")
  bf16 = convert.load_official(sd, meta["config_passed_to_MRModel"], dtype=jnp.bfloat16,
                               pallas_ops=pallas_ops)
  x, t, y = _nhwc(d["input/x"]), d["input/log_snr"], d["input/y"]
  t_shared = np.asarray(d["input/log_snr_same"]).reshape(-1)[0]
  for tt in (t, t_shared):  # per-image times, and one scalar time (the folded sampling path)
    for a, b in zip(f32(x, tt, y), bf16(x, tt, y)):
      rel = float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(a)))
      assert rel < 1e-2, rel


def test_round_trip_params_to_official(fixtures_dir):
  _, meta, sd = _load(fixtures_dir, "dimr_tiny_2r_perturbed")
  params = convert.official_to_params(sd, meta["config_passed_to_MRModel"])
  back = convert.params_to_official(params, meta["config_passed_to_MRModel"])
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])


@pytest.mark.parametrize("name,variant", [("DiMR-XL/2R", "XL/2R"), ("DiMR-G/2R", "G/2R")])
def test_manifest_every_official_key_mapped(fixtures_dir, name, variant):
  man = json.loads((fixtures_dir / "dimr_official_manifest.json").read_text())
  model = man["models"][name]
  official = {e["key"]: tuple(e["shape"]) for e in model["state_dict"]}
  ours = convert.official_keys_for(model["model_args_as_in_config"])
  assert ours == official
  assert ours == convert.official_keys_for(dict(variant=variant, image_size=32))
  assert sum(int(np.prod(s)) for s in ours.values()) == model["params"]["total_state_dict_elements"]


def test_missing_unexpected_and_shape_errors(fixtures_dir):
  _, meta, sd = _load(fixtures_dir, "dimr_tiny_2r")
  cfg = meta["config_passed_to_MRModel"]
  bad = dict(sd)
  del bad["stages.0.blocks.1.block1.dense.bias"]
  with pytest.raises(convert.ConversionError, match=r"missing keys \(1\).*blocks\.1\.block1\.dense\.bias"):
    convert.official_to_params(bad, cfg)
  bad = dict(sd, **{"stages.0.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(convert.ConversionError, match=r"unexpected keys \(1\).*stages\.0\.extra\.weight"):
    convert.official_to_params(bad, cfg)
  bad = dict(sd)
  bad["stages.1.skip_denses.0.weight"] = np.zeros((32, 63), np.float32)
  with pytest.raises(convert.ConversionError,
                     match=r"shape mismatch: stages\.1\.skip_denses\.0\.weight: expected \(32, 64\), got \(32, 63\)"):
    convert.official_to_params(bad, cfg)


def test_wrong_model_size_is_a_clear_error(fixtures_dir):
  _, meta, sd = _load(fixtures_dir, "dimr_tiny_2r")
  with pytest.raises(convert.ConversionError, match="does not match the model config"):
    convert.official_to_params(sd, dict(variant="mu/2R", num_classes=11, image_size=16))


def test_pth_without_torch_and_module_prefix(fixtures_dir, tmp_path):
  d, meta, sd = _load(fixtures_dir, "dimr_tiny_2r")
  path = torch_pickle_writer.write_pth(tmp_path / "ckpt.pth", {f"module.{k}": v for k, v in sd.items()})
  loaded = weights.load_state_dict(path)
  assert set(loaded) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(loaded[k], sd[k])
  apply = convert.load_official(str(path), meta["config_passed_to_MRModel"])
  out = apply(_nhwc(d["input/x"]), d["input/log_snr"], d["input/y"])
  np.testing.assert_allclose(np.asarray(out[-1]), _nhwc(d["output/1"]), atol=1e-5)


def test_pth_with_code_is_refused(tmp_path):
  import pickle
  import zipfile

  class Evil:
    def __reduce__(self):
      import os
      return (os.system, ("echo pwned",))

  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
  with pytest.raises(weights.UnsafeWeightsError, match="refusing to unpickle"):
    weights.load_state_dict(path)


def test_npz_and_safetensors_sources(fixtures_dir, tmp_path):
  d, meta, sd = _load(fixtures_dir, "dimr_tiny_2r")
  np.savez(tmp_path / "w.npz", **sd)
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
  for p in ("w.npz", "w.safetensors"):
    apply = convert.load_official(str(tmp_path / p), meta["config_passed_to_MRModel"])
    out = apply(_nhwc(d["input/x"]), d["input/log_snr"], d["input/y"])
    np.testing.assert_allclose(np.asarray(out[0]), _nhwc(d["output/0"]), atol=1e-5)
