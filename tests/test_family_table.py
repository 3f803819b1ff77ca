"""The model-family table is complete and the places that used to decide a family ask it."""

import dataclasses

import pytest

from gralora_jax import families, sharding
from gralora_jax.loading import convert, gguf_io
from gralora_jax.models import MODEL_CLASSES, SUPPORTED_MODEL_TYPES, spec_from_hf_config
from gralora_jax.targets import default_target_modules


def test_every_family_has_sharding_rules_and_targets():
    for model_type, fam in families.FAMILIES.items():
        assert families.sharding_rules(model_type) is sharding.RULES[model_type]
        assert fam.default_targets and default_target_modules(model_type) == fam.default_targets
    assert families.sharding_rules("not-a-family") is None


def test_our_model_classes_come_from_the_table():
    assert set(SUPPORTED_MODEL_TYPES) == {t for t, f in families.FAMILIES.items() if f.model_class}
    for model_type, cls in MODEL_CLASSES.items():
        assert cls is families.model_class(model_type) and cls.__name__ in families.FAMILIES[model_type].model_class
    assert families.model_class("bert") is None


def test_our_families_name_a_spec_reader():
    for model_type in SUPPORTED_MODEL_TYPES:
        reader = families.spec_reader(model_type)
        assert callable(reader) and reader.__module__ == "gralora_jax.models.spec"
    assert families.spec_reader("bert") is None and families.spec_reader("not-a-family") is None


def test_import_check_refuses_our_model_without_a_spec_reader():
    ours = families.FAMILIES["qwen2"]
    families._check((ours,), {"qwen2": []})
    for bad in (dict(spec_reader=None), dict(spec_reader="read_qwen2"), dict(model_class=None)):
        with pytest.raises(ImportError, match="'qwen2': our model class needs a spec reader"):
            families._check((dataclasses.replace(ours, **bad),), {"qwen2": []})


def test_spec_reading_asks_the_table(monkeypatch):
    """With qwen2's entry naming Llama's reader, a Qwen2 config reads as Llama's: no q/k/v bias."""
    import transformers

    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    assert spec_from_hf_config(cfg).qkv_bias
    llama_reader = families.FAMILIES["llama"].spec_reader
    monkeypatch.setitem(families.FAMILIES, "qwen2", dataclasses.replace(families.FAMILIES["qwen2"],
                                                                        spec_reader=llama_reader))
    assert not spec_from_hf_config(cfg).qkv_bias


def test_derived_lookups():
    assert ("lm_head/kernel", "model/embed_tokens/embedding") in convert.TIED_HEADS
    assert gguf_io.SUPPORTED_ARCHITECTURES == families.gguf_architectures() == ("llama", "qwen3", "gemma3")
    assert families.gguf_family("qwen3").model_type == "qwen3" and families.gguf_family("gemma2") is None
    assert families.gguf_family("gemma3").model_type == "gemma3_text" and families.gguf_family("gemma3").gguf_norm_shift
    assert families.is_t5_like("mt5") and families.is_t5_like("umt5") and not families.is_t5_like("llama")


def test_unknown_family_is_one_clear_error():
    cfg = type("C", (), {"model_type": "bert"})()
    with pytest.raises(ValueError, match="unsupported model_type 'bert'"):
        spec_from_hf_config(cfg)


# ----------------------------------------------------------------------------- kernel layouts


def test_import_check_refuses_a_family_without_rules_or_with_bad_kernel_layouts():
    ok = families.Family("x", out_in_kernels=(r"(^|/)c_\w+$",))
    families._check((ok,), {"x": []})
    with pytest.raises(ImportError, match=r"no sharding rules .* \['x'\]"):
        families._check((ok,), {})
    for bad in (("(unclosed",), r"c_\w+", (3,)):
        with pytest.raises(ImportError, match="'x': out_in_kernels must be a tuple of regexes"):
            families._check((families.Family("x", out_in_kernels=bad),), {"x": []})


def _tiny_gpt2(**kw):
    import transformers as tf

    cfg = tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16, **kw)
    return tf.FlaxGPT2LMHeadModel(cfg, seed=0)


def _stored_layouts(model) -> dict:
    """Module path -> the layout its class stores, found by tracing the model's init (the oracle)."""
    import jax
    from flax import linen as nn

    seen = {}

    def record(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name == "__call__" and m.scope is not None and m.scope.path:
            if type(m).__name__ == "FlaxConv1D":
                seen["/".join(m.scope.path)] = families.OUT_IN
            elif isinstance(m, nn.Dense):
                seen["/".join(m.scope.path)] = families.IN_OUT
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init_weights(jax.random.PRNGKey(0), model.input_shape))
    return seen


def test_table_kernel_layouts_match_gpt2s_module_classes():
    """Every FlaxConv1D of GPT-2 (self- and cross-attention, MLP) is OUT_IN in the table and every
    nn.Dense (the untied lm_head) IN_OUT."""
    stored = _stored_layouts(_tiny_gpt2(add_cross_attention=True, tie_word_embeddings=False))
    assert {"transformer/h/0/crossattention/q_attn", "lm_head"} <= set(stored)
    assert families.OUT_IN in stored.values() and families.IN_OUT in stored.values()
    assert {p: families.kernel_layout("gpt2", p) for p in stored} == stored


def test_layouts_are_asked_of_the_table(monkeypatch):
    """Surgery, sharding and the interceptor all follow the family entry: with GPT-2's entry
    changed to say [in, out], surgery and sharding change and running the adapted model raises."""
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from gralora_jax import GraLoRAConfig, get_gralora_model, tree
    from gralora_jax.sharding import make_mesh, param_partition_specs

    model = _tiny_gpt2()
    config = GraLoRAConfig(r=4, alpha=8, gralora_k=2, target_modules=["c_attn"])
    path = "transformer/h/0/attn/c_attn"
    gm = get_gralora_model(model, config)
    specs = tree.flatten(param_partition_specs(gm.params, "gpt2", make_mesh("4x2")))
    assert gm.layouts[path] == families.OUT_IN and specs[path + "/kernel"] == P("model", None)

    monkeypatch.setitem(families.FAMILIES, "gpt2", dataclasses.replace(families.FAMILIES["gpt2"], out_in_kernels=()))
    specs = tree.flatten(param_partition_specs(gm.params, "gpt2", make_mesh("4x2")))
    assert specs[path + "/kernel"] == P(None, "model")
    wrong = get_gralora_model(model, config)
    assert wrong.layouts[path] == families.IN_OUT
    with pytest.raises(TypeError, match="FlaxConv1D but its kernel layout is taken as 'in_out'"):
        wrong(jnp.ones((1, 8), jnp.int32))
