"""Config reading and validation (no compilation)."""

import operator

import pytest
import transformers

from gralora_jax.models import SUPPORTED_MODEL_TYPES, auto_model, spec_from_hf_config

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


# Per family of ours: a small transformers config and the DecoderSpec fields (dotted: of a field) its spec
# reader sets.
QUIRKS = {
    "llama": (transformers.LlamaConfig(**SMALL, attention_bias=True),
              dict(qkv_bias=True, o_bias=True, windows=(None, None), qk_norm=False, norm_offset=0.0)),
    "qwen2": (transformers.Qwen2Config(**SMALL), dict(qkv_bias=True, o_bias=False)),
    "qwen3": (transformers.Qwen3Config(**SMALL, head_dim=16), dict(qk_norm=True, qkv_bias=False, sandwich_norms=False)),
    "mistral": (transformers.MistralConfig(**SMALL, sliding_window=7), dict(windows=(7, 7))),
    "gemma": (transformers.GemmaConfig(**SMALL, head_dim=16, hidden_act="gelu"),
              dict(hidden_act="gelu_pytorch_tanh", norm_offset=1.0, embed_scale=True, sandwich_norms=False)),
    "gemma2": (transformers.Gemma2Config(**SMALL, head_dim=16, sliding_window=5, query_pre_attn_scalar=64,
                                         attn_logit_softcapping=40.0, final_logit_softcapping=20.0),
               dict(windows=(5, None), norm_offset=1.0, embed_scale=True, sandwich_norms=True, qk_norm=False,
                    query_scale=0.125, attn_logit_softcap=40.0, final_logit_softcap=20.0, local_rope=None)),
    "gemma3_text": (transformers.Gemma3TextConfig(**{**SMALL, "num_hidden_layers": 3}, head_dim=16, sliding_window=5,
                                                  sliding_window_pattern=2, rope_local_base_freq=100.0,
                                                  query_pre_attn_scalar=64),
                    {"windows": (5, None, 5), "qk_norm": True, "sandwich_norms": True, "norm_offset": 1.0,
                     "query_scale": 0.125, "local_rope.theta": 100.0, "local_rope.rotary_dim": 16}),
}


def test_every_family_of_ours_has_a_quirks_case():
    assert set(QUIRKS) == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("model_type", sorted(QUIRKS))
def test_family_quirks_are_read(model_type):
    config, expected = QUIRKS[model_type]
    spec = spec_from_hf_config(config)
    assert spec.model_type == model_type
    assert {k: operator.attrgetter(k)(spec) for k in expected} == expected


def test_llama3_rope_is_read():
    r = spec_from_hf_config(transformers.LlamaConfig(**SMALL, rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192)))
    assert (r.rope.rope_type, r.rope.theta, r.rope.factor) == ("llama3", 500000.0, 32.0)


def test_errors():
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
        spec_from_hf_config(transformers.LlamaConfig(**SMALL, rope_scaling=dict(rope_type="yarn", factor=2.0)))
    with pytest.raises(ValueError, match="scan_layers=True needs every layer"):
        auto_model(transformers.Gemma2Config(**SMALL, head_dim=16, sliding_window=5), scan_layers=True)
    with pytest.raises(ValueError, match="unknown remat_policy"):
        auto_model(transformers.LlamaConfig(**SMALL), remat_policy="most")
    with pytest.raises(ValueError, match="attention_mask_mode"):
        auto_model(transformers.LlamaConfig(**SMALL), attention_mask_mode="left")
    with pytest.raises(ValueError, match="expects a Qwen2Config"):
        from gralora_jax.models import Qwen2ForCausalLM

        Qwen2ForCausalLM(transformers.LlamaConfig(**SMALL))


def test_auto_model_from_dict_and_dir(tmp_path):
    model = auto_model({"model_type": "mistral", **SMALL})
    assert type(model).__name__ == "MistralForCausalLM"
    transformers.Qwen2Config(**SMALL).save_pretrained(tmp_path)
    assert type(auto_model(tmp_path)).__name__ == "Qwen2ForCausalLM"
    with pytest.raises(ValueError, match="unsupported model_type 'bert'"):
        auto_model({"model_type": "bert"})


def test_rope_parameters_of_newer_transformers():
    import types

    cfg = types.SimpleNamespace(model_type="llama", rms_norm_eps=1e-6, hidden_act="silu", **SMALL,
                                rope_parameters=dict(rope_type="linear", rope_theta=123.0, factor=2.0))
    spec = spec_from_hf_config(cfg)
    assert (spec.rope.theta, spec.rope.rope_type, spec.rope.factor) == (123.0, "linear", 2.0)


@pytest.mark.skipif(not hasattr(transformers, "FlaxLlamaForCausalLM"), reason="transformers without Flax models")
def test_tree_equals_transformers_flax_llama():
    import jax

    cfg = transformers.LlamaConfig(**SMALL)
    theirs = transformers.FlaxLlamaForCausalLM(cfg, _do_init=False).params_shape_tree
    ours = auto_model(cfg).params_shape_tree
    shapes = lambda t: {k: v.shape for k, v in jax.tree_util.tree_leaves_with_path(t)}  # noqa: E731
    assert shapes(ours) == shapes(theirs)
