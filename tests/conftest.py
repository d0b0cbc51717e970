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
