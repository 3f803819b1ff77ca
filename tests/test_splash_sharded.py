"""Splash attention under shard_map on a 4x2 CPU mesh (Pallas interpreter) and its automatic choice on TPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gralora_jax.models import attention as att

Q_SPLASH = jnp.zeros((1, 128, 4, 128), jnp.bfloat16)


def test_splash_chosen_on_tpu_with_a_mesh_in_context():
    from gralora_jax.sharding import make_mesh

    with jax.set_mesh(make_mesh("4x2")):
        assert att.choose_implementation(None, Q_SPLASH, backend="tpu") == "splash"
        assert att.choose_implementation(None, Q_SPLASH[:, :100], backend="tpu") == "xla"  # T not a multiple of 128
        assert att.choose_implementation(None, Q_SPLASH, backend="gpu") == "cudnn"
    # 8 devices and no mesh in context: a bare Pallas call cannot be partitioned, so XLA
    assert att.choose_implementation(None, Q_SPLASH, backend="tpu") == "xla"


@pytest.mark.parametrize("case", ["causal", "left_padding"])
def test_sharded_splash_on_a_4x2_mesh_matches_xla(case):
    """Splash under shard_map (batch over data=4, KV heads over model=2; interpret mode), jitted over
    sharded inputs with the mesh in context, against XLA attention: outputs and gradients."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from gralora_jax.sharding import make_mesh

    mesh = make_mesh("4x2")
    B, T, N, K, H = 4, 128, 4, 2, 128
    ks = jax.random.split(jax.random.PRNGKey(2), 4)
    q, k, v = (jax.random.normal(kk, (B, T, n, H)) for kk, n in zip(ks, (N, K, K)))
    kw, rows = {}, np.ones((B, T), bool)
    if case == "left_padding":
        rows = np.arange(T)[None, :] >= np.array([[0], [5], [60], [0]])
        kw["key_mask"] = jnp.asarray(rows)[:, None, None, :]
    cot = jax.random.normal(ks[3], (B, T, N, H)) * rows[:, :, None, None]
    scale = H ** -0.5

    def loss(impl):
        return lambda q, k, v, kw: jnp.sum(att.attention(q, k, v, scale=scale, implementation=impl, **kw) * cot)

    spec = NamedSharding(mesh, P("data", None, "model", None))
    args = [jax.device_put(x, spec) for x in (q, k, v)]
    with jax.set_mesh(mesh):
        fwd = jax.jit(lambda q, k, v, kw: att.attention(q, k, v, scale=scale, implementation="splash", **kw))
        assert "shard_map" in str(jax.make_jaxpr(fwd)(*args, kw))
        got = fwd(*args, kw)
        got_grads = jax.jit(jax.grad(loss("splash"), argnums=(0, 1, 2)))(*args, kw)
    want = att.attention(q, k, v, scale=scale, implementation="xla", **kw)
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=2e-5)
    assert got.sharding.spec == P("data", None, "model", None)
    for g, w in zip(got_grads, jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v, kw)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-4)
