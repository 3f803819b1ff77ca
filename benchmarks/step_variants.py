"""Where the user path's train step spends its time: the CLI's engine, one knob changed at a time.

The CLI (``experiments.commonsense``) trains with ``make_causal_lm_loss_fn`` (chunked loss),
an attention mask and a loss mask from right-padded batches, adapter dropout, Lion with
clipping and a warmup-cosine schedule, and, above a size, scanned layers. The library
benchmark (:mod:`benchmarks.train_throughput`) times a leaner step (AdamW, no clipping, no
dropout, no masks, unrolled layers). This script builds the CLI's step with
:func:`gralora_jax.train.make_train_step` at a real shape and changes one knob at a time, each
variant in a fresh process, printing compile seconds and step milliseconds::

    python -m benchmarks.step_variants --shape 135m --batch 16 --seq 128 \\
        --variants "cli:;nodrop:dropout=0;scan:scan=1;nomask:mask=0"

Knobs (``name=value``, comma separated; defaults are the CLI's paper preset): ``dropout``
(0.05), ``scan``
(0/1), ``unroll`` (layers per scan iteration, 1), ``remat`` (none), ``opt`` (lion), ``clip`` (1.0), ``mask`` (1: attention + loss masks),
``method`` (gralora4 | lora), ``layout`` (the GraLoRA block layout), ``sync`` (1: fetch the
metrics every step, as a loop that syncs does), ``trace`` (1: two more steps under
``jax.profiler``, summarised per kernel category with :mod:`benchmarks.trace_summary`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import types
from typing import Optional, Sequence

DEFAULTS = dict(dropout="0.05", scan="0", unroll="1", remat="none", opt="lion", clip="1.0", mask="1",
                method="gralora4", layout="", sync="0", trace="0")


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, knobs = text.partition(":")
    out = dict(DEFAULTS)
    for kv in filter(None, knobs.split(",")):
        k, _, v = kv.partition("=")
        if k not in DEFAULTS:
            raise ValueError(f"unknown knob {k!r} in variant {text!r}; knobs: {sorted(DEFAULTS)}")
        out[k] = v
    return name, out


def measure(shape_name: str, batch: int, seq: int, steps: int, knobs: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.jax_step import random_params
    from benchmarks.shapes import PROJECTIONS, SHAPES, parse_method
    from gralora_jax.config import GraLoRAConfig, LoRAConfig
    from gralora_jax.models import CausalLM
    from gralora_jax.optim import OptimConfig, make_optimizer, make_schedule
    from gralora_jax.sharding import batch_sharding, make_mesh, param_partition_specs
    from gralora_jax.surgery import get_gralora_model
    from gralora_jax.train import init_train_state, make_causal_lm_loss_fn, make_train_step

    shape = SHAPES[shape_name]
    mesh = make_mesh("1x1", jax.devices()[:1])
    cfg = types.SimpleNamespace(model_type="llama", rope_scaling=None, initializer_range=0.02,
                                **shape.hf_config_kwargs())
    model = CausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan_layers=knobs["scan"] == "1",
                     scan_unroll=int(knobs["unroll"]), remat_policy=knobs["remat"])
    params = random_params(model, jax.random.PRNGKey(0))
    m = parse_method(knobs["method"], rank=64, alpha=128)
    rate = float(knobs["dropout"])
    if m.kind == "lora":
        acfg = LoRAConfig(r=m.r, lora_alpha=m.alpha, lora_dropout=rate, target_modules=list(PROJECTIONS))
    else:
        acfg = GraLoRAConfig(r=m.r, alpha=m.alpha, gralora_k=m.k, hybrid_r=m.hybrid_r, gralora_dropout=rate,
                             target_modules=list(PROJECTIONS))
    kw = {"block_layout": knobs["layout"]} if knobs["layout"] else {}
    gm = get_gralora_model(model, acfg, params=params, rng=jax.random.PRNGKey(1), **kw)
    mask = gm.trainable_mask()
    specs = param_partition_specs(gm.params, "llama", mesh)
    ocfg = OptimConfig(optimizer=knobs["opt"], learning_rate=2e-4, total_steps=1000, warmup_ratio=0.1,
                       max_grad_norm=float(knobs["clip"]), b2=0.95 if knobs["opt"] == "lion" else None)
    optimizer = make_optimizer(ocfg, gm.params, mask)
    step = make_train_step(make_causal_lm_loss_fn(gm), optimizer, mask, mesh, specs, gm.params,
                           schedule=make_schedule(ocfg))
    state, frozen = init_train_state(gm.params, mask, optimizer, mesh, specs)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, shape.vocab, (batch, seq), dtype=np.int32)
    data = {"input_ids": ids}
    if knobs["mask"] == "1":  # right padding: every row a different length, as the CLI's buckets give
        lengths = rng.integers(seq // 2, seq + 1, batch)
        am = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
        data.update(attention_mask=am, loss_mask=am)
    data = jax.device_put(data, batch_sharding(mesh))
    t0 = time.perf_counter()
    compiled = step.jitted.lower(state, frozen, data).compile()
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(state, frozen, data)
    jax.block_until_ready(metrics)
    for _ in range(2):
        state, metrics = compiled(state, frozen, data)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, frozen, data)
        if knobs["sync"] == "1":
            jax.device_get(metrics)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - t0) / steps
    stats = jax.local_devices()[0].memory_stats() or {}
    out = {"compile_s": compile_s, "step_ms": step_s * 1e3, "tokens_per_s": batch * seq / step_s,
           "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "loss": float(metrics["loss"])}
    if knobs["trace"] == "1":
        import tempfile

        from benchmarks.trace_summary import summarize
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d, create_perfetto_trace=True):
                for _ in range(2):
                    state, metrics = compiled(state, frozen, data)
                jax.block_until_ready((state, metrics))
            summary = summarize(d, steps=2, top=25)
        summary.pop("trace_file", None)
        out["trace"] = summary
    return out


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.step_variants", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="135m")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--variants", default="cli:")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        name, knobs = parse_variant(a.worker)
        print("RESULT " + json.dumps({"variant": name, **knobs, **measure(a.shape, a.batch, a.seq, a.steps, knobs)}),
              flush=True)
        return []
    rows = []
    print(f"| shape {a.shape} {a.batch}x{a.seq} | compile (s) | step (ms) | tokens/s | peak (GiB) | knobs |")
    print("|---|---|---|---|---|---|")
    for v in filter(None, a.variants.split(";")):
        name, knobs = parse_variant(v)
        argv_ = [sys.executable, "-m", "benchmarks.step_variants", "--shape", a.shape, "--batch", str(a.batch),
                 "--seq", str(a.seq), "--steps", str(a.steps), "--worker", v]
        try:
            proc = subprocess.run(argv_, text=True, capture_output=True, timeout=a.timeout)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            row = json.loads(lines[-1][7:]) if lines else {"variant": name, "error": proc.stderr[-800:]}
        except subprocess.TimeoutExpired:
            row = {"variant": name, "error": f"timeout {a.timeout}s"}
        rows.append(row)
        if "error" in row:
            print(f"| {name} | error | | | | {row['error'][-300:]!r} |", flush=True)
        else:
            diff = ",".join(f"{k}={knobs[k]}" for k in DEFAULTS if knobs[k] != DEFAULTS[k])
            print(f"| {name} | {row['compile_s']:.1f} | {row['step_ms']:.1f} | {row['tokens_per_s']:,.0f} | "
                  f"{row['peak_gib']:.1f} | {diff or 'CLI defaults'} |", flush=True)
            if isinstance(row.get("trace"), dict):
                from benchmarks.trace_summary import format_summary
                print(format_summary(row["trace"]), flush=True)
    return rows


if __name__ == "__main__":
    main()
