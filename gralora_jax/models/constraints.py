"""Activation sharding constraints, active only while a mesh is in context.

Parameters carry their shardings in; activations get theirs from XLA's propagation, which
follows the parameters. On an FSDP mesh that goes wrong: the embedding table is
``[vocab, hidden]`` with hidden over ``fsdp``, so the looked-up hidden states come out split
over ``fsdp`` along *hidden* with the whole batch on every device, and the rest of the network
inherits that (measured on ``1x8x1``: the layer carry ``[B, T, hidden/8]``, every token on
every device). :func:`batch_sharded` pins the residual stream to the layout FSDP means: batch
over the data axes (``data``, ``fsdp``), the other axes whole (in the Megatron rules the
residual is replicated over ``model``; the column/row projections split their own features).

Without a mesh in context (``jax.set_mesh``; :class:`gralora_jax.train.TrainStep` traces under
its own) or on one device these are the identity, so single-device code is unaffected.

>>> import jax.numpy as jnp
>>> x = jnp.ones((4, 3, 8))
>>> batch_sharded(x) is x  # no mesh in context
True
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P

from gralora_jax.meshspec import BATCH_AXES


def context_mesh():
    """The mesh set with ``jax.set_mesh`` (concrete or abstract) when it has several devices, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or math.prod(mesh.shape.values()) <= 1:
        return None
    return mesh


def split_axes(mesh, names, dim: int):
    """The axes among ``names`` (present, size > 1) whose product divides ``dim``, as a spec entry."""
    axes = tuple(a for a in names if a in mesh.shape and mesh.shape[a] > 1)
    if not axes or dim % math.prod(mesh.shape[a] for a in axes):
        return None
    return axes[0] if len(axes) == 1 else axes


def batch_sharded(x: jax.Array, axes=BATCH_AXES, *, rest=None) -> jax.Array:
    """``x [B, ...]`` constrained to batch over the mesh's ``axes`` (default its data axes), other
    axes ``rest`` (replicated; ``P.UNCONSTRAINED``: XLA's choice); ``x`` itself without a mesh in
    context, or when those axes do not divide ``B`` (then XLA decides)."""
    mesh = context_mesh()
    if mesh is None or x.ndim == 0:
        return x
    b = split_axes(mesh, axes, x.shape[0])
    if b is None:
        return x
    return jax.lax.with_sharding_constraint(x, P(b, *([rest] * (x.ndim - 1))))


def batch_pinned(x: jax.Array) -> jax.Array:
    """Only the batch axis of ``x`` over the data axes, the others left to XLA (an adapted layer's
    input: on a ``model`` axis a row-parallel layer's input keeps its features split)."""
    return batch_sharded(x, rest=P.UNCONSTRAINED)


def embedded(h: jax.Array) -> jax.Array:
    """:func:`batch_sharded` for an embedding lookup's output, in two steps: batch over ``fsdp``
    first (an all-to-all from the table's hidden-over-``fsdp`` layout), then over every data
    axis. In one step, with ``data`` and ``model`` axes besides (``2x2x2``), XLA finds no
    efficient path from hidden-split to batch-split and replicates the output."""
    return batch_sharded(batch_sharded(h, ("fsdp",)))


def vocab_split(kernel: jax.Array):
    """An output head ``kernel [D, V]`` with ``V`` over ``fsdp`` when an FSDP mesh is in context
    (and ``fsdp`` divides ``V``), with that spec entry; ``(kernel, None)`` otherwise.

    With the tokens split over ``fsdp``, a head split along ``D`` would be gathered whole on every
    device (1 GiB in bf16 for Llama-3's 128256 x 4096). Split along ``V`` it stays 1/fsdp per
    device; each loss chunk's hidden states are gathered instead and the log-sum-exp is reduced
    across devices (:func:`vocab_sharded`, ``gralora_jax.losses.chunked_cross_entropy``)."""
    mesh = context_mesh()
    if mesh is None or kernel.ndim != 2:
        return kernel, None
    v = split_axes(mesh, ("fsdp",), kernel.shape[1])
    if v is None:
        return kernel, None
    return jax.lax.with_sharding_constraint(kernel, P(None, v)), v


def vocab_sharded(logits: jax.Array, entry) -> jax.Array:
    """``logits [..., V]`` constrained to ``V`` over ``entry`` (from :func:`vocab_split`), the
    other axes whole; ``logits`` itself when ``entry`` is None."""
    if entry is None:
        return logits
    return jax.lax.with_sharding_constraint(logits, P(*([None] * (logits.ndim - 1)), entry))

