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


def assert_mu_model_matches_xla(ops: str, *, scan_unroll, remat, shared_time: bool = True,
                                out_rtol: float, grad_rtol: float = 5e-2, after_forward=None):
  """A bf16 mu/2R DiMR built with ``pallas_ops=ops`` against the same model on XLA alone: outputs
  (then ``after_forward()``, e.g. a check of which kernel calls the forward made), then the
  parameter gradients of a squared-output loss, each within a relative L2 tolerance. Used by the
  kernel tests whose kernels are faked on CPU, to show the model routes through them unchanged."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from dimr_jax.models import dimr as dimr_model

  def make(pallas_ops):
    return dimr_model.DiMR(dict(variant="mu/2R", num_classes=11), dtype=jnp.bfloat16,
                           pallas_ops=pallas_ops, scan_unroll=scan_unroll, remat=remat,
                           rngs=nnx.Rngs(params=0))

  x, y = jax.random.normal(jax.random.key(7), (2, 32, 32, 4)), jnp.array([2, 9])
  t = jnp.float32(0.3) if shared_time else jnp.array([0.3, 0.7])

  def close(want, got, rtol):
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      assert np.linalg.norm(a - b) <= rtol * np.linalg.norm(a) + 1e-6

  close(make("")(x, t, y), make(ops)(x, t, y), out_rtol)
  if after_forward is not None:
    after_forward()

  def loss(model):
    return sum(jnp.sum(o.astype(jnp.float32) ** 2) for o in model(x, t, y))
  close(nnx.grad(loss)(make("")), nnx.grad(loss)(make(ops)), grad_rtol)
