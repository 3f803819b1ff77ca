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
    assert sp[q + "gralora_A"] == P(None, "fsdp", None)  # fsdp: the in/k axis, never the block axis
    assert sp[q + "gralora_B"] == P(None, None, "model")  # k=2 not divisible by 4 -> out/k=16 axis
    assert sp["model/layers/0/self_attn/o_proj/kernel"] == P("model", "fsdp")
    assert sp["model/layers/0/mlp/down_proj/gralora_B"] == P(None, None, "fsdp")  # fsdp: the out/k axis
    assert sp["model/layers/0/mlp/down_proj/gralora_A"] == P(None, "model", None)  # k=2 < model=4: in/k=32 axis


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


# ---------------------------------------------------------------- rules against real parameter trees

COL, ROW, EMB, HEAD = "column", "row", "embedding", "head"
# what each kind of leaf must get on a 2x2x2 (data, fsdp, model) mesh, kernels stored [in, out]
WANT = {COL: P("fsdp", "model"), ROW: P("model", "fsdp"), EMB: P("model", "fsdp"), HEAD: P("fsdp", "model")}
_DECODER = [("self_attn/q_proj", COL), ("self_attn/k_proj", COL), ("self_attn/v_proj", COL), ("self_attn/o_proj", ROW),
            ("mlp/gate_proj", COL), ("mlp/up_proj", COL), ("mlp/down_proj", ROW), ("embed_tokens", EMB), ("lm_head", HEAD)]
_BERT = [("attention/self/query", COL), ("attention/self/key", COL), ("attention/self/value", COL),
         ("attention/output/dense", ROW), ("intermediate/dense", COL), ("output/dense", ROW), ("word_embeddings", EMB)]
_T5 = [(f"{a}/{p}", COL) for a in ("SelfAttention", "EncDecAttention") for p in "qkv"] + [
    ("SelfAttention/o", ROW), ("EncDecAttention/o", ROW), ("DenseReluDense/wo", ROW), ("shared", EMB)]
_small = dict(vocab_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)

# model type -> (builder of the real params shape tree, [(module path suffix, kind)], stored [out, in]?)
# Suffixes are tried in order; every kernel/embedding that matches none must stay replicated.


def _ours(cfg, **kw):
    from gralora_jax.models import auto_model
    return lambda: auto_model(cfg(), **kw).params_shape_tree


def _hf(cls, cfg):
    def build():
        import transformers as tf
        from gralora_jax import quirks
        quirks.patch_t5_clip()
        m = getattr(tf, cls)(cfg(), _do_init=False)
        return jax.eval_shape(lambda: m.init_weights(jax.random.PRNGKey(0), m.input_shape))
    return build


def _families():
    import transformers as tf
    dec = dict(hidden_size=32, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, **_small)
    return {
        "llama": (_ours(lambda: tf.LlamaConfig(**dec)), _DECODER, False),
        "llama (scanned)": (_ours(lambda: tf.LlamaConfig(**dec), scan_layers=True, remat_policy="full"), _DECODER, False),
        "mistral": (_ours(lambda: tf.MistralConfig(**dec)), _DECODER, False),
        "qwen2": (_ours(lambda: tf.Qwen2Config(**dec), scan_layers=True), _DECODER, False),
        "qwen3": (_ours(lambda: tf.Qwen3Config(head_dim=16, **dec)), _DECODER, False),
        "gemma": (_ours(lambda: tf.GemmaConfig(head_dim=8, **dec)), _DECODER, False),
        "gemma2": (_ours(lambda: tf.Gemma2Config(head_dim=8, **dec)), _DECODER, False),
        "gemma3_text": (_ours(lambda: tf.Gemma3TextConfig(head_dim=8, **dec)), _DECODER, False),
        "gpt2": (_hf("FlaxGPT2LMHeadModel", lambda: tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                                                  n_positions=32)),
                 [("attn/c_attn", COL), ("attn/c_proj", ROW), ("mlp/c_fc", COL), ("mlp/c_proj", ROW), ("wte", EMB)], True),
        "gptj": (_hf("FlaxGPTJForCausalLM", lambda: tf.GPTJConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                                                  n_positions=32, rotary_dim=4)),
                 [("attn/q_proj", COL), ("attn/k_proj", COL), ("attn/v_proj", COL), ("attn/out_proj", ROW),
                  ("mlp/fc_in", COL), ("mlp/fc_out", ROW), ("wte", EMB), ("lm_head", HEAD)], False),
        "opt": (_hf("FlaxOPTForCausalLM", lambda: tf.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                               num_attention_heads=4, word_embed_proj_dim=32,
                                                               max_position_embeddings=32)),
                [("self_attn/q_proj", COL), ("self_attn/k_proj", COL), ("self_attn/v_proj", COL),
                 ("self_attn/out_proj", ROW), ("fc1", COL), ("fc2", ROW), ("embed_tokens", EMB)], False),
        "bart": (_hf("FlaxBartForConditionalGeneration", lambda: tf.BartConfig(
                    vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                    decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32)),
                 [(f"{a}/{p}_proj", COL) for a in ("self_attn", "encoder_attn") for p in "qkv"]
                 + [("self_attn/out_proj", ROW), ("encoder_attn/out_proj", ROW), ("fc1", COL), ("fc2", ROW),
                    ("shared", EMB)], False),
        "bert": (_hf("FlaxBertForSequenceClassification",
                     lambda: tf.BertConfig(hidden_size=32, max_position_embeddings=32, **_small)), _BERT, False),
        "roberta": (_hf("FlaxRobertaForMaskedLM",
                        lambda: tf.RobertaConfig(hidden_size=32, max_position_embeddings=40, **_small)), _BERT, False),
        "electra": (_hf("FlaxElectraForMaskedLM", lambda: tf.ElectraConfig(embedding_size=32, hidden_size=32,
                                                                           max_position_embeddings=32, **_small)),
                    _BERT, False),
        "t5": (_hf("FlaxT5ForConditionalGeneration", lambda: tf.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64,
                                                                          num_layers=2, num_heads=4)),
               _T5 + [("DenseReluDense/wi", COL)], False),
        "mt5": (_hf("FlaxMT5ForConditionalGeneration", lambda: tf.MT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64,
                                                                            num_layers=2, num_heads=4)),
                _T5 + [("DenseReluDense/wi_0", COL), ("DenseReluDense/wi_1", COL), ("lm_head", HEAD)], False),
    }


