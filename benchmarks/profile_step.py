"""Per-kernel time of one benchmark case, from a JAX profiler trace (no TensorBoard needed).

    python benchmarks/profile_step.py --case=XL/2R:train:64:none --top=40

Builds the case exactly as ``bench.py`` does, traces ``--steps`` steps with ``jax.profiler``, parses
the XSpace with JAX's own ``ProfileData`` and prints, per step: the device time by kernel class
(GEMM, attention, convolution, other fusions, copies), the ``--top`` kernels by total time, and
(``--by_source``) the time per ``jax.named_scope`` of the model, forward and backward apart.
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
    ("conv", re.compile(r"conv2d|convolution|implicit|dgrad|wgrad|fprop", re.I)),
    ("copy/transpose", re.compile(r"memcpy|memset|copy|transpose", re.I)),
    ("reduce fusion", re.compile(r"reduc|input_", re.I)),
]


def classify(name: str) -> str:
  for cls, rx in _CLASSES:
    if rx.search(name):
      return cls
  return "other fusion"


def _add(table: dict, key, ns: float, count: int = 1) -> None:
  entry = table.setdefault(key, [0.0, 0])
  entry[0] += ns
  entry[1] += count


def kernel_times(trace_dir: str) -> tuple[dict, dict]:
  """Reads the trace once; kernel time (ns) and launch count by kernel name and by HLO op.

  Returns ``(by_kernel, by_op)``, values ``[ns, launches]``; by_op keys are (hlo_module, hlo_op).
  GPU kernels sit on the "Stream" lines of the device planes; on CPU the thunks sit on host
  threads and carry the same ``hlo_op`` stat.
  """
  from jax._src.lib import _profile_data
  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not files:
    raise SystemExit(f"no .xplane.pb under {trace_dir}")
  data = _profile_data.ProfileData.from_file(files[0])
  by_kernel, by_op = {}, {}
  on_device = any(pl.name.startswith("/device:") for pl in data.planes)
  for plane in data.planes:
    if on_device and not plane.name.startswith("/device:"):
      continue
    for line in plane.lines:
      # Stream lines hold the kernels; "XLA Ops"/"XLA Modules" lines summarise the same time.
      if on_device and not line.name.startswith("Stream"):
        continue
      for ev in line.events:
        stats = {k: v for k, v in ev.stats}
        if not on_device and "hlo_op" not in stats:
          continue
        _add(by_kernel, ev.name, ev.duration_ns)
        _add(by_op, (str(stats.get("hlo_module", "?")), str(stats.get("hlo_op", ev.name))),
             ev.duration_ns)
  if not by_kernel:
    print("no device kernel lines; planes/lines in the trace:",
          [(pl.name, [ln.name for ln in pl.lines][:8]) for pl in data.planes])
  return by_kernel, by_op


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def _hlo_modules(dump_dir: str):
  """Yields (module, [(computation, line, instruction match)]) from XLA's optimized-HLO text dumps."""
  for path in sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt"))):
    # module_0042.jit_train_step.sm_9.0_gpu_after_optimizations.txt -> jit_train_step
    module = os.path.basename(path).split(".")[1]
    lines, comp = [], None
    with open(path) as f:
      for line in f:
        c = _COMP.match(line)
        if c and "=" not in line.split("(")[0]:
          comp = c.group(1)
          continue
        m = _INSTR.match(line)
        if m:
          lines.append((comp, line, m))
    yield module, lines


def hlo_sources(dump_dir: str) -> dict[tuple[str, str], str]:
  """(module, HLO instruction) -> named-scope path, from XLA's optimized-HLO text dumps.

  An instruction without metadata (some fusions) takes the first op_name inside the computation
  it calls, else (marked '~', a guess) its first operand's.
  """
  out = {}
  for module, lines in _hlo_modules(dump_dir):
    comp_op, instrs = {}, []
    for comp, line, m in lines:
      op = _OP_NAME.search(line)
      if op and comp is not None:
        comp_op.setdefault(comp, op.group(1))
      calls = _CALLS.search(line)
      operands = re.findall(r"%([\w.\-]+)", line.split("=", 1)[1].split("metadata=")[0])
      instrs.append((m.group(1), op.group(1) if op else None, calls.group(1) if calls else None,
                     operands))
    ops = {}
    for name, op, calls, operands in instrs:
      # No metadata anywhere (a pass-made op): take the first operand's.
      op = op or comp_op.get(calls)
      guess = None if op else next((ops[o] for o in operands if ops.get(o)), None)
      ops[name] = op or guess
      out[(module, name)] = scope_of(op) if op else "~" + scope_of(guess or "?")
  return out


_SHAPE_OP = re.compile(r"=\s*(\S+?)\s+([\w\-]+)\(")
_KIND = re.compile(r"kind=(\w+)")
_BORING = {"parameter", "constant", "bitcast", "broadcast", "get-tuple-element", "tuple", "reshape"}


