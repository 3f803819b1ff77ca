"""One method's training step in our stack, timed: ``run_jax(...) -> dict``.

Everything comes from the library: ``gralora_jax.models.LlamaForCausalLM`` (random weights,
bf16 parameters and compute), ``get_gralora_model`` (fp32 adapters on the seven projections),
``make_optimizer`` (AdamW over the trainable mask; frozen leaves carry no state),
``make_train_step`` (one jit, grads w.r.t. the trainable leaves only, donated state) on a
``make_mesh`` mesh with the llama sharding rules. ``frozen`` times a jitted forward + loss.

Timing: the step is lowered and compiled ahead of time (``compile_s``), run ``warmup`` times,
then ``steps`` times back to back with one ``block_until_ready`` at the end (dispatch overlaps
the device, as in a training loop). Peak memory is the device allocator's
``peak_bytes_in_use`` for the whole process (one method per process).
``loss="chunked"`` uses :func:`gralora_jax.losses.chunked_cross_entropy` on the final
hidden state instead of materialising the float32 ``[B, T, vocab]`` logits.

The steps after the model and its weights exist (surgery :func:`apply_method`, the loss
:func:`make_loss_fn`, optimizer, compile and timing :func:`time_method`) are shared with
:mod:`benchmarks.hf_flax_step`, which runs the same path on transformers' ``FlaxLlamaForCausalLM``.
"""

from __future__ import annotations

import time
import types
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.shapes import PROJECTIONS as PROJ, Method, Shape


def _peak_bytes() -> Optional[int]:
    stats = jax.local_devices()[0].memory_stats()
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", 0)) or None


def random_params(model, key, shardings=None, std: float = 0.02):
    """Random base weights of ``model``'s shapes: norms 1, everything else ``normal(0, std)``.

    One small jitted RNG program per distinct (shape, dtype, sharding), reused across leaves
    (a Llama has ~9 distinct shapes), without tracing the model's forward pass as
    ``model.init_params`` does (that compile alone took ~100 s for the 1b shape on the H200,
    and one program producing every leaf still spent most of the ~100 s of setup seen there).
    """
    from gralora_jax import tree as tree_lib

    flat = tree_lib.flatten(model.params_shape_tree)
    flat_sh = tree_lib.flatten(shardings) if shardings is not None else {}
    names = sorted(flat)
    keys = jax.random.split(key, len(names))
    programs = {}
    out = {}
    for k, p in zip(keys, names):
        s = flat[p]
        ones = p.endswith("norm/weight")
        sh = flat_sh.get(p)
        sig = (tuple(s.shape), jnp.dtype(s.dtype).name, ones, sh)
        if sig not in programs:
            shape, dtype = tuple(s.shape), s.dtype
            if ones:
                fn = lambda _k, shape=shape, dtype=dtype: jnp.ones(shape, dtype)
            else:
                fn = lambda k_, shape=shape, dtype=dtype: (std * jax.random.normal(k_, shape, jnp.float32)).astype(dtype)
            programs[sig] = jax.jit(fn, out_shardings=sh)
        out[p] = programs[sig](k)
    return tree_lib.unflatten(out)


def adapter_config(method: Method):
    """The library adapter config of an adapter ``method`` on all seven projections."""
    from gralora_jax.config import GraLoRAConfig, LoRAConfig

    if method.kind == "lora":
        return LoRAConfig(r=method.r, lora_alpha=method.alpha, target_modules=list(PROJ))
    if method.kind == "gralora":
        return GraLoRAConfig(r=method.r, alpha=method.alpha, gralora_k=method.k, hybrid_r=method.hybrid_r,
                             target_modules=list(PROJ))
    raise ValueError(f"{method.name} trains no adapters")


def apply_method(model, params, method: Method, seed: int, layout: Optional[str] = None):
    """``(forward, params, mask)``: ``get_gralora_model`` for adapter methods (forward is the
    :class:`GraLoRAModel`, mask its trainable mask), else the bare model and an all-True mask.
    ``layout``: GraLoRA's ``block_layout`` (None: the library default)."""
    from gralora_jax import layers
    from gralora_jax.surgery import get_gralora_model

    if method.trains_adapters:
        gm = get_gralora_model(model, adapter_config(method), params=params, rng=jax.random.PRNGKey(seed + 1),
                               block_layout=layout or layers.DEFAULT_BLOCK_LAYOUT)
        return gm, gm.params, gm.trainable_mask()
    return model, params, jax.tree.map(lambda _: True, params)


LOSSES = ("full", "chunked", "rows")


