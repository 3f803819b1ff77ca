"""The adapter-kind registry: every kind complete and self-consistent, one init for host and
Flax, and rsLoRA (the third kind) against PEFT on PyTorch in both directions."""

import dataclasses
import json
import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from gralora_jax import kinds, layers
from gralora_jax.config import GraLoRAConfig, LoRAConfig, config_from_peft_dict, load_adapter_config
from gralora_jax.kinds import KINDS, MeshAxes
from gralora_jax.surgery import _host_generator

jax.config.update("jax_default_matmul_precision", "highest")

# one config per kind, with random B so every leaf is drawn; extra variants where a kind has optional leaves
CONFIGS = {
    "gralora": GraLoRAConfig(r=8, alpha=16, gralora_k=4, init_weights=False),
    "gralora_hybrid": GraLoRAConfig(r=8, alpha=16, gralora_k=2, hybrid_r=2, init_weights=False),
    "gralora_zero_B": GraLoRAConfig(r=8, gralora_k=4, hybrid_r=2),
    "lora": LoRAConfig(r=4, lora_alpha=8, init_lora_weights=False),
    "lora_zero_B": LoRAConfig(r=4),
    "rslora": LoRAConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False),
}


def test_configs_cover_every_kind():
    assert {kinds.kind_of(c).name for c in CONFIGS.values()} == set(KINDS)


@pytest.mark.parametrize("name", list(KINDS))
def test_every_kind_is_complete(name):
    kind = KINDS[name]
    assert set(kind.peft_keys) == set(kind.leaves)
    assert kind.bias_only in kinds.BIAS_CHOICES and kind.peft_type in kinds.PEFT_TYPES
    assert all(f in {f.name for f in dataclasses.fields(kind.config_class)} for f in kind.output_fields)
    for leaf in kind.leaves:
        assert kinds.kind_of_leaf(leaf).peft_keys[leaf] == kind.peft_keys[leaf]


@pytest.mark.parametrize("case", list(CONFIGS))
def test_host_and_key_init_follow_the_same_rules(case):
    """Surgery draws on the host, the Flax layers from a key; one init: same leaves, shapes,
    dtypes, zeros and Kaiming bounds."""
    config = CONFIGS[case]
    host = kinds.init_on_host(_host_generator(jax.random.PRNGKey(0)), config, 64, 32, jnp.bfloat16)
    key = kinds.init_from_key(jax.random.PRNGKey(0), config, 64, 32, jnp.bfloat16)
    assert {k: (v.shape, v.dtype) for k, v in host.items()} == {k: (v.shape, v.dtype) for k, v in key.items()}
    assert set(host) <= set(kinds.kind_of(config).leaves)
    for k in key:
        a, b = np.abs(np.asarray(host[k], np.float32)), np.abs(np.asarray(key[k], np.float32))
        assert (a.max() == 0) == (b.max() == 0), k
        if b.max() > 0:  # same U(-bound, bound): both maxima just under the bound
            assert a.max() <= b.max() * 1.15 and b.max() <= a.max() * 1.15, k


def test_public_init_functions_are_the_kinds_init():
    key = jax.random.PRNGKey(3)
    a = layers.init_gralora_adapter(key, 16, 8, 4, 2, 2, init_weights=False)
    b = kinds.init_from_key(key, GraLoRAConfig(r=4, gralora_k=2, hybrid_r=2, init_weights=False), 16, 8, jnp.float32)
    assert all(np.array_equal(a[k], b[k]) for k in b) and set(a) == set(b)
    a = layers.init_lora_adapter(key, 16, 8, 4, init_weights=False)
    b = kinds.init_from_key(key, LoRAConfig(r=4, init_lora_weights=False), 16, 8, jnp.float32)
    assert all(np.array_equal(a[k], b[k]) for k in b) and set(a) == set(b)


@pytest.mark.parametrize("case", list(CONFIGS))
def test_partition_spec_rule_covers_every_leaf(case):
    config = CONFIGS[case]
    kind = kinds.kind_of(config)
    axes = MeshAxes(size=lambda e: 2, is_batch=lambda e: e == "fsdp")
    for leaf, v in kinds.init_on_host(_host_generator(jax.random.PRNGKey(0)), config, 64, 32, jnp.float32).items():
        for s_in, s_out in ((None, None), ("fsdp", "model"), ("model", "fsdp")):
            spec = kind.partition_spec(leaf, v.shape, s_in, s_out, axes)
            assert len(spec) == v.ndim and None in spec, (leaf, spec)  # the rank axis is never split


