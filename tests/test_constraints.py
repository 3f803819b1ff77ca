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