def make_loss_fn(loss: str, logits: Callable, hidden: Callable, head_kernel: Callable) -> Callable:
    """``loss_fn(params, batch, rng, train) -> (loss, {})`` of next-token prediction on ``input_ids``.

    ``loss="full"``: :func:`gralora_jax.losses.causal_lm_loss` on ``logits(params, ids)``;
    ``"chunked"``: :func:`gralora_jax.losses.chunked_cross_entropy` of
    ``hidden(params, ids)`` (final, normed hidden state) against ``head_kernel(params)``
    (``[hidden, vocab]``), 1024 tokens at a time over the *flattened* batch (what the 2026-11-29
    H200 tables used; on a data-parallel mesh the chunks cut across the data shards);
    ``"rows"``: the library's :func:`gralora_jax.losses.chunked_causal_lm_loss` (what
    ``make_causal_lm_loss_fn`` uses): the same sum, chunked within each row, so the data axis
    stays sharded.
    """
    from gralora_jax.losses import causal_lm_loss, chunked_causal_lm_loss, chunked_cross_entropy

    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")

    def loss_fn(p, batch_, rng, train):
        ids = batch_["input_ids"]
        if loss == "rows":
            value, _ = chunked_causal_lm_loss(hidden(p, ids), head_kernel(p), ids, chunk_size=1024)
        elif loss == "chunked":
            # position t predicts ids[t + 1]; the last position predicts nothing (label -1)
            labels = jnp.concatenate([ids[:, 1:], jnp.full((ids.shape[0], 1), -1, ids.dtype)], axis=1)
            value = chunked_cross_entropy(hidden(p, ids), head_kernel(p), labels, chunk_size=1024)
        else:
            value, _ = causal_lm_loss(logits(p, ids), ids)
        return value, {}

    return loss_fn


def bench_mesh(mesh: str):
    """``make_mesh(mesh)`` on the first ``prod(mesh)`` devices (e.g. ``"2x1"``: data=2, model=1)."""
    from gralora_jax.sharding import make_mesh, parse_mesh

    n_dev = int(np.prod(list(parse_mesh(mesh).values())))
    return make_mesh(mesh, jax.devices()[:n_dev])


def random_batch(shape: Shape, batch: int, seq: int, seed: int, mesh_) -> dict:
    """``{"input_ids": [batch, seq] int32}`` uniform over the vocabulary, placed on ``mesh_``'s data axes."""
    from gralora_jax.sharding import batch_sharding

    ids = jax.random.randint(jax.random.PRNGKey(seed + 2), (batch, seq), 0, shape.vocab, jnp.int32)
    return {"input_ids": jax.device_put(ids, batch_sharding(mesh_))}


def time_method(
    method: Method,
    loss_fn: Callable,
    params,
    mask,
    data: dict,
    mesh_,
    *,
    steps: int,
    warmup: int,
    profile_dir: Optional[str] = None,
    t_setup: float,
    phases: dict,
) -> dict:
    """Compile and time one method's step; the part shared by every jax stack.

    ``frozen``: a jitted ``loss_fn`` (forward + loss). Otherwise ``make_optimizer`` (AdamW over
    ``mask``; ``full`` trains everything), ``make_train_step`` and ``init_train_state`` on
    ``mesh_`` with the llama sharding rules. ``t_setup`` is when the caller's setup began
    (``time.perf_counter()``); ``phases`` (setup phase -> seconds) gains ``train_state``.
    Returns the result dict of :func:`run_jax` (without stack-specific ``versions``).
    """
    from gralora_jax.optim import OptimConfig, make_optimizer
    from gralora_jax.sharding import param_partition_specs
    from gralora_jax.train import init_train_state, make_train_step
    from gralora_jax import tree as tree_lib

    specs = param_partition_specs(params, "llama", mesh_)
    flat_mask = tree_lib.flatten(mask)
    n_train = sum(int(np.prod(v.shape)) for p, v in tree_lib.flatten(params).items() if flat_mask[p])

    if method.kind == "frozen":
        fn = jax.jit(lambda p, b: loss_fn(p, b, None, False)[0])
        args = (params, data)
        t0 = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = time.perf_counter() - t0

        def run_once(args):
            return compiled(*args), args
    else:
        optimizer = make_optimizer(
            OptimConfig(optimizer="adamw", learning_rate=1e-5, total_steps=10_000, schedule="constant",
                        max_grad_norm=0.0),
            params,
            None if method.kind == "full" else mask,
        )
        step = make_train_step(loss_fn, optimizer, mask, mesh_, specs, params)
        t_phase = time.perf_counter()
        state, frozen = init_train_state(params, mask, optimizer, mesh_, specs)
        jax.block_until_ready((state, frozen))
        phases["train_state"] = time.perf_counter() - t_phase
        del params
        args = (state, frozen, data)
        t0 = time.perf_counter()
        compiled = step.jitted.lower(*args).compile()
        compile_s = time.perf_counter() - t0

        def run_once(args):
            state_, frozen_, data_ = args
            new_state, metrics = compiled(state_, frozen_, data_)
            return metrics["loss"], (new_state, frozen_, data_)

    mem = compiled.memory_analysis()
    setup_s = time.perf_counter() - t_setup - compile_s
    t0 = time.perf_counter()
    out, args = run_once(args)
    jax.block_until_ready(out)
    first_step_s = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        out, args = run_once(args)
    jax.block_until_ready((out, args))
    t0 = time.perf_counter()
    for _ in range(steps):
        out, args = run_once(args)
    jax.block_until_ready((out, args))
    step_s = (time.perf_counter() - t0) / steps
    loss_value = float(out)
    peak = _peak_bytes()
    if profile_dir:  # two more steps under the profiler (after the peak was read)
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            for _ in range(2):
                out, args = run_once(args)
            jax.block_until_ready((out, args))
    return {
        "step_s": step_s,
        "compile_s": compile_s,
        "first_step_s": first_step_s,
        "setup_s": setup_s,
        "setup_phases_s": phases,
        "peak_bytes": peak,
        "xla_temp_bytes": getattr(mem, "temp_size_in_bytes", None) if mem is not None else None,
        "xla_argument_bytes": getattr(mem, "argument_size_in_bytes", None) if mem is not None else None,
        "trainable_params": n_train if method.kind != "frozen" else 0,
        "loss": loss_value,
        "devices": int(mesh_.devices.size),
        "device_kind": jax.devices()[0].device_kind,
        "versions": {"jax": jax.__version__},
    }


