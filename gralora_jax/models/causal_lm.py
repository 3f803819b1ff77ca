"""The user-facing model object, shaped like a transformers Flax model.

``CausalLM`` holds a transformers config (``.config``), the linen module (``.module``)
and optionally parameters (``.params``), and is called like ``FlaxLlamaForCausalLM``::

    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, ...), dtype=jnp.bfloat16)
    params = model.init_params(jax.random.PRNGKey(0))     # random weights of that shape
    out = model(input_ids, attention_mask, params=params)  # out.logits: [B, T, vocab] float32

``model.apply(params, ...)`` is the same thing as a pure function (jit it);
``compute_logits=False`` skips the vocabulary projection and returns
``out.last_hidden_state`` for a chunked loss (:mod:`gralora_jax.losses`) with
``model.lm_head_kernel(params)``.

Token ids given on the host (numpy, lists) are checked against the vocabulary and an
out-of-range id raises ``ValueError``; inside ``jit`` nothing can raise, and an id
``>= vocab_size`` gives NaN logits while a negative one counts from the end
(:mod:`gralora_jax.models.inputs`).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from gralora_jax.models.decoder import CausalLMModule, init_cache
from gralora_jax.models.inputs import check_token_ids
from gralora_jax.models.spec import spec_from_hf_config


class CausalLM:
    """Base wrapper; subclasses set ``config_class`` (a transformers config class)."""

    config_class: Any = None

    def __init__(
        self,
        config,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        scan_layers: bool = False,
        scan_unroll: int = 1,
        remat_policy: str = "none",
        attn_implementation: Optional[str] = None,
        attention_mask_mode: str = "mask",
        params=None,
    ):
        """
        Args:
          config: a transformers config (``LlamaConfig``, ``Qwen2Config``, ...).
          dtype: compute dtype (activations, matmuls); logits are returned in float32.
          param_dtype: dtype of freshly initialised parameters (loading casts to it too).
          scan_layers: ``nn.scan`` over layers; parameters under ``model/layers/scan``.
          scan_unroll: with ``scan_layers``, layers per scan iteration (1: compile time flat in
            depth; more: longer compiles, fusion across the unrolled layers).
          remat_policy: per-layer ``jax.checkpoint`` policy name (see ``spec.REMAT_POLICIES``).
          attn_implementation: None (default: cuDNN flash attention on GPU for bf16/fp16 where it
            applies, XLA elsewhere; see ``models.attention``), or force "xla" / "cudnn" / "splash"
            (Pallas TPU splash kernel, ``models.splash``).
          attention_mask_mode: "mask" (any padding) or "lengths" (right padding only, cuDNN-friendly).
          params: optional parameter tree kept as ``self.params`` (used when a call passes none).
        """
        if self.config_class is not None and not isinstance(config, self.config_class):
            raise ValueError(f"{type(self).__name__} expects a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.spec = spec_from_hf_config(
            config,
            scan_layers=scan_layers,
            scan_unroll=scan_unroll,
            remat_policy=remat_policy,
            attn_implementation=attn_implementation,
            attention_mask_mode=attention_mask_mode,
        )
        self.module = CausalLMModule(self.spec, dtype=dtype, param_dtype=param_dtype)
        self.params = params

    # -- parameters -------------------------------------------------------------------
    def init_params(self, rng, input_shape=(1, 8)):
        """Random parameters (transformers' init: normal(initializer_range) kernels, unit norms), jit-compiled.

        For a sharded init, wrap it yourself: ``jax.jit(model.init_params, out_shardings=...)``.
        """
        ids = jnp.zeros(input_shape, jnp.int32)
        return jax.jit(lambda r: self.module.init(r, ids)["params"])(rng)

    @property
    def params_shape_tree(self):
        """``jax.ShapeDtypeStruct`` tree of the parameters (no allocation)."""
        return jax.eval_shape(lambda r: self.init_params(r), jax.random.PRNGKey(0))

    def lm_head_kernel(self, params):
        """The ``[hidden, vocab]`` output projection (the embedding transposed when tied)."""
        if self.spec.tie_word_embeddings:
            return params["model"]["embed_tokens"]["embedding"].T
        return params["lm_head"]["kernel"]

    def init_cache(self, batch: int, max_len: int, dtype=None):
        """Zero KV cache for :mod:`gralora_jax.models.generation` (dtype defaults to the compute dtype)."""
        return init_cache(self.spec, batch, max_len, dtype or self.dtype)

    # -- forward ----------------------------------------------------------------------
    def apply(self, params, input_ids, attention_mask=None, position_ids=None, *, dropout_rng=None,
              train: bool = False, output_hidden_states: bool = False, compute_logits: bool = True,
              cache=None, cache_index=None):
        """Pure forward pass; returns :class:`~gralora_jax.models.decoder.CausalLMOutput`.

        ``train``/``dropout_rng`` are accepted for the transformers convention: the base
        model has no dropout, but ``dropout_rng`` is passed as the ``"dropout"`` rng so
        intercepting adapters (GraLoRA dropout) can draw from it.
        """
        del train
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
        return self.module.apply(
            {"params": params}, jnp.asarray(input_ids), attention_mask, position_ids, cache, cache_index,
            output_hidden_states, compute_logits, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, params=None, dropout_rng=None,
                 train: bool = False, return_dict: bool = True, output_hidden_states: bool = False,
                 compute_logits: bool = True, **kwargs):
        if params is None:
            params = self.params
        if params is None:
            raise ValueError("no params: pass params=... or set model.params (e.g. from init_params/from_pretrained)")
        if kwargs:
            raise ValueError(f"unsupported arguments: {sorted(kwargs)}")
        check_token_ids(input_ids, self.spec.vocab_size)  # host inputs only; traced ids pass (see models.inputs)
        out = self.apply(params, input_ids, attention_mask, position_ids, dropout_rng=dropout_rng, train=train,
                         output_hidden_states=output_hidden_states, compute_logits=compute_logits)
        if not return_dict:
            return (out.logits,) + ((out.hidden_states,) if output_hidden_states else ())
        return out

    def __repr__(self):
        return (f"{type(self).__name__}({self.spec.model_type}, layers={self.spec.num_layers}, "
                f"hidden={self.spec.hidden_size}, dtype={jnp.dtype(self.dtype).name}, "
                f"scan_layers={self.spec.scan_layers}, remat_policy={self.spec.remat_policy!r})")
