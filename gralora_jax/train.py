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
from gralora_jax.checkpoint import Checkpointer
from gralora_jax.distributed import global_batch_from_local, is_main_process, put_global
from gralora_jax.losses import causal_lm_loss, check_chunk_size, chunked_causal_lm_loss
from gralora_jax.optim import OptimConfig, make_optimizer, make_schedule
from gralora_jax.sharding import batch_spec, named_shardings

LossFn = Callable[[Any, Mapping[str, Any], jax.Array, bool], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps to run in total (a resumed run stops at the same step)
    grad_accum: int = 1  # micro-batches per step, accumulated inside the jitted step
    log_every: int = 10  # write metrics.jsonl / TensorBoard every N steps (progress bar every step)
    eval_every: int = 0  # call eval_fn every N steps (0 = never; also after the last step if > 0)
    checkpoint_every: int = 0  # save a checkpoint every N steps (0 = only at the end / on SIGTERM)
    keep_checkpoints: int = 3  # how many recent checkpoints to keep
    output_dir: str | None = None  # metrics.jsonl, tensorboard/ and checkpoints/ go here (None = nowhere)
    seed: int = 0  # seeds the train-state rng (dropout)
    progress: bool = True  # tqdm progress bar on process 0
    tensorboard: bool = True  # also log to TensorBoard when tensorboardX is importable
    handle_sigterm: bool = True  # on SIGTERM: checkpoint at the next step boundary and stop cleanly

    def __post_init__(self):
        for name in ("steps", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # trainable leaves only (nested dict)
    opt_state: Any  # optax state (no arrays for frozen leaves)
    rng: jax.Array  # uint32[2] PRNG key, split once per step


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
    )
    return state, frozen


# ----------------------------------------------------------------------------- the step


class TrainStep:
    """The jitted step ``(state, frozen, batch) -> (state, metrics)``.

    ``trace_count`` counts Python traces (== compilations for fixed shapes/shardings).
    ``state_shardings`` / ``frozen_shardings`` / ``batch_sharding`` are the fixed shardings.
    """

    def __init__(self, fn, state_shardings, frozen_shardings, batch_sharding):
        self.trace_count = 0
        self.state_shardings = state_shardings
        self.frozen_shardings = frozen_shardings
        self.batch_sharding = batch_sharding

        def counted(*args):
            self.trace_count += 1
            return fn(*args)

        self.jitted = jax.jit(
            counted,
            in_shardings=(state_shardings, frozen_shardings, batch_sharding),
            out_shardings=(state_shardings, NamedSharding(batch_sharding.mesh, P())),
            donate_argnums=(0,),
        )

    def __call__(self, state: TrainState, frozen, batch):
        return self.jitted(state, frozen, batch)


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
    Metrics returned: ``loss``, ``grad_norm`` (before clipping), ``lr``, ``num_tokens`` and the
    token-weighted mean of any other scalar the loss_fn reports.
    """
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
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
        metrics = {"loss": loss, "grad_norm": grad_norm, "num_tokens": wsum}
        metrics.update({k: v / denom for k, v in extra.items()})
        metrics["lr"] = schedule(state.step) if schedule is not None else jnp.float32(jnp.nan)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
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


def make_causal_lm_loss_fn(gralora_model, *, model_dropout: bool = False, loss: str = "auto",
                           chunk_size: int = 1024) -> LossFn:
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
    """
    check_chunk_size(chunk_size)
    kind = select_causal_lm_loss(gralora_model, loss)

    def loss_fn(params, batch, rng, train):
        ids = batch["input_ids"]
        attn = batch.get("attention_mask")
        lmask = batch.get("loss_mask", attn)
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


class _SigtermFlag:
    """Sets ``requested`` on SIGTERM (main thread only); restores the old handler on exit."""

    def __init__(self, enabled: bool):
        self.requested = False
        self._old = None
        self._enabled = enabled and threading.current_thread() is threading.main_thread()

    def __enter__(self):
        if self._enabled:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._enabled:
            signal.signal(signal.SIGTERM, self._old)
        return False


class _Logger:
    """metrics.jsonl (+ TensorBoard) on process 0 only."""

    def __init__(self, output_dir: str | None, tensorboard: bool):
        self.main = is_main_process()
        self.file = None
        self.tb = None
        if not (self.main and output_dir):
            return
        os.makedirs(output_dir, exist_ok=True)
        self.file = open(os.path.join(output_dir, "metrics.jsonl"), "a")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except ImportError:
                self.tb = None

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self.file is None:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, float(v), int(step))

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


