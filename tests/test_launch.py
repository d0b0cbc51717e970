"""launch/: dry-runs of the Cloud TPU and SLURM launchers, and the per-worker shell scripts (no cloud calls)."""
import importlib.util
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"


def load(name):
  """Imports launch/<name>.py (launch/ is scripts, not a package) as `launch_<name>`."""
  spec = importlib.util.spec_from_file_location(f"launch_{name}", LAUNCH / f"{name}.py")
  module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


slurm, tpu_pod = load("slurm"), load("tpu_pod")

CONFIG = "configs/dimr_xl_256.py"
OVERRIDES = ["--config.total_steps=1000", "--config.optim.lr=1e-4"]


def run_main(module, argv, capsys):
  rc = module.main(argv)
  out, err = capsys.readouterr()
  return rc, out, err


def tpu_all(accel, capsys, *extra):
  argv = ["all", "--name=dimr-test", f"--accelerator_type={accel}", "--zone=us-east5-a", "--project=my-proj",
          "--spot", f"--config={CONFIG}", "--workdir=gs://my-bucket/dimr_xl", *OVERRIDES, "--dry-run", *extra]
  rc, out, err = run_main(tpu_pod, argv, capsys)
  assert rc == 0, err
  return out.splitlines(), err


def only(lines, *words):
  found = [l for l in lines if all(w in l for w in words)]
  assert len(found) == 1, (words, lines)
  return found[0]


@pytest.mark.parametrize("accel,workers,runtime", [("v5p-64", 8, "v2-alpha-tpuv5"),
                                                   ("v6e-256", 64, "v2-alpha-tpuv6e")])
def test_tpu_dry_run(accel, workers, runtime, capsys):
  lines, err = tpu_all(accel, capsys)
  assert lines[0].startswith(f"# {accel}: {workers} workers")
  create = shlex.split(only(lines, "queued-resources", "create"))
  assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "dimr-test"]
  for flag in (f"--accelerator-type={accel}", "--zone=us-east5-a", "--project=my-proj", "--spot",
               f"--runtime-version={runtime}", "--node-id=dimr-test"):
    assert flag in create
  assert "ACTIVE" in "\n".join(lines) and only(lines, "queued-resources", "describe")
  assert "--worker=all" in shlex.split(only(lines, "tpu-vm", "scp"))
  setup = shlex.split(only(lines, "tpu-vm", "ssh", "DIMR_INSTALL_ONLY=1"))
  assert "--worker=all" in setup
  run = shlex.split(only(lines, "tpu-vm", "ssh", "run_tpu.sh --config"))
  assert "--worker=all" in run
  remote = shlex.split(next(a for a in run if a.startswith("--command=")).removeprefix("--command="))
  assert "DIMR_DISTRIBUTED=1" in remote and remote[remote.index("DIMR_DISTRIBUTED=1") + 2].endswith(
      "launch/run_tpu.sh")
  for arg in (f"--config={CONFIG}", "--workdir=gs://my-bucket/dimr_xl", *OVERRIDES):
    assert arg in remote
  assert "warning" not in err
  assert not any("delete" in l for l in lines)  # only with --delete_after


def test_tpu_background_logs_delete(capsys):
  lines, _ = tpu_all("v5p-64", capsys, "--background")
  run = only(lines, "run_tpu.sh --config")
  assert "nohup" in run and "dimr_logs/train.log" in run
  common = ["--name=dimr-test", "--zone=us-east5-a", "--project=my-proj", "--dry-run"]
  rc, out, _ = run_main(tpu_pod, ["logs", *common], capsys)
  assert rc == 0 and "--worker=0" in out and "tail" in out and "dimr_logs/train.log" in out
  rc, out, _ = run_main(tpu_pod, ["delete", *common], capsys)
  assert rc == 0
  assert shlex.split(out.strip()) == ["gcloud", "compute", "tpus", "queued-resources", "delete", "dimr-test",
                                      "--force", "--quiet", "--zone=us-east5-a", "--project=my-proj"]


