#!/usr/bin/env python3
"""Run DiMR JAX training on a Cloud TPU slice (single host or pod) with gcloud.

Subcommands (each is a few gcloud calls; `--dry-run` prints them, shell-quoted, and runs nothing):

  create  queued-resources create (--spot | --reserved | --best-effort), then poll until ACTIVE
  setup   tar this checkout (or `--git_url` clone), copy it to every worker, install `.[tpu]`
  run     start `launch/run_tpu.sh --config=... --workdir=gs://... [--config.k=v ...]` on all workers
          at once (DIMR_DISTRIBUTED=1 -> jax.distributed); streamed, or `--background` into a log
  logs    tail a worker's log of a `--background` run (worker 0 by default)
  stop    kill the `--background` run on every worker (by the pid it recorded)
  delete  delete the queued resource and its TPU VMs
  all     create -> setup -> run

Example (a v5p-64 slice = 8 hosts):
  python launch/tpu_pod.py all --name=dimr-xl --accelerator_type=v5p-64 --zone=us-east5-a \
      --project=my-proj --spot --config=configs/dimr_xl_256.py --workdir=gs://my-bucket/dimr_xl_256 \
      --background --config.total_steps=400000
  python launch/tpu_pod.py logs   --name=dimr-xl --zone=us-east5-a --project=my-proj
  python launch/tpu_pod.py delete --name=dimr-xl --zone=us-east5-a --project=my-proj

Arguments starting with `--config.` are training config overrides and are passed through verbatim.
Only the Python standard library is used, so this runs from any machine that has gcloud.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time
from typing import Callable, Sequence

# The launchers run as plain scripts (`python launch/x.py`) and are loaded by path in tests, so
# their shared helpers are imported from this folder explicitly.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from launch_common import LaunchError, split_overrides  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
REMOTE_DIR = "dimr_jax"          # the code's directory on each worker, relative to $HOME
REMOTE_TARBALL = "dimr_jax.tar.gz"
TAR_EXCLUDES = (".venv", "runs", ".git", "__pycache__", "*.egg-info", ".pytest_cache", "build", "dist")


# --------------------------------------------------------------------------------------------------
# Accelerator types -> hosts.
#
# | generation | type name       | N counts     | chips/host        | hosts      | examples               |
# |------------|-----------------|--------------|-------------------|------------|------------------------|
# | v4         | v4-N            | TensorCores  | 4 (2 cores/chip)  | N / 8      | v4-8: 1, v4-32: 4      |
# | v5p        | v5p-N           | TensorCores  | 4 (2 cores/chip)  | N / 8      | v5p-8: 1, v5p-64: 8    |
# | v5e        | v5litepod-N     | chips        | N if N <= 8 else 4| 1 or N / 4 | -8: 1, -256: 64        |
# | v6e        | v6e-N           | chips        | N if N <= 8 else 4| 1 or N / 4 | v6e-8: 1, v6e-256: 64  |
#
# v5e/v6e sizes 1, 4 and 8 are single-host VMs (the 8-chip one is a single host with 8 chips); from 16
# chips on, a slice is made of 4-chip hosts.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Generation:
  runtime_version: str           # default TPU VM image
  counts_cores: bool             # True: N in "<gen>-N" counts TensorCores (2 per chip), else chips
  sizes: tuple[int, ...] | None  # allowed N (None: any multiple of 8)


GENERATIONS = {
    "v4": Generation("tpu-ubuntu2204-base", counts_cores=True, sizes=None),
    "v5p": Generation("v2-alpha-tpuv5", counts_cores=True, sizes=None),
    "v5litepod": Generation("v2-alpha-tpuv5-lite", counts_cores=False, sizes=(1, 4, 8, 16, 32, 64, 128, 256)),
    "v6e": Generation("v2-alpha-tpuv6e", counts_cores=False, sizes=(1, 4, 8, 16, 32, 64, 128, 256)),
}


@dataclasses.dataclass(frozen=True)
class Slice:
  accelerator_type: str
  generation: str
  chips: int
  hosts: int

  @property
  def chips_per_host(self) -> int:
    return self.chips // self.hosts

  def header(self) -> str:
    word = "worker" if self.hosts == 1 else "workers"
    return (f"# {self.accelerator_type}: {self.hosts} {word} "
            f"({self.chips} chips, {self.chips_per_host} per host)")


def parse_accelerator(accelerator_type: str) -> Slice:
  """'v5p-64' -> Slice(chips=32, hosts=8). Raises LaunchError for anything not in the table above."""
  gen, _, size = accelerator_type.rpartition("-")
  if gen == "v5e":
    raise LaunchError(f"accelerator type {accelerator_type!r}: gcloud names v5e slices "
                      f"'v5litepod-N', e.g. v5litepod-{size}")
  if gen not in GENERATIONS or not size.isdigit():
    raise LaunchError(f"unknown accelerator type {accelerator_type!r}; expected one of "
                      f"{', '.join(g + '-N' for g in GENERATIONS)} (e.g. v5p-64, v6e-256, v5litepod-16)")
  n, g = int(size), GENERATIONS[gen]
  if g.counts_cores:
    if n < 8 or n % 8:
      raise LaunchError(f"accelerator type {accelerator_type!r}: {gen}-N counts TensorCores and N must be "
                        "a multiple of 8 (8 cores = 4 chips = one host)")
    return Slice(accelerator_type, gen, chips=n // 2, hosts=n // 8)
  if n not in g.sizes:
    raise LaunchError(f"accelerator type {accelerator_type!r}: {gen}-N counts chips and N must be one of "
                      f"{', '.join(map(str, g.sizes))}")
  return Slice(accelerator_type, gen, chips=n, hosts=1 if n <= 8 else n // 4)


# --------------------------------------------------------------------------------------------------
# Running (or printing) commands.
# --------------------------------------------------------------------------------------------------


class Shell:
  """Runs commands, or with dry_run prints each one (shlex.join) to stdout and runs nothing."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def note(self, text: str) -> None:
    print(f"# {text}" if self.dry_run else f"[tpu_pod] {text}", file=sys.stdout if self.dry_run else sys.stderr)

  def run(self, cmd: Sequence[str]) -> None:
    if self.dry_run:
      print(shlex.join(cmd))
      return
    print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    subprocess.run(list(cmd), check=True)

  def output(self, cmd: Sequence[str]) -> str:
    return subprocess.run(list(cmd), check=True, capture_output=True, text=True).stdout.strip()


