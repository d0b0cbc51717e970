"""Test setup: 8 fake CPU devices, fast compiles, and the shared fixtures path."""
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = (REPO / ".." / "shared" / "fixtures").resolve()


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  if not FIXTURES.exists():
    pytest.skip(f"shared fixtures not found at {FIXTURES}")
  return FIXTURES


def write_rule_vae_weights(fixtures_dir: pathlib.Path, config, path: pathlib.Path, seed_offset: int) -> str:
  """Writes SD-VAE weights for ``config`` made by the fixture JSON's documented weight rule."""
  import json

  import numpy as np

  from dimr_jax import vae

  meta = json.loads((fixtures_dir / "sd_vae_ldm_ref.json").read_text())
  ns = {}
  exec(meta["weight_rule"]["python_source"], ns)  # noqa: S102 - the fixture's documented rule
  np.savez(path, **ns["rule_state_dict"](vae.ldm_state_dict_shapes(config), seed_offset=seed_offset))
  return str(path)


def lower_for_cuda_or_skip(fn, *args) -> str:
  """StableHLO text of ``fn`` lowered for CUDA on this (CPU) machine; skips where it cannot be.

  jaxlib builds without the Triton dialect raise ImportError; jax >= 0.11 needs the GPU's
  compute capability to lower a Triton kernel and raises RuntimeError without a GPU.
  """
  import jax

  try:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  except ImportError as e:
    pytest.skip(f"no Triton lowering available: {e}")
  except RuntimeError as e:
    if "No supported GPU devices" not in str(e):
      raise
    pytest.skip(f"this jax lowers Triton kernels only with a GPU present: {e}")
