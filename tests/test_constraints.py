"""Activation sharding constraints (gralora_jax.models.constraints): the identity without a mesh in
context, batch over the data axes with one; our decoder's hidden states follow them on an FSDP mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from jax.sharding import PartitionSpec as P

from gralora_jax.models import LlamaForCausalLM
from gralora_jax.models.constraints import batch_sharded, context_mesh, embedded
from gralora_jax.sharding import make_mesh, param_partition_specs, shard_params


def _entries(spec):
    """A PartitionSpec as a tuple without trailing Nones (jax drops them in outputs' specs)."""
    out = list(spec)
    while out and out[-1] is None:
        out.pop()
    return tuple(out)


def _spec_of(fn, x, mesh):
    with jax.set_mesh(mesh):
        return _entries(jax.jit(fn)(jax.device_put(x, jax.sharding.NamedSharding(mesh, P()))).sharding.spec)


def test_identity_without_a_mesh():
    x = jnp.ones((8, 4))
    assert context_mesh() is None
    assert batch_sharded(x) is x and embedded(x) is x


@pytest.mark.parametrize("mesh,batch,want", [
    ("2x2x2", 8, (("data", "fsdp"),)),
    ("1x8x1", 16, ("fsdp",)),
    ("4x2", 8, ("data",)),
    ("2x2x2", 6, ()),  # 4 does not divide 6: no constraint (XLA keeps the replicated input), no error
])
def test_batch_over_the_data_axes(mesh, batch, want):
    assert _spec_of(lambda x: batch_sharded(x * 2), np.ones((batch, 4, 6), np.float32), make_mesh(mesh)) == want


def _llama(scan: bool):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg, scan_layers=scan)


@pytest.mark.parametrize("scan", [False, True])
def test_decoder_hidden_states_batch_sharded_on_fsdp_mesh(scan):
    """Without the constraints the hidden states inherit the embedding table's hidden-over-fsdp split."""
    model = _llama(scan)
    mesh = make_mesh("1x8x1")
    params = model.init_params(jax.random.PRNGKey(0))
    params = shard_params(params, mesh, param_partition_specs(params, "llama", mesh))
    ids = jax.device_put(np.arange(8 * 16).reshape(8, 16) % 128, jax.sharding.NamedSharding(mesh, P("fsdp")))
    fwd = jax.jit(lambda p, i: model.apply(p, i).last_hidden_state)
    free = fwd(params, ids)
    with jax.set_mesh(mesh):
        pinned = fwd(params, ids)
    assert _entries(free.sharding.spec) == (None, None, "fsdp")  # XLA on its own: hidden split, batch whole
    assert _entries(pinned.sharding.spec) == ("fsdp",)
    np.testing.assert_allclose(np.asarray(pinned), np.asarray(free), rtol=1e-5, atol=1e-5)


def test_surgery_pins_hf_flax_embeddings_and_adapted_inputs():
    """transformers' Flax models have no constraints of their own: the surgery's interceptor re-pins the
    token embedding lookup (and every adapted layer's input) to batch over the data axes."""
    from gralora_jax import GraLoRAConfig, get_gralora_model

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.FlaxLlamaForCausalLM(cfg, seed=0)
    gm = get_gralora_model(model, GraLoRAConfig(r=4, alpha=8, gralora_k=4, target_modules=["q_proj", "v_proj"]),
                           params=model.params, rng=jax.random.PRNGKey(0))
    mesh = make_mesh("1x8x1")
    params = shard_params(gm.params, mesh, param_partition_specs(gm.params, "llama", mesh))
    ids = jax.device_put(np.arange(8 * 16).reshape(8, 16) % 128, jax.sharding.NamedSharding(mesh, P("fsdp")))
    fwd = jax.jit(lambda p, i: gm(i, params=p, output_hidden_states=True).hidden_states[0])
    free = fwd(params, ids)
    with jax.set_mesh(mesh):
        pinned = fwd(params, ids)
    assert _entries(free.sharding.spec) == (None, None, "fsdp")
    assert _entries(pinned.sharding.spec) == ("fsdp",)


@pytest.mark.parametrize("mesh,split", [("1x8x1", True), ("2x4x1", True), ("1x8x1", False)])
def test_chunked_loss_keeps_the_head_split_along_the_vocabulary(mesh, split, monkeypatch):
    """On an FSDP mesh the chunked loss splits the head along the vocabulary instead of gathering it
    (no all-gather in the compiled step yields a [hidden, vocab] array; with the split turned off,
    split=False, the detector sees the gather); loss and gradients equal a plain float64 numpy
    computation of the same cross-entropy either way."""
    import re

    from gralora_jax import losses
    from gralora_jax.losses import chunked_causal_lm_loss

    if not split:
        monkeypatch.setattr(losses, "vocab_split", lambda kernel: (kernel, None))

    B, T, D, V = 8, 6, 16, 64
    rng = np.random.default_rng(0)
    h = rng.normal(size=(B, T, D)).astype(np.float32)
    w = (0.3 * rng.normal(size=(D, V))).astype(np.float32)
    labels = rng.integers(0, V, size=(B, T))
    mask = (rng.random((B, T)) > 0.2).astype(np.float32)

    def numpy_loss(h, w):
        logits = (h[:, :-1].astype(np.float64) @ w.astype(np.float64))
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        tgt = np.take_along_axis(logits, labels[:, 1:, None], -1)[..., 0]
        m = mask[:, 1:]
        return float(((lse - tgt) * m).sum() / m.sum())

    m = make_mesh(mesh)
    fsdp = m.shape.get("fsdp", 1)
    hs = jax.device_put(h, jax.sharding.NamedSharding(m, P(("data", "fsdp") if fsdp > 1 else "data")))
    ws = jax.device_put(w, jax.sharding.NamedSharding(m, P("fsdp" if fsdp > 1 else None, None)))
    loss = lambda h, w: chunked_causal_lm_loss(h, w, labels, mask, chunk_size=16)[0]
    with jax.set_mesh(m):
        fn = jax.jit(jax.value_and_grad(loss))
        hlo = fn.lower(hs, ws).compile().as_text()
        value, grad = fn(hs, ws)
    gathered = [line for line in hlo.splitlines() if re.search(rf"= \w+\[{D},{V}\]\S* all-gather", line)]
    assert (not gathered) == split, gathered
    np.testing.assert_allclose(float(value), numpy_loss(h, w), rtol=1e-5)
    eps = 1e-3  # central difference of the float64 loss along one hidden coordinate
    hp, hm = h.copy(), h.copy()
    hp[1, 2, 3] += eps
    hm[1, 2, 3] -= eps
    np.testing.assert_allclose(float(np.asarray(grad)[1, 2, 3]), (numpy_loss(hp, w) - numpy_loss(hm, w)) / (2 * eps),
                               rtol=1e-3, atol=1e-6)
