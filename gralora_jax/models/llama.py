"""Llama (1/2/3.x), Qwen2/Qwen2.5, Qwen3 and Mistral: one config-driven decoder, four names.

The differences are all read from the transformers config by
:func:`gralora_jax.models.spec.spec_from_hf_config`: rope_theta / rope_scaling
(linear, dynamic, llama3), GQA, Qwen2's bias on q/k/v (not o), Qwen3's q/k RMSNorm, Mistral's sliding window,
tied embeddings. The modules are in :mod:`gralora_jax.models.decoder`.

>>> from transformers import LlamaConfig
>>> import jax
>>> cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
...                   num_attention_heads=4, num_key_value_heads=2)
>>> model = LlamaForCausalLM(cfg)
>>> model.params_shape_tree["model"]["layers"]["0"]["self_attn"]["k_proj"]["kernel"].shape
(64, 32)
"""

from __future__ import annotations

from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from gralora_jax.models.causal_lm import CausalLM


class LlamaForCausalLM(CausalLM):
    config_class = LlamaConfig


class Qwen2ForCausalLM(CausalLM):
    config_class = Qwen2Config


class MistralForCausalLM(CausalLM):
    config_class = MistralConfig


class Qwen3ForCausalLM(CausalLM):
    config_class = Qwen3Config