@pytest.mark.parametrize("accel,hosts,chips", [("v4-8", 1, 4), ("v5p-8", 1, 4), ("v5p-64", 8, 32),
                                               ("v5p-1024", 128, 512), ("v5litepod-8", 1, 8),
                                               ("v5litepod-16", 4, 16), ("v5litepod-256", 64, 256),
                                               ("v6e-4", 1, 4), ("v6e-8", 1, 8), ("v6e-256", 64, 256)])
def test_worker_table(accel, hosts, chips):
  sl = tpu_pod.parse_accelerator(accel)
  assert (sl.hosts, sl.chips) == (hosts, chips)


def test_tpu_bad_input(capsys):
  common = ["--name=n", "--zone=z", "--project=p", "--dry-run"]
  for accel in ("v7x-99", "v5p-12", "v6e-12", "v5e-16", "tpu"):
    rc, _, err = run_main(tpu_pod, ["create", f"--accelerator_type={accel}", *common], capsys)
    assert rc == 2 and "error: " in err and "accelerator type" in err, (accel, err)
  rc, _, err = run_main(tpu_pod, ["run", "--accelerator_type=v5p-64", f"--config={CONFIG}", *common], capsys)
  assert rc == 2 and "--workdir" in err
  rc, _, err = run_main(tpu_pod, ["all", "--accelerator_type=v5p-64", f"--config={CONFIG}", *common], capsys)
  assert rc == 2 and "--workdir" in err
  rc, out, err = run_main(tpu_pod, ["run", "--accelerator_type=v5p-64", f"--config={CONFIG}",
                                    "--workdir=/tmp/x", *common], capsys)
  assert rc == 0 and "warning" in err and "gs://" in err
  rc, _, err = run_main(tpu_pod, ["run", "--accelerator_type=v6e-8", f"--config={CONFIG}",
                                  "--workdir=/tmp/x", *common], capsys)
  assert rc == 0 and "warning" not in err  # one host: a local workdir is fine


def slurm_dry_run(capsys, *extra):
  argv = ["--nodes=2", "--gpus_per_node=8", "--partition=gpu", "--account=acct", "--time=48:00:00",
          "--venv=/opt/venvs/dimr", f"--config={CONFIG}", "--workdir=/shared/runs/dimr_xl", *OVERRIDES,
          "--dry-run", *extra]
  rc, out, err = run_main(slurm, argv, capsys)
  assert rc == 0, err
  return out


def bash_n(text, tmp_path):
  path = tmp_path / "script.sh"
  path.write_text(text)
  subprocess.run(["bash", "-n", str(path)], check=True)


def test_slurm_per_gpu(capsys, tmp_path):
  out = slurm_dry_run(capsys, "--per=gpu")
  lines = out.splitlines()
  for directive in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gres=gpu:8",
                    "#SBATCH --partition=gpu", "#SBATCH --account=acct", "#SBATCH --time=48:00:00"):
    assert directive in lines
  assert "export DIMR_VENV=/opt/venvs/dimr" in lines
  assert only(lines, "export DIMR_COORDINATOR_ADDRESS=").startswith('export DIMR_COORDINATOR_ADDRESS="${head_node}:')
  assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in out
  assert 'export DIMR_NUM_PROCESSES="$SLURM_NTASKS"' in lines
  assert 'export DIMR_PROCESS_ID="$SLURM_PROCID"' in out
  assert 'export DIMR_LOCAL_DEVICE_IDS="$SLURM_LOCALID"' in out
  srun = shlex.split(only(out.replace("\\\n", "").splitlines(), "srun ", "launch/run_slurm.sh"))
  i = srun.index("launch/run_slurm.sh")
  assert srun[0] == "srun" and srun[i - 3:i - 1] == ["bash", "-c"] and srun[i - 1].endswith('exec "$0" "$@"')
  for arg in (f"--config={CONFIG}", "--workdir=/shared/runs/dimr_xl", *OVERRIDES):
    assert arg in srun[srun.index("launch/run_slurm.sh"):]
  assert "NCCL_NVLS_ENABLE=1" not in out and "export NCCL_NVLS_ENABLE=0" in lines
  assert lines[-1].startswith("sbatch ") and lines[-1].endswith(".sbatch")
  bash_n(out, tmp_path)