class Trainer:
    """Owns the train state, the jitted step, checkpointing and logging for one run.

    ``eval_fn(full_params, step) -> dict`` (optional) is called every ``eval_every`` steps;
    its numbers are logged with an ``eval_`` prefix. ``checkpoint_meta`` is passed to
    :class:`gralora_jax.checkpoint.Checkpointer` (``adapter_config``, ``base_model``, ``user``).
    After :meth:`fit`, ``stop_reason`` is ``"done"`` or ``"sigterm"``.
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
            meta = dict(checkpoint_meta or {})
            self.checkpointer = Checkpointer(
                os.path.join(config.output_dir, "checkpoints"),
                keep=config.keep_checkpoints,
                base_params=params,
                mesh=mesh,
                **meta,
            )
        self.stop_reason: str | None = None

    @property
    def step(self) -> int:
        return int(jax.device_get(self.state.step))

    def full_params(self) -> dict:
        """Trainable + frozen, one tree (e.g. for export or evaluation)."""
        return tree_lib.combine(self.state.params, self.frozen)

    def restore(self, data_iter=None) -> bool:
        """Resume from the latest checkpoint, if any (also seeks ``data_iter``). True if resumed."""
        if self.checkpointer is None:
            return False
        out = self.checkpointer.restore_latest(self.state, self.step_fn.state_shardings)
        if out is None:
            return False
        self.state, data_state = out
        if data_iter is not None and data_state is not None:
            data_iter.restore(data_state)
        return True

    def save(self, data_iter=None) -> None:
        if self.checkpointer is not None:
            self.checkpointer.save(self.state, data_state=None if data_iter is None else data_iter.state())

    def _batch(self, host_batch: Mapping[str, Any]) -> dict:
        return global_batch_from_local(host_batch, sharding=self.step_fn.batch_sharding)

    def fit(self, data_iter) -> TrainState:
        """Run until ``config.steps`` (or SIGTERM). Raises ``FloatingPointError`` on a
        non-finite loss or gradient norm, without checkpointing the bad state."""
        cfg = self.config
        logger = _Logger(cfg.output_dir, cfg.tensorboard)
        bar = None
        start = self.step
        if cfg.progress and is_main_process() and start < cfg.steps:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)
            except ImportError:
                bar = None
        step = start
        self.stop_reason = "done"
        try:
            with _SigtermFlag(cfg.handle_sigterm) as sig:
                t_last = time.perf_counter()
                while step < cfg.steps:
                    batch = self._batch(next(data_iter))
                    self.state, metrics = self.step_fn(self.state, self.frozen, batch)
                    step += 1
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                        raise FloatingPointError(
                            f"non-finite loss or gradient at step {step}: loss={m['loss']}, "
                            f"grad_norm={m['grad_norm']}; stopping (this state is not checkpointed)"
                        )
                    now = time.perf_counter()
                    dt, t_last = now - t_last, now
                    m["tokens_per_s"] = m.get("num_tokens", 0.0) / max(dt, 1e-9)
                    m["step_time"] = dt
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}", lr=f"{m['lr']:.2e}")
                    if step % cfg.log_every == 0 or step == cfg.steps:
                        logger.log(step, {**m, "time": time.time()})
                    if self.eval_fn is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                        ev = self.eval_fn(self.full_params(), step)
                        logger.log(step, {f"eval_{k}": v for k, v in dict(ev).items()})
                    last = step == cfg.steps
                    if self.checkpointer is not None and (
                        sig.requested or last or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                    ):
                        self.save(data_iter)
                    if sig.requested:
                        self.stop_reason = "sigterm"
                        break
        finally:
            if self.checkpointer is not None:
                self.checkpointer.wait_until_finished()
            if bar is not None:
                bar.close()
            logger.close()
        return self.state


def train(*, data_iter, resume: bool = True, **trainer_kwargs) -> Trainer:
    """Build a :class:`Trainer`, resume from its latest checkpoint if any, fit, return it."""
    trainer = Trainer(**trainer_kwargs)
    if resume:
        trainer.restore(data_iter)
    trainer.fit(data_iter)
    return trainer