FAMILIES = _families()


def test_every_supported_model_type_has_rules():
    from gralora_jax.models import SUPPORTED_MODEL_TYPES
    from gralora_jax.targets import DEFAULT_TARGET_MODULES

    assert set(SUPPORTED_MODEL_TYPES) | set(DEFAULT_TARGET_MODULES) <= set(RULES)
    assert {f.split(" ")[0] for f in FAMILIES} == set(RULES)  # and each is tested on its real tree below


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rules_on_real_parameter_paths(family):
    """Every projection / embedding / head of the family's real tree gets its intended spec
    (not replicated); every other kernel and embedding stays replicated."""
    build, kinds, out_in = FAMILIES[family]
    shapes = build()
    mesh = make_mesh("2x2x2")
    sp = tree_lib.flatten(param_partition_specs(shapes, family.split(" ")[0], mesh))
    flat = tree_lib.flatten(shapes)
    hits = {suffix: 0 for suffix, _ in kinds}
    for path, leaf in flat.items():
        module, _, leaf_name = path.rpartition("/")
        if leaf_name not in ("kernel", "embedding"):
            continue
        kind = next((k for suffix, k in kinds if module == suffix or module.endswith("/" + suffix)), None)
        if kind is None:
            assert all(e is None for e in sp[path]), (path, sp[path])
            continue
        hits[next(s for s, k in kinds if module == s or module.endswith("/" + s))] += 1
        want = WANT[kind]
        if out_in and kind in (COL, ROW):
            want = P(*want[::-1])
        lead = (None,) * (len(leaf.shape) - 2)  # the scanned layer axis
        assert sp[path] == P(*lead, *want), (path, sp[path])
    assert all(hits.values()), {s: n for s, n in hits.items() if not n}


def test_adapters_follow_real_kernels_on_an_fsdp_mesh():
    """GraLoRA leaves on the real (scanned) Llama tree: the model axis goes on the block axis,
    fsdp on the in/k or out/k axis (never on the block axis: the batch is split over fsdp)."""
    from gralora_jax import GraLoRAConfig
    from gralora_jax.surgery import add_adapters

    shapes = FAMILIES["llama (scanned)"][0]()
    with_ad, _ = add_adapters(shapes, GraLoRAConfig(r=4, gralora_k=2, hybrid_r=2, target_modules="all-linear"),
                              jax.random.PRNGKey(0))
    sp = tree_lib.flatten(param_partition_specs(with_ad, "llama", make_mesh("2x2x2")))
    q, o = "model/layers/scan/self_attn/q_proj/", "model/layers/scan/self_attn/o_proj/"
    assert sp[q + "gralora_A"] == P(None, None, "fsdp", None)  # [L, k, in/k, r]
    assert sp[q + "gralora_B"] == P(None, "model", None, None)  # [L, k, r, out/k]
    assert sp[q + "gralora_A_general"] == P(None, "fsdp", None) and sp[q + "gralora_B_general"] == P(None, None, "model")
    assert sp[o + "gralora_A"] == P(None, "model", None, None)
    assert sp[o + "gralora_B"] == P(None, None, None, "fsdp")


@pytest.mark.parametrize("model_type", ["falcon", None])
def test_model_type_without_rules(model_type):
    params = {"h": {"0": {"dense": {"kernel": S((8, 8), F32)}}}}
    sp = param_partition_specs(params, model_type, make_mesh("8x1"))  # data parallel: replicate, fine
    assert sp["h"]["0"]["dense"]["kernel"] == P(None, None)
    for mesh, axis in (("4x2", "model axis \\(2\\)"), ("2x4x1", "fsdp axis \\(4\\)")):
        with pytest.raises(ValueError, match=f"no sharding rules for model type {model_type!r}.*{axis}.*'8x1'"):
            param_partition_specs(params, model_type, make_mesh(mesh))


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