def gcloud(args: argparse.Namespace, *cmd: str, track: str | None = None) -> list[str]:
  """`gcloud [track] compute tpus ...cmd --zone=Z --project=P`."""
  return ["gcloud", *([track] if track else []), "compute", "tpus", *cmd,
          f"--zone={args.zone}", f"--project={args.project}"]


def ssh(args: argparse.Namespace, command: str, worker: str = "all") -> list[str]:
  return gcloud(args, "tpu-vm", "ssh", args.name, f"--worker={worker}", f"--command={command}")


# --------------------------------------------------------------------------------------------------
# Subcommands.
# --------------------------------------------------------------------------------------------------


def cmd_create(args: argparse.Namespace, sh: Shell) -> None:
  sl = parse_accelerator(args.accelerator_type)
  runtime = args.runtime_version or GENERATIONS[sl.generation].runtime_version
  flags = [f"--{args.provisioning}"] if args.provisioning else []
  # --best-effort is only in the alpha track of gcloud.
  track = "alpha" if args.provisioning == "best-effort" else None
  sh.run(gcloud(args, "queued-resources", "create", args.name, f"--node-id={args.name}",
                f"--accelerator-type={args.accelerator_type}", f"--runtime-version={runtime}",
                *flags, track=track))
  if not args.no_wait:
    wait_active(args, sh)


def wait_active(args: argparse.Namespace, sh: Shell) -> None:
  """Polls `queued-resources describe` until the request is ACTIVE (fails on FAILED/SUSPENDED)."""
  cmd = gcloud(args, "queued-resources", "describe", args.name, "--format=value(state.state)")
  if sh.dry_run:
    sh.note(f"poll every {args.poll_s}s until the state is ACTIVE:")
    sh.run(cmd)
    return
  start, last = time.time(), None
  while True:
    state = sh.output(cmd)
    if state != last:
      sh.note(f"{args.name}: {state} after {time.time() - start:.0f}s")
      last = state
    if state == "ACTIVE":
      return
    if state in ("FAILED", "SUSPENDED"):
      raise LaunchError(f"queued resource {args.name} is {state}; see "
                        f"`{shlex.join(gcloud(args, 'queued-resources', 'describe', args.name))}`")
    if args.wait_timeout_s and time.time() - start > args.wait_timeout_s:
      raise LaunchError(f"queued resource {args.name} not ACTIVE after {args.wait_timeout_s}s (state {state})")
    time.sleep(args.poll_s)


