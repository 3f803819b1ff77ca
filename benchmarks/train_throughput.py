"""Training throughput, MFU and peak memory per method, ours beside PEFT, in one command.

    python -m benchmarks.train_throughput --shape 1b --methods frozen,lora,gralora4 \\
        --batch 8 --seq 1024 --steps 10 --warmup 3 --out benchmarks/results/1b

Each method runs in its own child process (``--worker``): peak-memory counters only grow
within a process, JAX and PyTorch must not share a GPU allocator, and an out-of-memory
method (full fine-tuning at 8B) must not end the run. The parent holds no device; it
collects one JSON line per child and writes ``<out>.json`` (raw numbers) and ``<out>.md``
(a table with tokens/s, MFU, step/compile time, peak memory and the ratios:
GraLoRA / our LoRA, ours / PEFT).

With ``--peft`` (default: when torch and peft import) each adapter method also runs as
``peft_<method>`` (and ``frozen`` as ``peft_frozen``). With ``--hf`` (default off) each of our
methods is followed by ``hf_<method>``: the same surgery, optimizer and train step on
transformers' own ``FlaxLlamaForCausalLM`` (stack "transformers FlaxLlama (jax)"); the table then
gains a column "ours vs HF Flax" (our tokens/s over its, our compile time over its; JSON field
``ours_vs_hf``). transformers 5 has no Flax: ``--hf-pythonpath DIR`` (default: the environment
variable ``BENCH_HF_PYTHONPATH``) is prepended to ``PYTHONPATH`` of the ``hf_`` children only,
e.g. a folder holding transformers 4.57.6 installed with ``pip install --target``.
``--budget S`` bounds the whole run: each child gets at most what is left of ``S`` seconds, and
methods that would start with less than 15 s left are recorded as skipped.

See :mod:`benchmarks.shapes` for the method names and the FLOP count,
:mod:`benchmarks.jax_step`, :mod:`benchmarks.hf_flax_step` and :mod:`benchmarks.peft_step`
for what exactly is timed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

from gralora_jax.layers import BLOCK_LAYOUTS, DEFAULT_BLOCK_LAYOUT

from benchmarks.shapes import (SHAPES, default_peak, hf_unsupported, parse_method, train_flops_per_token,
                               trainable_params)

RESULT_TAG = "RESULT_JSON "
MIN_CHILD_S = 15.0  # with --budget: a method is skipped when less than this is left


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--methods", default="frozen,lora,gralora2,gralora4,gralora4h16,full")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation (>= 1)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=128)
    ap.add_argument("--remat", default="none", help="our remat_policy (e.g. full); PEFT side: gradient checkpointing")
    ap.add_argument("--mesh", default="1x1", help="our mesh, data x model (e.g. 2x1, 1x2)")
    ap.add_argument("--loss", default="full", choices=("full", "chunked", "rows"),
                    help="our loss: full logits, chunked CE over the flattened batch, or per row (the library's)")
    ap.add_argument("--attn", default=None, choices=(None, "xla", "cudnn"), help="our attention implementation")
    ap.add_argument("--layout", default=DEFAULT_BLOCK_LAYOUT, choices=BLOCK_LAYOUTS,
                    help="GraLoRA block_layout of our methods (gralora_jax.layers.BLOCK_LAYOUTS)")
    ap.add_argument("--peft", dest="peft", action="store_true", default=None)
    ap.add_argument("--no-peft", dest="peft", action="store_false")
    ap.add_argument("--hf", action="store_true", help="also run hf_<m> (transformers FlaxLlama) after each method")
    ap.add_argument("--hf-pythonpath", default=None,
                    help="prepended to PYTHONPATH of hf_ children only (default: $BENCH_HF_PYTHONPATH)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (default: H200 bf16 datasheet)")
    ap.add_argument("--measure-matmul", action="store_true", help="also time a large bf16 matmul (device ceiling)")
    ap.add_argument("--inprocess", action="store_true", help="run methods in this process (tests; memory mixes)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per child process")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all children together (each gets min(--timeout, what is left))")
    ap.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    ap.add_argument("--label", default="", help="free text stored with the results")
    ap.add_argument("--profile", default="", help="comma list of our methods to trace (jax.profiler, 2 steps)")
    ap.add_argument("--profile-dir", default="/tmp/bench_profile", help="where traces go (<dir>/<method>)")
    ap.add_argument("--merge", nargs="+", default=None,
                    help="rebuild the report from these <out>.partial.json / <out>.json files (same shape/settings)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap


def _peft_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "peft", "transformers"))


def expand_methods(names: Sequence[str], peft: bool, hf: bool = False) -> list[str]:
    """With ``hf``, ``hf_<m>`` right after each of our methods (pairs survive a cut-short run);
    with ``peft``, ``peft_<m>`` for each adapter method (and ``frozen``) at the end.

    >>> expand_methods(["frozen", "lora", "full"], peft=True, hf=True)
    ['frozen', 'hf_frozen', 'lora', 'hf_lora', 'full', 'hf_full', 'peft_frozen', 'peft_lora']
    """
    out = []
    for n in names:
        if n not in out:
            out.append(n)
        if hf and parse_method(n).backend == "jax" and f"hf_{n}" not in out:
            out.append(f"hf_{n}")
    if peft:
        for n in names:
            m = parse_method(n)
            if m.backend == "jax" and (m.trains_adapters or m.kind == "frozen") and f"peft_{n}" not in out:
                out.append(f"peft_{n}")
    return out


def _measure_matmul(n: int = 8192, reps: int = 20) -> dict:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
        c = f(a, b)
    c.block_until_ready()
    dt = (time.perf_counter() - t0) / reps
    return {"method": "_matmul", "matmul_n": n, "matmul_tflops": 2 * n ** 3 / dt / 1e12, "device_kind": jax.devices()[0].device_kind}


def run_worker(args) -> dict:
    """Run one method in this process and return its raw result."""
    if args.worker == "_matmul":
        return _measure_matmul()
    shape = SHAPES[args.shape]
    method = parse_method(args.worker, rank=args.rank, alpha=args.alpha)
    common = dict(batch=args.batch, seq=args.seq, steps=args.steps, warmup=max(args.warmup, 1), remat=args.remat)
    if method.backend == "peft":
        from benchmarks.peft_step import run_peft

        res = run_peft(shape, method, **common)
    else:
        if method.backend == "hf":
            from benchmarks.hf_flax_step import run_hf as run
        else:
            from benchmarks.jax_step import run_jax as run

        prof = os.path.join(args.profile_dir, method.name) if method.name in args.profile.split(",") else None
        res = run(shape, method, mesh=args.mesh, loss=args.loss, attn=args.attn,
                  layout=args.layout, profile_dir=prof, **common)
        if prof:
            from benchmarks.trace_summary import summarize

            res["profile"] = summarize(prof, steps=2)
    res["method"] = method.name
    res["backend"] = method.backend
    return res


def _child_argv(args, method: str) -> list[str]:
    argv = [sys.executable, "-m", "benchmarks.train_throughput", "--worker", method]
    for flag in ("shape", "batch", "seq", "steps", "warmup", "rank", "alpha", "remat", "mesh", "loss",
                 "layout", "profile", "profile_dir"):
        argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.attn:
        argv += ["--attn", args.attn]
    return argv


_CACHE_DIR: Optional[str] = None


def hf_pythonpath(args) -> Optional[str]:
    """``--hf-pythonpath``, else ``$BENCH_HF_PYTHONPATH``, else None (empty counts as unset)."""
    value = args.hf_pythonpath if getattr(args, "hf_pythonpath", None) else os.environ.get("BENCH_HF_PYTHONPATH")
    return value or None


def _child_env(method: str = "", hf_path: Optional[str] = None) -> dict:
    """Children of one run share a fresh persistent XLA compilation cache: programs common to all
    methods (random init, adapter insertion, optimizer init) compile once per run; each method's
    train step is a different program, so its ``compile_s`` is still a real compile.

    ``hf_`` children (only those) get ``hf_path`` in front of ``PYTHONPATH``: transformers 4.x for
    FlaxLlama where the installed one (transformers 5, wanted by peft) has no Flax."""
    global _CACHE_DIR
    env = dict(os.environ)
    if hf_path and method.startswith("hf_"):
        old = env.get("PYTHONPATH")
        env["PYTHONPATH"] = hf_path + (os.pathsep + old if old else "")
    if "JAX_COMPILATION_CACHE_DIR" not in env:
        if _CACHE_DIR is None:
            _CACHE_DIR = tempfile.mkdtemp(prefix="bench_jax_cache_")
        env["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    return env


def _run_child(args, method: str, timeout: Optional[float] = None) -> dict:
    timeout = args.timeout if timeout is None else timeout
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(_child_argv(args, method), capture_output=True, text=True, timeout=timeout,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              env=_child_env(method, hf_pythonpath(args)))
    except subprocess.TimeoutExpired as e:
        return {"method": method, "error": f"timeout after {timeout:.0f}s", "tail": str(e.stderr)[-2000:]}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            res["process_s"] = time.perf_counter() - t0
            return res
    err = (proc.stderr or "")[-3000:]
    oom = any(s in err for s in ("RESOURCE_EXHAUSTED", "OutOfMemory", "out of memory", "Out of memory"))
    last = next((line.strip() for line in reversed(err.splitlines()) if line.strip()), "")
    error = "out of memory" if oom else f"exit code {proc.returncode}" + (f": {last[:200]}" if last else "")
    return {"method": method, "error": error, "tail": err}


def refused(args, method: str) -> Optional[str]:
    """Why ``method`` cannot run with these options (checked before starting a child; no jax import), or None."""
    if parse_method(method).backend != "hf":
        return None
    return hf_unsupported(args.remat, args.attn)


def derive(res: dict, args, peak_flops: float) -> dict:
    """Add tokens/s, FLOPs, TFLOP/s and MFU to one raw result."""
    if "error" in res or res.get("method") == "_matmul":
        return res
    shape = SHAPES[args.shape]
    method = parse_method(res["method"], rank=args.rank, alpha=args.alpha)
    tokens = args.batch * args.seq
    flops = train_flops_per_token(shape, args.seq, method) * tokens
    res["tokens_per_step"] = tokens
    res["tokens_per_s"] = tokens / res["step_s"]
    res["model_flops_per_step"] = flops
    res["model_tflops_per_s"] = flops / res["step_s"] / 1e12
    res["mfu"] = flops / res["step_s"] / (peak_flops * res.get("devices", 1))
    res["expected_trainable_params"] = trainable_params(shape, method)
    return res


def add_ratios(results: list[dict]) -> None:
    """``vs_lora`` (step time / the same stack's LoRA's, ours and hf; peak memory likewise),
    ``vs_peft`` (our tokens/s / PEFT's) and ``ours_vs_hf`` (our tokens/s / transformers FlaxLlama's,
    our compile time / its, our peak memory / its)."""
    by = {r["method"]: r for r in results if "error" not in r and "step_s" in r}
    prefixes = {"jax": "", "hf": "hf_"}
    for r in results:
        if "error" in r or "step_s" not in r:
            continue
        prefix = prefixes.get(r.get("backend"))
        lora = by.get(f"{prefix}lora") if prefix is not None else None
        if lora and r["method"].startswith(f"{prefix}gralora"):
            r["step_vs_lora"] = r["step_s"] / lora["step_s"]
            if r.get("peak_bytes") and lora.get("peak_bytes"):
                r["peak_vs_lora"] = r["peak_bytes"] / lora["peak_bytes"]
        hf = by.get("hf_" + r["method"])
        if r.get("backend") == "jax" and hf:
            r["ours_vs_hf"] = {
                "tokens_per_s": hf["step_s"] / r["step_s"],
                "compile_s": r["compile_s"] / hf["compile_s"] if r.get("compile_s") and hf.get("compile_s") else None,
                "peak_bytes": r["peak_bytes"] / hf["peak_bytes"] if r.get("peak_bytes") and hf.get("peak_bytes") else None,
            }
        twin = by.get("peft_" + r["method"])
        if r.get("backend") == "jax" and twin:
            r["speedup_vs_peft"] = twin["step_s"] / r["step_s"]
            if r.get("peak_bytes") and twin.get("peak_bytes"):
                r["peak_vs_peft"] = r["peak_bytes"] / twin["peak_bytes"]


def _gib(b: Optional[int]) -> str:
    return "-" if not b else f"{b / 2**30:.1f}"


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


STACKS = {"jax": "ours (jax)", "hf": "transformers FlaxLlama (jax)", "peft": "PEFT (torch)"}


def _vs_hf(r: dict) -> str:
    """``"1.23x / 0.85"``: our tokens/s over FlaxLlama's / our compile time over its."""
    v = r.get("ours_vs_hf")
    if not v:
        return "-"
    return f"{v['tokens_per_s']:.2f}x / {_fmt(v.get('compile_s'), '.2f')}"


