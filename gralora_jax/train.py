"""The training engine: one jitted, sharded train step and the loop around it.

The engine is model-agnostic. It needs a params tree (adapters beside kernels), a boolean
trainable mask (``gralora_jax.tree.trainable_mask``) and a pure
``loss_fn(params, batch, rng, train) -> (loss f32 scalar, metrics dict)``. The tree is split
into ``trainable`` (lives in the donated :class:`TrainState` with the optimizer state) and
``frozen`` (a separate, never-donated argument); gradients are taken w.r.t. the trainable
leaves only, so the base costs no gradient or optimizer memory.

Step ``state, metrics = step(state, frozen, batch)`` is a single ``jax.jit`` with explicit
in/out shardings (so it compiles once), donating ``state``. With ``grad_accum = A`` the global
batch ``[B, ...]`` is split into A micro-batches inside the step (a ``lax.scan``); each
micro-batch loss is weighted by ``metrics["num_tokens"]`` when the loss_fn reports it, so the
accumulated step equals one step on the whole batch.

>>> # loss_fn = make_causal_lm_loss_fn(gralora_model)
>>> # trainer = Trainer(loss_fn=loss_fn, params=gm.params, mask=gm.trainable_mask(),
>>> #                   optim=OptimConfig(...), config=TrainConfig(steps=100, output_dir="run"),
>>> #                   mesh=make_mesh("4x2"), param_specs=param_partition_specs(gm.params, "llama", mesh))
>>> # trainer.fit(data_iterator)

Data iterator contract: ``next(it)`` returns a dict of host numpy arrays (this process's
rows of the global batch, leading batch axis), ``it.state()`` returns a JSON-serialisable
position *after* the batches already returned and ``it.restore(position)`` seeks there,
so a resumed run sees exactly the batches the interrupted one would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gralora_jax import tree as tree_lib
from gralora_jax import fileio
from gralora_jax import layers
from gralora_jax.checkpoint import MIN_KEEP, Checkpointer, compare_resume_guard
from gralora_jax.distributed import check_initialized, global_batch_from_local, is_main_process, put_global
from gralora_jax.losses import causal_lm_loss, check_chunk_size, chunked_causal_lm_loss
from gralora_jax.optim import OptimConfig, make_optimizer, make_schedule
from gralora_jax.sharding import batch_spec, named_shardings

LossFn = Callable[[Any, Mapping[str, Any], jax.Array, bool], tuple[jax.Array, dict]]


# Why a run stopped -> the process exit code a command line should return (one table for all callers).
EXIT_CODES = {
    "done": 0,  # reached TrainConfig.steps
    "nonfinite": 1,  # a step produced NaN/Inf (FloatingPointError raised; the update was not applied)
    "diverged": 1,  # zero gradient norm and a flat loss for TrainConfig.stall_intervals log intervals
    "sigint": 130,  # Ctrl-C: checkpoint saved at the next step boundary (128 + SIGINT)
    "sigterm": 143,  # SIGTERM (preemption, scheduler stop): checkpoint saved (128 + SIGTERM)
}
_SIGNAL_REASONS = {signal.SIGINT: "sigint", signal.SIGTERM: "sigterm"}
_STOP_CODES = ("", "sigterm", "sigint")  # index = the flag value processes agree on (max wins: sigint > sigterm)
# Steps the host may dispatch ahead of the device between log steps. Unbounded, the host queues
# every step up to the next log step and then waits in C, where Python runs no signal handler: a
# Ctrl-C or a preemption SIGTERM was acted on only after all queued steps (46 s at 4.6 s a step on
# CPU). Two keep the device fed and a signal is seen within about two steps.
_STEPS_AHEAD = 2


def exit_code(stop_reason: str | None) -> int:
    """The exit code for ``Trainer.stop_reason`` (:data:`EXIT_CODES`; ``None`` counts as a failure).

    >>> exit_code("done"), exit_code("sigint"), exit_code("sigterm")
    (0, 130, 143)
    """
    return EXIT_CODES.get(stop_reason, 1)


class TrainingDiverged(FloatingPointError):
    """Training stalled: zero gradient norm and a flat loss for several log intervals (a
    ``FloatingPointError``, like a non-finite step, so callers handle both alike)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps to run in total (a resumed run stops at the same step)
    grad_accum: int = 1  # micro-batches per step, accumulated inside the jitted step
    log_every: int = 10  # fetch metrics from the device, write metrics.jsonl / TensorBoard every N steps
    eval_every: int = 0  # call eval_fn every N steps (0 = never; also after the last step if > 0)
    checkpoint_every: int = 0  # save a checkpoint every N steps (0 = only at the end / on a stop signal)
    checkpoint_minutes: float = 0.0  # also save once this many minutes have passed since the last save (0 = off)
    keep_checkpoints: int = 3  # recent checkpoints kept (>= 2: a corrupt latest one falls back to the previous)
    output_dir: str | None = None  # metrics.jsonl, tensorboard/ and checkpoints/ (local or gs://; None = nowhere)
    seed: int = 0  # seeds the train-state rng (dropout)
    progress: bool = True  # tqdm progress bar on process 0 (only when stderr is a terminal)
    tensorboard: bool = True  # also log to TensorBoard when tensorboardX is importable
    handle_signals: bool = True  # SIGINT/SIGTERM: checkpoint at the next step boundary and stop (again: exit now)
    stop_check_every: int = 10  # several processes: agree on a stop signal every N steps (one scalar all-gather)
    stall_intervals: int = 3  # stop ("diverged") after N log intervals of zero gradient norm and flat loss; 0 = off

    def __post_init__(self):
        for name in ("steps", "grad_accum", "log_every", "stop_check_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "stall_intervals"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.checkpoint_minutes) and self.checkpoint_minutes >= 0):
            raise ValueError(f"TrainConfig.checkpoint_minutes must be a finite number >= 0, got {self.checkpoint_minutes}")
        if self.keep_checkpoints < MIN_KEEP:
            raise ValueError(f"TrainConfig.keep_checkpoints must be >= {MIN_KEEP} (a corrupt latest checkpoint "
                             f"falls back to the previous one), got {self.keep_checkpoints}")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps applied
    params: Any  # trainable leaves only (nested dict)
    opt_state: Any  # optax state (no arrays for frozen leaves)
    rng: jax.Array  # uint32[2] PRNG key, split once per step
    bad_step: jax.Array  # int32 scalar: first step whose update was non-finite and not applied (0 = none; sticky)


# ----------------------------------------------------------------------------- shardings


def _trailing_dict_path(keypath) -> str | None:
    names = []
    for k in reversed(keypath):
        if isinstance(k, jax.tree_util.DictKey):
            names.append(str(k.key))
        else:
            break
    return "/".join(reversed(names)) if names else None


def opt_state_specs(opt_state_shapes: Any, params_shapes: Mapping[str, Any], param_specs: Mapping[str, Any]) -> Any:
    """PartitionSpecs for an optimizer state: a leaf whose key path ends in a param's path
    (``...mu['model']['layers']...['gralora_A']``) and has that param's shape gets the param's
    spec; everything else (counts, scalars) is replicated."""
    flat_shapes = tree_lib.flatten(params_shapes)
    flat_specs = tree_lib.flatten(param_specs)

    def spec(keypath, leaf):
        p = _trailing_dict_path(keypath)
        if p in flat_specs and tuple(np.shape(flat_shapes[p])) == tuple(np.shape(leaf)):
            return flat_specs[p]
        return P()

    return jax.tree_util.tree_map_with_path(spec, opt_state_shapes)


def train_state_specs(optimizer, params_shapes, mask, param_specs) -> tuple[TrainState, dict]:
    """``(TrainState of PartitionSpec, frozen-params specs)`` for a params tree and mask."""
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params_shapes)
    t_shapes, _ = tree_lib.split_trainable(shapes, mask)
    t_specs, f_specs = tree_lib.split_trainable(param_specs, mask)
    opt_shapes = jax.eval_shape(optimizer.init, shapes)
    specs = TrainState(
        step=P(),
        params=t_specs,
        opt_state=opt_state_specs(opt_shapes, shapes, param_specs),
        rng=P(),
        bad_step=P(),
    )
    return specs, f_specs


