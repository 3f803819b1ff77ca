"""gralora-jax: GraLoRA (Granular Low-Rank Adaptation) for JAX/Flax, interchangeable with PEFT.

The names below are loaded on first use (PEP 562), so ``import gralora_jax`` and the jax-free
modules (:mod:`gralora_jax.hostdevices`, :mod:`gralora_jax.meshspec`) do not import jax, flax,
optax, orbax or transformers: an entry point can set the CPU host-device count before jax starts.

>>> from gralora_jax import GraLoRAConfig, GraLoRADense
>>> GraLoRAConfig(r=8, alpha=16, gralora_k=2).scaling
2.0
"""

from __future__ import annotations

import importlib

# public name -> the module defining it
_EXPORTS = {
    "gralora_jax.kinds": ("KINDS", "AdapterKind"),
    "gralora_jax.families": ("FAMILIES", "Family"),
    "gralora_jax.config": ("GraLoRAConfig", "LoRAConfig", "load_adapter_config"),
    "gralora_jax.layers": ("GraLoRADense", "LoRADense", "adapter_output", "delta_kernel", "init_gralora_adapter",
                           "init_lora_adapter", "merge", "unmerge"),
    "gralora_jax.loading": ("load_pretrained", "load_tokenizer"),
    "gralora_jax.models.inputs": ("check_token_ids",),
    "gralora_jax.peft_io": ("load_adapter", "save_adapter"),
    "gralora_jax.surgery": ("GraLoRAModel", "add_adapters", "get_gralora_model"),
    "gralora_jax.optim": ("OptimConfig", "make_optimizer"),
    "gralora_jax.sharding": ("make_mesh", "param_partition_specs"),
    "gralora_jax.train": ("EXIT_CODES", "TrainConfig", "Trainer", "TrainingDiverged", "exit_code",
                          "make_causal_lm_loss_fn", "train"),
    "gralora_jax.checkpoint": ("Checkpointer", "CorruptCheckpointError", "compare_resume_guard"),
    "gralora_jax.hostdevices": ("ensure_host_devices",),
    "gralora_jax.distributed": ("DistributedConfig", "gather_to_host", "maybe_initialize_distributed", "put_global"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
_SUBMODULES = ("tree", "kinds")

__all__ = sorted([*_WHERE, *_SUBMODULES])
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted({*globals(), *__all__})
