"""Per-device memory of the training step on a simulated mesh, from shapes only (nothing is allocated).

For each mesh and method, the library's own train step (``make_train_step`` with
``make_causal_lm_loss_fn``, AdamW, the llama sharding rules) is lowered on
``jax.ShapeDtypeStruct`` trees and compiled for N fake CPU devices; XLA's
``memory_analysis()`` of that compiled SPMD program gives the per-device bytes of arguments
(base shard + trainable shard + optimizer state + batch), outputs, and temporaries
(activations and the other scratch the step needs). ``params/dev`` is computed independently
from the shardings (sum over leaves of bytes / shard count). XLA's "Involuntary full
rematerialization" warnings (printed to stderr by the SPMD partitioner) are counted per
compile.

    python -m benchmarks.memory_plan --shape 8b --meshes 16x1,4x4,2x8x1,1x16x1 --devices 16

The step traces with its mesh in context, so the models' activation constraints apply
(:mod:`gralora_jax.models.constraints`); ``--no-activation-constraints`` compiles it without them.

The model is ``gralora_jax.models`` Llama with ``scan_layers=True`` (compile time does not
grow with depth) and the given remat policy; bf16 base, fp32 adapters and optimizer state.
Adapter shapes come from the surgery on a one-layer model of the same width, stacked to the
full depth (the real surgery would draw every adapter on the host for nothing).
CPU numbers are XLA's CPU memory plan; a TPU/GPU compile of the same program lays out
buffers differently (TPU pads to tiles), so read them as a plan, not a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import types


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="8b", help="benchmarks.shapes name (tiny, 135m, 1b, 8b)")
    ap.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    ap.add_argument("--vocab", type=int, default=None, help="override the shape's vocabulary size")
    ap.add_argument("--meshes", default="16x1,4x4,2x8x1,1x16x1", help="comma-separated DxM or DxFxM meshes")
    ap.add_argument("--devices", type=int, default=16, help="fake CPU devices (every mesh must use all of them)")
    ap.add_argument("--methods", default="lora,gralora4", help="comma-separated benchmarks.shapes methods")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--alpha", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--remat", default="full", help="remat policy of each layer (none, full, dots_saveable, ...)")
    ap.add_argument("--no-scan", dest="scan", action="store_false", help="unrolled layers (small shapes only)")
    ap.add_argument("--no-activation-constraints", dest="constraints", action="store_false",
                    help="trace without the models' activation sharding constraints (to measure what they change)")
    ap.add_argument("--json", action="store_true", help="print one JSON object per row instead of a table")
    return ap.parse_args(argv)


@contextlib.contextmanager
def _capture_stderr():
    """Collect what C++ (XLA) writes to file descriptor 2 while the block runs."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        out = {"text": ""}
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out["text"] = tmp.read().decode(errors="replace")


def _shapes(model, config, n_layers):
    """Full params tree as ShapeDtypeStructs: the model's base shapes plus stacked adapter shapes."""
    import jax
    import jax.numpy as jnp

    from gralora_jax import tree as tree_lib
    from gralora_jax.surgery import add_adapters

    base = model.params_shape_tree
    if not model.spec.scan_layers:  # unrolled (small shapes): the real surgery
        with_ad, _ = add_adapters(base, config, jax.random.PRNGKey(0), adapter_dtype=jnp.float32)
        return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), with_ad)
    one = types.SimpleNamespace(**{**vars(model.config), "num_hidden_layers": 1})
    small = type(model)(one, dtype=model.dtype, param_dtype=model.param_dtype, scan_layers=True,
                        remat_policy=model.spec.remat_policy)
    with_ad, _ = add_adapters(small.params_shape_tree, config, jax.random.PRNGKey(0), adapter_dtype=jnp.float32)
    flat = tree_lib.flatten(base)
    for p, v in tree_lib.flatten(with_ad).items():
        if tree_lib.is_adapter_path(p):
            flat[p] = jax.ShapeDtypeStruct((n_layers,) + tuple(v.shape[1:]), v.dtype)
    return tree_lib.unflatten(flat)


def _per_device_bytes(shapes, specs, mesh) -> int:
    import math

    import numpy as np

    from gralora_jax import tree as tree_lib

    total = 0
    fs = tree_lib.flatten(specs)
    for p, v in tree_lib.flatten(shapes).items():
        shards = 1
        for entry in fs[p]:
            for name in (entry if isinstance(entry, tuple) else (entry,)) if entry is not None else ():
                shards *= mesh.shape[name]
        total += math.prod(v.shape) * np.dtype(v.dtype).itemsize // shards
    return total


