#!/usr/bin/env python3
"""Render launch/slurm_job.sbatch for N nodes x G GPUs and submit it with sbatch.

  python launch/slurm.py --nodes=2 --gpus_per_node=8 --per=gpu --partition=gpu --account=my-acct \
      --time=48:00:00 --venv=$PWD/.venv --config=configs/dimr_xl_256.py --workdir=/shared/runs/dimr_xl_256 \
      [--config.key=value ...] [--dry-run]

--per=gpu   one process per GPU (--ntasks-per-node=G); each process takes GPU $SLURM_LOCALID through
            DIMR_LOCAL_DEVICE_IDS. Every task must see all of its node's GPUs, so GPUs are requested per
            node (--gres=gpu:G), not per task.
--per=node  one process per node that drives all G GPUs (--ntasks-per-node=1).

Each process runs launch/run_slurm.sh (activate --venv, DIMR_DISTRIBUTED=1, python -m dimr_jax.main ...)
with DIMR_COORDINATOR_ADDRESS (first node:port), DIMR_NUM_PROCESSES, DIMR_PROCESS_ID set from SLURM.
--dry-run prints the rendered script and the sbatch command; otherwise the script is written under
--log_dir and submitted. Only the Python standard library is used.
"""
from __future__ import annotations

import argparse
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
from typing import Sequence

# The launchers run as plain scripts (`python launch/x.py`) and are loaded by path in tests, so
# their shared helpers are imported from this folder explicitly.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from launch_common import LaunchError, split_overrides  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
TEMPLATE = pathlib.Path(__file__).resolve().parent / "slurm_job.sbatch"
# Default coordinator port, derived from the job id so two jobs sharing a node do not collide.
JOB_PORT = "$((20000 + SLURM_JOB_ID % 10000))"


def render(template: str, values: dict[str, str]) -> str:
  """Fills {{NAME}}; a placeholder rendered empty drops its whole line. Unknown names are an error."""
  missing = sorted(set(re.findall(r"\{\{(\w+)\}\}", template)) - set(values))
  if missing:
    raise LaunchError(f"template placeholders without a value: {missing}")
  lines = []
  for line in template.splitlines():
    names = re.findall(r"\{\{(\w+)\}\}", line)
    if names and line.strip() == "{{%s}}" % names[0] and not values[names[0]]:
      continue
    lines.append(re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], line))
  return "\n".join(lines) + "\n"


