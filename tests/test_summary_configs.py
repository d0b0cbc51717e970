"""Every config loads; the summary tool prints the paper's params / GMACs."""
import pathlib
import re

import pytest

from dimr_jax import config_utils
from dimr_jax.tools import summary

CONFIGS = sorted(str(p) for p in (pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py")
                 if p.name not in ("__init__.py",))


@pytest.mark.parametrize("path", CONFIGS)
def test_config_loads(path):
  c = config_utils.load_config_file(path)
  assert c.model.variant
  if "runlocal" in pathlib.Path(path).read_text() or "with_arg" in pathlib.Path(path).read_text():
    c = config_utils.load_config_file(path + ":runlocal")
    assert c.input.batch_size <= 64


def test_unknown_override_fails_loudly():
  with pytest.raises(KeyError, match="unknown config key"):
    config_utils.load_config_file(CONFIGS[0], {"optim.lrr": 1.0})


@pytest.mark.parametrize("name,params,gmacs", [
    ("dimr_xl_256", 505046408, 160.18),
    ("dimr_g_256", 1056352904, 331.10),
    ("dimr_xl_512", 525.03e6, 206.1),
])
def test_summary_numbers(capsys, name, params, gmacs):
  cfg = str(pathlib.Path(CONFIGS[0]).parent / f"{name}.py")
  assert summary.main([f"--config={cfg}"]) == 0
  out = capsys.readouterr().out
  p = int(re.search(r"^params: (\d+)$", out, re.M).group(1))
  g = float(re.search(r"^gmacs: ([\d.]+)$", out, re.M).group(1))
  if isinstance(params, int):
    assert p == params
  else:
    assert abs(p - params) / params < 1e-3
  assert abs(g - gmacs) / gmacs < 5e-3


def test_unknown_config_argument_fails():
  path = str(pathlib.Path(CONFIGS[0]).parent / "dimr_xl_256.py")
  assert config_utils.load_config_file(path + ":runlocal").input.dataset == "synthetic"
  with pytest.raises(ValueError, match="unknown config argument 'fast'"):
    config_utils.load_config_file(path + ":fast")