def markdown(report: dict) -> str:
    meta = report["meta"]
    hf = any(r.get("backend") == "hf" or str(r.get("method", "")).startswith("hf_") for r in report["results"])
    extra_head, extra_rule = (" ours vs HF Flax (tokens/s, compile) |", "---|") if hf else ("", "")
    lines = [
        f"### {meta['shape']} ({meta['reference']}), batch {meta['batch']} x {meta['seq']} tokens, "
        f"mesh {meta['mesh']}, remat {meta['remat']}, loss {meta['loss']}, "
        f"layout {meta.get('layout', meta.get('contraction'))}",
        "",
        f"{meta['date']} · {meta['device_kind']} x{meta['devices']} · MFU vs {meta['peak_tflops']:.1f} TFLOP/s"
        + (f" · measured bf16 matmul {meta['matmul_tflops']:.0f} TFLOP/s" if meta.get("matmul_tflops") else "")
        + (f" · {meta['label']}" if meta.get("label") else ""),
        "",
        "| method | stack | trainable | step (ms) | tokens/s | model TFLOP/s | MFU | peak mem (GiB) | compile (s) "
        "| step vs LoRA | mem vs LoRA | speed-up vs PEFT | mem vs PEFT |" + extra_head,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + extra_rule,
    ]
    for r in report["results"]:
        if r.get("method") == "_matmul":
            continue
        if "error" in r:
            lines.append(f"| {r['method']} | | | {r['error']} | | | | | | | | | |" + (" |" if hf else ""))
            continue
        stack = STACKS.get(r["backend"], r["backend"])
        lines.append(
            f"| {r['method']} | {stack} | {r['trainable_params']:,} | {r['step_s'] * 1e3:.1f} "
            f"| {r['tokens_per_s']:,.0f} | {r['model_tflops_per_s']:.1f} | {100 * r['mfu']:.1f}% "
            f"| {_gib(r.get('peak_bytes'))} | {_fmt(r.get('compile_s'), '.1f')} "
            f"| {_fmt(r.get('step_vs_lora'), '.3f')} | {_fmt(r.get('peak_vs_lora'), '.3f')} "
            f"| {_fmt(r.get('speedup_vs_peft'), '.2f')} | {_fmt(r.get('peak_vs_peft'), '.3f')} |"
            + (f" {_vs_hf(r)} |" if hf else "")
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = _parser().parse_args(argv)
    if args.worker:
        res = run_worker(args)
        print(RESULT_TAG + json.dumps(res), flush=True)
        return res
    if args.merge:
        results = []
        for path in args.merge:
            with open(path) as f:
                results += [r for r in json.load(f)["results"] if r.get("method") not in {x.get("method") for x in results}]
        return _report(args, results)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    for n in names:
        parse_method(n, rank=args.rank, alpha=args.alpha)  # fail early on a bad name
    peft = _peft_available() if args.peft is None else args.peft
    names = expand_methods(names, peft, hf=args.hf)
    if args.measure_matmul:
        names = ["_matmul"] + names
    results = []
    t_start = time.perf_counter()
    for n in names:
        left = None if args.budget is None else args.budget - (time.perf_counter() - t_start)
        why = None if n == "_matmul" else refused(args, n)
        if why:
            res = {"method": n, "error": why}
        elif left is not None and left < MIN_CHILD_S:
            res = {"method": n, "error": f"skipped: --budget {args.budget:.0f}s used up"}
        elif args.inprocess:
            wargs = argparse.Namespace(**{**vars(args), "worker": n})
            res = run_worker(wargs)
            res.setdefault("method", n)
        else:
            res = _run_child(args, n, timeout=args.timeout if left is None else min(args.timeout, left))
        summary = {k: res.get(k) for k in ("method", "step_s", "peak_bytes", "compile_s", "error")}
        print(json.dumps(summary), flush=True)
        if res.get("profile"):
            from benchmarks.trace_summary import format_summary

            print(f"profile of {n}:\n" + format_summary(res["profile"]), flush=True)
        results.append(res)
        if args.out:  # partial results survive a killed run
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out + ".partial.json", "w") as f:
                json.dump({"args": vars(args), "results": results}, f, indent=1)
    return _report(args, results)