def render_script(args: argparse.Namespace) -> str:
  per_gpu = args.per == "gpu"
  task_exports = 'export DIMR_PROCESS_ID="$SLURM_PROCID";'
  if per_gpu:
    task_exports += ' export DIMR_LOCAL_DEVICE_IDS="$SLURM_LOCALID";'
  sbatch_extra = [f"#SBATCH --partition={args.partition}" if args.partition else "",
                  f"#SBATCH --account={args.account}" if args.account else "",
                  f"#SBATCH --cpus-per-task={args.cpus_per_task}" if args.cpus_per_task else "",
                  *(f"#SBATCH {flag}" for flag in args.sbatch)]
  env = []
  for kv in args.env:
    key, sep, value = kv.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*", key):
      raise LaunchError(f"--env {kv!r}: expected KEY=VALUE")
    if key == "NCCL_NVLS_ENABLE" and value.strip() not in ("0", ""):
      raise LaunchError("--env NCCL_NVLS_ENABLE: NVLink multicast stays off in these jobs (see the template)")
    env.append(f"export {key}={shlex.quote(value)}")
  train_args = [f"--config={args.config}", f"--workdir={args.workdir}", *args.overrides]
  values = {
      "JOB_NAME": args.job_name,
      "NODES": str(args.nodes),
      "TASKS_PER_NODE": str(args.gpus_per_node if per_gpu else 1),
      "GPUS_PER_NODE": str(args.gpus_per_node),
      "TIME": args.time,
      "LOG_DIR": str(args.log_dir),
      "SBATCH_EXTRA": "\n".join(line for line in sbatch_extra if line),
      "MODE_DOC": (f"one process per GPU ({args.nodes} x {args.gpus_per_node} processes, 1 GPU each)" if per_gpu
                   else f"one process per node ({args.nodes} processes, {args.gpus_per_node} GPUs each)"),
      "REPO_DIR": shlex.quote(str(args.repo_dir)),
      "VENV": shlex.quote(args.venv),
      "SETUP": "\n".join(args.setup),
      "PORT": str(args.port) if args.port else JOB_PORT,
      "ENV": "\n".join(env),
      "TASK_EXPORTS": task_exports,
      "TRAIN_ARGS": " ".join(shlex.quote(a) for a in train_args),
  }
  return render(TEMPLATE.read_text(), values)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="slurm.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                              epilog="Arguments --config.key=value are passed to the training run.")
  p.add_argument("--nodes", type=int, required=True)
  p.add_argument("--gpus_per_node", type=int, default=8)
  p.add_argument("--per", choices=("gpu", "node"), default="gpu", help="one process per GPU or per node")
  p.add_argument("--partition")
  p.add_argument("--account")
  p.add_argument("--time", default="24:00:00", help="wall-clock limit, HH:MM:SS or D-HH:MM:SS")
  p.add_argument("--cpus_per_task", type=int, help="CPUs per process (data loading); cluster default if unset")
  p.add_argument("--venv", default=str(REPO / ".venv"),
                 help="venv that run_slurm.sh activates on every node ('' = use the PATH as is)")
  p.add_argument("--config", required=True, help="configs/<file>.py[:arg]")
  p.add_argument("--workdir", required=True, help="a directory on a filesystem shared by all nodes")
  p.add_argument("--job_name", default="dimr")
  p.add_argument("--port", type=int, default=0, help="coordinator port (default 20000 + job id %% 10000)")
  p.add_argument("--repo_dir", default=str(REPO), help="this checkout as the nodes see it")
  p.add_argument("--log_dir", default=str(REPO / "runs" / "slurm"), help="sbatch output and the script")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra exports (repeatable)")
  p.add_argument("--setup", action="append", default=[], metavar="CMD",
                 help="shell lines before srun, e.g. 'module load cuda/12.4' (repeatable)")
  p.add_argument("--sbatch", action="append", default=[], metavar="FLAG",
                 help="extra #SBATCH flag, e.g. --sbatch=--exclusive (repeatable)")
  p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                 help="print the script and the sbatch command, submit nothing")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    rest, overrides = split_overrides(argv)
    args = build_parser().parse_args(rest)
    args.overrides = overrides
    if args.nodes < 1 or args.gpus_per_node < 1:
      raise LaunchError("--nodes and --gpus_per_node must be >= 1")
    if args.nodes > 1 and args.workdir.startswith("/tmp"):
      print(f"warning: --workdir={args.workdir} is usually node-local; checkpoints need a shared filesystem",
            file=sys.stderr)
    script = render_script(args)
    path = pathlib.Path(args.log_dir) / f"{args.job_name}.sbatch"
    cmd = ["sbatch", str(path)]
    if args.dry_run:
      print(f"{script}# --- dry run: would write the script above to {path} and run:\n{shlex.join(cmd)}")
      return 0
    if not shutil.which("sbatch"):
      raise LaunchError("sbatch not found on PATH (run this on a SLURM login node, or use --dry-run)")
    path.parent.mkdir(parents=True, exist_ok=True)  # slurm does not create the --output directory
    path.write_text(script)
    print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
  except LaunchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except SystemExit as e:  # argparse: --help, or a usage error it already printed
    return e.code if isinstance(e.code, int) else 2
  except subprocess.CalledProcessError as e:
    print(f"error: sbatch failed with exit status {e.returncode}", file=sys.stderr)
    return e.returncode or 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