def init_train_state(params, mask, optimizer, mesh: Mesh, param_specs, *, seed: int = 0) -> tuple[TrainState, dict]:
    """Place ``params`` on ``mesh`` and build ``(TrainState, frozen params)``.

    The optimizer state is created by a jitted ``init`` with explicit out shardings, so it is
    born sharded like the params it tracks.
    """
    state_specs, frozen_specs = train_state_specs(optimizer, params, mask, param_specs)
    trainable, frozen = tree_lib.split_trainable(params, mask)
    trainable = put_global(trainable, named_shardings(mesh, state_specs.params))
    frozen = put_global(frozen, named_shardings(mesh, frozen_specs))

    def init(trainable, frozen):
        full = tree_lib.combine(trainable, frozen)
        return optimizer.init(full)

    opt_state = jax.jit(init, out_shardings=named_shardings(mesh, state_specs.opt_state))(trainable, frozen)
    repl = NamedSharding(mesh, P())
    state = TrainState(
        step=put_global(np.zeros((), np.int32), repl),
        params=trainable,
        opt_state=opt_state,
        rng=put_global(jax.random.PRNGKey(seed), repl),
        bad_step=put_global(np.zeros((), np.int32), repl),
    )
    return state, frozen


# ----------------------------------------------------------------------------- the step


