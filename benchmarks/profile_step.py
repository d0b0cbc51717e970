"""Per-kernel time of one benchmark case, from a JAX profiler trace (no TensorBoard needed).

    python benchmarks/profile_step.py --case=XL/2R:train:64:none --top=40

Builds the case exactly as ``bench.py`` does, traces ``--steps`` steps with ``jax.profiler``, parses
the XSpace with JAX's own ``ProfileData`` and prints, per step: the device time by kernel class
(GEMM, attention, convolution, other fusions, copies), then the ``--top`` kernels by total time.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

_CLASSES = [
    ("attention", re.compile(r"sdpa|fmha|flash|attention|mha", re.I)),
    ("gemm", re.compile(r"gemm|xmma|cutlass|nvjet|matmul|dot|wgmma|sm90", re.I)),
    ("conv", re.compile(r"conv|implicit|dgrad|wgrad|fprop", re.I)),
    ("copy/transpose", re.compile(r"memcpy|memset|copy|transpose", re.I)),
    ("reduce fusion", re.compile(r"reduc|input_", re.I)),
]


def classify(name: str) -> str:
  for cls, rx in _CLASSES:
    if rx.search(name):
      return cls
  return "other fusion"


def kernel_times(trace_dir: str) -> dict[str, tuple[float, int]]:
  """Sums device kernel durations (ns) by kernel name over every GPU stream in the trace."""
  from jax._src.lib import _profile_data
  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not files:
    raise SystemExit(f"no .xplane.pb under {trace_dir}")
  data = _profile_data.ProfileData.from_file(files[0])
  totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
  for plane in data.planes:
    if not plane.name.startswith("/device:"):
      continue
    for line in plane.lines:
      # Stream lines hold the kernels; "XLA Ops"/"XLA Modules" lines summarise the same time.
      if not line.name.startswith("Stream"):
        continue
      for ev in line.events:
        t = totals[ev.name]
        t[0] += ev.duration_ns
        t[1] += 1
  if not totals:
    print("no device kernel lines; planes/lines in the trace:",
          [(pl.name, [ln.name for ln in pl.lines][:8]) for pl in data.planes])
  return {k: (v[0], v[1]) for k, v in totals.items()}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--case", default="XL/2R:train:64:none")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--top", type=int, default=40)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--attention_impl", default="")
  p.add_argument("--scan_unroll", type=int, default=0)
  p.add_argument("--trace_dir", default="")
  args = p.parse_args(argv)
  run, res, _ = bench.build(args.case, args)
  for _ in range(2):
    jax.block_until_ready(run())
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="dimr_trace_")
  jax.profiler.start_trace(trace_dir)
  for _ in range(args.steps):
    jax.block_until_ready(run())
  jax.profiler.stop_trace()
  times = kernel_times(trace_dir)
  total = sum(t for t, _ in times.values())
  per_step = lambda ns: ns / args.steps / 1e6  # noqa: E731  ms per step
  print(f"{args.case} on {res['device']}: device kernel time {per_step(total):.1f} ms/step "
        f"(compile {res['compile_s']} s)")
  by_class = collections.Counter()
  for name, (t, _) in times.items():
    by_class[classify(name)] += t
  for cls, t in by_class.most_common():
    print(f"  {cls:16s} {per_step(t):8.2f} ms  {100 * t / total:5.1f}%")
  print(f"top {args.top} kernels (ms/step, launches/step, class):")
  for name, (t, c) in sorted(times.items(), key=lambda kv: -kv[1][0])[: args.top]:
    print(f"  {per_step(t):8.3f} {c / args.steps:6.0f}  {classify(name):14s} {name[:110]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