def cmd_setup(args: argparse.Namespace, sh: Shell) -> None:
  install = f"DIMR_INSTALL_ONLY=1 DIMR_REINSTALL={int(args.reinstall)} bash launch/run_tpu.sh"
  if args.git_url:
    branch = ["--branch", args.git_ref] if args.git_ref else []
    clone = shlex.join(["git", "clone", "--depth=1", *branch, args.git_url, REMOTE_DIR])
    sh.run(ssh(args, f"rm -rf {REMOTE_DIR} && {clone} && cd {REMOTE_DIR} && {install}"))
    return
  tarball = f"/tmp/dimr_jax_{args.name}.tar.gz"
  sh.run(["tar", "-czf", tarball, *(f"--exclude={p}" for p in TAR_EXCLUDES), "-C", str(REPO), "."])
  sh.run(gcloud(args, "tpu-vm", "scp", tarball, f"{args.name}:{REMOTE_TARBALL}", "--worker=all"))
  sh.run(ssh(args, f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && tar -xzf {REMOTE_TARBALL} -C {REMOTE_DIR} "
                   f"&& cd {REMOTE_DIR} && {install}"))


def train_command(args: argparse.Namespace) -> str:
  """The shell command each worker runs from $HOME (run_tpu.sh cds into the code dir itself)."""
  train = shlex.join(["bash", f"{REMOTE_DIR}/launch/run_tpu.sh", f"--config={args.config}",
                      f"--workdir={args.workdir}", *args.overrides])
  if not args.background:
    return f"DIMR_DISTRIBUTED=1 {train}"
  log, pid = shlex.quote(args.log), shlex.quote(args.log + ".pid")
  return (f"mkdir -p {shlex.quote(os.path.dirname(args.log) or '.')} && "
          f"DIMR_DISTRIBUTED=1 nohup {train} > {log} 2>&1 < /dev/null & echo $! > {pid}")


def check_run_args(args: argparse.Namespace) -> None:
  """Errors for a missing --config/--workdir; a warning for a local workdir on a multi-host slice."""
  if not args.config:
    raise LaunchError(f"{args.command} needs --config=configs/<file>.py")
  if not args.workdir:
    raise LaunchError(f"{args.command} needs --workdir (a gs://bucket/path every worker can write)")
  sl = parse_accelerator(args.accelerator_type)
  if sl.hosts > 1 and not args.workdir.startswith("gs://"):
    print(f"warning: --workdir={args.workdir} is not a gs:// path, but {args.accelerator_type} has {sl.hosts} "
          "hosts: each would write checkpoints and logs to its own disk and multi-host checkpointing fails. "
          "Use --workdir=gs://BUCKET/PATH.", file=sys.stderr)


def cmd_run(args: argparse.Namespace, sh: Shell) -> None:
  if args.command == "run":  # `all` checked before creating the slice
    check_run_args(args)
  try:
    sh.run(ssh(args, train_command(args)))
  finally:  # a failed or interrupted foreground run still gives the slice back
    if args.delete_after and not args.background:
      cmd_delete(args, sh)
  if args.background:
    sh.note(f"started in the background; follow it with: python launch/tpu_pod.py logs --name={args.name} "
            f"--zone={args.zone} --project={args.project}")


def cmd_logs(args: argparse.Namespace, sh: Shell) -> None:
  follow = "-F " if args.follow else ""
  sh.run(ssh(args, f"tail -n {args.lines} {follow}{shlex.quote(args.log)}", worker=args.worker))


def cmd_stop(args: argparse.Namespace, sh: Shell) -> None:
  pid = shlex.quote(args.log + ".pid")
  sh.run(ssh(args, f"if [ -f {pid} ]; then kill $(cat {pid}) || true; rm -f {pid}; fi"))


def cmd_delete(args: argparse.Namespace, sh: Shell) -> None:
  # --force also deletes the TPU VMs the queued resource created.
  sh.run(gcloud(args, "queued-resources", "delete", args.name, "--force", "--quiet"))


