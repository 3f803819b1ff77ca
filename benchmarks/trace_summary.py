"""Where device time goes: a summary of a ``jax.profiler`` trace (perfetto JSON).

``summarize(dir, steps)`` reads the ``perfetto_trace.json.gz`` that
``jax.profiler.trace(dir, create_perfetto_trace=True)`` wrote, keeps complete events
(``ph == "X"``) of the device processes (names containing ``/device:``), and sums their
durations per kernel name and per coarse category, divided by ``steps``:

* ``matmul``    cuBLAS / cuBLASLt / CUTLASS kernels (``gemm``, ``nvjet``, ``cutlass``, ``sm90_xmma``)
* ``attention`` fused attention (``flash``, ``fmha``, ``cudnn``)
* ``copy``      memcpy / memset / transpose / copy fusions
* ``fusion``    other XLA fusions (elementwise, reductions, loss)
* ``other``     the rest

Kernels overlapping on several streams are summed, so ``busy_ms`` can exceed the wall time.
CPU-only traces have no device process: the summary then says so.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os


def kernel_kind(name: str) -> str:
    """The kind of a GPU kernel, from its name: ``triton-gemm`` (XLA's Triton GEMM fusions),
    ``cublas-bf16`` (cuBLASLt ``nvjet`` / bf16 ``xmma``), ``gemm-other`` (float32 cuBLAS, CUTLASS),
    ``cudnn-attention``, ``copy`` or ``other``."""
    n = name.lower()
    if "gemm_fusion" in n or "triton" in n:
        return "triton-gemm"
    if "nvjet" in n or ("xmma" in n and "bf16" in n):
        return "cublas-bf16"
    if any(s in n for s in ("gemm", "cutlass", "xmma", "cublas", "matmul", "dot")):
        return "gemm-other"
    if any(s in n for s in ("flash", "fmha", "cudnn", "sdpa", "attention")):
        return "cudnn-attention"
    if any(s in n for s in ("memcpy", "memset", "transpose", "copy")):
        return "copy"
    return "other"


_COARSE = {"triton-gemm": "matmul", "cublas-bf16": "matmul", "gemm-other": "matmul", "cudnn-attention": "attention",
           "copy": "copy"}


def _category(name: str) -> str:
    kind = kernel_kind(name)
    if kind in _COARSE:
        return _COARSE[kind]
    n = name.lower()
    return "fusion" if ("fusion" in n or "reduce" in n or "loop" in n) else "other"


def device_events(directory: str) -> tuple[list, list, str]:
    """``(complete device events, all process names, trace file)`` of the newest perfetto trace
    under ``directory``; ``FileNotFoundError`` when there is none."""
    files = sorted(glob.glob(os.path.join(directory, "**", "*perfetto_trace.json.gz"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no perfetto trace under {directory}")
    with gzip.open(files[-1], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    pnames = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            pnames[e.get("pid")] = str(e.get("args", {}).get("name", ""))
    device_pids = {pid for pid, n in pnames.items() if "/device:" in n and "host" not in n.lower()}
    device = [e for e in events if e.get("ph") == "X" and e.get("pid") in device_pids]
    return device, sorted(set(pnames.values())), files[-1]


def summarize(directory: str, steps: int = 1, top: int = 30) -> dict:
    try:
        events, processes, trace_file = device_events(directory)
    except FileNotFoundError as e:
        return {"error": str(e)}
    per_name = collections.Counter()
    count = collections.Counter()
    for e in events:
        per_name[e["name"]] += float(e.get("dur", 0.0))
        count[e["name"]] += 1
    if not per_name:
        return {"error": "no device events (CPU run?)", "processes": processes[:10]}
    per_cat = collections.Counter()
    for n, d in per_name.items():
        per_cat[_category(n)] += d
    ms = lambda us: round(us / 1e3 / steps, 3)
    return {
        "busy_ms_per_step": ms(sum(per_name.values())),
        "categories_ms_per_step": {k: ms(v) for k, v in per_cat.most_common()},
        "top_kernels_ms_per_step": [
            {"name": n[:160], "ms": ms(d), "calls_per_step": count[n] / steps} for n, d in per_name.most_common(top)
        ],
        "trace_file": trace_file,
    }


def format_summary(s: dict) -> str:
    if "error" in s:
        return s["error"]
    lines = [f"device busy {s['busy_ms_per_step']:.1f} ms/step; " + ", ".join(
        f"{k} {v:.1f}" for k, v in s["categories_ms_per_step"].items())]
    for k in s["top_kernels_ms_per_step"]:
        lines.append(f"  {k['ms']:8.3f} ms  x{k['calls_per_step']:<5g} {k['name']}")
    return "\n".join(lines)