class TrainStep:
    """The jitted step ``(state, frozen, batch) -> (state, metrics)``.

    ``trace_count`` counts Python traces (== compilations for fixed shapes/shardings).
    ``state_shardings`` / ``frozen_shardings`` / ``batch_sharding`` are the fixed shardings.
    The step is traced with its mesh in context, so the models' activation constraints
    (:mod:`gralora_jax.models.constraints`) apply without the caller's ``jax.set_mesh``.
    """

    def __init__(self, fn, state_shardings, frozen_shardings, batch_sharding):
        self.trace_count = 0
        self.state_shardings = state_shardings
        self.frozen_shardings = frozen_shardings
        self.batch_sharding = batch_sharding

        mesh = batch_sharding.mesh

        def counted(*args):
            self.trace_count += 1
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # the models' activation constraints
                return fn(*args)

        self.jitted = jax.jit(
            counted,
            in_shardings=(state_shardings, frozen_shardings, batch_sharding),
            out_shardings=(state_shardings, NamedSharding(batch_sharding.mesh, P())),
            donate_argnums=(0,),
        )

    def __call__(self, state: TrainState, frozen, batch):
        return self.jitted(state, frozen, batch)


def _all_finite(tree, specs=None) -> jax.Array:
    """Scalar bool: every float leaf of ``tree`` is finite.

    Leaves of one shape, dtype and partition spec (``specs``: a tree of ``PartitionSpec``
    matching ``tree``) are checked together: their non-finite indicators are added elementwise
    (no communication, same layout) and reduced once, so XLA runs one reduction per group instead
    of one per leaf (a LoRA's params and AdamW state at 1B are 672 leaves in ~10 groups; checked
    leaf by leaf they took 2.7 ms of a 107 ms step on an H200). Without ``specs`` each leaf is its
    own group.
    """
    leaves = jax.tree.leaves(tree)
    keys = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P)) if specs is not None else []
    if len(keys) != len(leaves):
        keys = list(range(len(leaves)))
    groups: dict = {}
    for x, key in zip(leaves, keys):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            groups.setdefault((x.shape, x.dtype, key), []).append(x)
    if not groups:
        return jnp.bool_(True)
    bad = [jnp.sum(sum(jnp.where(jnp.isfinite(x), 0.0, 1.0) for x in g)) for g in groups.values()]
    return jnp.sum(jnp.stack(bad)) == 0


