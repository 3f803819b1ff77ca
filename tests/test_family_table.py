"""The model-family table is complete and the places that used to decide a family ask it."""

import pytest

from gralora_jax import families, quirks, sharding
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


def test_derived_lookups():
    assert ("lm_head/kernel", "model/embed_tokens/embedding") in convert.TIED_HEADS
    assert gguf_io.SUPPORTED_ARCHITECTURES == families.gguf_architectures() == ("llama", "qwen3", "gemma3")
    assert families.gguf_family("qwen3").model_type == "qwen3" and families.gguf_family("gemma2") is None
    assert families.gguf_family("gemma3").model_type == "gemma3_text" and families.gguf_family("gemma3").gguf_norm_shift
    assert families.is_t5_like("mt5") and families.is_t5_like("umt5") and not families.is_t5_like("llama")
    model = type("M", (), {"config": type("C", (), {"model_type": "t5"})()})()
    assert quirks.is_t5_model(model)


def test_unknown_family_is_one_clear_error():
    cfg = type("C", (), {"model_type": "bert"})()
    with pytest.raises(ValueError, match="unsupported model_type 'bert'"):
        spec_from_hf_config(cfg)
