"""The convert CLI writes a checkpoint that init_from, the EMA restore and compile_only use."""
import json
import textwrap

import jax
import numpy as np
from flax import nnx

from dimr_jax import checkpoint as ckpt_lib
from dimr_jax import config_utils, convert, train
from dimr_jax.models import dimr as dimr_model


def _fixture_config_file(tmp_path, fixtures_dir):
  meta = json.loads((fixtures_dir / "dimr_tiny_2r_perturbed.json").read_text())
  stages = meta["config_passed_to_MRModel"]["stage_configs"]
  path = tmp_path / "fixture_cfg.py"
  path.write_text(textwrap.dedent(f"""
      import ml_collections
      from dimr_jax import config_base

      def get_config():
        c = config_base.base("mu/2R", 16, dataset="synthetic", num_classes=11)
        c.model.stage_configs = [ml_collections.ConfigDict(s) for s in {stages!r}]
        c.model.dtype = "float32"
        c.input.batch_size = 8
        c.total_steps = 0
        c.sample_every = 0
        c.async_checkpointing = False
        return c
      """))
  return str(path)


def test_convert_cli_then_init_from_and_compile_only(tmp_path, fixtures_dir, capsys):
  d = np.load(fixtures_dir / "dimr_tiny_2r_perturbed.npz", allow_pickle=False)
  sd = {k[len("param/"):]: d[k] for k in d.files if k.startswith("param/")}
  np.savez(tmp_path / "official.npz", **sd)
  cfg_path = _fixture_config_file(tmp_path, fixtures_dir)
  out = tmp_path / "converted"
  assert convert.main(["--official", str(tmp_path / "official.npz"), "--config", cfg_path,
                       "--out", str(out)]) == 0
  config = config_utils.load_config_file(cfg_path)
  spec = dimr_model.model_spec_from_config(config.model)
  want = convert.official_to_params(sd, spec)

  # The notebook path: the saved config rebuilds the model, the EMA params restore onto one device.
  saved = ckpt_lib.restore_config(str(out))
  abs_params = nnx.state(dimr_model.abstract_model(saved.model), nnx.Param)
  got = ckpt_lib.restore_ema_params(str(out), abs_params)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # init_from: training starts from the converted weights (params and EMA).
  config2 = config_utils.load_config_file(cfg_path, {"init_from": str(out)})
  state = train.train_and_evaluate(config2, str(tmp_path / "run"))
  for a, b, c in zip(jax.tree.leaves(want), jax.tree.leaves(state["params"]),
                     jax.tree.leaves(state["ema_params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))

  # --compile_only: compiles the step for this mesh and prints XLA's memory analysis.
  config3 = config_utils.load_config_file(cfg_path, {"compile_only": True, "mesh.fsdp": 4})
  assert train.train_and_evaluate(config3, str(tmp_path / "compile")) is None
  printed = capsys.readouterr().out
  assert "compiled train step for mesh {'data': 2, 'fsdp': 4}" in printed
  assert "temp_size_in_bytes" in printed and "peak estimate" in printed
