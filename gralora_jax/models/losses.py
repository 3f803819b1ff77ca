"""Memory-light cross-entropy over a large vocabulary: never materialise ``[B, T, vocab]`` logits.

``chunked_cross_entropy`` flattens the tokens, splits them into chunks of ``chunk_size``
and, with ``lax.scan`` over the chunks, computes each chunk's float32 logits
``hidden @ lm_head_kernel``, its log-sum-exp and the label logit. Each chunk is wrapped
in ``jax.checkpoint``, so the backward pass recomputes a chunk's logits instead of
keeping them: peak memory is ``chunk_size x vocab`` floats instead of ``B x T x vocab``.

Labels are taken as given (already shifted: ``labels[b, t]`` is the target of position
``t``); ``mask`` (and ``labels < 0``, e.g. -100) drops tokens.

>>> import jax.numpy as jnp
>>> h = jnp.ones((1, 3, 2)); w = jnp.array([[1., 0.], [0., 1.]])
>>> round(float(chunked_cross_entropy(h, w, jnp.array([[0, 1, 0]]), jnp.ones((1, 3)), chunk_size=2)), 4)  # log 2
0.6931
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def chunked_cross_entropy(hidden, lm_head_kernel, labels, mask=None, chunk_size: int = 1024, *,
                          logit_softcap: Optional[float] = None, reduction: str = "mean"):
    """Token cross-entropy of ``softmax(hidden @ lm_head_kernel)`` against ``labels``.

    Args:
      hidden: ``[..., D]`` final hidden states (``model(..., compute_logits=False).last_hidden_state``).
      lm_head_kernel: ``[D, V]`` (``model.lm_head_kernel(params)``).
      labels: ``[...]`` int targets; negative values are ignored.
      mask: ``[...]`` weights (1 keeps a token); None keeps all non-negative labels.
      chunk_size: tokens per chunk.
      logit_softcap: Gemma2's final soft-capping ``c * tanh(logits / c)``, if any.
      reduction: "mean" (over kept tokens), "sum", or "none" (per-token losses, shape of ``labels``).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    D = hidden.shape[-1]
    if lm_head_kernel.shape[0] != D:
        raise ValueError(f"lm_head_kernel {lm_head_kernel.shape} does not match hidden size {D}")
    out_shape = labels.shape
    h = hidden.reshape(-1, D)
    y = labels.reshape(-1).astype(jnp.int32)
    w = jnp.ones(y.shape, jnp.float32) if mask is None else mask.reshape(-1).astype(jnp.float32)
    w = jnp.where(y < 0, 0.0, w)
    y = jnp.maximum(y, 0)
    n = h.shape[0]
    chunk = min(chunk_size, n)
    pad = (-n) % chunk
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        y = jnp.pad(y, (0, pad))
        w = jnp.pad(w, (0, pad))
    n_chunks = h.shape[0] // chunk
    kernel = lm_head_kernel.astype(hidden.dtype)

    @jax.checkpoint
    def chunk_loss(hc, yc):
        logits = jnp.dot(hc, kernel, preferred_element_type=jnp.float32)
        if logit_softcap is not None:
            logits = logit_softcap * jnp.tanh(logits / logit_softcap)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, yc[:, None], axis=-1)[:, 0]
        return lse - target

    def body(carry, xs):
        hc, yc = xs
        return carry, chunk_loss(hc, yc)

    _, losses = jax.lax.scan(body, None, (h.reshape(n_chunks, chunk, D), y.reshape(n_chunks, chunk)))
    losses = losses.reshape(-1) * w
    if reduction == "none":
        return losses[:n].reshape(out_shape)
    total = jnp.sum(losses)
    if reduction == "sum":
        return total
    return total / jnp.maximum(jnp.sum(w), 1.0)