def _split_micro(x, accum: int):
    """[B, ...] -> [A, B/A, ...] taking rows i, i+A, ... into micro-batch i, so each device's
    contiguous rows stay on that device (no cross-device shuffle)."""
    b = x.shape[0]
    if b % accum:
        raise ValueError(f"batch size {b} is not divisible by grad_accum={accum}")
    return jnp.swapaxes(x.reshape(b // accum, accum, *x.shape[1:]), 0, 1)


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    mask: Mapping[str, Any],
    mesh: Mesh,
    param_specs: Mapping[str, Any],
    params_shapes: Mapping[str, Any],
    *,
    grad_accum: int = 1,
    schedule: Callable | None = None,
) -> TrainStep:
    """Build the jitted, sharded train step.

    ``optimizer`` comes from :func:`gralora_jax.optim.make_optimizer` over the full tree with
    the same ``mask``; ``params_shapes`` is the full params tree (arrays or shape structs),
    used to derive the optimizer-state shardings; ``schedule`` (optional) gives the logged lr.
    Metrics returned (device scalars; the step never waits for the host): ``loss``,
    ``grad_norm`` (before clipping), ``lr``, ``num_tokens`` and the token-weighted mean of any
    other scalar the loss_fn reports.

    Non-finite guard: when the loss, the gradient norm, the updated params or the optimizer
    state hold a NaN/Inf, the update is *not applied* (params, optimizer state, rng and step stay
    those of the previous step) and ``state.bad_step`` records that step (sticky: every later
    step is a no-op too), so a state in memory or on disk is always finite.
    """
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    layers.use_gpu_threefry_kernel()  # adapter dropout masks compile in ms, not s, on GPU
    state_specs, frozen_specs = train_state_specs(optimizer, params_shapes, mask, param_specs)
    state_sh = named_shardings(mesh, state_specs)
    frozen_sh = named_shardings(mesh, frozen_specs)
    batch_sh = NamedSharding(mesh, batch_spec(mesh))

    def weighted_loss(trainable, frozen, micro, rng):
        full = tree_lib.combine(trainable, frozen)
        loss, metrics = loss_fn(full, micro, rng, True)
        w = jnp.asarray(metrics.get("num_tokens", 1.0), jnp.float32)
        extra = {k: jnp.asarray(v, jnp.float32) * w for k, v in metrics.items() if k != "num_tokens"}
        return loss.astype(jnp.float32) * w, (w, extra)

    grad_fn = jax.value_and_grad(weighted_loss, has_aux=True)

    def step(state: TrainState, frozen, batch):
        rng, step_rng = jax.random.split(state.rng)
        if grad_accum == 1:
            (lsum, (wsum, extra)), gsum = grad_fn(state.params, frozen, batch, step_rng)
        else:
            micro = jax.tree.map(lambda x: _split_micro(x, grad_accum), batch)

            def body(carry, inp):
                i, mb = inp
                (l, (w, ex)), g = grad_fn(state.params, frozen, mb, jax.random.fold_in(step_rng, i))
                gs, ls, ws, exs = carry
                return (jax.tree.map(jnp.add, gs, g), ls + l, ws + w, jax.tree.map(jnp.add, exs, ex)), None

            zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            _, (_, ex_shape) = jax.eval_shape(
                weighted_loss, state.params, frozen, jax.tree.map(lambda x: x[0], micro), step_rng
            )
            zeros_ex = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), ex_shape)
            init = (zeros_g, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros_ex)
            (gsum, lsum, wsum, extra), _ = jax.lax.scan(body, init, (jnp.arange(grad_accum), micro))
        denom = jnp.maximum(wsum, 1e-9)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), gsum, state.params)
        loss = lsum / denom
        grad_norm = optax.tree.norm(grads)

        full_params = tree_lib.combine(state.params, frozen)
        full_grads = tree_lib.combine(grads, jax.tree.map(jnp.zeros_like, frozen))
        updates, opt_state = optimizer.update(full_grads, state.opt_state, full_params)
        t_updates, _ = tree_lib.split_trainable(updates, mask)
        params = optax.apply_updates(state.params, t_updates)
        finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                  & _all_finite((params, opt_state), (state_specs.params, state_specs.opt_state)))
        ok = finite & (state.bad_step == 0)

        def keep(new, old):
            return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

        metrics = {"loss": loss, "grad_norm": grad_norm, "num_tokens": wsum}
        metrics.update({k: v / denom for k, v in extra.items()})
        metrics["lr"] = schedule(state.step) if schedule is not None else jnp.float32(jnp.nan)
        new_state = TrainState(
            step=state.step + ok.astype(state.step.dtype),
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            rng=keep(rng, state.rng),
            bad_step=jnp.where((state.bad_step == 0) & ~finite, state.step + 1, state.bad_step),
        )
        return new_state, metrics

    return TrainStep(step, state_sh, frozen_sh, batch_sh)


# ----------------------------------------------------------------------------- loss helpers


LOSS_KINDS = ("auto", "full", "chunked")


def _adapted_heads(params) -> list[str]:
    """Adapted modules named ``lm_head``: the chunked loss does not run that module, so its adapter would be lost."""
    if params is None:
        return []
    return [m for m in tree_lib.adapted_modules(params) if m.rsplit("/", 1)[-1] == "lm_head"]


def select_causal_lm_loss(gralora_model, loss: str = "auto", params=None) -> str:
    """Resolve ``loss`` ("auto" / "full" / "chunked") to "full" or "chunked" for ``gralora_model``.

    "chunked" needs a model that can return its final hidden state (``supports_hidden_fn``: our
    :mod:`gralora_jax.models`, not transformers' Flax models) and no adapter on ``lm_head`` (the
    chunked path multiplies by the base lm_head kernel and would drop it). "auto" picks "chunked"
    when both hold, else "full"; an explicit "chunked" that cannot hold raises ``ValueError``.
    ``params`` defaults to ``gralora_model.params``.
    """
    if loss not in LOSS_KINDS:
        raise ValueError(f"loss must be one of {LOSS_KINDS}, got {loss!r}")
    if loss == "full":
        return "full"
    supported = bool(getattr(gralora_model, "supports_hidden_fn", False))
    heads = _adapted_heads(getattr(gralora_model, "params", None) if params is None else params)
    if supported and not heads:
        return "chunked"
    if loss == "auto":
        return "full"
    if not supported:
        raise ValueError(f"loss='chunked' needs a model that returns hidden states without logits "
                         f"(gralora_jax.models); {type(getattr(gralora_model, 'model', gralora_model)).__name__} "
                         "does not: use loss='full' or 'auto'")
    raise ValueError(f"loss='chunked' would drop the adapter on {heads}: use loss='full' or 'auto'")


