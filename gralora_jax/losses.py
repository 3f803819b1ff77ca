"""Token-level losses.

``causal_lm_loss`` is the shifted next-token cross-entropy used for causal-LM fine-tuning:
position ``t`` predicts token ``t+1``; ``loss_mask[t+1]`` says whether token ``t+1`` counts
(e.g. 0 on the prompt and on padding, 1 on the response). Logits are upcast to float32
before the log-softmax, so bf16 models get an f32 loss. It returns the mask-weighted mean
and the number of counted tokens, which lets gradient accumulation weight micro-batches by
their token counts (the accumulated step then equals one step on the concatenated batch).

``chunked_cross_entropy`` is the memory-light cross-entropy over a large vocabulary: it
flattens the tokens, splits them into chunks of ``chunk_size`` and, with ``lax.scan`` over
the chunks, computes each chunk's logits ``hidden @ lm_head_kernel`` (in the hidden states'
dtype, like the models' full logits, then float32), its log-sum-exp and the label logit: peak
memory is ``chunk_size x vocab`` logits instead of ``B x T x vocab``. It has its own VJP: when
differentiated, the forward pass also forms each chunk's ``softmax - one_hot`` and multiplies
it (in the head's dtype) by the head, so the backward pass only scales that ``d loss / d
hidden`` by the incoming per-token cotangent. The logits are computed once, not recomputed; a
trainable head recomputes them for its own gradient. Its labels are taken as given (already
shifted); ``mask`` (and ``labels < 0``, e.g. -100) drops tokens.

``chunked_causal_lm_loss`` is ``causal_lm_loss`` from the final hidden state and the lm_head
kernel, never materialising ``[B, T, vocab]`` logits: it runs ``chunked_cross_entropy`` on
each row (``vmap``), so a chunk is a block of positions of *every* row and the batch axis
(sharded over the data mesh axis) stays a batch axis inside the scan.

>>> import jax.numpy as jnp
>>> logits = jnp.zeros((1, 3, 4))                 # uniform over 4 classes
>>> loss, n = causal_lm_loss(logits, jnp.array([[0, 1, 2]]))
>>> round(float(loss), 4), int(n)                 # log(4), two predicted tokens
(1.3863, 2)
>>> h = jnp.ones((1, 3, 2)); w = jnp.array([[1., 0.], [0., 1.]])
>>> round(float(chunked_cross_entropy(h, w, jnp.array([[0, 1, 0]]), jnp.ones((1, 3)), chunk_size=2)), 4)  # log 2
0.6931
"""

from __future__ import annotations

import functools
import numbers
from typing import Optional

import jax
import jax.numpy as jnp

from gralora_jax.models.constraints import vocab_sharded, vocab_split


def causal_lm_loss(logits, labels, loss_mask=None):
    """Mean shifted cross-entropy and the token count.

    ``logits``: [B, T, V]; ``labels``: [B, T] int token ids (usually ``input_ids``);
    ``loss_mask``: [B, T] (bool/0-1 float) over *target* positions, default all ones.
    Returns ``(loss f32 scalar, num_tokens f32 scalar)``; with no counted token the loss is 0.
    """
    if logits.ndim != 3 or labels.ndim != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"causal_lm_loss: expected logits [B, T, V] and labels [B, T], got {logits.shape} and {labels.shape}"
        )
    targets, weights = next_token_targets(labels, loss_mask)  # the last position has weight 0
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    nll = jnp.where(weights > 0, nll, 0.0)
    n = weights.sum()
    loss = (nll * weights).sum() / jnp.maximum(n, 1.0)
    return loss, n


def next_token_targets(labels, loss_mask=None):
    """``(targets [B, T] int32, weights [B, T] f32)`` for next-token prediction at every position.

    ``targets[:, t] = labels[:, t+1]`` and ``weights[:, t] = loss_mask[:, t+1]`` (1 when no mask);
    the last position has no next token: target 0, weight 0. Same counting as
    :func:`causal_lm_loss`, but aligned with the full ``[B, T]`` hidden state (no slicing copy).
    """
    if labels.ndim != 2:
        raise ValueError(f"next_token_targets: expected labels [B, T], got shape {labels.shape}")
    if loss_mask is not None and loss_mask.shape != labels.shape:
        raise ValueError(f"loss_mask shape {loss_mask.shape} != labels shape {labels.shape}")
    zeros = jnp.zeros((labels.shape[0], 1), jnp.int32)
    targets = jnp.concatenate([labels[:, 1:].astype(jnp.int32), zeros], axis=1)
    w = jnp.ones(labels.shape, jnp.float32) if loss_mask is None else loss_mask.astype(jnp.float32)
    weights = jnp.concatenate([w[:, 1:], jnp.zeros((labels.shape[0], 1), jnp.float32)], axis=1)
    return targets, weights