def _report(args, results: list) -> dict:
    for r in results:  # the matmul probe reports no method name
        if "matmul_tflops" in r:
            r["method"] = "_matmul"
    ok = [r for r in results if "error" not in r and r.get("method") != "_matmul"]
    device_kind = ok[0]["device_kind"] if ok else "unknown"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else default_peak(device_kind)
    results = [derive(r, args, peak) for r in results]
    add_ratios(results)
    matmul = next((r for r in results if r.get("method") == "_matmul" and "error" not in r), None)
    shape = SHAPES[args.shape]
    meta = {
        "date": datetime.date.today().isoformat(),
        "shape": args.shape,
        "reference": shape.reference,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "rank": args.rank,
        "alpha": args.alpha,
        "remat": args.remat,
        "mesh": args.mesh,
        "loss": args.loss,
        "attn": args.attn,
        "layout": args.layout,
        "device_kind": device_kind,
        "devices": max((r.get("devices", 1) for r in ok), default=1),
        "peak_tflops": peak / 1e12,
        "matmul_tflops": matmul["matmul_tflops"] if matmul else None,
        "host": platform.node(),
        "python": platform.python_version(),
        "label": args.label,
    }
    report = {"meta": meta, "results": results}
    md = markdown(report)
    print(md)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(report, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(md)
    return report


if __name__ == "__main__":
    main()