def make_causal_lm_loss_fn(gralora_model, *, loss: str = "auto",
                           chunk_size: int = 1024, right_padded: bool = False) -> LossFn:
    """``loss_fn`` for a :class:`gralora_jax.surgery.GraLoRAModel` (or anything with
    ``logits_fn(params, input_ids, attention_mask, *, dropout_rng, train)``).

    Batch keys: ``input_ids`` [B, T], optional ``attention_mask`` [B, T] and ``loss_mask``
    [B, T] (defaults to ``attention_mask``, else all ones). Metrics: ``num_tokens``.

    ``loss`` (default "auto"): "full" computes float32 logits ``[B, T, vocab]`` and
    :func:`gralora_jax.losses.causal_lm_loss`; "chunked" runs the adapted model up to its final
    hidden state (``GraLoRAModel.hidden_fn``) and :func:`gralora_jax.losses.chunked_causal_lm_loss`
    with the (soft-capped, possibly tied) lm_head, holding only ``chunk_size`` tokens' logits at
    a time; same loss, gradients and ``num_tokens``. "auto" is "chunked" for our own
    :mod:`gralora_jax.models` unless ``lm_head`` carries an adapter, else "full" (transformers'
    Flax models, objects with only ``logits_fn``); see :func:`select_causal_lm_loss`. The choice
    is ``loss_fn.loss``; it is checked again against the params each call traces with.

    ``right_padded=True`` promises that every batch is right-padded (each row's real tokens
    first, as :func:`experiments.commonsense.data.pad_batch` writes them). Under causal attention
    a real token then never attends to the padding after it, so the model runs without the
    attention mask (same outputs at every real position, hence the same loss and gradients) and
    the mask only selects the loss tokens. Measured on an H200 (Llama-3.2-1B shape, batch
    16 x 256, scanned layers): 95.5 ms -> 81.3 ms a step.
    """
    check_chunk_size(chunk_size)
    kind = select_causal_lm_loss(gralora_model, loss)

    def loss_fn(params, batch, rng, train):
        ids = batch["input_ids"]
        attn = batch.get("attention_mask")
        lmask = batch.get("loss_mask", attn)
        if right_padded:
            attn = None  # causal attention already hides the trailing padding from every real token
        dropout_rng = rng if train else None
        use = kind
        if kind == "chunked" and _adapted_heads(params):
            if loss != "auto":
                raise ValueError(f"loss='chunked' would drop the adapter on {_adapted_heads(params)}")
            use = "full"  # these params adapt lm_head: never lose its adapter
        if use == "full":
            logits = gralora_model.logits_fn(params, ids, attn, dropout_rng=dropout_rng, train=train)
            value, n = causal_lm_loss(logits, ids, lmask)
        else:
            hidden = gralora_model.hidden_fn(params, ids, attn, dropout_rng=dropout_rng, train=train)
            kernel, softcap = gralora_model.lm_head(params)
            value, n = chunked_causal_lm_loss(hidden, kernel, ids, lmask, chunk_size=chunk_size, logit_softcap=softcap)
        return value, {"num_tokens": n}

    loss_fn.loss = kind
    return loss_fn


# ----------------------------------------------------------------------------- the loop


def _say(message: str) -> None:
    """A notice on stderr; a closed stderr (``... | tee log`` whose tee died with the same Ctrl-C)
    must not turn a signal's clean checkpoint-and-stop into a crash, so write errors are ignored."""
    try:
        sys.stderr.write(f"\n[gralora_jax.train] {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # broken pipe, closed file
        pass


class _StopSignals:
    """SIGINT / SIGTERM during :meth:`Trainer.fit`: the first sets ``reason`` (the loop saves a
    checkpoint at the next step boundary and stops); a second one exits the process at once with
    that signal's code (no traceback, nothing saved; orbax never leaves a half-committed step).
    Main thread only; the previous handlers are restored on exit."""

    def __init__(self, enabled: bool):
        self.reason: str | None = None
        self._old: dict = {}
        self._enabled = enabled and threading.current_thread() is threading.main_thread()

    def __enter__(self):
        if self._enabled:
            for sig in _SIGNAL_REASONS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        reason = _SIGNAL_REASONS[signum]
        if self.reason is not None:
            _say(f"{reason} again: exiting now without saving")
            os._exit(EXIT_CODES[reason])
        self.reason = reason
        _say(f"{reason}: saving a checkpoint at the next step boundary, then stopping (send it again to exit now)")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def _agreed_stop(local: str | None, step: int, every: int, save_due: bool = False) -> tuple[str | None, bool]:
    """(stop reason, save now) that every process acts on after ``step``.

    One process: its own flags (no device work). Several: every ``every`` steps all processes
    all-gather two int32 (the same steps on every process, so they stop, or take a timed
    checkpoint, at the same step; any process's flag counts)."""
    if jax.process_count() == 1:
        return local, save_due
    if step % every:
        return None, False
    from jax.experimental import multihost_utils

    mine = np.array([_STOP_CODES.index(local or ""), int(save_due)], np.int32)
    with jax.transfer_guard_device_to_host("allow"):
        flags = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 2).max(axis=0)
    return _STOP_CODES[int(flags[0])] or None, bool(flags[1])


