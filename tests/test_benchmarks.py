"""The benchmark drivers: case grammar, weak-scaling bookkeeping, and one real run on 2 CPU devices."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench  # noqa: E402
import scaling  # noqa: E402


def test_parse_case():
  assert bench.parse_case("XL/2R:train:64:none") == {
      "model": "XL/2R", "kind": "train", "batch": 64, "remat": "none", "scan_unroll": None,
      "num_devices": 1, "mode": "dp"}
  c = bench.parse_case("G/2R:train:128:block:1@8:fsdp")
  assert (c["batch"], c["remat"], c["scan_unroll"], c["num_devices"], c["mode"]) == (128, "block", 1, 8, "fsdp")
  assert bench.parse_case("XL/2R:sample:125")["kind"] == "sample"
  for bad in ("XL/2R:train", "XX:train:64", "XL/2R:eval:64", "XL/2R:train:64:none@2:tp", "XL/2R:train:b64",
              "XL/2R:sample:125@2:dp", "XL/2R:train:64:none@0:dp"):
    with pytest.raises(ValueError, match="bad case"):
      bench.parse_case(bad)


def test_bad_case_on_the_command_line_is_one_line():
  r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), "--cases=XL/2R:train:b64"],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert "bad case 'XL/2R:train:b64'" in r.stderr.strip().splitlines()[-1]


def test_mgpu_fields_replace_the_kernel_default_per_depth(monkeypatch):
  from dimr_jax.models import geglu_gemm_mgpu as gm
  assert bench.mgpu_fields("960:delay_release=1;480:stages=5,chain_tiles=1") == {
      960: {"delay_release": 1}, 480: {"stages": 5, "chain_tiles": 1}}
  for bad in ("960:delay_release", "960:nope=1", "x:stages=2"):
    with pytest.raises(ValueError, match="bad --mgpu_fields"):
      bench.mgpu_fields(bad)
  r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), "--mgpu_fields=960:nope=1"],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "Traceback" not in r.stderr and "nope" in r.stderr
  monkeypatch.setattr(gm, "default_config", gm.default_config)  # restored after the test
  base = gm.default_config(480, 960)
  bench._patch_mgpu_default("480:stages=5,chain_tiles=1")
  got = gm.default_config(480, 960)
  assert (got.stages, got.chain_tiles, got.tile_k) == (5, True, base.tile_k)
  assert gm.default_config(960, 1920).chain_tiles is False  # other depths untouched
  assert gm.default_config(16, 32) is None


def test_mesh_config():
  assert bench.mesh_config(4, "dp") == {"data": 4, "fsdp": 1}
  assert bench.mesh_config(4, "fsdp") == {"data": 1, "fsdp": 4}


def test_scaling_cases_skip_missing_devices():
  cases, skipped = scaling.scaling_cases("XL/2R", 64, "none", [1, 2, 4, 8], ["dp", "fsdp"], available=2)
  assert cases == ["XL/2R:train:64:none@1:dp", "XL/2R:train:64:none@2:dp", "XL/2R:train:64:none@2:fsdp"]
  assert skipped == [4, 8]


def test_add_efficiency():
  def rec(n, per_dev, model="XL/2R", batch=64, kind="train"):
    return {"model": model, "kind": kind, "batch": batch, "remat": "none", "scan_unroll": 0,
            "num_devices": n, "mode": "dp", "global_batch": batch * n, "img_per_s": per_dev * n,
            "img_per_s_per_device": per_dev, "step_time_s": 0.2, "peak_mem_gib": 40.0,
            "mfu": 0.4, "device": "gpu"}
  recs = scaling.add_efficiency([rec(1, 300.0), rec(2, 285.0), rec(2, 150.0, batch=128),
                                 rec(1, 500.0, kind="sample"), {"case": "x", "error": "OOM"}])
  assert recs[0]["scaling_efficiency"] == pytest.approx(1.0)
  assert recs[1]["scaling_efficiency"] == pytest.approx(0.95)
  assert "scaling_efficiency" not in recs[2]  # no 1-device run at that batch
  assert "scaling_efficiency" not in recs[3]  # sampling is not a scaling case
  assert "| XL/2R | 2 | dp | 64 |" in scaling.table(recs[:2])


@pytest.mark.slow
def test_scaling_runs_on_two_cpu_devices(tmp_path):
  """The real train step of the tiny model, data parallel and FSDP over 2 fake CPU devices."""
  out = tmp_path / "s.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  env.pop("NCCL_NVLS_ENABLE", None)
  r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scaling.py"), "--model=mu", "--batch=4",
                      "--devices=1,2,4", "--parallel_compile", "--steps=2", "--timeout=400",
                      f"--out={out}"], capture_output=True, text=True, env=env, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "skipped [4] devices: only 2 present" in r.stdout
  recs = json.loads(out.read_text())
  assert [(x["num_devices"], x["mode"]) for x in recs] == [(1, "dp"), (2, "dp"), (2, "fsdp")]
  assert all(x["global_batch"] == 4 * x["num_devices"] and x["img_per_s"] > 0 for x in recs)
  assert recs[2]["mesh"] == {"data": 1, "fsdp": 2}
  assert all(x["env"]["NCCL_NVLS_ENABLE"] == "0" for x in recs)  # NVLink multicast off by default
  assert all(x["scaling_efficiency"] > 0 for x in recs)
  assert out.with_suffix(".md").read_text().startswith("| model | GPUs |")


@pytest.mark.slow
def test_profile_step_runs_on_cpu():
  """profile_step.py builds its case through bench.build and parses its own trace."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "profile_step.py"), "--case=mu:train:4:none",
                      "--steps=2", "--by_source=0", "--top=3"], capture_output=True, text=True, env=env,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "mu:train:4:none on cpu: device kernel time" in r.stdout
