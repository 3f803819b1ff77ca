"""GraLoRAConfig / LoRAConfig: PEFT defaults, validation and adapter_config.json conversion."""

import dataclasses
import json

import pytest

from gralora_jax.config import GraLoRAConfig, LoRAConfig, config_from_peft_dict, load_adapter_config
from conftest import DATA_DIR

MANIFEST = json.loads((DATA_DIR / "manifest.json").read_text())


def test_peft_defaults():
    c = GraLoRAConfig()
    assert (c.r, c.alpha, c.gralora_k, c.hybrid_r, c.gralora_dropout) == (32, 64, 2, 0, 0.0)
    assert (c.fan_in_fan_out, c.bias, c.init_weights) == (False, "none", True)
    assert c.scaling == 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.r = 8


@pytest.mark.parametrize("r,alpha,h,expected", [(8, 16, 0, 2.0), (16, 40, 4, 2.0), (32, 64, 8, 1.6), (12, 6, 0, 0.5)])
def test_scaling_is_alpha_over_r_plus_hybrid(r, alpha, h, expected):
    assert GraLoRAConfig(r=r, alpha=alpha, gralora_k=2 if r % 2 == 0 else 1, hybrid_r=h).scaling == pytest.approx(expected)


@pytest.mark.parametrize("case", MANIFEST["layer_cases"], ids=lambda c: c["name"])
def test_golden_peft_config_dicts_round_trip(case):
    d = case["peft_config"]
    c = GraLoRAConfig.from_peft_dict(d)
    assert c.scaling == pytest.approx(case["scaling"])
    out = c.to_peft_dict()
    for key in ("peft_type", "r", "hybrid_r", "alpha", "gralora_k", "gralora_dropout", "fan_in_fan_out", "bias",
                "init_weights", "layers_to_transform", "layers_pattern", "modules_to_save"):
        assert out[key] == d[key], key
    assert sorted(out["target_modules"]) == sorted(d["target_modules"])
    assert GraLoRAConfig.from_peft_dict(out) == c


def test_golden_model_adapter_config_file():
    c = load_adapter_config(DATA_DIR / "model_tiny_llama_r8_k2_h0" / "adapter")
    assert isinstance(c, GraLoRAConfig)
    assert (c.r, c.alpha, c.gralora_k, c.hybrid_r) == (8, 16, 2, 0)
    assert set(c.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_config_accepted_by_peft():
    peft = pytest.importorskip("peft")
    c = GraLoRAConfig(r=16, alpha=32, gralora_k=4, hybrid_r=4, target_modules=["q_proj"], layers_to_transform=[0, 1], layers_pattern="layers")
    d = c.to_peft_dict()
    pc = peft.GraloraConfig(**{k: v for k, v in d.items() if k not in ("peft_type", "peft_version")})
    assert (pc.r, pc.alpha, pc.gralora_k, pc.hybrid_r) == (16, 32, 4, 4)


def test_authors_convention_r_includes_hybrid():
    d = {"peft_type": "GRALORA", "r": 12, "hybrid_r": 4, "alpha": 24, "gralora_k": 2}
    c = GraLoRAConfig.from_peft_dict(d, authors_convention=True)
    assert c.r == 8 and c.hybrid_r == 4
    assert c.scaling == pytest.approx(24 / 12)  # the authors' alpha / r_total


def test_lora_config_and_dispatch():
    c = LoRAConfig(r=8, lora_alpha=16, target_modules=["q_proj"])
    assert c.scaling == 2.0
    assert config_from_peft_dict(c.to_peft_dict()) == c
    with pytest.raises(ValueError, match="peft_type"):
        config_from_peft_dict({"peft_type": "IA3"})
    with pytest.raises(ValueError, match="use_dora"):
        LoRAConfig.from_peft_dict({"peft_type": "LORA", "use_dora": True})


@pytest.mark.parametrize("kw,msg", [
    ({"bias": "some"}, "bias must be one of"),
    ({"gralora_dropout": 1.0}, "gralora_dropout"),
    ({"r": -4, "gralora_k": 2}, "`r` should be a positive integer value but the value passed is -4"),
])
def test_other_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        GraLoRAConfig(**kw)


def test_bad_adapter_config_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter_config(tmp_path)


_GOOD = {"peft_type": "GRALORA", "r": 8, "alpha": 16, "gralora_k": 2, "hybrid_r": 0, "target_modules": ["q_proj"]}


@pytest.mark.parametrize(
    "content,needle",
    [
        (json.dumps([_GOOD]), "adapter config must be a JSON object, got a list"),
        (json.dumps("GRALORA"), "adapter config must be a JSON object, got a string"),
        (json.dumps({**_GOOD, "r": "8"}), "field 'r' must be an integer, got '8' \\(str\\)"),
        (json.dumps({**_GOOD, "alpha": [1]}), "field 'alpha' must be a number, got \\[1\\] \\(list\\)"),
        (json.dumps({**_GOOD, "gralora_k": True}), "field 'gralora_k' must be an integer"),
        (json.dumps({**_GOOD, "target_modules": [1, 2]}), "field 'target_modules' must be a string, a list of strings"),
        (json.dumps({**_GOOD, "fan_in_fan_out": "no"}), "field 'fan_in_fan_out' must be true or false"),
        (json.dumps({**_GOOD, "r": 6, "gralora_k": 4}), "r should be divisible by gralora_k"),
        (json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": "16", "use_rslora": False}), "field 'lora_alpha' must be a number"),
    ],
    ids=["list", "string", "r_str", "alpha_list", "k_bool", "targets_ints", "bool_str", "peft_check", "lora_alpha_str"],
)
def test_malformed_adapter_config_is_one_line_naming_the_file(tmp_path, content, needle):
    path = tmp_path / "adapter_config.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=needle) as e:
        load_adapter_config(tmp_path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "d,missing",
    [
        ({k: v for k, v in _GOOD.items() if k != "alpha"}, {"alpha"}),
        ({"peft_type": "GRALORA", "target_modules": ["q_proj"]}, {"r", "alpha", "gralora_k", "hybrid_r"}),
        ({"peft_type": "LORA", "r": 8}, {"lora_alpha", "use_rslora"}),
    ],
)
def test_missing_output_fields_warn_one_line_each(tmp_path, d, missing):
    import warnings

    (tmp_path / "adapter_config.json").write_text(json.dumps(d))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = load_adapter_config(tmp_path)
    msgs = [str(w.message) for w in caught if "assuming PEFT's default" in str(w.message)]
    assert {m.split("has no '")[1].split("'")[0] for m in msgs} == missing
    assert all("adapter_config.json" in m and "\n" not in m for m in msgs)
    if "alpha" in missing:
        assert c.alpha == 64 and "default 64" in next(m for m in msgs if "'alpha'" in m)


def test_complete_config_does_not_warn(tmp_path):
    import warnings

    (tmp_path / "adapter_config.json").write_text(json.dumps(GraLoRAConfig(r=8, alpha=16).to_peft_dict()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter_config(tmp_path)
