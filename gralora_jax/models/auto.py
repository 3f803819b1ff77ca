"""Pick the model class from a config's ``model_type``; load HF checkpoints into our models.

>>> from transformers import Qwen2Config
>>> type(auto_model(Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
...     num_hidden_layers=1, intermediate_size=128, vocab_size=128))).__name__
'Qwen2ForCausalLM'

:func:`from_pretrained` is :func:`gralora_jax.loading.load_pretrained` with ``use_ours=True``
(one loader: config reader, weight mapping, dtype cast; ``scan_layers=True`` stacks the layers).
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp

from gralora_jax import families
from gralora_jax.models.spec import SUPPORTED_MODEL_TYPES

# model_type -> our Flax model class (from the family table).
MODEL_CLASSES = {t: families.model_class(t) for t in SUPPORTED_MODEL_TYPES}


def _load_config(config_or_dir: Any):
    if isinstance(config_or_dir, (str, os.PathLike)):
        from gralora_jax.loading.pretrained import load_config  # one reader of config.json (validated, no remote code)

        return load_config(os.fspath(config_or_dir))
    if isinstance(config_or_dir, dict):
        from transformers import AutoConfig

        d = dict(config_or_dir)
        model_type = d.pop("model_type", None)
        if model_type not in MODEL_CLASSES:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(MODEL_CLASSES)}")
        return AutoConfig.for_model(model_type, **d)
    return config_or_dir


def auto_model(config_or_dir: Any, *, dtype=jnp.float32, param_dtype=None, **kwargs):
    """Our model class for ``config.model_type`` (a transformers config, a config dict, or a checkpoint dir).

    ``kwargs`` go to the class (``scan_layers``, ``remat_policy``, ``attn_implementation``,
    ``attention_mask_mode``). Raises ``ValueError`` naming unsupported model types.
    """
    config = _load_config(config_or_dir)
    model_type = getattr(config, "model_type", None)
    cls = MODEL_CLASSES.get(model_type)
    if cls is None:
        raise ValueError(f"unsupported model_type {model_type!r}; gralora_jax.models supports {sorted(MODEL_CLASSES)}")
    return cls(config, dtype=dtype, param_dtype=param_dtype or dtype, **kwargs)


def from_pretrained(path_or_hub_id: Any, *, dtype=jnp.float32, param_dtype=None, strict: bool = True,
                    revision=None, **kwargs):
    """Load an HF checkpoint into our model -> ``(model, params)``; ``model.params`` is set too.

    Floating weights are cast to ``param_dtype`` (default: ``dtype``). With tied
    embeddings the model has no ``lm_head`` parameter; a checkpoint's ``lm_head.weight``
    (if saved) is then ignored. ``kwargs`` as in :func:`auto_model`.
    """
    from gralora_jax.loading.pretrained import load_pretrained  # the one loader

    return load_pretrained(path_or_hub_id, dtype=dtype, param_dtype=param_dtype, use_ours=True, revision=revision,
                           strict=strict, model_options=kwargs)
