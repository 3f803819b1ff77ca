"""gralora-jax: GraLoRA (Granular Low-Rank Adaptation) for JAX/Flax, interchangeable with PEFT.

>>> from gralora_jax import GraLoRAConfig, GraLoRADense
>>> GraLoRAConfig(r=8, alpha=16, gralora_k=2).scaling
2.0
"""

from gralora_jax import kinds, tree
from gralora_jax.kinds import KINDS, AdapterKind
from gralora_jax.families import FAMILIES, Family
from gralora_jax.config import GraLoRAConfig, LoRAConfig, load_adapter_config
from gralora_jax.layers import (
    GraLoRADense,
    LoRADense,
    adapter_output,
    delta_kernel,
    init_gralora_adapter,
    init_lora_adapter,
    merge,
    unmerge,
)
from gralora_jax.loading import load_pretrained, load_tokenizer
from gralora_jax.models.inputs import check_token_ids
from gralora_jax.peft_io import load_adapter, save_adapter
from gralora_jax.surgery import GraLoRAModel, add_adapters, get_gralora_model
from gralora_jax.optim import OptimConfig, make_optimizer
from gralora_jax.sharding import make_mesh, param_partition_specs
from gralora_jax.train import (EXIT_CODES, TrainConfig, Trainer, TrainingDiverged, exit_code, make_causal_lm_loss_fn,
                               train)
from gralora_jax.checkpoint import Checkpointer, CorruptCheckpointError, compare_resume_guard
from gralora_jax.hostdevices import ensure_host_devices
from gralora_jax.distributed import DistributedConfig, gather_to_host, maybe_initialize_distributed, put_global

__all__ = [
    "KINDS",
    "AdapterKind",
    "kinds",
    "FAMILIES",
    "Family",
    "Checkpointer",
    "CorruptCheckpointError",
    "DistributedConfig",
    "EXIT_CODES",
    "TrainingDiverged",
    "compare_resume_guard",
    "exit_code",
    "OptimConfig",
    "TrainConfig",
    "Trainer",
    "check_token_ids",
    "ensure_host_devices",
    "gather_to_host",
    "make_causal_lm_loss_fn",
    "make_mesh",
    "make_optimizer",
    "maybe_initialize_distributed",
    "param_partition_specs",
    "put_global",
    "train",
    "GraLoRAConfig",
    "GraLoRADense",
    "GraLoRAModel",
    "LoRAConfig",
    "LoRADense",
    "adapter_output",
    "add_adapters",
    "delta_kernel",
    "get_gralora_model",
    "init_gralora_adapter",
    "init_lora_adapter",
    "load_adapter",
    "load_adapter_config",
    "load_pretrained",
    "load_tokenizer",
    "merge",
    "save_adapter",
    "tree",
    "unmerge",
]
__version__ = "0.1.0"