def _progress_bar(cfg: TrainConfig, start: int):
    """tqdm on process 0 when ``cfg.progress`` and stderr is a terminal; else None."""
    if not (cfg.progress and is_main_process() and start < cfg.steps and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)


def _device_memory() -> dict:
    """``{"peak_bytes": ...}``: the allocator's peak on this process's first device, where the
    backend reports it (GPU, TPU; not CPU). A host-side query: no device sync."""
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {"peak_bytes": float(peak)} if peak else {}


def _interval_metrics(rows: list[Mapping[str, Any]], seconds: float) -> dict:
    """Host metrics for the steps since the last log: the mean over those steps of every metric,
    except ``lr`` (the last step's); ``tokens_per_s`` and ``step_time`` over the wall time."""
    out = {k: float(np.mean([float(r[k]) for r in rows])) for k in rows[-1]}
    out["lr"] = float(rows[-1]["lr"])
    seconds = max(seconds, 1e-9)
    out["tokens_per_s"] = sum(float(r.get("num_tokens", 0.0)) for r in rows) / seconds
    out["step_time"] = seconds / len(rows)
    return out


class _MetricsLog:
    """metrics.jsonl (+ TensorBoard) on process 0: exactly one row per logged step, across resumes.

    On open, rows of steps after ``start_step`` (steps a resumed run does again) and any torn
    last line are dropped by an atomic rewrite. Local files are then appended to; remote ones
    (``gs://``, which cannot append) are rewritten atomically at each write."""

    def __init__(self, output_dir: str | None, tensorboard: bool, start_step: int):
        self.path = None
        self.tb = None
        if not (is_main_process() and output_dir):
            return
        self.path = fileio.join(output_dir, "metrics.jsonl")
        self.remote = fileio.is_remote(self.path)
        self.lines: list[str] = []
        changed = not fileio.exists(self.path)
        if not changed:
            for line in fileio.read_text(self.path).splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if isinstance(row, dict) and int(row.get("step", start_step + 1)) <= start_step:
                    self.lines.append(line)
                else:
                    changed = True
        if changed:
            self._rewrite()
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(fileio.join(output_dir, "tensorboard"))
            except Exception:  # not installed, or no writer for this filesystem
                self.tb = None

    def _rewrite(self) -> None:
        fileio.atomic_write_text(self.path, "".join(line + "\n" for line in self.lines))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self.path is None:
            return
        line = json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}})
        self.lines.append(line)
        if self.remote:
            self._rewrite()
        else:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def checkpoint_dir(output_dir) -> str:
    """Where a :class:`Trainer` with ``output_dir`` keeps its checkpoints (scheme kept: ``gs://``)."""
    return fileio.join(output_dir, "checkpoints")


