"""Where device time goes, by model part: a ``jax.profiler`` trace joined with XLA's HLO dump.

:mod:`benchmarks.trace_summary` groups kernels by name; names such as ``gemm_fusion_dot_241``
or ``nvjet_sm90_...`` do not say which layer or pass they serve. Each GPU kernel event carries
the HLO instruction it ran (``args.hlo_op``), and XLA's optimized HLO (``--xla_dump_to=DIR
--xla_dump_hlo_as_text``) carries, for every instruction, the JAX ``op_name`` it came from
(``jit(counted)/transpose(jvp(CausalLMModule))/model/layers/3/mlp/up_proj/dot_general``). This
module joins the two and sums time per

* phase: ``bwd`` when the name stack holds ``transpose(`` (the backward pass), else ``fwd``;
* part: the loss (the chunked loss's ``while`` loop), the step outside the model (optimizer,
  finiteness guard), a projection (``q_proj`` ... ``down_proj``), the attention core with rotary,
  the MLP activation, the norms;
* kernel kind (:func:`benchmarks.trace_summary.kernel_kind`): bf16 cuBLAS GEMM, other GEMM
  (float32 cuBLAS), Triton GEMM fusion, cuDNN attention, copy, other (elementwise and reductions).

Run the step with CUDA command buffers off, so that each kernel names its own instruction::

    XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=^$ --xla_gpu_enable_command_buffer=" \\
      python -m benchmarks.train_throughput --shape 1b --batch 8 --seq 1024 --loss chunked --no-peft \\
        --methods lora --profile lora --profile-dir /tmp/prof
    python -m benchmarks.trace_attribution /tmp/prof/lora /tmp/dump --steps 2 --json lora_attribution.json
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re

from benchmarks.trace_summary import device_events, kernel_kind

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = ")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def hlo_op_names(hlo_text: str) -> dict:
    """``{instruction: op_name}`` from an optimized HLO module's text. An instruction without
    metadata of its own (most fusions) gets the most common ``op_name`` inside the computation it
    calls."""
    own, calls, inside = {}, {}, collections.defaultdict(collections.Counter)
    computation = None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m and not line.startswith(" "):
            computation = m.group(1)
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name = m.group(1)
        op = _OP_NAME.search(line)
        if op:
            own[name] = op.group(1)
            inside[computation][op.group(1)] += 1
        c = _CALLS.search(line)
        if c:
            calls[name] = c.group(1)
    out = dict(own)
    for name, callee in calls.items():
        if name not in out and inside[callee]:
            out[name] = inside[callee].most_common(1)[0][0]
    return out


def model_part(op_name: str) -> tuple[str, str]:
    """``(phase, part)`` of a JAX op_name (see the module docstring)."""
    s = op_name.lower()
    phase = "bwd" if "transpose(" in s else "fwd"
    if "while" in s:
        return phase, "loss"
    if "jvp(" not in s:
        return "step", "optimizer/guard"
    for p in PROJECTIONS:
        if p in s:
            return phase, p
    if "self_attn" in s or "attention" in s:
        return phase, "attention core/rope"
    if "norm" in s:
        return phase, "norm"
    if "mlp" in s:
        return phase, "mlp activation"
    return phase, "model other"


def attribute(events: list, op_names: dict, steps: int = 1) -> dict:
    """Milliseconds per step by (phase, part), by kernel kind and by both; kernels whose
    instruction has no op_name are counted under part ``unattributed``."""
    by_part, by_kind, by_both = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        ms = float(e.get("dur", 0.0)) / 1e3 / steps
        op = op_names.get(str(e.get("args", {}).get("hlo_op", "")))
        phase, part = model_part(op) if op else ("?", "unattributed")
        kind = kernel_kind(e["name"])
        by_part[f"{phase} {part}"] += ms
        by_kind[kind] += ms
        by_both[f"{phase} {part} | {kind}"] += ms
    r = lambda c: {k: round(v, 3) for k, v in c.most_common()}  # noqa: E731
    return {"busy_ms_per_step": round(sum(by_kind.values()), 3), "by_part": r(by_part), "by_kind": r(by_kind),
            "by_part_and_kind": r(by_both)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace_dir", help="the --profile-dir/<method> directory (jax.profiler trace)")
    ap.add_argument("dump_dir", help="the --xla_dump_to directory")
    ap.add_argument("--steps", type=int, default=2, help="steps in the trace (train_throughput traces 2)")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)
    modules = sorted(glob.glob(os.path.join(args.dump_dir, "*after_optimizations.txt")), key=os.path.getsize)
    if not modules:
        raise SystemExit(f"no '*after_optimizations.txt' under {args.dump_dir}: was the step run with --xla_dump_to?")
    events, _, _ = device_events(args.trace_dir)
    with open(modules[-1]) as f:  # the largest module is the train step
        result = attribute(events, hlo_op_names(f.read()), args.steps)
    print(f"device busy {result['busy_ms_per_step']:.1f} ms/step")
    for key in ("by_kind", "by_part", "by_part_and_kind"):
        print(key + ":")
        for k, v in list(result[key].items())[:40]:
            print(f"  {v:8.2f}  {k}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
