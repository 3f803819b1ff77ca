"""Target matching: our select_targets against PEFT's own check_target_module_exists."""

import types

import pytest

from gralora_jax.targets import default_target_modules, select_targets

PATHS = [
    "model.embed_tokens",
    "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj",
    "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj",
    "model.layers.12.self_attn.q_proj",
    "lm_head",
    "encoder.block.0.layer.1.DenseReluDense.wo", "encoder.block.1.layer.0.SelfAttention.q",
    "decoder.block.1.layer.1.EncDecAttention.q",
    "transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj",
    "bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.0.attention.output.dense",
]

CASES = [
    dict(target_modules=["q_proj"]),
    dict(target_modules=["self_attn.q_proj", "down_proj"]),
    dict(target_modules=["q"]),
    dict(target_modules=r".*layers\.(0|12)\..*(q|v)_proj"),
    dict(target_modules=r".*\.(query|c_attn)"),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
    dict(target_modules=["q_proj"], layers_to_transform=12),
    dict(target_modules=["q", "wo"], layers_to_transform=[1]),  # T5: the block index, not the layer index
    dict(target_modules=["q", "wo"], layers_to_transform=[1], layers_pattern="layer"),
    dict(target_modules=["c_attn", "c_proj", "query", "dense"], layers_to_transform=[0], layers_pattern=["h", "layer"]),
    dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1]),  # exact name: no filter
]


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_matches_peft(case):
    tuners_utils = pytest.importorskip("peft.tuners.tuners_utils")
    cfg = types.SimpleNamespace(
        target_modules=set(case["target_modules"]) if isinstance(case["target_modules"], list) else case["target_modules"],
        layers_to_transform=case.get("layers_to_transform"),
        layers_pattern=case.get("layers_pattern"),
        exclude_modules=None, modules_to_save=None, target_parameters=None,
    )
    want = [p for p in PATHS if tuners_utils.check_target_module_exists(cfg, p)]
    assert want, "case must match something"
    got = select_targets(PATHS, case["target_modules"], case.get("layers_to_transform"), case.get("layers_pattern"))
    assert got == want


def test_all_linear_skips_output_head():
    got = select_targets(PATHS, "all-linear")
    assert "lm_head" not in got and "model.layers.0.mlp.down_proj" in got


def test_errors():
    with pytest.raises(ValueError, match=r"matched no linear module.*'c_attn'.*'q_proj'"):
        select_targets(PATHS, ["nope"])
    with pytest.raises(ValueError, match=r"within layers \[7\]"):
        select_targets(PATHS, ["q_proj"], layers_to_transform=[7])
    with pytest.raises(ValueError, match="target_modules must be given"):
        select_targets(PATHS, None)
    with pytest.raises(ValueError, match="layers_to_transform only works"):
        select_targets(PATHS, r".*q_proj", layers_to_transform=[0])


def test_defaults_per_model_type():
    assert default_target_modules("llama") == ("q_proj", "v_proj")
    assert default_target_modules("gpt2") == ("c_attn",)
    assert default_target_modules("bert") == ("query", "value")
    assert default_target_modules("t5") == ("q", "v")
    assert default_target_modules("unknown") is None
    constants = pytest.importorskip("peft.utils.constants")
    for mt in ("llama", "mistral", "gemma", "qwen2", "gpt2", "bert", "roberta", "t5"):
        assert list(default_target_modules(mt)) == constants.TRANSFORMERS_MODELS_TO_GRALORA_TARGET_MODULES_MAPPING[mt]
