"""Metric writing without TensorFlow: TensorBoard event files (tensorboardX) plus a JSONL log.

Only process 0 writes; other processes get a no-op writer. Also the periodic-action helper
``itstime`` and a console progress line with ETA.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Mapping

import jax
import numpy as np


def itstime(step: int, every: int, total: int, *, first: bool = False, last: bool = True) -> bool:
  """True when a periodic action is due at ``step`` (1-based count of finished steps)."""
  if every <= 0:
    return last and step == total
  return (step % every == 0) or (last and step == total) or (first and step == 1)


class MetricWriter:
  """Scalars to TensorBoard events (``workdir/tb``) and ``workdir/metrics.jsonl``; images to TB."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = workdir
    self._tb = None
    self._jsonl = None
    if self.enabled:
      from tensorboardX import SummaryWriter

      os.makedirs(workdir, exist_ok=True)
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    for k, v in clean.items():
      self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()

  def write_image(self, step: int, name: str, image_hwc_uint8: np.ndarray) -> None:
    if self.enabled:
      self._tb.add_image(name, image_hwc_uint8, step, dataformats="HWC")

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


class Progress:
  """Console progress: step, loss, img/s, steps/s and ETA, measured between calls."""

  def __init__(self, total_steps: int, start_step: int, global_batch: int):
    self.total, self.batch = total_steps, global_batch
    self._t0, self._s0 = time.perf_counter(), start_step
    self._t_last, self._s_last = self._t0, start_step

  def rates(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    dt = max(now - self._t_last, 1e-9)
    steps_per_s = (step - self._s_last) / dt
    self._t_last, self._s_last = now, step
    return {"steps_per_s": steps_per_s, "img_per_s": steps_per_s * self.batch}

  def line(self, step: int, loss: float, rates: Mapping[str, float]) -> str:
    # ETA from the latest rate: the first interval includes compilation and would mislead.
    sps = rates.get("steps_per_s", 0.0)
    eta = (self.total - step) / sps if sps > 0 and step > self._s0 + 1 else float("nan")
    return (f"step {step}/{self.total}  loss {loss:.4f}  {rates['img_per_s']:.1f} img/s  "
            f"{rates['steps_per_s']:.2f} steps/s  ETA {_fmt(eta)}")


def _fmt(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# Nominal dense bf16 peak per chip (FLOP/s), for the MFU estimate; override with config.peak_tflops.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12,
              "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v6 lite": 918e12,
              "TPU v6e": 918e12}


def peak_flops_per_device(override_tflops: float = 0.0) -> float | None:
  if override_tflops > 0:
    return override_tflops * 1e12
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return None


def plot_loss_curve(jsonl_path: str, out_png: str) -> str | None:
  """Loss (and per-resolution losses) vs step from the JSONL log, as a PNG."""
  if not os.path.exists(jsonl_path):
    return None
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [json.loads(l) for l in open(jsonl_path) if l.strip()]
  rows = [r for r in rows if "loss" in r]
  if not rows:
    return None
  fig, ax = plt.subplots(figsize=(6, 4))
  keys = ["loss"] + sorted(k for k in rows[0] if k.startswith("loss_"))
  for k in keys:
    pts = [(r["step"], r[k]) for r in rows if k in r]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k)
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_yscale("log")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out_png, dpi=100)
  plt.close(fig)
  logging.info("wrote %s", out_png)
  return out_png
