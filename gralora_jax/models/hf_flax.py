"""transformers' Flax causal LMs behind the interface :func:`gralora_jax.models.generate` decodes with.

:func:`generate` needs three things of a model: ``apply(params, input_ids, attention_mask,
position_ids, cache, cache_index) -> output`` with ``.logits`` and ``.past_key_values``, an empty
KV cache for ``batch x length`` slots, and the batch axis of the cache arrays. Our
:class:`~gralora_jax.models.causal_lm.CausalLM` has them natively; this module gives them for a
transformers ``Flax*ForCausalLM`` (Llama, Mistral, Gemma, GPT-2, GPT-Neo, OPT, ...), so one
decoder (KV cache, HF-style beam search) serves every causal LM the library can load.

transformers' Flax attention keeps its own write position (a ``cache_index`` scalar per layer,
advanced by the number of tokens written), so ``cache_index`` is not passed on: ``generate``
writes the prompt at slot 0 and then one token per step, exactly the order those counters
follow. Its attention mask spans the whole cache (``[B, P + max_new_tokens]``), which is what
``generate`` passes.

>>> class Fake:  # anything with ``init_cache`` and a ``config.vocab_size``
...     class config:
...         vocab_size = 7
...     def init_cache(self, batch, length): ...
>>> is_hf_flax(Fake()), vocab_size(Fake())
(True, 7)
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def is_hf_flax(model: Any) -> bool:
    """True for a transformers Flax model with a KV cache (not one of :mod:`gralora_jax.models`)."""
    return getattr(model, "spec", None) is None and callable(getattr(model, "init_cache", None))


def vocab_size(model: Any) -> int | None:
    return getattr(getattr(model, "config", None), "vocab_size", None)


def apply_fn(model: Any) -> Callable:
    """``(params, input_ids, attention_mask, position_ids, cache, cache_index) -> output`` of ``model``."""

    def apply(params, input_ids, attention_mask, position_ids, cache, cache_index):
        del cache_index  # transformers' attention layers count their own write position
        return model(input_ids, attention_mask=attention_mask, position_ids=position_ids, params=params,
                     past_key_values=cache)

    return apply


def init_cache(model: Any, batch: int, length: int) -> dict:
    """An all-zero cache (write positions 0) of ``model.init_cache(batch, length)``'s shapes.

    ``init_cache`` itself initialises the whole network to find them; under ``eval_shape`` that
    costs nothing, and zeros are what it would return."""
    shapes = jax.eval_shape(lambda: model.init_cache(batch, length))
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
