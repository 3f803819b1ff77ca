"""Mesh parsing, sharding rules (incl. adapter specs derived from their kernel) and placement."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gralora_jax import tree as tree_lib
from gralora_jax.hostdevices import ensure_host_devices
from gralora_jax.sharding import (
    RULES,
    batch_sharding,
    fit_spec,
    make_mesh,
    param_partition_specs,
    parse_mesh,
    shard_params,
)

S = jax.ShapeDtypeStruct
F32 = jnp.float32


def test_parse_mesh():
    assert parse_mesh("4x2") == {"data": 4, "model": 2}
    assert parse_mesh("1X8") == {"data": 1, "model": 8}
    assert parse_mesh("2x2x2") == {"data": 2, "fsdp": 2, "model": 2}


@pytest.mark.parametrize("bad", ["4", "4x", "x2", "4x0", "4x-2", "2x2x2x1", "ax2", "", 8])
def test_parse_mesh_bad(bad):
    with pytest.raises(ValueError, match="mesh"):
        parse_mesh(bad)


@pytest.mark.parametrize("spec", ["4x4", "2x2", "3x1", "2x2x4"])
def test_make_mesh_size_mismatch(spec):
    with pytest.raises(ValueError) as e:
        make_mesh(spec)
    msg = str(e.value)
    n = int(np.prod([int(x) for x in spec.split("x")]))
    assert f"has {n} devices" in msg and "8 device(s)" in msg
    assert "--xla_force_host_platform_device_count" in msg


@pytest.mark.parametrize("spec,names", [("4x2", ("data", "model")), ("2x1x4", ("data", "fsdp", "model"))])
def test_make_mesh_ok(spec, names):
    mesh = make_mesh(spec)
    assert mesh.axis_names == names
    assert tuple(mesh.shape.values()) == tuple(parse_mesh(spec).values())
    sub = make_mesh("2x1", devices=jax.devices()[:2])
    assert sub.devices.size == 2


def _llama_like(hidden=32, ff=64, vocab=64, k=2, r=8):
    lyr = {
        "self_attn": {
            "q_proj": {"kernel": S((hidden, hidden), F32), "gralora_A": S((k, hidden // k, r), F32),
                       "gralora_B": S((k, r, hidden // k), F32), "gralora_A_general": S((hidden, 2), F32),
                       "gralora_B_general": S((2, hidden), F32)},
            "o_proj": {"kernel": S((hidden, hidden), F32), "lora_A": S((hidden, 4), F32), "lora_B": S((4, hidden), F32)},
        },
        "mlp": {"down_proj": {"kernel": S((ff, hidden), F32), "gralora_A": S((k, ff // k, r), F32),
                              "gralora_B": S((k, r, hidden // k), F32)}},
        "input_layernorm": {"weight": S((hidden,), F32)},
    }
    return {"model": {"embed_tokens": {"embedding": S((vocab, hidden), F32)}, "layers": {"0": lyr},
                      "norm": {"weight": S((hidden,), F32)}},
            "lm_head": {"kernel": S((hidden, vocab), F32)}}


def test_llama_rules_2d_mesh():
    mesh = make_mesh("4x2")
    sp = tree_lib.flatten(param_partition_specs(_llama_like(), "llama", mesh))
    q = "model/layers/0/self_attn/q_proj/"
    assert sp[q + "kernel"] == P(None, "model")  # column parallel; no fsdp axis on a 2-D mesh
    assert sp[q + "gralora_A"] == P(None, None, None)  # input side not sharded
    assert sp[q + "gralora_B"] == P("model", None, None)  # k=2 output blocks over model=2
    assert sp[q + "gralora_A_general"] == P(None, None)
    assert sp[q + "gralora_B_general"] == P(None, "model")
    o = "model/layers/0/self_attn/o_proj/"
    assert sp[o + "kernel"] == P("model", None)  # row parallel
    assert sp[o + "lora_A"] == P("model", None) and sp[o + "lora_B"] == P(None, None)
    d = "model/layers/0/mlp/down_proj/"
    assert sp[d + "kernel"] == P("model", None) and sp[d + "gralora_A"] == P("model", None, None)
    assert sp["model/layers/0/input_layernorm/weight"] == P(None)
    assert sp["model/norm/weight"] == P(None)
    assert sp["lm_head/kernel"] == P(None, "model")
    assert sp["model/embed_tokens/embedding"] == P("model", None)


def test_llama_rules_3d_mesh_and_block_fallback():
    mesh = make_mesh("1x2x4")  # data=1, fsdp=2, model=4
    sp = tree_lib.flatten(param_partition_specs(_llama_like(), "mistral", mesh))
    q = "model/layers/0/self_attn/q_proj/"
    assert sp[q + "kernel"] == P("fsdp", "model")
    assert sp[q + "gralora_A"] == P("fsdp", None, None)  # k=2 blocks over fsdp=2
    assert sp[q + "gralora_B"] == P(None, None, "model")  # k=2 not divisible by 4 -> out/k=16 axis
    assert sp["model/layers/0/self_attn/o_proj/kernel"] == P("model", "fsdp")
    assert sp["model/layers/0/mlp/down_proj/gralora_B"] == P("fsdp", None, None)  # k=2 over fsdp=2


def test_indivisible_dims_fall_back_to_replicated():
    mesh = make_mesh("1x8")
    params = {"model": {"layers": {"0": {"self_attn": {"q_proj": {
        "kernel": S((12, 6), F32), "gralora_A": S((2, 6, 4), F32), "gralora_B": S((2, 4, 3), F32)}}}}}}
    sp = tree_lib.flatten(param_partition_specs(params, "llama", mesh))
    assert sp["model/layers/0/self_attn/q_proj/kernel"] == P(None, None)
    assert sp["model/layers/0/self_attn/q_proj/gralora_B"] == P(None, None, None)
    assert fit_spec(("model", None), (6, 5), mesh) == P(None, None)
    assert fit_spec(("nonexistent", "model"), (4, 16), mesh) == P(None, "model")


def test_scan_layout_prepends_layer_axis():
    mesh = make_mesh("4x2")
    params = {"model": {"layers": {"scan": {"self_attn": {"q_proj": {
        "kernel": S((3, 32, 32), F32), "gralora_A": S((3, 2, 16, 8), F32), "gralora_B": S((3, 2, 8, 16), F32),
        "lora_A": S((3, 32, 4), F32)}}}}}}
    sp = tree_lib.flatten(param_partition_specs(params, "llama", mesh))
    base = "model/layers/scan/self_attn/q_proj/"
    assert sp[base + "kernel"] == P(None, None, "model")
    assert sp[base + "gralora_B"] == P(None, "model", None, None)
    assert sp[base + "gralora_A"] == P(None, None, None, None)


def test_gpt2_conv1d_kernel_is_out_in():
    mesh = make_mesh("4x2")
    params = {"transformer": {"h": {"0": {"attn": {"c_attn": {
        "kernel": S((96, 32), F32), "lora_A": S((32, 4), F32), "lora_B": S((4, 96), F32)}}}}}}
    sp = tree_lib.flatten(param_partition_specs(params, "gpt2", mesh))
    assert sp["transformer/h/0/attn/c_attn/kernel"] == P("model", None)  # [out, in]: out over model
    assert sp["transformer/h/0/attn/c_attn/lora_B"] == P(None, "model")
    assert sp["transformer/h/0/attn/c_attn/lora_A"] == P(None, None)


@pytest.mark.parametrize("arch", sorted(RULES))
def test_every_arch_has_rules_that_compile(arch):
    mesh = make_mesh("4x2")
    sp = param_partition_specs({"x": {"kernel": S((8, 8), F32)}}, arch, mesh)
    assert sp["x"]["kernel"] == P(None, None)


def test_unknown_arch():
    with pytest.raises(ValueError, match="no sharding rules"):
        param_partition_specs({}, "nope", make_mesh("4x2"))


def test_shard_params_and_batch_sharding():
    mesh = make_mesh("2x2x2")
    params = {"model": {"layers": {"0": {"mlp": {"up_proj": {"kernel": jnp.arange(32 * 64.0).reshape(32, 64)}}}}}}
    specs = param_partition_specs(params, "llama", mesh)
    placed = shard_params(params, mesh, specs)
    k = placed["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]
    assert k.sharding.spec == P("fsdp", "model")
    assert k.addressable_shards[0].data.shape == (16, 32)
    np.testing.assert_array_equal(np.asarray(k), np.asarray(params["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]))
    bs = batch_sharding(mesh)
    assert bs.spec == P(("data", "fsdp"))
    x = jax.device_put(np.zeros((8, 5), np.int32), bs)
    assert x.addressable_shards[0].data.shape == (2, 5)
    assert batch_sharding(make_mesh("4x2")).spec == P("data")


def test_ensure_host_devices_after_init_too_few():
    assert jax.device_count() == 8
    ensure_host_devices(8)  # fine
    with pytest.raises(RuntimeError, match="xla_force_host_platform_device_count=16"):
        ensure_host_devices(16)


def test_ensure_host_devices_sets_flag_before_jax_init():
    code = (
        "from gralora_jax.hostdevices import ensure_host_devices; ensure_host_devices(3);"
        "import jax; print(jax.device_count())"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "3"