def test_selection_by_config_and_by_peft_dict():
    assert kinds.kind_of(GraLoRAConfig(r=4)).name == "gralora"
    assert kinds.kind_of(LoRAConfig(r=4)).name == "lora"
    assert kinds.kind_of(LoRAConfig(r=4, use_rslora=True)).name == "rslora"
    assert kinds.kind_for_peft_dict({"peft_type": "GRALORA"}).name == "gralora"
    assert kinds.kind_for_peft_dict({"peft_type": "lora", "use_rslora": False}).name == "lora"
    assert kinds.kind_for_peft_dict({"peft_type": "LORA", "use_rslora": True}).name == "rslora"
    with pytest.raises(ValueError, match="unsupported peft_type 'IA3': expected GRALORA or LORA"):
        kinds.kind_for_peft_dict({"peft_type": "IA3"})
    with pytest.raises(TypeError, match="config must be a GraLoRAConfig or LoRAConfig, got dict"):
        kinds.kind_of({"r": 4})
    assert kinds.kind_of_adapter({"kernel": 0, "lora_A": 0, "lora_B": 0}).name == "lora"
    with pytest.raises(ValueError, match="not an adapter"):
        kinds.kind_of_adapter({"kernel": 0})


def test_registry_check_refuses_inconsistent_kinds():
    lora = KINDS["lora"]
    with pytest.raises(ValueError, match="peft_keys must name exactly its leaves"):
        kinds._check({"bad": dataclasses.replace(lora, name="bad", leaves=("lora_A",))})
    with pytest.raises(ValueError, match="both the default of LoRAConfig"):
        kinds._check({"lora": lora, "twin": dataclasses.replace(lora, name="twin")})
    with pytest.raises(ValueError, match="share the leaf 'lora_A' but disagree"):
        twin = dataclasses.replace(lora, name="twin", selects=lambda get: True,
                                   peft_keys={**lora.peft_keys, "lora_A": ("lora_A.other", True)})
        kinds._check({"lora": lora, "twin": twin})


# ----------------------------------------------------------------------------- discovery

_KIND_FILE = """import dataclasses
from gralora_jax.kinds import lora
KIND = dataclasses.replace(lora.KIND, name={name!r}, order={order}, selects=lambda get: bool(get("use_{name}", False)))
"""


def _kind_package(root, name, files):
    pkg = root / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for module, text in files.items():
        (pkg / f"{module}.py").write_text(text)
    return str(pkg)


def test_the_package_registers_its_modules_by_order():
    assert kinds._kind_modules(kinds.__path__) == ["gralora", "lora", "rslora"]
    assert [k.order for k in KINDS.values()] == sorted(k.order for k in KINDS.values())


def test_a_kind_module_dropped_into_a_package_is_discovered(tmp_path, monkeypatch):
    """A new file is all a kind needs: found without being listed, registered by ``order`` (not by
    file name); ``base``, private and test modules are never imported as kinds."""
    monkeypatch.syspath_prepend(str(tmp_path))
    never = "raise RuntimeError('not a kind module')\n"
    path = _kind_package(tmp_path, "kinds_ext", {
        "alpha": _KIND_FILE.format(name="alpha", order=70), "zeta": _KIND_FILE.format(name="zeta", order=60),
        "base": never, "_shared": never, "alpha_test": never})
    found = kinds._load("kinds_ext", [path])
    assert list(found) == ["zeta", "alpha"]
    kinds._check({**KINDS, **found})  # LoRA's leaves, agreeing with LoRA: a consistent registry
    assert kinds._pick([KINDS["lora"], found["zeta"]], {"use_zeta": True}.get) is found["zeta"]


@pytest.mark.parametrize("package, files, error", [
    ("kinds_no_kind", {"empty": "X = 1\n"}, "kinds_no_kind.empty is a kind module but defines no KIND"),
    ("kinds_same_order", {"one": _KIND_FILE.format(name="one", order=5), "two": _KIND_FILE.format(name="two", order=5)},
     "'one' and 'two' share a name or an order"),
])
def test_discovery_refuses_a_module_without_kind_or_a_shared_order(tmp_path, monkeypatch, package, files, error):
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _kind_package(tmp_path, package, files)
    with pytest.raises((ImportError, ValueError), match=error):
        kinds._load(package, [path])


# ----------------------------------------------------------------------------- rsLoRA


