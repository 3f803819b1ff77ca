"""Greedy and beam-search decoding with a fixed-size KV cache, one jit-compiled loop.

Prompts are left-padded ``[B, P]`` with an ``attention_mask``; the cache holds
``P + max_new_tokens`` slots, the prompt fills slots ``0..P-1`` in one forward pass and
each new token is written at slot ``P + t`` (``lax.while_loop``; the loop stops early
once every sequence has finished). Positions are ``cumsum(mask) - 1``, so left padding
does not shift them. The result is ``[B, P + max_new_tokens]`` token ids: the prompt,
then the generated tokens, then ``pad_token_id`` after an end-of-sequence token.

Both decoders follow transformers' PyTorch ``generate`` (``do_sample=False``): greedy
keeps the EOS token and pads afterwards; beam search keeps ``num_beams`` running beams
from the top ``2 * num_beams`` continuations, moves beams that emit EOS (or reach the
length limit) to a finished set scored by ``sum_logprob / generated_len ** length_penalty``,
stops a prompt when no running beam can beat its worst finished one, and returns the
best finished beam.

Models: ours (:class:`~gralora_jax.models.causal_lm.CausalLM`) and transformers' Flax causal
LMs (:mod:`gralora_jax.models.hf_flax` supplies their cache and call), so every causal LM the
library loads decodes with this one implementation.

Adapters: the forward pass is ``apply_fn(params, input_ids, attention_mask, position_ids,
cache, cache_index) -> output`` (default: ``model.apply``) called inside the jitted
function, optionally within ``apply_wrapper()``, a zero-argument factory of a context
manager entered at trace time around each call. That is where GraLoRA's
``nn.intercept_methods`` context goes, e.g.
``generate(model, params_with_adapters, ids, mask, 32, apply_wrapper=lambda: interceptor(...))``.
Compiled loops are cached per model, shapes and options.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from gralora_jax.models import hf_flax
from gralora_jax.models.inputs import check_token_ids

NEG = -1.0e9  # transformers' "impossible" score


def _default_apply(model):
    def apply(params, input_ids, attention_mask, position_ids, cache, cache_index):
        return model.apply(params, input_ids, attention_mask, position_ids, cache=cache, cache_index=cache_index)

    return apply


def _eos_hit(tokens, eos_ids):
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.any(tokens[..., None] == jnp.asarray(eos_ids, tokens.dtype), axis=-1)


def _gather_cache(cache, rows, batch_axis):
    # scalars (transformers' per-layer write positions) are the same for every row
    return jax.tree_util.tree_map(lambda c: c if c.ndim == 0 else jnp.take(c, rows, axis=batch_axis), cache)


def _cache_interface(model):
    """``(init_cache(B, S), batch axis of the cache arrays, default apply_fn)`` of ``model``."""
    if hf_flax.is_hf_flax(model):
        return (lambda b, s: hf_flax.init_cache(model, b, s)), 0, hf_flax.apply_fn(model)
    return model.init_cache, (1 if model.spec.scan_layers else 0), _default_apply(model)


def _build(model, apply_fn, apply_wrapper, B, P, max_new, num_beams, eos_ids, pad_id, length_penalty):
    S = P + max_new
    wrapper = apply_wrapper or contextlib.nullcontext
    init_cache, batch_axis, default_apply = _cache_interface(model)
    apply_fn = apply_fn or default_apply

    def forward(params, ids, kv_valid, pos, cache, index):
        with wrapper():
            out = apply_fn(params, ids, kv_valid.astype(jnp.int32), pos, cache, index)
        return out.logits[:, -1].astype(jnp.float32), out.past_key_values

    def prefill(params, input_ids, attention_mask, rows):
        mask = attention_mask.astype(bool)
        kv_valid = jnp.concatenate([mask, jnp.zeros((B, max_new), bool)], axis=1)
        pos = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
        cache = init_cache(B, S)
        logits, cache = forward(params, input_ids, kv_valid, pos, cache, jnp.int32(0))
        if rows is not None:  # beams: copy each prompt's cache num_beams times
            logits, kv_valid = logits[rows], kv_valid[rows]
            cache = _gather_cache(cache, rows, batch_axis)
        next_pos = jnp.sum(mask.astype(jnp.int32), axis=1)
        if rows is not None:
            next_pos = next_pos[rows]
        return logits, cache, kv_valid, next_pos

    def step(params, tokens, cache, kv_valid, next_pos, t):
        kv_valid = kv_valid.at[:, P + t].set(True)
        logits, cache = forward(params, tokens[:, None], kv_valid, (next_pos + t)[:, None], cache, P + t)
        return logits, cache, kv_valid

    def greedy(params, input_ids, attention_mask):
        logits, cache, kv_valid, next_pos = prefill(params, input_ids, attention_mask, None)
        out = jnp.full((B, max_new), pad_id, jnp.int32)
        done = jnp.zeros((B,), bool)

        def cond(state):
            t, _, _, _, _, done = state
            return (t < max_new) & ~jnp.all(done)

        def body(state):
            t, logits, cache, kv_valid, out, done = state
            tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            tok = jnp.where(done, pad_id, tok)
            out = out.at[:, t].set(tok)
            done = done | _eos_hit(tok, eos_ids)
            logits, cache, kv_valid = step(params, tok, cache, kv_valid, next_pos, t)
            return t + 1, logits, cache, kv_valid, out, done

        state = (jnp.int32(0), logits, cache, kv_valid, out, done)
        out = jax.lax.while_loop(cond, body, state)[4]
        return jnp.concatenate([input_ids.astype(jnp.int32), out], axis=1)

    def beam(params, input_ids, attention_mask):
        nb = num_beams
        keep = max(2, 1 + len(eos_ids)) * nb
        rows = jnp.repeat(jnp.arange(B), nb)
        logits, cache, kv_valid, next_pos = prefill(params, input_ids, attention_mask, rows)
        run_seq = jnp.full((B, nb, max_new), pad_id, jnp.int32)
        run_score = jnp.tile(jnp.array([0.0] + [NEG] * (nb - 1), jnp.float32), (B, 1))
        fin_seq = jnp.full((B, nb, max_new), pad_id, jnp.int32)
        fin_score = jnp.full((B, nb), NEG, jnp.float32)
        fin_done = jnp.zeros((B, nb), bool)
        open_ = jnp.ones((B,), bool)  # transformers' is_early_stop_heuristic_unsatisfied
        top_mask = jnp.arange(keep) < nb
        batch_ix = jnp.arange(B)[:, None]

        def cond(state):
            t, open_ = state[0], state[-1]
            return (t < max_new) & jnp.any(open_)

        def body(state):
            t, logits, cache, kv_valid, run_seq, run_score, fin_seq, fin_score, fin_done, open_ = state
            logp = jax.nn.log_softmax(logits, axis=-1).reshape(B, nb, -1) + run_score[:, :, None]
            V = logp.shape[-1]
            top_score, top_ix = jax.lax.top_k(logp.reshape(B, nb * V), keep)
            origin = top_ix // V
            tok = (top_ix % V).astype(jnp.int32)
            top_seq = run_seq[batch_ix, origin].at[:, :, t].set(tok)
            hits = _eos_hit(tok, eos_ids) | (t + 1 >= max_new)
            # running beams for the next step: best nb that did not finish
            live = top_score + hits.astype(jnp.float32) * NEG
            _, nxt = jax.lax.top_k(live, nb)
            new_run_seq = top_seq[batch_ix, nxt]
            new_run_score = live[batch_ix, nxt]
            new_origin = origin[batch_ix, nxt]
            # finished beams: merge the top-nb candidates that just finished
            just_done = hits & top_mask[None, :]
            cand = top_score / ((t + 1).astype(jnp.float32) ** length_penalty)
            cand = cand + (~open_)[:, None].astype(jnp.float32) * NEG
            cand = cand + (~just_done).astype(jnp.float32) * NEG
            m_seq = jnp.concatenate([fin_seq, top_seq], axis=1)
            m_score = jnp.concatenate([fin_score, cand], axis=1)
            m_done = jnp.concatenate([fin_done, just_done], axis=1)
            _, best = jax.lax.top_k(m_score, nb)
            fin_seq, fin_score, fin_done = m_seq[batch_ix, best], m_score[batch_ix, best], m_done[batch_ix, best]
            # can a running beam still beat the worst finished one?
            best_running = new_run_score[:, 0] / ((t + 1).astype(jnp.float32) ** length_penalty)
            worst = jnp.where(fin_done, jnp.min(fin_score, axis=1, keepdims=True), NEG)
            open_ = open_ & jnp.any(best_running[:, None] > worst, axis=1)
            # advance the cache along the surviving beams
            flat_rows = (jnp.arange(B)[:, None] * nb + new_origin).reshape(-1)
            cache = _gather_cache(cache, flat_rows, batch_axis)
            logits, cache, kv_valid = step(params, new_run_seq[:, :, t].reshape(-1), cache, kv_valid, next_pos, t)
            return t + 1, logits, cache, kv_valid, new_run_seq, new_run_score, fin_seq, fin_score, fin_done, open_

        state = (jnp.int32(0), logits, cache, kv_valid, run_seq, run_score, fin_seq, fin_score, fin_done, open_)
        state = jax.lax.while_loop(cond, body, state)
        fin_seq = state[6]
        return jnp.concatenate([input_ids.astype(jnp.int32), fin_seq[:, 0]], axis=1)

    return jax.jit(greedy if num_beams == 1 else beam)


def generate(
    model,
    params,
    input_ids,
    attention_mask=None,
    max_new_tokens: int = 32,
    *,
    num_beams: int = 1,
    eos_token_id: Optional[Union[int, Sequence[int]]] = None,
    pad_token_id: Optional[int] = None,
    length_penalty: float = 1.0,
    apply_fn: Optional[Callable] = None,
    apply_wrapper: Optional[Callable] = None,
):
    """Decode ``max_new_tokens`` after left-padded prompts; returns ``[B, P + max_new_tokens]`` int32 ids.

    Args:
      model: a :class:`~gralora_jax.models.causal_lm.CausalLM` or a transformers Flax causal LM
        (for its cache, and its call unless ``apply_fn`` is given).
      params: the parameter tree (adapter leaves allowed; see ``apply_wrapper``).
      input_ids, attention_mask: ``[B, P]``, left-padded; mask defaults to all ones.
      num_beams: 1 = greedy, else beam search.
      eos_token_id: int or list of ints ending a sequence (None: never stop early).
      pad_token_id: fills after EOS (default: the first EOS id, else 0).
      length_penalty: beam scores are divided by ``generated_len ** length_penalty``.
      apply_fn: ``(params, input_ids, attention_mask, position_ids, cache, cache_index) -> output``
        with ``.logits`` and ``.past_key_values``; defaults to the model's own call.
      apply_wrapper: zero-argument factory of a context manager entered around every forward
        pass inside the traced function (e.g. the GraLoRA interception).
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    spec = getattr(model, "spec", None)
    vocab = spec.vocab_size if spec is not None else hf_flax.vocab_size(model)
    if vocab is not None:
        check_token_ids(input_ids, vocab)  # host prompts: an out-of-range id raises here
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, prompt_len], got shape {input_ids.shape}")
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if eos_token_id is None:
        eos_ids: tuple = ()
    elif isinstance(eos_token_id, int):
        eos_ids = (int(eos_token_id),)
    else:
        eos_ids = tuple(int(e) for e in eos_token_id)
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    B, P = input_ids.shape
    key = (B, P, int(max_new_tokens), int(num_beams), eos_ids, int(pad_token_id), float(length_penalty),
           "default" if apply_fn is None else apply_fn, apply_wrapper)
    compiled = model.__dict__.setdefault("_generate_fns", {})
    if key not in compiled:
        compiled[key] = _build(model, apply_fn, apply_wrapper, B, P, int(max_new_tokens),
                               int(num_beams), eos_ids, int(pad_token_id), float(length_penalty))
    return compiled[key](params, input_ids, attention_mask)
