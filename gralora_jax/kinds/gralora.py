"""GraLoRA (PEFT's ``GRALORA``): k x k block adapters, plus an optional hybrid LoRA path.

Leaves beside a kernel ``[in, out]``: ``gralora_A [k, in/k, r]`` and ``gralora_B [k, r, out/k]``
(PEFT's own tensors, saved as they are), and with ``hybrid_r = h > 0`` ``gralora_A_general
[in, h]`` and ``gralora_B_general [h, out]`` (PEFT's ``nn.Linear`` weights, saved transposed).
Scale ``alpha / (r + h)``. The block contraction itself is :mod:`gralora_jax.layers`'.
"""

from __future__ import annotations

from gralora_jax import layers
from gralora_jax.config import GraLoRAConfig, check_layer_divisible
from gralora_jax.kinds.base import AdapterKind, zeros_or_uniform

LEAVES = ("gralora_A", "gralora_B", "gralora_A_general", "gralora_B_general")


def scaling(config: GraLoRAConfig) -> float:
    """PEFT's scale: ``alpha / (r + hybrid_r)``."""
    return config.alpha / (config.r + config.hybrid_r)


def check_shape(config: GraLoRAConfig, in_features: int, out_features: int) -> None:
    check_layer_divisible(in_features, out_features, config.gralora_k)


def init(uniform, config: GraLoRAConfig, in_features: int, out_features: int, dtype) -> dict:
    """A Kaiming-uniform on fan-in ``in/k``, B zeros (random with ``init_weights=False``); the
    hybrid A on fan-in ``in``, its B likewise."""
    check_shape(config, in_features, out_features)
    k, r, h, zero = config.gralora_k, config.r, config.hybrid_r, config.init_weights
    i, o = in_features // k, out_features // k
    out = {
        "gralora_A": uniform("gralora_A", (k, i, r), i, dtype),
        "gralora_B": zeros_or_uniform(uniform, zero, "gralora_B", (k, r, o), r, dtype),
    }
    if h > 0:
        out["gralora_A_general"] = uniform("gralora_A_general", (in_features, h), in_features, dtype)
        out["gralora_B_general"] = zeros_or_uniform(uniform, zero, "gralora_B_general", (h, out_features), h, dtype)
    return out


def apply(x, adapter, scaling, *, dropout_rate=0.0, dropout_rng=None, precision=None,
          block_layout=layers.DEFAULT_BLOCK_LAYOUT):
    """``scale * (blocks(x) + x @ A_general @ B_general)`` in the layout ``block_layout``; the
    hybrid path draws its own dropout mask, as in PEFT."""
    layout = layers.layout_fn(block_layout)
    hybrid = "gralora_A_general" in adapter
    (xd, *xg), factor = layers.dropped_inputs(x, dropout_rate, dropout_rng, 2 if hybrid else 1)
    return layout(xd, xg[0] if hybrid else None, adapter, scaling * factor, precision)


def delta(adapter, scaling):
    return scaling * layers.gralora_delta(adapter["gralora_A"], adapter["gralora_B"],
                                          adapter.get("gralora_A_general"), adapter.get("gralora_B_general"))


def partition_spec(leaf: str, shape: tuple, s_in, s_out, axes) -> tuple:
    """The stacked factors split their block axis ``k`` over a ``model``-like entry when it
    divides ``k``, else their ``in/k`` (A) or ``out/k`` (B) axis. On a batch axis (``fsdp``:
    gathered before use, like the kernel) only the inner axis is split, so a block axis never
    collides with the batch. The hybrid factors follow LoRA: ``A (s_in, None)``, ``B (None, s_out)``."""
    if leaf == "gralora_A_general":
        return (s_in, None)
    if leaf == "gralora_B_general":
        return (None, s_out)
    s = s_in if leaf == "gralora_A" else s_out
    k, inner = shape[-3], (shape[-2] if leaf == "gralora_A" else shape[-1])
    on_inner = (None, s, None) if leaf == "gralora_A" else (None, None, s)
    if s is None:
        return (None, None, None)
    if axes.is_batch(s):
        return on_inner if inner % axes.size(s) == 0 else (None, None, None)
    if k % axes.size(s) == 0:
        return (s, None, None)
    return on_inner if inner % axes.size(s) == 0 else (None, None, None)


KIND = AdapterKind(
    name="gralora",
    order=10,
    peft_type="GRALORA",
    config_class=GraLoRAConfig,
    selects=None,
    leaves=LEAVES,
    peft_keys={
        "gralora_A": ("gralora_A", False),
        "gralora_B": ("gralora_B", False),
        "gralora_A_general": ("gralora_A_general.weight", True),
        "gralora_B_general": ("gralora_B_general.weight", True),
    },
    bias_only="gralora_only",
    output_fields=("r", "alpha", "gralora_k", "hybrid_r"),
    scaling=scaling,
    check_shape=check_shape,
    init=init,
    apply=apply,
    delta=delta,
    partition_spec=partition_spec,
    keep_sum=True,
)
