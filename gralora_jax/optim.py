"""Optimizers and learning-rate schedules for adapter (or full) fine-tuning.

Design: one optax transformation over the *whole* parameter tree, partitioned by the
trainable mask (``gralora_jax.tree.trainable_mask``). Trainable leaves get
``clip -> optimizer (+ masked weight decay)``; frozen leaves get ``optax.set_to_zero()``,
whose state is empty, and the trainable branch is ``optax.masked`` so its moments only
exist for trainable leaves. The optimizer state therefore holds no array for a frozen
leaf: a 7B base with rank-64 adapters carries optimizer memory for the adapters only.

Full fine-tuning is the same code with an all-True mask.

>>> import jax.numpy as jnp
>>> params = {"q": {"kernel": jnp.ones((4, 4)), "gralora_A": jnp.ones((2, 2, 2))}}
>>> mask = {"q": {"kernel": False, "gralora_A": True}}
>>> cfg = OptimConfig(optimizer="lion", learning_rate=1e-3, total_steps=10)
>>> opt = make_optimizer(cfg, params, mask)
>>> state = opt.init(params)
>>> sorted({x.shape for x in jax.tree_util.tree_leaves(state) if x.ndim > 0})
[(2, 2, 2)]
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gralora_jax import tree as tree_lib

OPTIMIZERS = ("adamw", "lion", "sgd")
SCHEDULES = ("cosine", "linear", "constant")

# Leaf names / path fragments that never get weight decay by default (biases, norm scales).
_NO_DECAY_LEAVES = ("bias", "scale")
_NORM_FRAGMENTS = ("norm", "ln_", "layer_norm", "layernorm")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adamw"  # "adamw" | "lion" | "sgd"
    learning_rate: float = 2e-4  # peak learning rate (reached at the end of warmup)
    total_steps: int = 1000  # optimizer steps of the whole run (schedule length)
    warmup_steps: int | None = None  # linear warmup steps from 0; overrides warmup_ratio when set
    warmup_ratio: float = 0.0  # warmup as a fraction of total_steps (ceil), used when warmup_steps is None
    schedule: str = "cosine"  # decay after warmup: "cosine" | "linear" | "constant"
    end_lr_ratio: float = 0.0  # final lr as a fraction of the peak (cosine/linear)
    b1: float | None = None  # first-moment decay; None = 0.9 (adamw, lion) / momentum 0 for sgd
    b2: float | None = None  # second-moment decay; None = 0.999 (adamw) / 0.95 (lion, GraLoRA paper)
    eps: float = 1e-8  # adamw epsilon
    weight_decay: float = 0.0  # decoupled weight decay (adamw/lion), L2-style added decay for sgd
    decay_norms_and_biases: bool = False  # False: no weight decay on biases, norm scales and 1-D leaves
    max_grad_norm: float = 1.0  # global-norm clipping over the trainable leaves; 0 = off

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            _invalid("optimizer", self.optimizer, f"one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            _invalid("schedule", self.schedule, f"one of {SCHEDULES}")
        if not (_is_int(self.total_steps) and self.total_steps > 0):
            _invalid("total_steps", self.total_steps, "an integer > 0")
        _check_real("learning_rate", self.learning_rate, "a finite number > 0", lambda x: x > 0)
        _check_real("warmup_ratio", self.warmup_ratio, "a number in [0, 1]", lambda x: 0 <= x <= 1)
        if self.warmup_steps is not None and not (_is_int(self.warmup_steps)
                                                  and 0 <= self.warmup_steps <= self.total_steps):
            _invalid("warmup_steps", self.warmup_steps, f"an integer in [0, total_steps={self.total_steps}]")
        _check_real("end_lr_ratio", self.end_lr_ratio, "a number in [0, 1]", lambda x: 0 <= x <= 1)
        for name in ("b1", "b2"):
            if getattr(self, name) is not None:
                _check_real(name, getattr(self, name), "a number in [0, 1)", lambda x: 0 <= x < 1)
        _check_real("eps", self.eps, "a finite number > 0", lambda x: x > 0)
        _check_real("weight_decay", self.weight_decay, "a finite number >= 0", lambda x: x >= 0)
        _check_real("max_grad_norm", self.max_grad_norm, "a finite number >= 0 (0 = off)", lambda x: x >= 0)

    @property
    def num_warmup_steps(self) -> int:
        """Warmup length in steps (``warmup_steps``, else ``ceil(warmup_ratio * total_steps)``)."""
        if self.warmup_steps is not None:
            return int(self.warmup_steps)
        return int(math.ceil(self.warmup_ratio * self.total_steps))

    @property
    def betas(self) -> tuple[float, float]:
        """(b1, b2) with the per-optimizer defaults filled in."""
        if self.optimizer == "lion":
            return (0.9 if self.b1 is None else self.b1, 0.95 if self.b2 is None else self.b2)
        if self.optimizer == "adamw":
            return (0.9 if self.b1 is None else self.b1, 0.999 if self.b2 is None else self.b2)
        return (0.0 if self.b1 is None else self.b1, 0.0)


def _invalid(name: str, value: Any, want: str):
    raise ValueError(f"OptimConfig.{name} must be {want}, got {value!r}")


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _check_real(name: str, value: Any, want: str, ok: Callable[[float], bool]) -> None:
    """One-line ``ValueError`` unless ``value`` is a finite real number with ``ok(value)``."""
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or not ok(value)):
        _invalid(name, value, want)


def make_schedule(cfg: OptimConfig) -> Callable[[Any], jax.Array]:
    """Linear warmup from 0 to the peak, then cosine / linear decay to ``end_lr_ratio * peak``.

    Step ``t`` is the optimizer's update count (0 for the first update), like HF
    ``get_*_schedule_with_warmup``: ``lr(t) = peak * t / warmup`` for ``t < warmup``; then with
    ``p = (t - warmup) / (total - warmup)`` clipped to [0, 1], cosine is
    ``end + (peak - end) * 0.5 * (1 + cos(pi p))`` and linear ``peak + (end - peak) * p``.

    >>> s = make_schedule(OptimConfig(learning_rate=1.0, total_steps=10, warmup_steps=2, schedule="linear"))
    >>> [round(float(s(t)), 3) for t in (0, 1, 2, 6, 10)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    peak = float(cfg.learning_rate)
    end = peak * float(cfg.end_lr_ratio)
    warm = cfg.num_warmup_steps
    decay = max(cfg.total_steps - warm, 1)
    kind = cfg.schedule

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        warm_lr = peak * t / max(warm, 1)
        p = jnp.clip((t - warm) / decay, 0.0, 1.0)
        if kind == "cosine":
            after = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * p))
        elif kind == "linear":
            after = peak + (end - peak) * p
        else:
            after = jnp.full_like(t, peak)
        return jnp.where(t < warm, warm_lr, after)

    return schedule