def hlo_signatures(dump_dir: str) -> dict[tuple[str, str], str]:
  """(module, HLO instruction) -> 'shape opcode[kind] {opcodes of the computation it calls}'.

  Ops of different blocks of an unrolled stage get the same signature, so ``--detail`` can sum
  them: it says *what* a fusion does (its output and the operations fused into it).
  """
  out = {}
  for module, hlo in _hlo_modules(dump_dir):
    comp_ops, lines = collections.defaultdict(set), []
    for comp, line, m in hlo:
      so = _SHAPE_OP.search(line)
      if not so:
        continue
      if comp is not None and so.group(2) not in _BORING:
        comp_ops[comp].add(so.group(2))
      lines.append((m.group(1), so.group(1).split("{")[0], so.group(2), _KIND.search(line),
                    _CALLS.search(line)))
    for name, shape, opcode, kind, calls in lines:
      inner = sorted(comp_ops.get(calls.group(1), ())) if calls else []
      kind = f"[{kind.group(1)}]" if kind else ""
      out[(module, name)] = f"{shape} {opcode}{kind} {{{','.join(inner)}}}"[:200]
  return out


def scope_of(op_name: str) -> str:
  """'jit(step)/transpose(jvp(stage0/attn))/norm/mul' -> 'bwd stage0/attn/norm mul'.

  The model's ``jax.named_scope``s (stage<r>, attn, mlp, norm, dwconv, skip, upsample, features,
  head; optimizer in the train step) make the path; jvp/transpose/remat wrappers are dropped.
  """
  bwd = "bwd" if "transpose(" in op_name else "fwd"
  parts = [p for p in re.split(r"[/()]", re.sub(r"^jit\([^)]*\)/", "", op_name)) if p]
  parts = [p for p in parts if p not in ("jvp", "transpose", "checkpoint", "remat", "rematted_computation",
                                         "jit", "pjit", "while", "body", "vmap", "closed_call")]
  if not parts:
    return f"{bwd} ?"
  return f"{bwd} {'/'.join(dict.fromkeys(parts[:-1]))} {parts[-1]}"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--case", default="XL/2R:train:64:none")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--top", type=int, default=40)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--attention_impl", default="")
  p.add_argument("--scan_unroll", type=int, default=0)
  p.add_argument("--pallas_ops", default="auto", help="model.pallas_ops, as in bench.py")
  p.add_argument("--mgpu_fields", default="", help="as in bench.py")
  p.add_argument("--trace_dir", default="")
  p.add_argument("--by_source", type=int, default=40,
                 help="also dump the optimized HLO and print the top N named scopes by time "
                      "(0: off; on also turns command buffers off for the traced run)")
  p.add_argument("--detail", default="",
                 help="regex on the scope (e.g. 'bwd stage0/attn'): list its HLO ops summed over "
                      "the blocks by what they compute (output shape, fused opcodes); needs "
                      "--by_source")
  p.add_argument("--detail_top", type=int, default=100)
  args = p.parse_args(argv)
  dump_dir = ""
  if args.by_source:
    dump_dir = tempfile.mkdtemp(prefix="dimr_hlo_")
    # Command buffers (CUDA graphs) would hide which HLO op launched a kernel: off while profiling.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_dump_to={dump_dir} --xla_dump_hlo_as_text"
                               " --xla_gpu_enable_command_buffer=").strip()
  run, res, _, _ = bench.build(args.case, args)
  for _ in range(2):
    jax.block_until_ready(run())
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="dimr_trace_")
  jax.profiler.start_trace(trace_dir)
  for _ in range(args.steps):
    jax.block_until_ready(run())
  jax.profiler.stop_trace()
  times, by_op = kernel_times(trace_dir)
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
  if dump_dir:
    src = hlo_sources(dump_dir)
    agg, scopes = {}, {}
    for op, (t, c) in by_op.items():
      _add(agg, src.get(op, f"? {op[1]}"), t, c)
    for where, (t, c) in agg.items():
      _add(scopes, where.rsplit(" ", 1)[0], t, c)
    for title, table in (("named scope", scopes), ("named scope + primitive", agg)):
      print(f"top {args.by_source} by {title} (ms/step, kernels/step, fwd|bwd scope):")
      for where, (t, c) in sorted(table.items(), key=lambda kv: -kv[1][0])[: args.by_source]:
        print(f"  {per_step(t):8.3f} {c / args.steps:6.0f}  {where[:120]}")
    if args.detail:
      sig, rx, detail = hlo_signatures(dump_dir), re.compile(args.detail), {}
      for op, (t, c) in by_op.items():
        where = src.get(op, f"? {op[1]}")
        if rx.search(where):
          _add(detail, f"{where[:48]:48s} {sig.get(op, op[1])}", t, c)
      print(f"ops of scopes matching {args.detail!r} by signature (ms/step, launches/step):")
      for what, (t, c) in sorted(detail.items(), key=lambda kv: -kv[1][0])[:args.detail_top]:
        print(f"  {per_step(t):8.3f} {c / args.steps:6.0f}  {what}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
