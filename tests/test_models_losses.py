"""chunked_cross_entropy vs a plain full-logits computation (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gralora_jax.losses import chunked_cross_entropy


def plain(hidden, kernel, labels, mask, softcap=None):
    logits = np.asarray(hidden, np.float64) @ np.asarray(kernel, np.float64)
    if softcap:
        logits = softcap * np.tanh(logits / softcap)
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    keep = (np.asarray(mask) > 0) & (np.asarray(labels) >= 0)
    nll = -np.take_along_axis(logp, np.maximum(labels, 0)[..., None], -1)[..., 0]
    return (nll * keep).sum() / keep.sum()


@pytest.mark.parametrize("chunk_size,softcap", [(5, None), (16, None), (64, 2.0)])
def test_matches_plain(chunk_size, softcap):
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(3, 7, 16)).astype(np.float32)
    kernel = rng.normal(size=(16, 50)).astype(np.float32)
    labels = rng.integers(0, 50, size=(3, 7))
    labels[0, 2] = -100
    mask = (rng.random((3, 7)) > 0.2).astype(np.float32)
    got = chunked_cross_entropy(jnp.asarray(hidden), jnp.asarray(kernel), jnp.asarray(labels), jnp.asarray(mask),
                                chunk_size, logit_softcap=softcap)
    np.testing.assert_allclose(float(got), plain(hidden, kernel, labels, mask, softcap), rtol=1e-5)


def test_gradients_match_full_logits():
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(2, 9, 8)).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(8, 30)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, 30, size=(2, 9)))
    mask = jnp.asarray((rng.random((2, 9)) > 0.3).astype(np.float32))

    def full(h, k):
        logp = jax.nn.log_softmax(h @ k, axis=-1)
        nll = -jnp.take_along_axis(logp, labels[..., None], -1)[..., 0]
        return jnp.sum(nll * mask) / jnp.sum(mask)

    g_ref = jax.grad(full, argnums=(0, 1))(hidden, kernel)
    g = jax.jit(jax.grad(lambda h, k: chunked_cross_entropy(h, k, labels, mask, 4), argnums=(0, 1)))(hidden, kernel)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_reductions_and_errors():
    h = jnp.ones((2, 3, 4))
    k = jnp.zeros((4, 10))
    labels = jnp.zeros((2, 3), jnp.int32)
    per_token = chunked_cross_entropy(h, k, labels, None, 4, reduction="none")
    assert per_token.shape == (2, 3)
    np.testing.assert_allclose(np.asarray(per_token), np.log(10.0), rtol=1e-6)
    np.testing.assert_allclose(float(chunked_cross_entropy(h, k, labels, None, 4, reduction="sum")), 6 * np.log(10.0),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        chunked_cross_entropy(h, k, labels, reduction="avg")
    with pytest.raises(ValueError, match="hidden size"):
        chunked_cross_entropy(h, jnp.zeros((5, 10)), labels)


def plain_grad_hidden(hidden, kernel, labels, weights, softcap=None):
    """float64 numpy d(sum_t w_t * nll_t) / d hidden."""
    h = np.asarray(hidden, np.float64)
    k = np.asarray(kernel, np.float64)
    z = h @ k
    t = np.tanh(z / softcap) if softcap else None
    logits = softcap * t if softcap else z
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p[np.arange(len(labels)), labels] -= 1.0
    dz = p * np.asarray(weights, np.float64)[:, None]
    if softcap:
        dz *= 1.0 - t * t
    return dz @ k.T


@pytest.mark.parametrize("dtype,softcap,chunk", [(jnp.float32, None, 4), (jnp.float32, 3.0, 5),
                                                  (jnp.bfloat16, None, 8), (jnp.bfloat16, 3.0, 3)])
def test_hidden_gradient_with_a_frozen_head(dtype, softcap, chunk):
    """The gradient path training uses (head frozen, so only d/d hidden): per-token weighted losses
    against a float64 numpy gradient, in float32 and bfloat16."""
    rng = np.random.default_rng(2)
    n, d, v = 11, 16, 40
    hidden = rng.normal(size=(n, d)).astype(np.float32)
    kernel = (rng.normal(size=(d, v)) / 2).astype(np.float32)
    labels = rng.integers(0, v, size=n)
    weights = rng.random(n).astype(np.float32)
    h, k = jnp.asarray(hidden, dtype), jnp.asarray(kernel, dtype)

    def f(h_):
        per_token = chunked_cross_entropy(h_, k, jnp.asarray(labels), None, chunk, logit_softcap=softcap,
                                          reduction="none")
        return jnp.sum(per_token * weights)

    got = np.asarray(jax.jit(jax.grad(f))(h), np.float64)
    want = plain_grad_hidden(np.asarray(h, np.float32), np.asarray(k, np.float32), labels, weights, softcap)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max(), rtol=tol)


def _dots(jaxpr) -> int:
    return str(jaxpr).count("dot_general[")  # nested jaxprs (scan bodies) print inline


def test_logits_are_computed_once_when_the_head_is_frozen():
    """Training with a frozen head runs two head matmuls per chunk (logits, then d hidden), not three
    (a recomputation of the logits in the backward pass); a trainable head adds the recompute and
    its own gradient."""
    h = jnp.ones((2, 8, 4))
    k = jnp.ones((4, 10))
    labels = jnp.zeros((2, 8), jnp.int32)
    frozen = jax.make_jaxpr(jax.grad(lambda h_: chunked_cross_entropy(h_, k, labels, None, 4)))(h)
    trained = jax.make_jaxpr(jax.grad(lambda h_, k_: chunked_cross_entropy(h_, k_, labels, None, 4),
                                      argnums=(0, 1)))(h, k)
    assert _dots(frozen) == 2
    assert _dots(trained) == 4
