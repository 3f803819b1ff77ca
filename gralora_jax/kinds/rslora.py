"""rsLoRA (PEFT's ``LoraConfig(use_rslora=True)``): LoRA with the rank-stabilised scale.

Kalajdzievski (2023): ``lora_alpha / sqrt(r)`` instead of ``lora_alpha / r`` keeps the adapter's
output and gradients of the same order as the rank grows. Everything else (leaves, init, output,
delta, PEFT keys, partition specs) is LoRA's; the file is still ``peft_type: "LORA"`` and says
``"use_rslora": true``, which is what selects this kind.
"""

from __future__ import annotations

import dataclasses
import math

from gralora_jax.config import LoRAConfig
from gralora_jax.kinds import lora


def scaling(config: LoRAConfig) -> float:
    """``lora_alpha / sqrt(r)``."""
    return config.lora_alpha / math.sqrt(config.r)


KIND = dataclasses.replace(
    lora.KIND,
    name="rslora",
    order=30,  # after LoRA, whose leaves it shares
    selects=lambda get: bool(get("use_rslora", False)),
    scaling=scaling,
)