def check_chunk_size(chunk_size) -> int:
    """``chunk_size`` if it is a positive int, else ``ValueError``."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def chunked_causal_lm_loss(hidden, lm_head_kernel, labels, loss_mask=None, *, chunk_size: int = 1024,
                           logit_softcap=None):
    """:func:`causal_lm_loss` of ``softcap(hidden @ lm_head_kernel)`` without the full logits.

    ``hidden``: [B, T, D] final hidden states; ``lm_head_kernel``: [D, V]; ``labels`` and
    ``loss_mask`` as in :func:`causal_lm_loss`; ``logit_softcap``: Gemma2's final
    ``c * tanh(logits / c)``. ``chunk_size`` is the number of tokens whose logits exist at
    once: each chunk covers ``ceil(chunk_size / B)`` positions of every row. Returns
    ``(loss f32 scalar, num_tokens f32 scalar)``.
    """
    if hidden.ndim != 3 or labels.ndim != 2 or hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"chunked_causal_lm_loss: expected hidden [B, T, D] and labels [B, T], got {hidden.shape} and {labels.shape}"
        )
    check_chunk_size(chunk_size)
    targets, weights = next_token_targets(labels, loss_mask)
    per_row = -(-chunk_size // labels.shape[0])

    def row_sum(h, y, w):
        return chunked_cross_entropy(h, lm_head_kernel, y, w, per_row, logit_softcap=logit_softcap, reduction="sum")

    n = weights.sum()
    total = jax.vmap(row_sum)(hidden, targets, weights).sum()
    return total / jnp.maximum(n, 1.0), n


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
    check_chunk_size(chunk_size)
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
    # on an FSDP mesh: the head split along the vocabulary, not gathered (models.constraints.vocab_split)
    kernel, vocab_axes = vocab_split(lm_head_kernel.astype(hidden.dtype))
    losses = _token_losses(h.reshape(n_chunks, chunk, D), kernel, y.reshape(n_chunks, chunk), vocab_axes,
                           logit_softcap)
    losses = losses.reshape(-1) * w
    if reduction == "none":
        return losses[:n].reshape(out_shape)
    total = jnp.sum(losses)
    if reduction == "sum":
        return total
    return total / jnp.maximum(jnp.sum(w), 1.0)


def _chunk_logits(hc, kernel, vocab_axes, softcap):
    """float32 ``(logits, tanh(z / softcap) or None)`` of one chunk ``hc [C, D]``. The product is
    rounded to the hidden states' dtype before the upcast, as the models' full logits are (and
    PyTorch's for a bf16 model): for bf16 the ``[C, V]`` array the loss passes read is half the size."""
    z = vocab_sharded(jnp.dot(hc, kernel), vocab_axes).astype(jnp.float32)
    if softcap is None:
        return z, None
    t = jnp.tanh(z / softcap)
    return softcap * t, t


def _chunk_loss(hc, yc, kernel, vocab_axes, softcap, grad: bool):
    """Per-token loss of one chunk and, with ``grad``, d loss / d z ``[C, V]`` (float32)."""
    logits, t = _chunk_logits(hc, kernel, vocab_axes, softcap)
    lse = jax.nn.logsumexp(logits, axis=-1)
    hit = jnp.arange(logits.shape[-1], dtype=jnp.int32) == yc[:, None]
    if vocab_axes is None:
        target = jnp.take_along_axis(logits, yc[:, None], axis=-1)[:, 0]
    else:  # a masked sum over the split vocabulary: a local reduction and one all-reduce, no gather
        target = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
    if not grad:
        return lse - target, None
    dz = jnp.exp(logits - lse[:, None]) - hit.astype(jnp.float32)  # softmax - one-hot
    if t is not None:
        dz = dz * (1.0 - t * t)
    return lse - target, vocab_sharded(dz, vocab_axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _token_losses(h, kernel, y, vocab_axes, softcap):
    """Per-token cross-entropy ``[n_chunks, C]`` of ``h [n_chunks, C, D]`` against ``y``, one chunk's
    logits at a time. Differentiated, the forward pass also forms each chunk's ``d loss / d h``
    (the logits are needed for both), so the backward pass only scales it by the incoming
    cotangent: the logits are computed once instead of twice, and ``d z`` enters the ``[C, V] x
    [V, D]`` product in the head's dtype (a bf16 GEMM for a bf16 model, as in PyTorch's autocast).
    A trainable head (``kernel`` perturbed) recomputes each chunk's logits for its gradient."""
    def body(carry, xs):
        return carry, _chunk_loss(xs[0], xs[1], kernel, vocab_axes, softcap, grad=False)[0]

    return jax.lax.scan(body, None, (h, y))[1]


def _token_losses_fwd(h, kernel, y, vocab_axes, softcap):
    h_in, k_in = h, kernel
    h, kernel, y = h.value, kernel.value, y.value

    def body(carry, xs):
        hc, yc = xs
        loss, dz = _chunk_loss(hc, yc, kernel, vocab_axes, softcap, grad=True)
        dh = jnp.dot(dz.astype(kernel.dtype), kernel.T, preferred_element_type=jnp.float32).astype(h.dtype)
        return carry, (loss, dh if h_in.perturbed else None)

    losses, dh = jax.lax.scan(body, None, (h, y))[1]
    return losses, (dh, h if k_in.perturbed else None, kernel if k_in.perturbed else None, y)


def _token_losses_bwd(vocab_axes, softcap, res, g):
    dh, h, kernel, y = res
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None, None
    g = g.astype(jnp.float32)
    dh = None if dh is None else (dh.astype(jnp.float32) * g[..., None]).astype(dh.dtype)
    dk = None
    if kernel is not None:  # a trained head: each chunk's logits again, weighted by its cotangent
        def body(acc, xs):
            hc, yc, gc = xs
            dz = _chunk_loss(hc, yc, kernel, vocab_axes, softcap, grad=True)[1] * gc[:, None]
            return acc + jnp.dot(hc.T, dz.astype(kernel.dtype), preferred_element_type=jnp.float32), None

        dk = jax.lax.scan(body, jnp.zeros(kernel.shape, jnp.float32), (h, y, g))[0].astype(kernel.dtype)
    return dh, dk, None


_token_losses.defvjp(_token_losses_fwd, _token_losses_bwd, symbolic_zeros=True)