def weight_decay_mask(params: Mapping[str, Any], decay_norms_and_biases: bool = False) -> dict:
    """True on leaves that get weight decay: by default everything except biases, norm scales
    (any path containing ``norm``/``ln_``) and 1-D leaves. Adapter leaves are decayed."""

    def decays(path: str, leaf) -> bool:
        if decay_norms_and_biases:
            return True
        if tree_lib.leaf_name(path) in _NO_DECAY_LEAVES:
            return False
        if any(f in path.lower() for f in _NORM_FRAGMENTS):
            return False
        return getattr(leaf, "ndim", 2) >= 2

    flat = tree_lib.flatten(params)
    return tree_lib.unflatten({p: decays(p, v) for p, v in flat.items()})


def _base_optimizer(cfg: OptimConfig, lr, decay_mask) -> optax.GradientTransformation:
    b1, b2 = cfg.betas
    if cfg.optimizer == "adamw":
        return optax.adamw(lr, b1=b1, b2=b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.optimizer == "lion":
        return optax.lion(lr, b1=b1, b2=b2, weight_decay=cfg.weight_decay, mask=decay_mask)
    parts = []
    if cfg.weight_decay:
        parts.append(optax.masked(optax.add_decayed_weights(cfg.weight_decay), decay_mask))
    parts.append(optax.sgd(lr, momentum=b1 or None))
    return optax.chain(*parts)


def make_optimizer(
    cfg: OptimConfig, params: Mapping[str, Any], mask: Mapping[str, Any] | None = None
) -> optax.GradientTransformation:
    """The partitioned optimizer for ``params`` (nested dict; arrays or shape structs).

    ``mask`` is the boolean trainable mask (same structure as ``params``); ``None`` means
    full fine-tuning (everything trains). Clipping (``max_grad_norm``) is computed over the
    trainable leaves only. Frozen leaves get ``set_to_zero`` and carry no optimizer state.
    The returned transformation must be ``init``-ed / ``update``-d with trees of the same
    structure as ``params``; :mod:`gralora_jax.train` feeds it zero gradients for frozen
    leaves, which XLA discards since their updates are never used.
    """
    flat_params = tree_lib.flatten(params)
    if mask is None:
        flat_mask = {p: True for p in flat_params}
    else:
        flat_mask = tree_lib.flatten(mask)
        if set(flat_mask) != set(flat_params):
            missing = sorted(set(flat_params) ^ set(flat_mask))[:5]
            raise ValueError(f"make_optimizer: mask and params have different paths, e.g. {missing}")
    if not any(flat_mask.values()):
        raise ValueError("make_optimizer: the trainable mask selects no leaf (nothing would train)")
    labels = tree_lib.unflatten({p: "train" if flat_mask[p] else "freeze" for p in flat_params})
    decay_mask = weight_decay_mask(params, cfg.decay_norms_and_biases)

    parts = []
    if cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(_base_optimizer(cfg, make_schedule(cfg), decay_mask))
    train_tx = optax.chain(*parts)
    if all(flat_mask.values()):
        return train_tx
    return optax.partition({"train": train_tx, "freeze": optax.set_to_zero()}, labels)
