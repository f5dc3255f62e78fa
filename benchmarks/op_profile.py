"""Per-operation profile of a compiled XLA:CPU program.

Runs a compiled function under ``jax.profiler.trace`` (with a Perfetto
trace), reads the per-thunk events (one per HLO instruction XLA:CPU
executes: fusions, dots, copies, ...), and attributes their durations to
the instructions of the optimized HLO (``compiled.as_text()``), grouped in
categories:

* ``matmul``: dots and YNNPACK/oneDNN dot fusions;
* ``transpose/copy``: fusions rooted in a copy or transpose (layout
  changes, often feeding weight-gradient matmuls);
* ``reduce``: fusions containing a reduction (LayerNorm statistics, bias
  gradients, softmax sums);
* ``elementwise``: other loop fusions;
* ``gather/scatter``, ``other``.

Each thunk's duration is its own; thunks may run in parallel on the
intra-op thread pool, so the per-step sum ("busy ms") can exceed the wall
time of a step.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import shutil
import tempfile

import jax

_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")


def _computations(text: str) -> dict[str, str]:
  """Name -> body of every computation of an HLO module text."""
  out = {}
  for chunk in re.split(r"\n(?=\S)", text):
    head = chunk.split("\n", 1)[0]
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) ", head)
    if m:
      out[m.group(1)] = chunk
  return out


def fusion_num_inputs(text: str) -> dict[str, int]:
  """Number of parameters of every fused computation in an HLO text."""
  out = {}
  for name, body in _computations(text).items():
    if "fused" in name or "fusion" in name:
      out[name] = len(re.findall(r" parameter\(\d+\)", body))
  return out


def max_fusion_inputs(text: str) -> int:
  """The largest number of inputs of any fused computation (0 if none).

  A fusion that recomputes a long elementwise chain (instead of reading it
  once from memory) needs every input of the chain, so this number grows
  with the length of the chain duplicated into it.
  """
  counts = fusion_num_inputs(text)
  return max(counts.values(), default=0)


def _opcode(rhs: str) -> str:
  """The opcode of an instruction's right-hand side ``shape opcode(...)``."""
  if rhs.startswith("("):  # tuple shape: skip to its closing parenthesis
    depth = 0
    for i, ch in enumerate(rhs):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        rhs = rhs[i + 1 :]
        break
  else:
    rhs = rhs.split(" ", 1)[-1]
  m = re.match(r"\s*([\w-]+)\(", rhs)
  return m.group(1) if m else ""


def _category(rhs: str, comps: dict[str, str]) -> str:
  op = _opcode(rhs)
  if op in ("dot", "convolution", "custom-call"):
    return "matmul"
  if op in ("copy", "transpose"):
    return "transpose/copy"
  if op in ("gather", "scatter", "dynamic-slice", "dynamic-update-slice"):
    return "gather/scatter"
  if op in ("reduce", "reduce-window"):
    return "reduce"
  if op != "fusion":
    return "other"
  if re.search(r"\"kind\":\"__(ynn|xnn|onednn)", rhs):
    return "matmul"
  m = re.search(r"calls=%?([\w.\-]+)", rhs)
  body = comps.get(m.group(1), "") if m else ""
  if re.search(r" dot\(", body):
    return "matmul"
  if re.search(r" (scatter|gather)\(", body):
    return "gather/scatter"
  if re.search(r" reduce\(", body):
    return "reduce"
  root = re.search(r"ROOT %?[\w.\-]+ = \S+ (\w[\w-]*)\(", body)
  if root and root.group(1) in ("copy", "transpose"):
    return "transpose/copy"
  return "elementwise"


def instruction_table(text: str) -> dict[str, dict]:
  """Instruction name -> {category, op_name metadata} for an HLO text."""
  comps = _computations(text)
  table = {}
  for line in text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    name, rhs = m.groups()
    meta = re.search(r'op_name="([^"]*)"', rhs)
    table[name] = {
      "category": _category(rhs, comps),
      "op_name": meta.group(1) if meta else "",
    }
  return table


def profile(compiled, args, calls: int = 10, top: int = 25) -> dict:
  """Per-op and per-category busy time of ``compiled(*args)``.

  Args:
    compiled: a ``jax.stages.Compiled`` (``jit(f).lower(...).compile()``);
      it must not donate its arguments.
    args: its arguments.
    calls: calls to trace (after one warm-up call).
    top: how many of the most expensive ops to list.

  Returns:
    ``{"calls", "busy_ms_per_call", "by_category": {cat: {ms, count}},
    "top_ops": [{name, category, op_name, ms_per_call}, ...],
    "max_fusion_inputs"}``.
  """
  text = compiled.as_text()
  table = instruction_table(text)
  events = _traced_events(lambda: compiled(*args), calls)
  per_op = collections.Counter()
  for e in events:
    if e.get("name") in table:
      per_op[e["name"]] += e.get("dur", 0) / 1e3 / calls  # us -> ms
  by_cat: dict[str, dict] = {}
  for name, ms in per_op.items():
    c = by_cat.setdefault(table[name]["category"], {"ms": 0.0, "count": 0})
    c["ms"] += ms
    c["count"] += 1
  return {
    "calls": calls,
    "busy_ms_per_call": sum(per_op.values()),
    "by_category": dict(sorted(by_cat.items(), key=lambda kv: -kv[1]["ms"])),
    "top_ops": [
      {"name": n, "ms_per_call": ms, **table[n]}
      for n, ms in per_op.most_common(top)
    ],
    "max_fusion_inputs": max_fusion_inputs(text),
  }


def _traced_events(fn, calls: int) -> list[dict]:
  """Complete ("X") trace events of ``calls`` calls of ``fn`` (after one)."""
  jax.block_until_ready(fn())
  tmp = tempfile.mkdtemp(prefix="op_profile_")
  try:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      out = None
      for _ in range(calls):
        out = fn()
      jax.block_until_ready(out)
    (path,) = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)
    with gzip.open(path) as f:
      trace = json.load(f)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return [e for e in events if e.get("ph") == "X"]


def concurrency(fn, text: str, calls: int = 10) -> dict:
  """How many of a program's instructions run at once, on average.

  Over ``calls`` calls of ``fn`` (one run of the program whose optimized
  HLO is ``text``; it may thread donated state, the calls are not blocked
  on one by one), ``busy`` sums the durations of the events that are
  instructions of ``text`` (on every device of a sharded program) and
  ``span`` runs from the first one's start to the last one's end. Their
  ratio is the mean number of instructions executing at once. A library
  dot that splits itself over the cores is one event, so this counts
  instructions, not busy cores: it is a lower bound on core use.

  Returns:
    ``{"calls", "busy_ms_per_call", "span_ms_per_call", "mean_concurrency"}``.
  """
  table = instruction_table(text)
  ops = [e for e in _traced_events(fn, calls) if e.get("name") in table]
  busy = sum(e.get("dur", 0) for e in ops)
  span = max(e["ts"] + e.get("dur", 0) for e in ops) - min(e["ts"] for e in ops)
  return {
    "calls": calls,
    "busy_ms_per_call": busy / 1e3 / calls,
    "span_ms_per_call": span / 1e3 / calls,
    "mean_concurrency": busy / span,
  }