def cmd_all(args: argparse.Namespace, sh: Shell) -> None:
  check_run_args(args)  # fail before booking a slice if `run` would
  cmd_create(args, sh)
  cmd_setup(args, sh)
  cmd_run(args, sh)


# --------------------------------------------------------------------------------------------------
# CLI.
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  common.add_argument("--name", required=True, help="queued resource and TPU node name")
  common.add_argument("--zone", required=True)
  common.add_argument("--project", required=True)
  common.add_argument("--accelerator_type", "--accelerator-type", help="e.g. v5p-64, v6e-256, v5litepod-16")
  common.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                      help="print every command, run nothing")
  common.add_argument("--log", default="dimr_logs/train.log",
                      help="log of a --background run on each worker, relative to $HOME (setup keeps it)")

  create = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  create.add_argument("--runtime_version", "--runtime-version", help="TPU VM image; default per generation")
  prov = create.add_mutually_exclusive_group()
  prov.add_argument("--spot", dest="provisioning", action="store_const", const="spot")
  prov.add_argument("--reserved", dest="provisioning", action="store_const", const="reserved")
  prov.add_argument("--best-effort", "--best_effort", dest="provisioning", action="store_const", const="best-effort")
  create.add_argument("--no_wait", action="store_true", help="do not poll until ACTIVE")
  create.add_argument("--poll_s", type=int, default=30)
  create.add_argument("--wait_timeout_s", type=int, default=0, help="0: wait forever")

  setup = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  setup.add_argument("--git_url", help="clone this on every worker instead of copying the local checkout")
  setup.add_argument("--git_ref", help="branch or tag for --git_url")
  setup.add_argument("--reinstall", action="store_true", help="pip install again (DIMR_REINSTALL=1)")

  run = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  run.add_argument("--config", help="configs/<file>.py[:arg]")
  run.add_argument("--workdir", help="gs://BUCKET/PATH for multi-host slices")
  run.add_argument("--background", action="store_true",
                   help="nohup the run into --log on every worker and return (see `logs`, `stop`)")
  run.add_argument("--delete_after", action="store_true",
                   help="delete the slice when a foreground run ends (also on failure or Ctrl-C)")

  logs = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  logs.add_argument("--worker", default="0")
  logs.add_argument("--lines", type=int, default=100)
  logs.add_argument("--no_follow", dest="follow", action="store_false")

  parser = argparse.ArgumentParser(prog="tpu_pod.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                   epilog="Arguments --config.key=value are passed to the training run.")
  sub = parser.add_subparsers(dest="command", required=True)
  table = {
      "create": ([create], cmd_create), "setup": ([setup], cmd_setup), "run": ([run], cmd_run),
      "logs": ([logs], cmd_logs), "stop": ([], cmd_stop), "delete": ([], cmd_delete),
      "all": ([create, setup, run], cmd_all),
  }
  for name, (parents, fn) in table.items():
    p = sub.add_parser(name, parents=[common, *parents], allow_abbrev=False)
    p.set_defaults(fn=fn)
  return parser


NEEDS_ACCELERATOR = ("create", "run", "all")


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    rest, overrides = split_overrides(argv)
    args = build_parser().parse_args(rest)
    args.overrides = overrides
    if overrides and args.command not in ("run", "all"):
      raise LaunchError(f"config overrides ({overrides[0]} ...) only apply to `run` and `all`")
    if args.accelerator_type:
      sl = parse_accelerator(args.accelerator_type)
      print(sl.header())
    elif args.command in NEEDS_ACCELERATOR:
      raise LaunchError(f"{args.command} needs --accelerator_type (e.g. v5p-64)")
    if not args.dry_run and not shutil.which("gcloud"):
      raise LaunchError("gcloud not found on PATH (install the Google Cloud CLI, or use --dry-run)")
    args.fn(args, Shell(args.dry_run))
  except LaunchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except SystemExit as e:  # argparse: --help, or a usage error it already printed
    return e.code if isinstance(e.code, int) else 2
  except subprocess.CalledProcessError as e:
    print(f"error: command failed with exit status {e.returncode}: {shlex.join(e.cmd)}", file=sys.stderr)
    return e.returncode or 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
