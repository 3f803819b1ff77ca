"""Gemma, Gemma2 and Gemma3 (text) on the shared decoder.

Gemma: RMSNorm scaled by ``(1 + weight)`` (computed in float32), embeddings multiplied by
``sqrt(hidden_size)``, tied embeddings, GELU(tanh) MLP, usually ``head_dim`` 256.
Gemma2 adds ``query_pre_attn_scalar`` for the attention scale, tanh soft-capping of the
attention logits (``attn_logit_softcapping``, via an einsum attention with float32
softmax) and of the final logits (``final_logit_softcapping``), "sandwich" norms around
attention and MLP, and alternating sliding-window / global layers (``layer_types``).
All of it is read from the config by :func:`gralora_jax.models.spec.spec_from_hf_config`.
Gemma3 (text, ``gemma3_text``) adds per-head q/k norms (``(1 + weight)``) and a separate rotary
base for the sliding layers (``rope_local_base_freq``, no scaling) next to the full layers'
``rope_theta`` / ``rope_scaling``. Alternating windows mean Gemma2/3 cannot use ``scan_layers=True``.
"""

from __future__ import annotations

from transformers import Gemma2Config, Gemma3TextConfig, GemmaConfig

from gralora_jax.models.causal_lm import CausalLM


class GemmaForCausalLM(CausalLM):
    config_class = GemmaConfig


class Gemma2ForCausalLM(CausalLM):
    config_class = Gemma2Config


class Gemma3ForCausalLM(CausalLM):
    config_class = Gemma3TextConfig