def run_jax(
    shape: Shape,
    method: Method,
    *,
    batch: int,
    seq: int,
    steps: int,
    warmup: int,
    remat: str = "none",
    mesh: str = "1x1",
    loss: str = "full",
    attn: Optional[str] = None,
    layout: Optional[str] = None,
    seed: int = 0,
    profile_dir: Optional[str] = None,
) -> dict:
    from gralora_jax.models import CausalLM

    t_setup = time.perf_counter()
    mesh_ = bench_mesh(mesh)
    # a plain attribute bag read by spec_from_hf_config: no dependence on the installed
    # transformers' config classes (the GPU image has transformers 5)
    cfg = types.SimpleNamespace(model_type="llama", rope_scaling=None, initializer_range=0.02,
                                **shape.hf_config_kwargs())
    model = CausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat_policy=remat,
                             attn_implementation=attn)
    return build_and_time(model, model, shape, method, mesh_, hidden=lambda forward: (
        lambda p, ids: forward(ids, params=p, compute_logits=False).last_hidden_state),
        head_kernel=model.lm_head_kernel, batch=batch, seq=seq, steps=steps, warmup=warmup, loss=loss,
        layout=layout, seed=seed, profile_dir=profile_dir, t_setup=t_setup, phases={})


def build_and_time(model, shape_tree_holder, shape: Shape, method: Method, mesh_, *, hidden: Callable,
                   head_kernel: Callable, batch: int, seq: int, steps: int, warmup: int, loss: str,
                   layout: Optional[str], seed: int, profile_dir: Optional[str], t_setup: float,
                   phases: dict) -> dict:
    """Random base weights (llama sharding rules), the method's surgery, the loss, a random batch,
    then :func:`time_method`. ``hidden(forward)`` returns ``(params, ids) -> final hidden state``;
    ``shape_tree_holder.params_shape_tree`` gives the base tree. Shared by ours and FlaxLlama."""
    from gralora_jax.sharding import named_shardings, param_partition_specs

    base_specs = param_partition_specs(shape_tree_holder.params_shape_tree, "llama", mesh_)
    t_phase = time.perf_counter()
    params = random_params(shape_tree_holder, jax.random.PRNGKey(seed), named_shardings(mesh_, base_specs))
    jax.block_until_ready(params)
    phases["init_params"] = time.perf_counter() - t_phase
    t_phase = time.perf_counter()
    forward, params, mask = apply_method(model, params, method, seed, layout)
    loss_fn = make_loss_fn(loss, logits=lambda p, ids: forward(ids, params=p).logits, hidden=hidden(forward),
                           head_kernel=head_kernel)
    data = random_batch(shape, batch, seq, seed, mesh_)
    jax.block_until_ready(params)
    phases["surgery"] = time.perf_counter() - t_phase
    return time_method(method, loss_fn, params, mask, data, mesh_, steps=steps, warmup=warmup,
                       profile_dir=profile_dir, t_setup=t_setup, phases=phases)
