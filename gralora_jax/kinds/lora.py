"""LoRA (PEFT's ``LORA``): the baseline GraLoRA is compared against.

Leaves beside a kernel ``[in, out]``: ``lora_A [in, r]`` and ``lora_B [r, out]`` (PEFT's
``nn.Linear`` weights, saved transposed). Output ``scale * x @ A @ B`` with scale ``lora_alpha / r``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gralora_jax import layers
from gralora_jax.config import LoRAConfig
from gralora_jax.kinds.base import AdapterKind, zeros_or_uniform

LEAVES = ("lora_A", "lora_B")


def scaling(config: LoRAConfig) -> float:
    return config.lora_alpha / config.r


def check_shape(config: LoRAConfig, in_features: int, out_features: int) -> None:
    """Every linear layer fits (the rank was checked by the config)."""


def init(uniform, config: LoRAConfig, in_features: int, out_features: int, dtype) -> dict:
    """A Kaiming-uniform on fan-in ``in``, B zeros (random with ``init_lora_weights=False``)."""
    r = config.r
    return {
        "lora_A": uniform("lora_A", (in_features, r), in_features, dtype),
        "lora_B": zeros_or_uniform(uniform, config.init_lora_weights, "lora_B", (r, out_features), r, dtype),
    }


def apply(x, adapter, scaling, *, dropout_rate=0.0, dropout_rng=None, precision=None, block_layout=None):
    """``scale * dropout(x) @ A @ B`` in the adapter dtype (``block_layout`` is GraLoRA's; unused)."""
    A, B = adapter["lora_A"], adapter["lora_B"]
    (xd,), factor = layers.dropped_inputs(x, dropout_rate, dropout_rng, 1)
    out = jnp.matmul(jnp.matmul(xd.astype(A.dtype), A, precision=precision), B, precision=precision)
    return ((scaling * factor) * out).astype(A.dtype)


def delta(adapter, scaling):
    return scaling * jnp.matmul(adapter["lora_A"], adapter["lora_B"], precision=jax.lax.Precision.HIGHEST)


def partition_spec(leaf: str, shape: tuple, s_in, s_out, axes) -> tuple:
    """``A (s_in, None)``, ``B (None, s_out)``: the rank axis replicated."""
    return (s_in, None) if leaf == "lora_A" else (None, s_out)


KIND = AdapterKind(
    name="lora",
    order=20,
    peft_type="LORA",
    config_class=LoRAConfig,
    selects=None,
    leaves=LEAVES,
    peft_keys={"lora_A": ("lora_A.weight", True), "lora_B": ("lora_B.weight", True)},
    bias_only="lora_only",
    output_fields=("r", "lora_alpha", "use_rslora"),
    scaling=scaling,
    check_shape=check_shape,
    init=init,
    apply=apply,
    delta=delta,
    partition_spec=partition_spec,
)
