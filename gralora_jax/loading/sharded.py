"""Load a checkpoint straight onto a device mesh, each device reading only its own shard.

:func:`load_pretrained_sharded` is :func:`~gralora_jax.loading.pretrained.load_pretrained`
for runs on a mesh (several chips, several hosts). The safetensors reader memory-maps the
files and the torch -> Flax conversion only transposes (a view), so the parameter tree it
builds costs no memory; every leaf is then created with ``jax.make_array_from_callback``
under its ``NamedSharding``, and the callback copies (and casts) just the block of the
memory map that device holds. The whole model never sits on one device or, with a model or
FSDP axis, in one host's memory: a host reads the shards of its own devices (a replicated
leaf once per host, not once per device). There is one placed copy of the base, which
:func:`gralora_jax.surgery.get_gralora_model` and :class:`gralora_jax.train.Trainer` use as is.

HF Flax ``.msgpack`` and GGUF checkpoints have no such lazy form: they are read whole on each
host, then placed shard by shard the same way.

The model is built as :func:`~gralora_jax.loading.pretrained.load_pretrained` builds it (one
:func:`~gralora_jax.loading.pretrained.prepare` step: source, config, ``build_model``).
``model_options`` (``scan_layers``, ``remat_policy``, ``attn_implementation``: see
:mod:`gralora_jax.models`) build our model with those options; with ``scan_layers`` the
per-layer tensors are presented as one stacked ``[L, ...]`` leaf per parameter
(``model/layers/scan/...``, the layout of :mod:`gralora_jax.models.layout`) whose blocks are
read layer by layer, so stacking costs no extra copy either.

>>> from gralora_jax.sharding import make_mesh                                # doctest: +SKIP
>>> model, params = load_pretrained_sharded("meta-llama/Llama-3.1-8B", make_mesh("2x8x1"),
...                                         dtype=jnp.bfloat16)               # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gralora_jax import families
from gralora_jax.loading.convert import is_floating
from gralora_jax.loading.pretrained import attach_params, prepare, read_weights
from gralora_jax.tree import flatten, unflatten


def _index_key(index: tuple) -> tuple:
    return tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in index)


def _read_block(view, index: tuple, dtype) -> np.ndarray:
    """One device's block of a (memory-mapped) host array, copied and cast."""
    block = view[index]
    return np.ascontiguousarray(block, dtype=dtype if dtype is not None and is_floating(block) else None)


def place_host_leaf(view, sharding: jax.sharding.Sharding, dtype=None) -> jax.Array:
    """A global ``jax.Array`` of ``view`` (any numpy-indexable host array, e.g. a memory map)
    under ``sharding``; only this process's devices' blocks are read, each distinct block once."""
    cache: dict[tuple, np.ndarray] = {}

    def block(index):
        key = _index_key(index)
        if key not in cache:
            cache[key] = _read_block(view, index, dtype)
        return cache[key]

    return jax.make_array_from_callback(tuple(view.shape), sharding, block)


class _Stacked:
    """Per-layer host arrays seen as one ``[L, ...]`` array; indexing reads only the layers and block asked for."""

    def __init__(self, parts):
        self.parts = parts
        self.shape = (len(parts), *np.shape(parts[0]))
        self.dtype = parts[0].dtype

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        return np.stack([np.asarray(self.parts[i][index[1:]]) for i in range(len(self.parts))[index[0]]])


def _stack_layers(views: Mapping) -> dict:
    """``model/layers/<i>/...`` -> ``model/layers/scan/...`` (lazily stacked leaves)."""
    layers = views["model"]["layers"]
    keys = sorted(layers, key=int)
    per_layer = [flatten(layers[k]) for k in keys]
    stacked = {p: _Stacked([flat[p] for flat in per_layer]) for p in per_layer[0]}
    out = dict(views)
    out["model"] = {**views["model"], "layers": {"scan": unflatten(stacked)}}
    return out


def load_pretrained_sharded(
    path_or_hub_id: str | os.PathLike,
    mesh: Mesh,
    *,
    rules: Any = None,
    specs: Mapping[str, Any] | None = None,
    dtype=jnp.float32,
    param_dtype=None,
    use_ours: bool | None = None,
    revision: str | None = None,
    strict: bool = True,
    model_options: Mapping[str, Any] | None = None,
):
    """Load a checkpoint (dir, hub id or ``.gguf``) directly onto ``mesh`` -> ``(model, params)``.

    Args:
      path_or_hub_id, dtype, param_dtype, use_ours, revision, strict: as in
        :func:`~gralora_jax.loading.pretrained.load_pretrained` (causal LMs).
      mesh: the device mesh the run uses.
      rules: sharding rules for :func:`gralora_jax.sharding.param_partition_specs` (an
        architecture name or a list of ``(regex, spec)``); default: the config's
        ``model_type`` when it has rules, else replicated.
      specs: a tree of ``PartitionSpec`` to use instead of ``rules``.
      model_options: keyword options for our model class (``scan_layers``, ``remat_policy``,
        ``attn_implementation``); needs a model type :mod:`gralora_jax.models` supports.

    The returned params are global ``jax.Array`` leaves with
    ``NamedSharding(mesh, spec)``; adapters added later get their specs from the same
    rules (an adapter follows its kernel), so the base specs match the full tree's.
    """
    from gralora_jax import sharding as sharding_lib

    param_dtype = param_dtype or dtype
    prepared = prepare(path_or_hub_id, dtype=dtype, param_dtype=param_dtype, use_ours=use_ours, revision=revision,
                       model_options=model_options)
    views = read_weights(prepared, strict=strict)  # memory maps in the unrolled layout
    if prepared.scanned:
        views = _stack_layers(views)
    if specs is None:
        if rules is None:
            model_type = getattr(prepared.config, "model_type", "default")
            rules = model_type if families.sharding_rules(model_type) is not None else "default"
        specs = sharding_lib.param_partition_specs(views, rules, mesh)
    flat_specs = flatten(specs)
    flat = {p: place_host_leaf(v, jax.sharding.NamedSharding(mesh, flat_specs[p]), param_dtype)
            for p, v in flatten(views).items()}
    params = unflatten(flat)
    attach_params(prepared.model, params)
    return prepared.model, params
