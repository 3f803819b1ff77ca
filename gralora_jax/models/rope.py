"""Rotary position embeddings with the rope_scaling variants of transformers' PyTorch models.

transformers' Flax Llama hard-codes base 10000 and ignores ``rope_scaling``; this module
follows the PyTorch models instead: ``rope_theta``, ``partial_rotary_factor`` and the
scaling types ``linear`` (positions divided by ``factor``), ``dynamic`` (NTK: the base
grows once the longest position seen in the call exceeds ``max_position_embeddings``)
and ``llama3`` (long wavelengths divided by ``factor``, a smooth ramp in between).

Rotation uses the "rotate half" layout of the HF checkpoints (feature ``i`` pairs with
``i + rotary_dim/2``). Angles and the rotation are computed in float32.

>>> import jax.numpy as jnp
>>> spec = RopeSpec(theta=10000.0, rotary_dim=4)
>>> inv_freq(spec).tolist()
[1.0, 0.009999999776482582]
>>> cos, sin = rope_cos_sin(spec, jnp.zeros((1, 3), jnp.int32))
>>> cos.shape
(1, 3, 4)
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from gralora_jax.models.spec import RopeSpec


def _base_inv_freq(theta, dim: int):
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def inv_freq(spec: RopeSpec, seq_len=None):
    """Inverse frequencies ``[rotary_dim // 2]`` (float32).

    ``seq_len`` (may be traced) matters only for ``dynamic``: the longest position + 1
    in the current call, as transformers computes it from ``position_ids``.
    """
    dim = spec.rotary_dim
    kind = spec.rope_type
    if kind == "default":
        return _base_inv_freq(spec.theta, dim)
    if kind == "linear":
        return _base_inv_freq(spec.theta, dim) / spec.factor
    if kind == "dynamic":
        max_pos = spec.max_position_embeddings
        length = jnp.maximum(jnp.asarray(max_pos if seq_len is None else seq_len, jnp.float32), max_pos)
        growth = (spec.factor * length / max_pos) - (spec.factor - 1.0)
        theta = spec.theta * growth ** (dim / (dim - 2))
        return _base_inv_freq(theta, dim)
    if kind == "llama3":
        freq = _base_inv_freq(spec.theta, dim)
        wavelen = 2.0 * math.pi / freq
        ctx = spec.original_max_position_embeddings
        low_wavelen = ctx / spec.low_freq_factor  # longer than this: fully scaled
        high_wavelen = ctx / spec.high_freq_factor  # shorter than this: untouched
        ramp = (ctx / wavelen - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor)
        mid = (1.0 - ramp) * freq / spec.factor + ramp * freq
        out = jnp.where(wavelen > low_wavelen, freq / spec.factor, freq)
        between = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(between, mid, out)
    raise ValueError(f"unsupported rope type {kind!r}")


def rope_cos_sin(spec: RopeSpec, position_ids):
    """``cos, sin`` of shape ``[batch, seq, rotary_dim]`` (float32) for integer ``position_ids``."""
    seq_len = jnp.max(position_ids) + 1 if spec.rope_type == "dynamic" else None
    freq = inv_freq(spec, seq_len)
    angles = position_ids.astype(jnp.float32)[..., None] * freq  # [B, T, dim/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate ``x`` ``[batch, seq, heads, head_dim]`` by per-position ``cos/sin`` ``[batch, seq, rotary_dim]``.

    Features beyond ``rotary_dim`` (partial rotary) pass through unchanged.
    """
    dim = cos.shape[-1]
    xf = x.astype(jnp.float32)
    rot, rest = xf[..., :dim], xf[..., dim:]
    half = dim // 2
    rotated_half = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = rot * c + rotated_half * s
    if rest.shape[-1]:
        out = jnp.concatenate([out, rest], axis=-1)
    return out.astype(x.dtype)