class Trainer:
    """Owns the train state, the jitted step, checkpointing and logging for one run.

    ``eval_fn(full_params, step) -> dict`` (optional) is called every ``eval_every`` steps;
    its numbers are logged with an ``eval_`` prefix. ``checkpoint_meta`` is passed to
    :class:`gralora_jax.checkpoint.Checkpointer` (``adapter_config``, ``base_model``, ``user``,
    ``resume_guard``).

    The loop never waits for the device between steps: metrics stay on the device and are
    fetched (all steps since the last fetch at once) only at log, eval and checkpoint steps;
    ``sync_steps`` lists the steps where it did. After :meth:`fit`, ``stop_reason`` is a key of
    :data:`EXIT_CODES` (``"done"``, ``"sigint"``, ``"sigterm"``, or ``"nonfinite"`` /
    ``"diverged"`` with an exception raised); ``train_seconds`` is the training wall time summed
    over every resume; ``examples_seen`` the sequences consumed.
    """

    def __init__(
        self,
        *,
        loss_fn: LossFn,
        params: Mapping[str, Any],
        mask: Mapping[str, Any],
        optim: OptimConfig,
        config: TrainConfig,
        mesh: Mesh,
        param_specs: Mapping[str, Any],
        eval_fn: Callable[[Any, int], Mapping[str, float]] | None = None,
        checkpoint_meta: Mapping[str, Any] | None = None,
    ):
        check_initialized("Trainer")
        self.config = config
        self.mesh = mesh
        self.eval_fn = eval_fn
        self.schedule = make_schedule(optim)
        self.optimizer = make_optimizer(optim, params, mask)
        self.step_fn = make_train_step(
            loss_fn, self.optimizer, mask, mesh, param_specs, params,
            grad_accum=config.grad_accum, schedule=self.schedule,
        )
        self.state, self.frozen = init_train_state(params, mask, self.optimizer, mesh, param_specs, seed=config.seed)
        self.checkpointer = None
        if config.output_dir:
            self.checkpointer = Checkpointer(
                checkpoint_dir(config.output_dir),
                keep=config.keep_checkpoints,
                base_params=params,
                mesh=mesh,
                **dict(checkpoint_meta or {}),
            )
        self.stop_reason: str | None = None
        self.examples_seen = 0  # sequences consumed (global batch rows x steps), kept across resumes
        self.train_seconds = 0.0  # wall time inside fit(), kept across resumes
        self.batch_rows: int | None = None  # global batch rows (from the checkpoint after a restore)
        self.sync_steps: list[int] = []  # steps after which fit() fetched from the device
        self._stall = (0, None)  # (log intervals in a row with zero grad norm and flat loss, that loss)

    @staticmethod
    def check_resume_guard(output_dir, guard: Mapping[str, Any]) -> int | None:
        """:func:`gralora_jax.checkpoint.compare_resume_guard` for the checkpoints of ``output_dir``:
        the step a resume would start from (None: no checkpoint) or a one-line ``ValueError``."""
        return compare_resume_guard(checkpoint_dir(output_dir), guard)

    @property
    def step(self) -> int:
        with jax.transfer_guard_device_to_host("allow"):
            return int(jax.device_get(self.state.step))

    def full_params(self) -> dict:
        """Trainable + frozen, one tree (e.g. for export or evaluation)."""
        return tree_lib.combine(self.state.params, self.frozen)

    def restore(self, data_iter=None) -> bool:
        """Resume from the newest good checkpoint, if any (also seeks ``data_iter``). True if resumed."""
        if self.checkpointer is None:
            return False
        out = self.checkpointer.restore_latest(self.state, self.step_fn.state_shardings)
        if out is None:
            return False
        self.state, data_state = out
        progress = (self.checkpointer.last_meta or {}).get("progress") or {}
        self.examples_seen = int(progress.get("examples_seen", 0))
        self.train_seconds = float(progress.get("train_seconds", 0.0))
        self.batch_rows = progress.get("global_batch_size")
        if data_iter is not None and data_state is not None:
            data_iter.restore(data_state)
        return True

    def save(self, data_iter=None) -> None:
        """Checkpoint the current state (refused with ``FloatingPointError`` after a non-finite step)."""
        if self.checkpointer is None:
            return
        self._raise_if_bad()
        self.checkpointer.save(
            self.state, step=self.step, data_state=None if data_iter is None else data_iter.state(),
            extra={"examples_seen": self.examples_seen, "global_batch_size": self.batch_rows,
                   "train_seconds": round(self.train_seconds, 3)},
        )

    def _batch(self, host_batch: Mapping[str, Any]) -> dict:
        return global_batch_from_local(host_batch, sharding=self.step_fn.batch_sharding)

    def _check_rows(self, batch: Mapping[str, Any], step: int) -> int:
        rows = int(np.shape(next(iter(batch.values())))[0])
        if self.batch_rows is not None and rows != self.batch_rows:
            raise ValueError(
                f"step {step} gets a global batch of {rows} rows but this run's checkpoint was trained with "
                f"{self.batch_rows}: the data position is kept per batch, so another batch size would skip or repeat "
                f"examples; resume with batch size {self.batch_rows} or use another output directory")
        self.batch_rows = rows
        return rows

    def _raise_if_bad(self, bad_step: int | None = None) -> None:
        if bad_step is None:
            with jax.transfer_guard_device_to_host("allow"):
                bad_step = int(jax.device_get(self.state.bad_step))
        if bad_step:
            self.stop_reason = "nonfinite"
            raise FloatingPointError(
                f"non-finite loss, gradient or update at step {bad_step}: that update was not applied; stopping "
                f"with the state of step {bad_step - 1} (checkpoints hold only finite values); lower the learning "
                "rate or check the data")

    def _fetch(self, step: int, pending: list) -> list[dict]:
        """Bring the pending device metrics to the host (one transfer) and check the non-finite flag."""
        self.sync_steps.append(step)
        with jax.transfer_guard_device_to_host("allow"):
            rows, bad = jax.device_get((pending, self.state.bad_step))
        self._raise_if_bad(int(bad))
        return rows

    def _check_stall(self, rows: list[dict], step: int) -> None:
        n_max = self.config.stall_intervals
        if not n_max:
            return
        losses = [float(r["loss"]) for r in rows]
        count, ref = self._stall
        ref = losses[0] if count == 0 else ref
        tol = 1e-6 * max(1.0, abs(ref))
        flat = max(float(r["grad_norm"]) for r in rows) == 0.0 and all(abs(x - ref) <= tol for x in losses)
        count = count + 1 if flat else 0
        self._stall = (count, ref)
        if count >= n_max:
            self.stop_reason = "diverged"
            raise TrainingDiverged(
                f"training stalled at step {step}: gradient norm 0 and loss flat at {ref:.6g} for {count} log "
                f"intervals (lr {float(rows[-1]['lr']):.3g}); the learning rate is probably far too high, or no "
                "token carries a loss (check the loss mask); stopping")

    def fit(self, data_iter) -> TrainState:
        """Run until ``config.steps`` or a stop signal (see :data:`EXIT_CODES`).

        Raises ``FloatingPointError`` when a step was non-finite (found at the next log, eval or
        checkpoint step; that update and every later one were not applied, nothing bad is
        saved) and :class:`TrainingDiverged` when training stalls."""
        cfg = self.config
        start = self.step
        self._raise_if_bad()
        log = _MetricsLog(cfg.output_dir, cfg.tensorboard, start)
        bar = _progress_bar(cfg, start)
        self.stop_reason = None
        self.sync_steps = []
        pending: list = []
        step = start
        t0 = time.perf_counter()
        seconds_before = self.train_seconds
        t_log = t_save = t0
        try:
            with _StopSignals(cfg.handle_signals) as sig:
                while step < cfg.steps:
                    batch = self._batch(next(data_iter))
                    rows = self._check_rows(batch, step + 1)
                    self.state, metrics = self.step_fn(self.state, self.frozen, batch)
                    step += 1
                    self.examples_seen += rows
                    pending.append(metrics)
                    if len(pending) > _STEPS_AHEAD:
                        jax.block_until_ready(pending[-1 - _STEPS_AHEAD])
                    if bar is not None:
                        bar.update(1)
                    due = bool(cfg.checkpoint_minutes) and time.perf_counter() - t_save >= 60 * cfg.checkpoint_minutes
                    stop, timed = _agreed_stop(sig.reason, step, cfg.stop_check_every, due)
                    last = step == cfg.steps
                    if step % cfg.log_every == 0 or last or stop:
                        host = self._fetch(step, pending)
                        now = time.perf_counter()
                        m = {**_interval_metrics(host, now - t_log), **_device_memory()}
                        pending, t_log = [], now
                        log.log(step, {**m, "time": time.time()})
                        if bar is not None:
                            bar.set_postfix({"loss": f"{m['loss']:.4f}", "tok/s": f"{m['tokens_per_s']:.0f}",
                                             "lr": f"{m['lr']:.2e}"})
                        self._check_stall(host, step)
                    if self.eval_fn is not None and cfg.eval_every and (step % cfg.eval_every == 0 or last):
                        if step not in self.sync_steps:
                            self.sync_steps.append(step)
                        self._raise_if_bad()
                        with jax.transfer_guard_device_to_host("allow"):
                            ev = self.eval_fn(self.full_params(), step)
                        log.log(step, {f"eval_{k}": v for k, v in dict(ev).items()})
                    if self.checkpointer is not None and (
                        stop or last or timed or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                    ):
                        if step not in self.sync_steps:
                            self.sync_steps.append(step)
                        self.train_seconds = seconds_before + time.perf_counter() - t0
                        self.save(data_iter)
                        t_save = time.perf_counter()
                    if stop:
                        self.stop_reason = stop
                        break
                if self.stop_reason is None and step > start:
                    # a signal during the last step's log, eval or checkpoint: that step is saved, and
                    # the request to stop still holds (the caller skips what comes after training)
                    self.stop_reason, _ = _agreed_stop(sig.reason, step, 1)
            if pending:  # never returns a state with an unchecked step
                self._fetch(step, pending)
            self.stop_reason = self.stop_reason or "done"
        finally:
            self.train_seconds = seconds_before + time.perf_counter() - t0
            if self.checkpointer is not None:
                with jax.transfer_guard_device_to_host("allow"):
                    self.checkpointer.wait_until_finished()
            if bar is not None:
                bar.close()
            log.close()
        return self.state


def train(*, data_iter, resume: bool = True, **trainer_kwargs) -> Trainer:
    """Build a :class:`Trainer`, resume from its latest checkpoint if any, fit, return it."""
    trainer = Trainer(**trainer_kwargs)
    if resume:
        trainer.restore(data_iter)
    trainer.fit(data_iter)
    return trainer
