"""Tests for the attention implementation choice and the kernels' masking (CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gralora_jax.models import attention as att

Q_BF16 = jnp.zeros((2, 8, 4, 64), jnp.bfloat16)


@pytest.mark.parametrize(
    "requested, q, kw, backend, expected",
    [
        (None, Q_BF16, {}, "gpu", "cudnn"),
        (None, Q_BF16.astype(jnp.float16), {}, "gpu", "cudnn"),
        (None, Q_BF16.astype(jnp.float32), {}, "gpu", "xla"),  # cuDNN is half precision only
        (None, Q_BF16, {}, "cpu", "xla"),
        (None, Q_BF16, {}, "tpu", "xla"),
        (None, jnp.zeros((1, 8, 4, 256), jnp.bfloat16), {}, "gpu", "xla"),  # head_dim > 128
        (None, jnp.zeros((1, 8, 4, 36), jnp.bfloat16), {}, "gpu", "xla"),  # not a multiple of 8
        (None, Q_BF16, {"key_mask": jnp.ones((2, 1, 1, 8), bool)}, "gpu", "xla"),
        (None, Q_BF16, {"full_mask": jnp.ones((2, 1, 8, 8), bool)}, "gpu", "xla"),
        ("xla", Q_BF16, {}, "gpu", "xla"),
        ("cudnn", Q_BF16.astype(jnp.float32), {}, "cpu", "cudnn"),  # forced: jax raises if unsupported
    ],
)
def test_choose_implementation(requested, q, kw, backend, expected):
    assert att.choose_implementation(requested, q, backend=backend, **kw) == expected


def test_choose_implementation_rejects_unknown():
    with pytest.raises(ValueError, match="'xla' or 'cudnn'"):
        att.choose_implementation("flash", Q_BF16, backend="gpu")


def _reference(q, k, v, scale, window=None, lengths=None):
    """Plain numpy causal attention with GQA, a sliding window and right-padding lengths."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    B, T, N, H = q.shape
    K = k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for n in range(N):
            kv = n // (N // K)
            logits = q[b, :, n] @ k[b, :, kv].T * scale
            i, j = np.arange(T)[:, None], np.arange(T)[None, :]
            ok = j <= i
            if window is not None:
                ok &= j > i - window
            if lengths is not None:
                ok &= j < lengths[b]
            logits = np.where(ok, logits, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            out[b, :, n] = (p / p.sum(-1, keepdims=True)) @ v[b, :, kv]
    return out


@pytest.mark.parametrize("window, lengths", [(None, None), (3, None), (None, [6, 4])])
def test_default_path_matches_reference(window, lengths):
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(ks[0], (2, 6, 4, 8))
    k = jax.random.normal(ks[1], (2, 6, 2, 8))
    v = jax.random.normal(ks[2], (2, 6, 2, 8))
    kv_lengths = None if lengths is None else jnp.array(lengths)
    out = att.attention(q, k, v, scale=0.3, window=window, kv_lengths=kv_lengths)
    ref = _reference(q, k, v, 0.3, window, lengths)
    valid = np.ones((2, 6), bool) if lengths is None else np.arange(6)[None] < np.array(lengths)[:, None]
    np.testing.assert_allclose(np.asarray(out)[valid], ref[valid], atol=1e-5)
