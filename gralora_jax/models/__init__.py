"""Our own flax.linen causal LMs with transformers' Flax parameter names.

Llama (incl. llama3 rope scaling), Qwen2, Qwen3, Mistral, Gemma, Gemma2, Gemma3 (text); see ``decoder.py``
for the tree layout and numerics, ``causal_lm.py`` for the call convention,
``auto.py`` for loading checkpoints, ``generation.py`` for KV-cache decoding.
"""

from gralora_jax.models.auto import MODEL_CLASSES, auto_model, from_pretrained
from gralora_jax.models.causal_lm import CausalLM
from gralora_jax.models.decoder import CausalLMOutput
from gralora_jax.models.generation import generate
from gralora_jax.models.inputs import check_token_ids
from gralora_jax.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM, GemmaForCausalLM
from gralora_jax.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from gralora_jax.models.layout import stack_layer_params, unstack_layer_params
from gralora_jax.models.spec import SUPPORTED_MODEL_TYPES, DecoderSpec, spec_from_hf_config

__all__ = [
    "MODEL_CLASSES",
    "SUPPORTED_MODEL_TYPES",
    "auto_model",
    "check_token_ids",
    "from_pretrained",
    "generate",
    "stack_layer_params",
    "unstack_layer_params",
    "CausalLM",
    "CausalLMOutput",
    "DecoderSpec",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "GemmaForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "spec_from_hf_config",
]