def test_rslora_scaling_comes_from_the_config():
    assert LoRAConfig(r=16, lora_alpha=8, use_rslora=True).scaling == 2.0
    assert LoRAConfig(r=16, lora_alpha=8).scaling == 0.5
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 16))
    layer = layers.LoRADense(features=8, r=4, lora_alpha=6, use_rslora=True, init_weights=False)
    v = layer.init(jax.random.PRNGKey(1), x)["params"]
    want = x @ v["kernel"] + v["bias"] + (6 / math.sqrt(4)) * (x @ v["lora_A"] @ v["lora_B"])
    np.testing.assert_allclose(np.asarray(layer.apply({"params": v}, x)), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_rslora_config_round_trips(tmp_path):
    c = LoRAConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"])
    d = c.to_peft_dict()
    assert d["peft_type"] == "LORA" and d["use_rslora"] is True
    assert config_from_peft_dict(d) == c and LoRAConfig.from_peft_dict(d) == c
    (tmp_path / "adapter_config.json").write_text(json.dumps(d))
    again = load_adapter_config(tmp_path)
    assert again == c and again.scaling == 16 / math.sqrt(8)
    assert config_from_peft_dict({**d, "use_rslora": False}).scaling == 2.0


def test_rslora_config_is_peft_loraconfig():
    peft = pytest.importorskip("peft")
    d = LoRAConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj"]).to_peft_dict()
    pc = peft.LoraConfig(**{k: v for k, v in d.items() if k not in ("peft_type",)})
    assert pc.use_rslora is True and pc.r == 8 and pc.lora_alpha == 16
    ours = config_from_peft_dict({"peft_type": "LORA", **json.loads(json.dumps(pc.to_dict(), default=list))})
    assert kinds.kind_of(ours).name == "rslora" and ours.scaling == 16 / math.sqrt(8)


# ----------------------------------------------------------------------------- rsLoRA against PEFT on PyTorch

RSLORA_ATOL = 1e-5
IDS = np.array([[1, 5, 9, 13, 17, 21, 25, 29], [2, 4, 6, 8, 10, 12, 14, 16]], dtype=np.int64)
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def torch_llama(tmp_path_factory):
    """A tiny random torch Llama saved with save_pretrained, and its Flax twin loaded here."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from gralora_jax.loading import load_pretrained

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation="eager")
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(d)
    model, params = load_pretrained(str(d))

    def fresh():
        return transformers.LlamaForCausalLM.from_pretrained(str(d), attn_implementation="eager").eval()

    return fresh, model, params


def _torch_logits(m):
    import torch

    with torch.no_grad():
        return m(input_ids=torch.tensor(IDS)).logits.numpy()


def _ours(gm, params=None):
    return np.asarray(gm.logits_fn(gm.params if params is None else params, jnp.asarray(IDS)))


def test_rslora_peft_to_here(torch_llama, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from gralora_jax.surgery import GraLoRAModel

    fresh, model, params = torch_llama
    torch.manual_seed(1)
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False, target_modules=TARGETS)
    pm = peft.get_peft_model(fresh(), pcfg).eval()
    ref = _torch_logits(pm)
    pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_rslora"] is True
    gm = GraLoRAModel.from_pretrained(model, str(tmp_path), params=params)
    assert kinds.kind_of(gm.config).name == "rslora" and gm.scaling == 8 / math.sqrt(4)
    np.testing.assert_allclose(_ours(gm), ref, atol=RSLORA_ATOL, rtol=RSLORA_ATOL)
    np.testing.assert_allclose(_ours(gm, gm.merge_and_unload()), ref, atol=RSLORA_ATOL, rtol=RSLORA_ATOL)
    # the flag matters: read as plain LoRA (scale alpha / r) the same tensors give other logits
    plain = dataclasses.replace(gm.config, use_rslora=False)
    assert np.abs(_ours(GraLoRAModel(model, plain, gm.params, gm.layouts)) - ref).max() > 100 * RSLORA_ATOL


def test_rslora_here_to_peft(torch_llama, tmp_path):
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from gralora_jax.surgery import get_gralora_model

    fresh, model, params = torch_llama
    config = LoRAConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False, target_modules=TARGETS)
    gm = get_gralora_model(model, config, params=params, rng=jax.random.PRNGKey(1))
    ours = _ours(gm)
    assert np.abs(ours - _ours(gm, params)).max() > 100 * RSLORA_ATOL  # the adapter matters
    gm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_rslora"] is True
    pm = peft.PeftModel.from_pretrained(fresh(), str(tmp_path)).eval()
    assert pm.peft_config["default"].use_rslora is True
    np.testing.assert_allclose(_torch_logits(pm), ours, atol=RSLORA_ATOL, rtol=RSLORA_ATOL)
