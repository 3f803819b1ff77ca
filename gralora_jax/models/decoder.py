"""A config-driven decoder-only causal LM in flax.linen (Llama, Qwen2, Mistral, Gemma, Gemma2).

The parameter tree is the one of transformers' ``FlaxLlamaForCausalLM``::

    model/embed_tokens/embedding                      [vocab, hidden]
    model/layers/<i>/self_attn/{q,k,v,o}_proj/kernel  [in, out]   (+ bias where the arch has one)
    model/layers/<i>/mlp/{gate,up,down}_proj/kernel   [in, out]
    model/layers/<i>/input_layernorm/weight           [hidden]
    model/layers/<i>/post_attention_layernorm/weight  [hidden]
    (Gemma2 adds pre_feedforward_layernorm, post_feedforward_layernorm)
    model/norm/weight                                 [hidden]
    lm_head/kernel                                    [hidden, vocab]   (absent when embeddings are tied)

Every projection is a plain ``flax.linen.Dense`` with those names, so the GraLoRA surgery
can route it through the adapter math with ``nn.intercept_methods`` without knowing this
file. Tied embeddings (``tie_word_embeddings``, always for Gemma) use the embedding matrix
transposed for the logits; there is then no ``lm_head`` parameter (PEFT does not target
``lm_head`` by default, and this saves a vocab x hidden copy).

``scan_layers=True`` runs ``nn.scan`` over the layers (compile time independent of depth);
the parameters then live under ``model/layers/scan/...`` with a leading layer axis:
convert with :func:`gralora_jax.models.layout.stack_layer_params` /
``unstack_layer_params`` (checkpoints are always read and written unrolled).
``remat_policy`` wraps each layer in ``jax.checkpoint`` (``nn.remat``) in either layout.
With a mesh in context the embeddings and every layer's output are pinned to batch over the data
axes (:mod:`gralora_jax.models.constraints`); without one they are left to XLA.

Numerics: RMSNorm statistics in float32; rotary in float32; attention logits and softmax
in float32 (``jax.nn.dot_product_attention``'s XLA path); everything else in ``dtype``
with parameters stored in ``param_dtype``. Logits are returned in float32.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from gralora_jax.models.attention import attention, cache_mask
from gralora_jax.models.constraints import batch_sharded, embedded
from gralora_jax.models.rope import apply_rope, rope_cos_sin
from gralora_jax.models.spec import DecoderSpec

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def activation(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported hidden_act {name!r}; supported: {sorted(_ACTIVATIONS)}") from None


@flax.struct.dataclass
class CausalLMOutput:
    """What the model returns (a pytree, so it can leave ``jax.jit``)."""

    logits: Any  # [B, T, vocab] float32, or None when compute_logits=False
    last_hidden_state: Any = None  # [B, T, hidden] after the final norm, in the compute dtype
    hidden_states: Any = None  # tuple: embeddings + each layer's output (output_hidden_states=True, unrolled only)
    past_key_values: Any = None  # updated KV cache when one was passed


class RMSNorm(nn.Module):
    """``x / rms(x) * (offset + weight)``; statistics in float32, eps from the config."""

    eps: float
    offset: float = 0.0  # Gemma stores weight - 1 (init zeros) and multiplies by (1 + weight)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        weight = self.param("weight", init, (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.offset:  # Gemma: scale in float32, then cast
            return (normed * (self.offset + weight.astype(jnp.float32))).astype(self.dtype)
        return weight.astype(self.dtype) * normed.astype(self.dtype)


def _dense(spec: DecoderSpec, features: int, bias: bool, name: str, dtype, param_dtype):
    return nn.Dense(
        features,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.initializers.normal(spec.initializer_range),
        name=name,
    )


class Attention(nn.Module):
    spec: DecoderSpec
    window: Optional[int]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, key_mask, kv_lengths, cache, cache_index, kv_valid):
        s = self.spec
        B, T, _ = x.shape
        N, K, H = s.num_heads, s.num_kv_heads, s.head_dim
        q = _dense(s, N * H, s.qkv_bias, "q_proj", self.dtype, self.param_dtype)(x).reshape(B, T, N, H)
        k = _dense(s, K * H, s.qkv_bias, "k_proj", self.dtype, self.param_dtype)(x).reshape(B, T, K, H)
        v = _dense(s, K * H, s.qkv_bias, "v_proj", self.dtype, self.param_dtype)(x).reshape(B, T, K, H)
        if s.qk_norm:  # Qwen3: per-head RMSNorm (weight [head_dim]) before rope
            q = RMSNorm(s.rms_norm_eps, s.norm_offset, self.dtype, self.param_dtype, name="q_norm")(q)
            k = RMSNorm(s.rms_norm_eps, s.norm_offset, self.dtype, self.param_dtype, name="k_norm")(k)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        scale = s.query_scale if s.query_scale is not None else H ** -0.5
        new_cache = None
        if cache is not None:
            ck = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, cache_index, 0, 0))
            cv = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, cache_index, 0, 0))
            new_cache = {"k": ck, "v": cv}
            mask = cache_mask(kv_valid, cache_index, T, self.window)
            # decoding: explicit mask over the cache slots, always the XLA path (tiny T, cuDNN gains nothing)
            out = attention(q, ck.astype(q.dtype), cv.astype(q.dtype), scale=scale, full_mask=mask,
                            softcap=s.attn_logit_softcap, implementation="xla")
        else:
            out = attention(q, k, v, scale=scale, window=self.window, key_mask=key_mask, kv_lengths=kv_lengths,
                            softcap=s.attn_logit_softcap, implementation=s.attn_implementation)
        out = _dense(s, s.hidden_size, s.o_bias, "o_proj", self.dtype, self.param_dtype)(out.reshape(B, T, N * H))
        return out, new_cache


class MLP(nn.Module):
    spec: DecoderSpec
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        s = self.spec
        gate = _dense(s, s.intermediate_size, s.mlp_bias, "gate_proj", self.dtype, self.param_dtype)(x)
        up = _dense(s, s.intermediate_size, s.mlp_bias, "up_proj", self.dtype, self.param_dtype)(x)
        return _dense(s, s.hidden_size, s.mlp_bias, "down_proj", self.dtype, self.param_dtype)(
            activation(s.hidden_act)(gate) * up)


class DecoderLayer(nn.Module):
    """One pre-norm block. ``__call__(h, *broadcast, cache) -> (h, new_cache)`` (scan-shaped)."""

    spec: DecoderSpec
    window: Optional[int]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, cos, sin, key_mask, kv_lengths, cache_index, kv_valid, cache):
        s = self.spec
        if s.local_rope is not None:  # Gemma3: cos/sin are (global, local) pairs; sliding layers take the local one
            cos, sin = (cos[1], sin[1]) if self.window is not None else (cos[0], sin[0])

        def norm(name):
            return RMSNorm(s.rms_norm_eps, s.norm_offset, self.dtype, self.param_dtype, name=name)

        attn_out, new_cache = Attention(s, self.window, self.dtype, self.param_dtype, name="self_attn")(
            norm("input_layernorm")(h), cos, sin, key_mask, kv_lengths, cache, cache_index, kv_valid)
        mlp = MLP(s, self.dtype, self.param_dtype, name="mlp")
        if s.sandwich_norms:  # Gemma2, Gemma3
            h = h + norm("post_attention_layernorm")(attn_out)
            h = h + norm("post_feedforward_layernorm")(mlp(norm("pre_feedforward_layernorm")(h)))
        else:
            h = h + attn_out
            h = h + mlp(norm("post_attention_layernorm")(h))
        return batch_sharded(h), new_cache


def _layer_class(spec: DecoderSpec):
    if spec.remat_policy == "none":
        return DecoderLayer
    policy = None if spec.remat_policy == "full" else getattr(jax.checkpoint_policies, spec.remat_policy)
    return nn.remat(DecoderLayer, policy=policy, prevent_cse=not spec.scan_layers)


class LayerStack(nn.Module):
    """``layers/<i>`` (unrolled) or ``layers/scan`` (``nn.scan``, leading layer axis)."""

    spec: DecoderSpec
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, cos, sin, key_mask, kv_lengths, cache_index, kv_valid, cache, output_hidden_states):
        s = self.spec
        layer_cls = _layer_class(s)
        if s.scan_layers:
            scanned = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,) * 6 + (0,),
                length=s.num_layers,
                unroll=s.scan_unroll,
            )(s, s.windows[0], self.dtype, self.param_dtype, name="scan")
            h, new_cache = scanned(h, cos, sin, key_mask, kv_lengths, cache_index, kv_valid, cache)
            return h, None, new_cache
        hiddens = [h] if output_hidden_states else None
        new_cache = {} if cache is not None else None
        for i in range(s.num_layers):
            layer = layer_cls(s, s.windows[i], self.dtype, self.param_dtype, name=str(i))
            h, c = layer(h, cos, sin, key_mask, kv_lengths, cache_index, kv_valid,
                         None if cache is None else cache[str(i)])
            if cache is not None:
                new_cache[str(i)] = c
            if output_hidden_states:
                hiddens.append(h)
        return h, hiddens, new_cache


class DecoderModel(nn.Module):
    """Embeddings, layers and final norm (the ``model`` sub-tree)."""

    spec: DecoderSpec
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask, position_ids, cache, cache_index, output_hidden_states):
        s = self.spec
        embed = nn.Embed(s.vocab_size, s.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                         embedding_init=nn.initializers.normal(s.initializer_range), name="embed_tokens")
        h = embed(input_ids).astype(self.dtype)
        if s.embed_scale:
            h = h * jnp.asarray(math.sqrt(s.hidden_size), self.dtype)
        h = embedded(h)
        cos, sin = rope_cos_sin(s.rope, position_ids)
        if s.local_rope is not None:  # Gemma3: (global, local) pairs, picked per layer
            cos_l, sin_l = rope_cos_sin(s.local_rope, position_ids)
            cos, sin = (cos, cos_l), (sin, sin_l)
        key_mask = kv_lengths = kv_valid = None
        if cache is not None:
            kv_valid = attention_mask.astype(bool)
        elif attention_mask is not None:
            if s.attention_mask_mode == "lengths":
                kv_lengths = jnp.sum(attention_mask.astype(jnp.int32), axis=-1)
            else:
                key_mask = attention_mask.astype(bool)[:, None, None, :]
        h, hiddens, new_cache = LayerStack(s, self.dtype, self.param_dtype, name="layers")(
            h, cos, sin, key_mask, kv_lengths, cache_index, kv_valid, cache, output_hidden_states)
        h = RMSNorm(s.rms_norm_eps, s.norm_offset, self.dtype, self.param_dtype, name="norm")(h)
        return h, hiddens, new_cache


def default_position_ids(input_ids, attention_mask):
    """``cumsum(mask) - 1`` (clipped at 0) with a mask, else ``arange``; right for left and right padding."""
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(input_ids.shape[-1], dtype=jnp.int32), input_ids.shape)
    m = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)


class CausalLMModule(nn.Module):
    """The full causal LM. Call convention mirrors transformers' Flax models (see ``CausalLM``).

    With ``cache`` (from :func:`init_cache`), ``attention_mask`` must be ``[B, cache_len]``
    marking the cache slots that hold real tokens after this call's write, ``cache_index``
    is the slot of ``input_ids[:, 0]``, and ``position_ids`` are required.
    """

    spec: DecoderSpec
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None, cache_index=None,
                 output_hidden_states: bool = False, compute_logits: bool = True):
        s = self.spec
        if cache is not None:
            if position_ids is None or attention_mask is None or cache_index is None:
                raise ValueError("with a cache, position_ids, attention_mask ([B, cache_len]) and cache_index "
                                 "are required")
        elif position_ids is None:
            position_ids = default_position_ids(input_ids, attention_mask)
        if output_hidden_states and s.scan_layers:
            raise ValueError("output_hidden_states=True needs the unrolled layout (scan_layers=False)")
        h, hiddens, new_cache = DecoderModel(s, self.dtype, self.param_dtype, name="model")(
            input_ids, attention_mask, position_ids, cache,
            None if cache_index is None else jnp.asarray(cache_index, jnp.int32), output_hidden_states)
        logits = None
        if s.tie_word_embeddings:
            if compute_logits:
                emb = self.variables["params"]["model"]["embed_tokens"]["embedding"]
                logits = jnp.einsum("...d,vd->...v", h, emb.astype(self.dtype))
        else:
            lm_head = _dense(s, s.vocab_size, False, "lm_head", self.dtype, self.param_dtype)
            if compute_logits or self.is_initializing():
                logits = lm_head(h)
        if logits is not None:
            logits = logits.astype(jnp.float32)
            if s.final_logit_softcap is not None:
                logits = s.final_logit_softcap * jnp.tanh(logits / s.final_logit_softcap)
            if not compute_logits:
                logits = None
        return CausalLMOutput(
            logits=logits,
            last_hidden_state=h,
            hidden_states=tuple(hiddens) if hiddens is not None else None,
            past_key_values=new_cache,
        )


def init_cache(spec: DecoderSpec, batch: int, max_len: int, dtype=jnp.float32):
    """Zero KV cache: ``{"<i>": {"k", "v"}}`` of ``[B, max_len, kv_heads, head_dim]`` (scan: one stacked entry)."""
    shape = (batch, max_len, spec.num_kv_heads, spec.head_dim)
    if spec.scan_layers:
        z = jnp.zeros((spec.num_layers,) + shape, dtype)
        return {"k": z, "v": z}
    return {str(i): {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for i in range(spec.num_layers)}
