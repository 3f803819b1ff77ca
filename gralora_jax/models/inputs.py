"""Token ids checked against the vocabulary where they are known on the host.

An embedding lookup inside ``jit`` cannot raise: flax's ``nn.Embed`` gathers with
``jnp.take``, whose out-of-bounds mode fills rows past the end with NaN (so an id
``>= vocab_size`` gives NaN logits, silently, which attention spreads to the other
positions of its sequence), and a negative id counts from the end
like a numpy index (``-1`` is the last row). Traced code therefore never sees an error;
the ids must be checked before they are traced. :func:`check_token_ids` does that on host
arrays (numpy, lists, concrete single-process jax arrays) and passes tracers through
untouched. It is called by :meth:`CausalLM.__call__
<gralora_jax.models.causal_lm.CausalLM.__call__>` for host inputs, by
:func:`~gralora_jax.models.generation.generate` and by the commonsense CLI after
tokenising.

>>> import numpy as np
>>> check_token_ids(np.array([[1, 2, 3]]), vocab_size=8).tolist()
[[1, 2, 3]]
>>> check_token_ids([[1, 8]], vocab_size=8)
Traceback (most recent call last):
...
ValueError: input_ids: token id 8 at index (0, 1) is outside the vocabulary [0, 8) (tokenizer and model do not match?)
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def _host_array(ids: Any) -> np.ndarray | None:
    """``ids`` as a numpy array, or None when they are not known on this host (traced, or
    spread over processes)."""
    if isinstance(ids, jax.core.Tracer):
        return None
    if isinstance(ids, jax.Array):
        if not ids.is_fully_addressable:
            return None
        return np.asarray(jax.device_get(ids))
    return np.asarray(ids)


def check_token_ids(ids: Any, vocab_size: int, *, what: str = "input_ids") -> Any:
    """Raise ``ValueError`` (one line naming ``what``, the first bad id and its index) unless
    every id is an integer in ``[0, vocab_size)``; return ``ids`` unchanged.

    Tracers (inside ``jit``/``grad``) and arrays spread over several processes are returned
    unchecked: see the module docstring for what out-of-range ids do there.
    """
    if int(vocab_size) <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    a = _host_array(ids)
    if a is None or a.size == 0:
        return ids
    if a.dtype == object or not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
        raise ValueError(f"{what}: token ids must be integers, got dtype {a.dtype}")
    bad = (a < 0) | (a >= vocab_size)
    if bad.any():
        index = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), a.shape))
        where = index[0] if len(index) == 1 else index
        raise ValueError(
            f"{what}: token id {int(a[index])} at index {where} is outside the vocabulary [0, {int(vocab_size)}) "
            "(tokenizer and model do not match?)"
        )
    return ids
