"""Chunked next-token cross-entropy: never holds the whole ``[B, T, vocab]`` logits.

With a 128k vocabulary and 8 x 1024 tokens the full float32 logits are 4.2 GB, and the
log-softmax and its gradient add as much again. Here the tokens are cut into chunks; a
``lax.scan`` computes each chunk's logits from the final hidden state and the output
projection, reduces them to ``logsumexp - logit[target]`` and drops them; ``jax.checkpoint``
on the chunk makes the backward pass recompute the chunk's logits instead of storing them.

The arithmetic is the model's: logits are the bf16 product ``h @ W`` cast to float32, exactly
what ``CausalLM`` returns before :func:`gralora_jax.losses.causal_lm_loss`, so the loss is the
same function (up to summation order).

>>> import jax, jax.numpy as jnp
>>> h = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 16))
>>> w = jax.random.normal(jax.random.PRNGKey(1), (16, 32))
>>> ids = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, 32)
>>> from gralora_jax.losses import causal_lm_loss
>>> full, _ = causal_lm_loss(h @ w, ids)
>>> bool(jnp.allclose(chunked_causal_lm_loss(h, w, ids, chunk=4), full, rtol=1e-5))
True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chunked_causal_lm_loss(hidden, head_kernel, labels, *, chunk: int = 1024):
    """Mean shifted cross-entropy of ``hidden [B, T, d] @ head_kernel [d, V]`` against ``labels [B, T]``.

    Position ``t`` predicts ``labels[:, t + 1]``; the last position of each row predicts nothing.
    ``chunk`` tokens (of the flattened ``B * T``) are processed at a time; it must divide ``B * T``.
    """
    B, T, d = hidden.shape
    n = B * T
    if labels.shape != (B, T):
        raise ValueError(f"labels {labels.shape} do not match hidden {hidden.shape[:2]}")
    chunk = min(chunk, n)
    if n % chunk:
        raise ValueError(f"chunk {chunk} must divide batch * seq = {n}")
    targets = jnp.concatenate([labels[:, 1:], jnp.zeros((B, 1), labels.dtype)], axis=1)
    weights = jnp.concatenate([jnp.ones((B, T - 1), jnp.float32), jnp.zeros((B, 1), jnp.float32)], axis=1)
    hs = hidden.reshape(n // chunk, chunk, d)
    ts = targets.reshape(n // chunk, chunk).astype(jnp.int32)
    ws = weights.reshape(n // chunk, chunk)

    @jax.checkpoint
    def chunk_nll(h, t, w):
        logits = jnp.dot(h, head_kernel.astype(h.dtype)).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        return jnp.sum((lse - tgt) * w)

    def body(total, xs):
        return total + chunk_nll(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ts, ws))
    return total / (B * (T - 1))
