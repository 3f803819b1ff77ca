"""gralora-jax: GraLoRA (Granular Low-Rank Adaptation) for JAX/Flax, interchangeable with PEFT."""

from gralora_jax import tree

__all__ = ["tree"]
__version__ = "0.1.0"
