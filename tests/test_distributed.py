"""A 2-process ``jax.distributed`` run on localhost (CPU), the way the launchers start a pod.

Two ``python -m dimr_jax.main`` processes with ``DIMR_DISTRIBUTED=1`` and explicit coordinates, each
with 2 fake CPU devices, form one 4-device mesh; each process reads its own ``process_index::2``
share of the data and feeds its half of every global batch (CPU collectives: gloo). Both write the
checkpoint into the same local directory (orbax multi-process), only process 0 writes logs. The
checkpoint must then restore in ONE process (this test process): EMA parameters alone, and the full
train state.
"""
import functools
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from dimr_jax import checkpoint as ckpt_lib
from dimr_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "configs" / "dimr_mu_digits.py")
NUM_PROCESSES = 2
STEPS = 2
# Short CPU compiles: the run is dominated by compiling init and the train step in both processes.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _free_port() -> int:
  """A port that is free on 127.0.0.1 right now (the coordinator binds it a moment later)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(process_id: int, port: int) -> dict:
  env = dict(os.environ)
  env.update({
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}",
      "DIMR_DISTRIBUTED": "1",
      "DIMR_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
      "DIMR_NUM_PROCESSES": str(NUM_PROCESSES),
      "DIMR_PROCESS_ID": str(process_id),
      # JAX's coordinator binds [::]:port by default; keep it on the loopback interface.
      "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",
      # Cross-process collectives on CPU (JAX's default in recent releases; explicit for older).
      "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
      "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
  })
  env.pop("DIMR_LOCAL_DEVICE_IDS", None)
  return env


def _launch(workdir: pathlib.Path, logdir: pathlib.Path, timeout: float = 300.0):
  """Starts all processes, waits for them; returns [(returncode, log text)] by process id."""
  port = _free_port()
  cmd = [sys.executable, "-m", "dimr_jax.main", f"--config={DIGITS}:test", f"--workdir={workdir}",
         "--config.model.variant=mu/2R", "--config.sample_every=0",
         f"--config.total_steps={STEPS}", f"--config.ckpt_every={STEPS}", "--config.log_every=1"]
  procs, logs = [], []
  for i in range(NUM_PROCESSES):
    log = open(logdir / f"process_{i}.log", "w")  # a file, not a pipe: orbax logs a lot
    logs.append(log)
    procs.append(subprocess.Popen(cmd, env=_env(i, port), cwd=REPO, stdout=log,
                                  stderr=subprocess.STDOUT))
  deadline = time.monotonic() + timeout
  try:
    # Poll rather than wait on each in turn: when one process fails, its peer would otherwise block
    # in a collective (or in jax.distributed's start-up barrier) for minutes.
    while time.monotonic() < deadline:
      codes = [p.poll() for p in procs]
      if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
        break
      time.sleep(0.5)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.close()
  return [(p.returncode, (logdir / f"process_{i}.log").read_text()) for i, p in enumerate(procs)]


def _tail(text: str, n: int = 40) -> str:
  return "\n".join(text.splitlines()[-n:])


def test_two_process_cpu_run_trains_and_restores_in_one_process(tmp_path):
  workdir = tmp_path / "run"
  results = _launch(workdir, tmp_path)
  for i, (rc, log) in enumerate(results):
    assert rc == 0, f"process {i} exited with {rc}:\n{_tail(log)}"
    assert f"process {i} of {NUM_PROCESSES}, 2 local / 4 global devices" in log, _tail(log)
    assert "mesh {'data': 4, 'fsdp': 1}" in log, _tail(log)

  # Only process 0 logs: its console has the step lines, and metrics.jsonl holds each step once.
  assert f"[dimr_jax] step {STEPS}/{STEPS}" in results[0][1]
  assert "[dimr_jax] step" not in results[1][1]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  assert all(np.isfinite(r["loss"]) for r in rows)
  assert len(list((workdir / "tb").glob("events.out.tfevents.*"))) == 1

  # One checkpoint, written jointly; each process saved the position of its own data shard.
  assert ckpt_lib.latest_step(str(workdir)) == STEPS
  step_dir = workdir / str(STEPS)
  for i in range(NUM_PROCESSES):
    pos = json.loads((step_dir / "data" / f"process_{i}-of-{NUM_PROCESSES}.json").read_text())
    assert pos["next_index"] == STEPS, pos

  # Restore in ONE process: the model from the saved config, the EMA parameters alone on one device.
  config = ckpt_lib.restore_config(str(workdir))
  assert config.model.variant == "mu/2R" and config.total_steps == STEPS
  abs_params = nnx.state(train.abstract_model(config), nnx.Param)
  ema = ckpt_lib.restore_ema_params(str(workdir), abs_params)
  leaves = jax.tree.leaves(ema)
  assert leaves and all(len(a.devices()) == 1 for a in leaves)
  assert all(np.isfinite(np.asarray(a)).all() for a in leaves)

  # ... and the full train state (params, AdamW moments, EMA, step) as well.
  tx = train.make_optimizer(config)
  abs_state = jax.eval_shape(functools.partial(train.init_state, config, tx), jax.random.key(0))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abs_state)
  mngr = ckpt_lib.make_manager(str(workdir), async_save=False, with_data=False)
  try:
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
    state = mngr.restore(STEPS, args=args)["state"]
  finally:
    mngr.close()
  assert int(state["step"]) == STEPS
  for a, b in zip(jax.tree.leaves(state["ema_params"]), leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The training parameters moved (lr warms up from 0, so step 2 made the first update) and the EMA,
  # which starts equal to them, lags behind: the two differ.
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(state["params"]), leaves))
