"""What an adapter kind is: the :class:`AdapterKind` record, and the two ways its init draws.

A kind's ``init`` is written once against a ``uniform(leaf, shape, fan_in, dtype)`` callable
(PEFT's Kaiming-uniform, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``). Surgery passes
:func:`host_uniform` (numpy on the host: no XLA program per adapter shape); the Flax layers
pass :func:`key_uniform` (one jax key split over the kind's leaves). Same rules and shapes,
different generators.

This module imports no kind, so kind modules and the registry can both import it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

# uniform(leaf name, shape, fan_in, dtype) -> array drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in))
Uniform = Callable[[str, tuple, int, Any], jax.Array]


class MeshAxes(NamedTuple):
    """What a partition-spec rule may ask about the mesh (given by :mod:`gralora_jax.sharding`)."""

    size: Callable[[Any], int]  # mesh axis entry (a name or a tuple of names) -> devices along it
    is_batch: Callable[[Any], bool]  # True when the entry also splits the batch (data / fsdp)


@dataclasses.dataclass(frozen=True)
class AdapterKind:
    """Everything that differs between adapter kinds; one instance per kind module (``KIND``)."""

    name: str  # registry key and the name in messages: "gralora", "lora", "rslora"
    order: int  # registration order, lowest first and unique: the first kind holding a leaf owns it
    peft_type: str  # PEFT's ``peft_type`` in adapter_config.json
    config_class: type  # the frozen config dataclass (several kinds may share one)
    # field getter ``get(name, default)`` of a config or adapter_config.json dict -> True when this
    # kind, rather than the default kind of its config class (selects=None), applies
    selects: Optional[Callable[[Callable[[str, Any], Any]], bool]]
    leaves: tuple[str, ...]  # tree leaf names beside the kernel, in init draw order
    peft_keys: Mapping[str, tuple[str, bool]]  # leaf -> (PEFT key suffix, stored transposed in the file)
    bias_only: str  # the ``bias`` choice that trains only adapted modules' biases (PEFT's "<kind>_only")
    output_fields: tuple[str, ...]  # adapter_config.json fields that change outputs (warned about when missing)
    scaling: Callable[[Any], float]  # config -> scale of the adapter output (read through ``config.scaling``)
    check_shape: Callable[[Any, int, int], None]  # (config, in, out): PEFT's error for a layer it cannot adapt
    init: Callable[..., dict]  # (uniform, config, in, out, dtype) -> {leaf: array}, PEFT's initialisation
    # (x, adapter, scaling, *, dropout_rate, dropout_rng, precision, block_layout) -> scale * adapter(x)
    apply: Callable[..., jax.Array]
    delta: Callable[..., jax.Array]  # (adapter, scaling) -> the weight update [..., in, out], scale included
    # (leaf, shape, s_in, s_out, MeshAxes) -> mesh axis entries of the leaf's own (unstacked) dims,
    # from the kernel's input and output entries
    partition_spec: Callable[..., tuple]
    # True: the adapted layer's output ``base + adapter`` goes through ``jax.lax.optimization_barrier``,
    # so the backward pass saves the sum rather than its two terms. Without it XLA folds the sum into
    # the consumer (Llama's ``silu(gate) * up``) and keeps both terms of gate and up alive for the
    # backward: measured 2026-12-04 on an H200, Llama-3.2-1B shape, batch 8 x 1024, GraLoRA k=4
    # peak 19.06 -> 15.33 GiB (temp 17.45 -> 13.45 GB) at the same step time.
    keep_sum: bool = False

    def add_output(self, y: jax.Array, delta: jax.Array) -> jax.Array:
        """An adapted layer's output: ``y + delta`` in ``y``'s dtype (see ``keep_sum``)."""
        out = y + delta.astype(y.dtype)
        return jax.lax.optimization_barrier(out) if self.keep_sum else out


def kaiming_bound(fan_in: int) -> float:
    """torch's ``kaiming_uniform_(a=sqrt(5))`` bound: ``1 / sqrt(fan_in)``."""
    return 1.0 / math.sqrt(fan_in)


def host_uniform(gen: np.random.Generator) -> Uniform:
    """Draws from a numpy generator, in call order (float32 values, cast to ``dtype``)."""

    def uniform(leaf, shape, fan_in, dtype):
        b = kaiming_bound(fan_in)
        return jnp.asarray(gen.uniform(-b, b, shape).astype(np.float32), dtype)

    return uniform


def key_uniform(key: jax.Array, leaves: tuple[str, ...]) -> Uniform:
    """Draws from ``key`` split once over ``leaves``: each leaf's draw depends on its name only."""
    keys = dict(zip(leaves, jax.random.split(key, len(leaves))))

    def uniform(leaf, shape, fan_in, dtype):
        b = kaiming_bound(fan_in)
        return jax.random.uniform(keys[leaf], shape, dtype, -b, b)

    return uniform


def zeros_or_uniform(uniform: Uniform, zero: bool, leaf: str, shape: tuple, fan_in: int, dtype) -> jax.Array:
    """PEFT's B factors: zeros (``init_weights=True``), else drawn like A (testing mode)."""
    return jnp.zeros(shape, dtype) if zero else uniform(leaf, shape, fan_in, dtype)
