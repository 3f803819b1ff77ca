"""Causal self-attention kernels: ``jax.nn.dot_product_attention`` plus masks built from data.

Two regimes:

* **No cache** (training, scoring): queries and keys are the same positions, so the causal
  and sliding-window structure is passed as ``is_causal`` / ``local_window_size`` (cuDNN
  can skip the masked blocks) and padding as either a boolean key mask ``[B, 1, 1, S]``
  (any padding side) or ``key_value_seq_lengths`` (right padding only; cuDNN supports it).
* **KV cache** (generation): queries sit at cache slots ``index .. index+T-1`` of a
  fixed-size cache, so the mask is explicit: slot ``j`` is visible to the query in slot
  ``i`` iff it holds a real token, ``j <= i`` and (with a window ``w``) ``j > i - w``
  (transformers' convention: the window counts the query itself).

GQA is native to ``jax.nn.dot_product_attention`` (K/V are not repeated). Its XLA path
computes logits in float32 and the softmax in float32, and materialises the ``[B, N, T, S]``
probabilities (kept for the backward pass); cuDNN's fused (flash) kernel keeps none.

Implementation choice (``implementation``): ``"xla"``, ``"cudnn"`` and ``"splash"`` force one;
``None`` (the models' default) picks cuDNN where it applies -- the default backend is a GPU,
bf16/fp16 inputs, head_dim a multiple of 8 up to 128, the no-cache path with no boolean key
mask (causality, sliding window and right-padding lengths are native to cuDNN) --, the Pallas
splash kernel on TPU where it applies -- the no-cache path, sequence length and head_dim
multiples of 128, and one device or a mesh in context (``jax.set_mesh``) for its ``shard_map``
(:mod:`gralora_jax.models.splash`) -- and XLA everywhere else (CPU, float32 on GPU, decoding
with a cache, left padding on GPU, short sequences). jax's own ``None`` still means XLA, hence
this choice here (:func:`choose_implementation`). Off TPU, ``"splash"`` runs through the Pallas
interpreter (tests).

Gemma2's logit soft-capping is expressible in neither, so :func:`softcap_attention` is a small
einsum implementation with the same masking and float32 softmax.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def cache_mask(kv_valid, cache_index, q_len: int, window: Optional[int] = None):
    """Boolean mask ``[B, 1, T, S]`` for queries at cache slots ``cache_index + arange(T)``.

    ``kv_valid``: ``[B, S]`` bool, slots that hold (or will hold, after this step's write)
    real tokens.
    """
    S = kv_valid.shape[-1]
    q_slot = cache_index + jnp.arange(q_len)[:, None]  # [T, 1]
    k_slot = jnp.arange(S)[None, :]  # [1, S]
    allowed = k_slot <= q_slot
    if window is not None:
        allowed = allowed & (k_slot > q_slot - window)
    return kv_valid[:, None, None, :] & allowed[None, None]


_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
IMPLEMENTATIONS = ("xla", "cudnn", "splash")


def choose_implementation(requested: Optional[str], q, *, key_mask=None, full_mask=None,
                          backend: Optional[str] = None) -> str:
    """``"xla"``, ``"cudnn"`` or ``"splash"`` for one attention call (see the module docstring).

    >>> import jax.numpy as jnp
    >>> q = jnp.zeros((1, 4, 2, 64), jnp.bfloat16)
    >>> choose_implementation(None, q, backend="gpu"), choose_implementation(None, q, backend="cpu")
    ('cudnn', 'xla')
    >>> choose_implementation(None, q.astype(jnp.float32), backend="gpu")
    'xla'
    """
    if requested is not None:
        if requested not in IMPLEMENTATIONS:
            raise ValueError(f"attention implementation must be None or one of {IMPLEMENTATIONS}, got {requested!r}")
        if requested == "splash" and full_mask is not None:
            return "xla"  # the splash kernel has no KV-cache form
        return requested
    backend = backend or jax.default_backend()
    head_dim = q.shape[-1]
    if backend == "tpu":
        return "splash" if _splash_applies(q, full_mask) else "xla"
    ok = (
        backend == "gpu"
        and q.dtype in _CUDNN_DTYPES
        and head_dim % 8 == 0
        and head_dim <= 128
        and key_mask is None
        and full_mask is None
    )
    return "cudnn" if ok else "xla"


def _splash_applies(q, full_mask) -> bool:
    """The splash kernel's conditions (module docstring) for an automatic choice on TPU."""
    from gralora_jax.models.constraints import context_mesh

    return (full_mask is None and q.shape[1] % 128 == 0 and q.shape[-1] % 128 == 0
            and (jax.device_count() == 1 or context_mesh() is not None))


def _full_mask(q_len, kv_len, window, key_mask):
    q = jnp.arange(q_len)[:, None]
    k = jnp.arange(kv_len)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    allowed = allowed[None, None]
    return allowed if key_mask is None else allowed & key_mask


def attention(
    q,
    k,
    v,
    *,
    scale: float,
    window: Optional[int] = None,
    key_mask=None,
    kv_lengths=None,
    full_mask=None,
    softcap: Optional[float] = None,
    implementation: Optional[str] = None,
):
    """Causal attention. ``q`` ``[B, T, N, H]``, ``k``/``v`` ``[B, S, K, H]`` -> ``[B, T, N, H]``.

    Exactly one way of masking is used:
    ``full_mask`` ``[B, 1, T, S]`` (cache path; causal/window already folded in), or the
    no-cache path where ``T == S`` and causality/window come from positions, plus optional
    ``key_mask`` ``[B, 1, 1, S]`` (bool) or ``kv_lengths`` ``[B]`` (right padding).
    """
    implementation = choose_implementation(implementation, q, key_mask=key_mask, full_mask=full_mask)
    if implementation == "splash":
        from gralora_jax.models.splash import sharded_splash_attention

        return sharded_splash_attention(q, k, v, scale=scale, window=window, key_mask=key_mask,
                                        kv_lengths=kv_lengths, softcap=softcap,
                                        interpret=jax.default_backend() != "tpu")
    if softcap is not None:
        if full_mask is None:
            full_mask = _full_mask(q.shape[1], k.shape[1], window, key_mask)
            if kv_lengths is not None:
                full_mask = full_mask & (jnp.arange(k.shape[1])[None, None, None, :] < kv_lengths[:, None, None, None])
        return softcap_attention(q, k, v, full_mask, scale=scale, softcap=softcap)
    if full_mask is not None:
        return jax.nn.dot_product_attention(q, k, v, mask=full_mask, scale=scale, implementation=implementation)
    kw = {}
    if window is not None:
        kw["local_window_size"] = (window - 1, 0)
    if kv_lengths is not None:
        lengths = kv_lengths.astype(jnp.int32)
        kw["query_seq_lengths"] = lengths
        kw["key_value_seq_lengths"] = lengths
    return jax.nn.dot_product_attention(
        q, k, v, mask=key_mask, scale=scale, is_causal=True, implementation=implementation, **kw
    )


def softcap_attention(q, k, v, mask, *, scale: float, softcap: float):
    """Attention with ``softcap * tanh(logits / softcap)`` before masking (Gemma2); float32 softmax."""
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    qg = q.reshape(B, T, K, G, H)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    logits = softcap * jnp.tanh(logits / softcap)
    if mask is not None:
        m = mask.reshape(mask.shape[0], 1, 1, *mask.shape[2:]) if mask.shape[1] == 1 else mask.reshape(
            mask.shape[0], K, G, *mask.shape[2:])
        logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(B, T, N, H)
