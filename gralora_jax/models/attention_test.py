"""Tests for the attention implementation choice and the kernels' masking (CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gralora_jax.models import attention as att

Q_BF16 = jnp.zeros((2, 8, 4, 64), jnp.bfloat16)
Q_SPLASH = jnp.zeros((1, 128, 4, 128), jnp.bfloat16)


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
        ("splash", Q_BF16, {}, "cpu", "splash"),  # forced
        ("splash", Q_BF16, {"full_mask": jnp.ones((2, 1, 8, 8), bool)}, "tpu", "xla"),  # no cache form
        (None, Q_BF16, {}, "tpu", "xla"),  # T=8, head_dim 64: not the kernel's blocks
        (None, Q_SPLASH, {"full_mask": jnp.ones((1, 1, 128, 128), bool)}, "tpu", "xla"),  # decoding with a cache
    ],
)
def test_choose_implementation(requested, q, kw, backend, expected):
    assert att.choose_implementation(requested, q, backend=backend, **kw) == expected


def test_choose_implementation_rejects_unknown():
    with pytest.raises(ValueError, match="one of"):
        att.choose_implementation("flash", Q_BF16, backend="gpu")


def _reference(q, k, v, scale, window=None, lengths=None, softcap=None, key_valid=None):
    """Plain numpy causal attention with GQA, a sliding window and right-padding lengths."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    B, T, N, H = q.shape
    K = k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for n in range(N):
            kv = n // (N // K)
            logits = q[b, :, n] @ k[b, :, kv].T * scale
            if softcap is not None:
                logits = softcap * np.tanh(logits / softcap)
            i, j = np.arange(T)[:, None], np.arange(T)[None, :]
            ok = j <= i
            if window is not None:
                ok &= j > i - window
            if lengths is not None:
                ok &= j < lengths[b]
            if key_valid is not None:
                ok &= key_valid[b][None, :]
            logits = np.where(ok, logits, -np.inf)
            with np.errstate(invalid="ignore"):  # fully masked rows (padding queries) are NaN, never compared
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


@pytest.mark.parametrize("case", ["causal", "window", "lengths", "left_padding", "softcap"])
def test_splash_kernel_in_interpret_mode(case):
    """The Pallas splash kernel (interpreted on CPU) against the numpy reference, forward and
    gradients (the latter against XLA's path), GQA with 2 query heads per KV head."""
    B, T, N, K, H = 2, 256, 4, 2, 128
    ks = jax.random.split(jax.random.PRNGKey(1), 4)
    q, k, v = (jax.random.normal(kk, (B, T, n, H)) for kk, n in zip(ks, (N, K, K)))
    kw, ref_kw = {}, {}
    if case == "window":
        kw["window"] = ref_kw["window"] = 100
    if case == "lengths":
        kw["kv_lengths"] = jnp.array([T, 130])
        ref_kw["lengths"] = [T, 130]
    if case == "left_padding":
        valid = np.arange(T)[None, :] >= np.array([[0], [60]])
        kw["key_mask"] = jnp.asarray(valid)[:, None, None, :]
        ref_kw["key_valid"] = valid
    if case == "softcap":
        kw["softcap"] = ref_kw["softcap"] = 2.0
    scale = H ** -0.5
    out = att.attention(q, k, v, scale=scale, implementation="splash", **kw)
    ref = _reference(q, k, v, scale, **ref_kw)
    rows = np.ones((B, T), bool)
    if case == "lengths":
        rows = np.arange(T)[None] < np.array([[T], [130]])
    if case == "left_padding":
        rows = valid
    np.testing.assert_allclose(np.asarray(out)[rows], ref[rows], atol=2e-5)
    cot = jax.random.normal(ks[3], (B, T, N, H)) * rows[:, :, None, None]
    grads = lambda impl: jax.grad(lambda q, k, v: jnp.sum(att.attention(q, k, v, scale=scale, implementation=impl, **kw)
                                                          * cot), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads("splash"), grads("xla")):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4)


def test_splash_refuses_lengths_not_multiple_of_128():
    q = jnp.zeros((1, 100, 2, 128))
    with pytest.raises(ValueError, match="multiple of 128"):
        att.attention(q, q, q, scale=1.0, implementation="splash")


def test_splash_in_a_model_matches_the_default_path():
    """A tiny Llama (head_dim 16, 2 layers) gives the same logits with attn_implementation="splash"."""
    import types

    from gralora_jax.models import CausalLM

    cfg = types.SimpleNamespace(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
                                rope_scaling=None, tie_word_embeddings=False, initializer_range=0.02)
    ids = jax.random.randint(jax.random.PRNGKey(0), (2, 128), 0, 64)
    base = CausalLM(cfg)
    params = base.init_params(jax.random.PRNGKey(1))
    want = base(ids, params=params).logits
    got = CausalLM(cfg, attn_implementation="splash")(ids, params=params).logits
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)

