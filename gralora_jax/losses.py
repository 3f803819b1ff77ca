"""Token-level losses.

``causal_lm_loss`` is the shifted next-token cross-entropy used for causal-LM fine-tuning:
position ``t`` predicts token ``t+1``; ``loss_mask[t+1]`` says whether token ``t+1`` counts
(e.g. 0 on the prompt and on padding, 1 on the response). Logits are upcast to float32
before the log-softmax, so bf16 models get an f32 loss. It returns the mask-weighted mean
and the number of counted tokens, which lets gradient accumulation weight micro-batches by
their token counts (the accumulated step then equals one step on the concatenated batch).

>>> import jax.numpy as jnp
>>> logits = jnp.zeros((1, 3, 4))                 # uniform over 4 classes
>>> loss, n = causal_lm_loss(logits, jnp.array([[0, 1, 2]]))
>>> round(float(loss), 4), int(n)                 # log(4), two predicted tokens
(1.3863, 2)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    if loss_mask is None:
        weights = jnp.ones(targets.shape, jnp.float32)
    else:
        if loss_mask.shape != labels.shape:
            raise ValueError(f"causal_lm_loss: loss_mask shape {loss_mask.shape} != labels shape {labels.shape}")
        weights = loss_mask[:, 1:].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    n = weights.sum()
    loss = (nll * weights).sum() / jnp.maximum(n, 1.0)
    return loss, n
