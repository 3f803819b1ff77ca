"""loading.load_pretrained_sharded: a checkpoint placed on a 4x2 / 2x2x2 mesh block by block.

Values are checked against load_pretrained (the whole-array reader, itself tested against
PEFT/transformers), placement against the sharding rules, and the reads against the blocks
each device holds (the memory map is never copied whole for a sharded leaf).
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from gralora_jax import tree as tree_lib
from gralora_jax.loading import sharded
from gralora_jax.loading.pretrained import load_pretrained
from gralora_jax.sharding import make_mesh, param_partition_specs


@pytest.fixture(scope="module")
def base_dir(data_dir):
    return str(data_dir / "model_tiny_llama_r8_k2_h0" / "base")


@pytest.fixture(scope="module")
def reference(base_dir):
    _, params = load_pretrained(base_dir)
    return {p: np.asarray(v) for p, v in tree_lib.flatten(params).items()}


@pytest.mark.parametrize("mesh_spec, dtype", [("4x2", jnp.float32), ("2x2x2", jnp.bfloat16)])
def test_sharded_load_matches_whole_load(base_dir, reference, mesh_spec, dtype, monkeypatch):
    reads = []
    real = sharded._read_block

    def spy(view, index, dt):
        out = real(view, index, dt)
        reads.append((tuple(np.shape(view)), out.shape))
        return out

    monkeypatch.setattr(sharded, "_read_block", spy)
    mesh = make_mesh(mesh_spec)
    model, params = sharded.load_pretrained_sharded(base_dir, mesh, dtype=dtype)
    specs = tree_lib.flatten(param_partition_specs(params, "llama", mesh))
    flat = tree_lib.flatten(params)
    assert set(flat) == set(reference)
    n_sharded = 0
    for p, x in flat.items():
        assert x.dtype == dtype, p
        assert x.sharding.spec == specs[p], p
        np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32)),
                                      reference[p].astype(dtype).astype(np.float32), err_msg=p)
        if not x.sharding.is_fully_replicated:
            n_sharded += 1
            assert all(s.data.shape != x.shape for s in x.addressable_shards), p
    assert n_sharded >= 7  # q/k/v/o/gate/up/down at least
    # every read of a sharded leaf was a proper block, and no block was read twice per leaf
    assert any(whole != block for whole, block in reads)
    assert len(reads) <= len(flat) * len(jax.devices())
    assert len(reads) == sum(len({str(s.index) for s in x.addressable_shards}) for x in flat.values())
    assert model.params is params
    # the model runs on the placed params
    logits = model(jnp.zeros((8, 8), jnp.int32), params=params).logits
    assert logits.shape == (8, 8, 256) and bool(jnp.all(jnp.isfinite(logits)))


def test_scanned_layers_load_stacked_and_sharded(base_dir, reference):
    """scan_layers=True: each parameter is one [L, ...] leaf built block by block from the
    per-layer tensors; values equal the whole load stacked by models.layout, and the model runs."""
    from gralora_jax.models.layout import stack_layer_params

    mesh = make_mesh("4x2")
    model, params = sharded.load_pretrained_sharded(base_dir, mesh, model_options={"scan_layers": True})
    assert model.spec.scan_layers
    want = tree_lib.flatten(stack_layer_params(tree_lib.unflatten(reference)))
    flat = tree_lib.flatten(params)
    assert set(flat) == set(want)
    q = flat["model/layers/scan/self_attn/q_proj/kernel"]
    assert q.shape[0] == 2 and not q.sharding.is_fully_replicated
    for p, x in flat.items():
        np.testing.assert_array_equal(np.asarray(x), want[p], err_msg=p)
    _, unrolled = load_pretrained(base_dir)
    ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    want_logits = load_pretrained(base_dir)[0](ids, params=unrolled).logits
    np.testing.assert_allclose(np.asarray(model(ids, params=params).logits), np.asarray(want_logits), atol=1e-5)