def test_slurm_per_node(capsys, tmp_path):
  out = slurm_dry_run(capsys, "--per=node", "--port=12345", "--env=NCCL_SOCKET_IFNAME=eth0")
  assert "#SBATCH --ntasks-per-node=1" in out and "#SBATCH --gres=gpu:8" in out
  assert "DIMR_LOCAL_DEVICE_IDS" not in out and 'export DIMR_PROCESS_ID="$SLURM_PROCID"' in out
  assert 'DIMR_COORDINATOR_ADDRESS="${head_node}:12345"' in out and "export NCCL_SOCKET_IFNAME=eth0" in out
  bash_n(out, tmp_path)


def test_slurm_bad_input(capsys):
  base = ["--nodes=2", f"--config={CONFIG}", "--dry-run"]
  rc, _, err = run_main(slurm, base, capsys)
  assert rc == 2 and "--workdir" in err
  rc, _, err = run_main(slurm, [*base, "--workdir=/w", "--env=NCCL_NVLS_ENABLE=1"], capsys)
  assert rc == 2 and "NCCL_NVLS_ENABLE" in err
  rc, _, err = run_main(slurm, [*base, "--workdir=/w", "--per=rank"], capsys)
  assert rc == 2


@pytest.mark.parametrize("script", sorted(LAUNCH.glob("*.sh")) + [LAUNCH / "slurm_job.sbatch"],
                         ids=lambda p: p.name)
def test_bash_syntax(script):
  subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.fixture
def fake_venv(tmp_path):
  """A venv whose `python` only records how it was called; `import ...` succeeds iff FAKE_INSTALLED=1."""
  bin_dir = tmp_path / "venv" / "bin"
  bin_dir.mkdir(parents=True)
  (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
  python = bin_dir / "python"
  python.write_text('#!/usr/bin/env bash\n'
                    'echo "python $* DIMR_DISTRIBUTED=${DIMR_DISTRIBUTED:-}" >> "$FAKE_LOG"\n'
                    'if [[ "$1" == -c ]]; then [[ "${FAKE_INSTALLED:-0}" == 1 ]]; fi\n')
  python.chmod(0o755)
  return tmp_path / "venv", tmp_path / "calls.log"


def run_script(name, venv, log, **env):
  full = {"PATH": os.environ["PATH"], "HOME": str(venv.parent), "DIMR_VENV": str(venv), "FAKE_LOG": str(log),
          **env}
  subprocess.run(["bash", str(LAUNCH / name), f"--config={CONFIG}", "--workdir=gs://b/x", OVERRIDES[0]],
                 env=full, check=True, capture_output=True)
  return log.read_text().splitlines()


def test_run_tpu_sh(fake_venv):
  venv, log = fake_venv
  calls = run_script("run_tpu.sh", venv, log, FAKE_INSTALLED="1")
  assert not any("pip install" in c for c in calls)  # already installed: no pip
  assert calls[-1] == f"python -m dimr_jax.main --config={CONFIG} --workdir=gs://b/x {OVERRIDES[0]} DIMR_DISTRIBUTED=1"
  log.unlink()
  calls = run_script("run_tpu.sh", venv, log, FAKE_INSTALLED="1", DIMR_REINSTALL="1", DIMR_INSTALL_ONLY="1")
  assert any("-m pip install --quiet -e .[tpu]" in c for c in calls)
  assert not any("dimr_jax.main" in c for c in calls)


def test_run_slurm_sh(fake_venv):
  venv, log = fake_venv
  calls = run_script("run_slurm.sh", venv, log)
  assert calls == [f"python -m dimr_jax.main --config={CONFIG} --workdir=gs://b/x {OVERRIDES[0]} DIMR_DISTRIBUTED=1"]


def test_passthrough_after_double_dash(capsys):
  common = ["--name=n", "--zone=z", "--project=p", "--dry-run", "--accelerator_type=v5p-8"]
  rc, out, _ = run_main(tpu_pod, ["run", *common, f"--config={CONFIG}", "--workdir=gs://b/x",
                                  "--config.mesh.fsdp=4", "--", "--compile_only"], capsys)
  assert rc == 0 and out.splitlines()[-1].count("--config.mesh.fsdp=4 --compile_only") == 1
  out = slurm_dry_run(capsys, "--", "--compile_only")
  assert "--config.optim.lr=1e-4 --compile_only" in out