def plan_row(shape, method, mesh_spec: str, *, batch: int, seq: int, remat: str, scan: bool = True,
             constraints: bool = True) -> dict:
    """Compile one (mesh, method) step from shapes; return its per-device memory figures.
    ``constraints=False``: without :mod:`gralora_jax.models.constraints` (as if no mesh were in context)."""
    from unittest import mock

    import jax
    import jax.numpy as jnp

    from benchmarks.jax_step import adapter_config
    from gralora_jax import tree as tree_lib
    from gralora_jax.models import CausalLM
    from gralora_jax.optim import OptimConfig, make_optimizer
    from gralora_jax.sharding import make_mesh, param_partition_specs
    from gralora_jax.surgery import GraLoRAModel
    from gralora_jax.train import TrainState, make_causal_lm_loss_fn, make_train_step

    S = jax.ShapeDtypeStruct
    cfg = types.SimpleNamespace(model_type="llama", rope_scaling=None, initializer_range=0.02,
                                **shape.hf_config_kwargs())
    model = CausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan_layers=scan, remat_policy=remat)
    config = adapter_config(method)
    shapes = _shapes(model, config, shape.layers)
    gm = GraLoRAModel(model, config, shapes, layouts={})
    mask = gm.trainable_mask()
    mesh = make_mesh(mesh_spec)
    specs = param_partition_specs(shapes, "llama", mesh)
    opt = make_optimizer(OptimConfig(optimizer="adamw", learning_rate=1e-4, total_steps=1000), shapes, mask)
    step = make_train_step(make_causal_lm_loss_fn(gm), opt, mask, mesh, specs, shapes)
    trainable, frozen = tree_lib.split_trainable(shapes, mask)
    state = TrainState(step=S((), jnp.int32), params=trainable, opt_state=jax.eval_shape(opt.init, shapes),
                       rng=S((2,), jnp.uint32), bad_step=S((), jnp.int32))
    data = {"input_ids": S((batch, seq), jnp.int32), "attention_mask": S((batch, seq), jnp.int32)}
    off = mock.patch("gralora_jax.models.constraints.context_mesh", lambda: None)
    with _capture_stderr() as err, (contextlib.nullcontext() if constraints else off):
        compiled = step.jitted.lower(state, frozen, data).compile()
    mem = compiled.memory_analysis()
    n_train = sum(v.size for v in tree_lib.flatten(trainable).values())
    return {
        "mesh": mesh_spec,
        "method": method.name,
        "layers": shape.layers,
        "params_per_device": _per_device_bytes(shapes, specs, mesh),
        "argument_bytes": mem.argument_size_in_bytes,
        "output_bytes": mem.output_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes,
        "total_bytes": mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes,
        "trainable_params": int(n_train),
        "involuntary_remat": err["text"].count("Involuntary full rematerialization"),
        "constraints": constraints,
    }


def main(argv=None) -> int:
    a = _args(argv)
    from gralora_jax.hostdevices import ensure_host_devices

    ensure_host_devices(a.devices)  # before jax initialises its backend
    import dataclasses

    from benchmarks.shapes import SHAPES, parse_method

    shape = SHAPES[a.shape]
    if a.layers:
        shape = dataclasses.replace(shape, layers=a.layers)
    if a.vocab:
        shape = dataclasses.replace(shape, vocab=a.vocab)
    rows = []
    for mesh_spec in a.meshes.split(","):
        for name in a.methods.split(","):
            row = plan_row(shape, parse_method(name, rank=a.rank, alpha=a.alpha), mesh_spec,
                           batch=a.batch, seq=a.seq, remat=a.remat, scan=a.scan, constraints=a.constraints)
            rows.append(row)
            if a.json:
                print(json.dumps(row), flush=True)
    if not a.json:
        gib = 2.0 ** 30
        print(f"{shape.reference} shape ({shape.layers} layers), batch {a.batch} x {a.seq}, bf16 base, fp32 adapters "
              f"+ AdamW, remat={a.remat}, scan_layers={a.scan}; per device, GiB ({a.devices} CPU devices)")
        print(f"{'mesh':>8} {'method':>10} {'params':>8} {'args':>8} {'temp':>8} {'total':>8} {'remat warn':>10}")
        for r in rows:
            print(f"{r['mesh']:>8} {r['method']:>10} {r['params_per_device'] / gib:8.2f} {r['argument_bytes'] / gib:8.2f} "
                  f"{r['temp_bytes'] / gib:8.2f} {r['total_bytes'] / gib:8.2f} {r['involuntary_remat']:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
