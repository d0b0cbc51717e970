"""Weak scaling of the real train step over the GPUs of one host: data parallel and FSDP.

    python benchmarks/scaling.py --model=XL/2R --batch=64 --remat=none --devices=1,2,4,8 \
        --modes=dp,fsdp --extra=G/2R:train:128:block:1@2:fsdp --peak_tflops=788 \
        --out=benchmarks/results/h200x2_scaling.json

The per-device batch is fixed (weak scaling); each case is a ``bench.py`` case
(``MODEL:train:BATCH:REMAT@NDEV:MODE``) in its own process, one JAX process driving all of its
devices (the single-controller form of what ``launch/`` starts one process per host for).
Device counts above what is present are skipped and said so. Efficiency at N devices is
(img/s per device at N) / (img/s at 1 device) for the same model, batch and remat. ``--extra``
adds cases as they are (e.g. the largest G/2R batch that fits with FSDP). Writes the bench
records (each with ``scaling_efficiency`` where a 1-device baseline ran) and a Markdown table
next to the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import bench  # benchmarks/bench.py


def device_count() -> int:
  """Devices of the default backend, asked in a subprocess so this process never holds a GPU."""
  r = subprocess.run([sys.executable, "-c", "import jax; print(jax.device_count())"],
                     capture_output=True, text=True, check=True)
  return int(r.stdout.strip().splitlines()[-1])


def scaling_cases(model: str, batch: int, remat: str, devices: list[int], modes: list[str],
                  available: int) -> tuple[list[str], list[int]]:
  """The weak-scaling case list (1 device once: dp and fsdp coincide there) and skipped counts."""
  run = [n for n in devices if n <= available]
  cases = [f"{model}:train:{batch}:{remat}@1:dp"] if 1 in run else []
  cases += [f"{model}:train:{batch}:{remat}@{n}:{m}" for n in run if n > 1 for m in modes]
  return cases, [n for n in devices if n > available]


def add_efficiency(records: list[dict]) -> list[dict]:
  """Sets ``scaling_efficiency`` = per-device img/s / the 1-device img/s of the same setup."""
  key = lambda r: (r["model"], r["kind"], r["batch"], r["remat"], r.get("scan_unroll"))
  train = [r for r in records if "error" not in r and r["kind"] == "train"]
  base = {key(r): r["img_per_s"] for r in train if r["num_devices"] == 1}
  for r in train:
    if key(r) in base:
      r["scaling_efficiency"] = r["img_per_s_per_device"] / base[key(r)]
  return records


def table(records: list[dict]) -> str:
  head = ("| model | GPUs | mode | batch/GPU | global batch | remat | img/s | img/s per GPU | "
          "efficiency | step ms | peak GiB/GPU | MFU | device |\n|" + "---|" * 13)
  rows = []
  for r in records:
    if "error" in r:
      rows.append(f"| {r['case']} | | | | | | {r['error']} | | | | | | |")
      continue
    eff = f"{100 * r['scaling_efficiency']:.1f}%" if "scaling_efficiency" in r else "n/a"
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
    mode = "-" if r["num_devices"] == 1 else r["mode"]
    rows.append(f"| {r['model']} | {r['num_devices']} | {mode} | {r['batch']} | {r['global_batch']} | "
                f"{r['remat']} | {r['img_per_s']:.1f} | {r['img_per_s_per_device']:.1f} | {eff} | "
                f"{1e3 * r['step_time_s']:.1f} | {r['peak_mem_gib']:.1f} | {mfu} | {r['device']} |")
  return "\n".join([head] + rows)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="XL/2R")
  p.add_argument("--batch", type=int, default=64, help="per-device batch")
  p.add_argument("--remat", default="none")
  p.add_argument("--devices", default="1,2,4,8")
  p.add_argument("--modes", default="dp,fsdp")
  p.add_argument("--extra", default="", help="more bench.py cases, comma separated")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--attention_impl", default="")
  p.add_argument("--scan_unroll", type=int, default=0)
  p.add_argument("--pallas_ops", default="auto")
  p.add_argument("--peak_tflops", type=float, default=0.0)
  p.add_argument("--parallel_compile", action="store_true")
  p.add_argument("--timeout", type=int, default=400)
  p.add_argument("--out", default="")
  p.add_argument("--jsonl", default="", help="also append each record here as it finishes")
  args = p.parse_args(argv)
  modes = [m for m in args.modes.split(",") if m]
  if any(m not in bench.MODES for m in modes):
    p.error(f"--modes takes {bench.MODES}, got {modes}")
  for c in [c for c in args.extra.split(",") if c]:
    try:
      bench.parse_case(c)
    except ValueError as e:
      p.error(str(e))  # one line and exit 2, before anything starts
  available = device_count()
  cases, skipped = scaling_cases(args.model, args.batch, args.remat,
                                 [int(n) for n in args.devices.split(",") if n], modes, available)
  if skipped:
    print(f"skipped {skipped} devices: only {available} present", flush=True)
  cases += [c for c in args.extra.split(",") if c]
  records = add_efficiency(bench.run_cases(cases, args))
  text = table(records)
  print("\n" + text)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(records, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
      f.write(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
