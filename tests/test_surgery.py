"""Surgery on a tiny transformers Flax Llama: target errors, masks, dropout, jit + grad, init rules."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import transformers as tf
from flax import linen as nn

from gralora_jax import GraLoRAConfig, LoRAConfig
from gralora_jax import kinds
from gralora_jax import tree as tree_lib
from gralora_jax.surgery import GraLoRAModel, add_adapters, get_gralora_model

MATMUL_PRECISION = "highest"  # set around this module by conftest.matmul_precision
IDS = jnp.array([[3, 5, 7, 9, 11, 13, 2, 4]], dtype=jnp.int32)


@pytest.fixture(scope="module")
def llama():
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attention_bias=True)
    return tf.FlaxLlamaForCausalLM(cfg, seed=0)


def test_nothing_matched_lists_names(llama):
    with pytest.raises(ValueError, match=r"matched no linear module.*'down_proj'.*'q_proj'"):
        get_gralora_model(llama, GraLoRAConfig(r=4, target_modules=["query"]))


def test_embedding_target_is_type_error(llama):
    with pytest.raises(TypeError, match=r"embed_tokens.*only linear layers"):
        get_gralora_model(llama, GraLoRAConfig(r=4, target_modules=["embed_tokens", "q_proj"]))


def test_indivisible_shapes_use_peft_message(llama):
    with pytest.raises(ValueError, match="in_features should be divisible by gralora_k, but got 32 and 3"):
        get_gralora_model(llama, GraLoRAConfig(r=6, gralora_k=3, target_modules=["k_proj"]))


def test_default_targets_from_model_type(llama):
    gm = get_gralora_model(llama, GraLoRAConfig(r=4))
    assert gm.config.target_modules == ("q_proj", "v_proj")
    assert [m.rsplit("/", 1)[1] for m in gm.adapted_modules] == ["q_proj", "v_proj"] * 2


def test_regex_and_layers(llama):
    gm = get_gralora_model(llama, GraLoRAConfig(r=4, target_modules=r"model\.layers\.1\.(self_attn\.o_proj|mlp\.up_proj)"))
    assert gm.adapted_modules == ["model/layers/1/self_attn/o_proj", "model/layers/1/mlp/up_proj"]
    gm = get_gralora_model(llama, GraLoRAConfig(r=4, target_modules=["q_proj", "down_proj"], layers_to_transform=[0],
                                                layers_pattern="layers"))
    assert gm.adapted_modules == ["model/layers/0/self_attn/q_proj", "model/layers/0/mlp/down_proj"]


def test_bias_masks(llama):
    def trained(bias):
        gm = get_gralora_model(llama, GraLoRAConfig(r=4, target_modules=["q_proj"], bias=bias))
        return {p for p, t in tree_lib.flatten(gm.trainable_mask()).items() if t}, gm

    adapters = {f"model/layers/{i}/self_attn/q_proj/gralora_{x}" for i in (0, 1) for x in "AB"}
    none, _ = trained("none")
    assert none == adapters
    only, gm = trained("gralora_only")
    assert only == adapters | {f"model/layers/{i}/self_attn/q_proj/bias" for i in (0, 1)}
    assert set(tree_lib.flatten(gm.adapter_params())) == only
    every, _ = trained("all")
    assert every == adapters | {f"model/layers/{i}/self_attn/{n}/bias" for i in (0, 1) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    full = {p for p, t in tree_lib.flatten(gm.trainable_mask(full=True)).items() if t}
    assert full == set(tree_lib.flatten(gm.params))


def test_dropout(llama):
    gm = get_gralora_model(llama, GraLoRAConfig(r=4, gralora_dropout=0.5, init_weights=False, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="no dropout_rng"):
        gm(IDS, train=True)
    eval1, eval2 = gm(IDS).logits, gm(IDS, train=False).logits
    np.testing.assert_array_equal(np.asarray(eval1), np.asarray(eval2))
    # the base model has no dropout here (attention_dropout=0), so any change is the adapter's
    t1 = gm(IDS, train=True, dropout_rng=jax.random.PRNGKey(1)).logits
    t1b = gm(IDS, train=True, dropout_rng=jax.random.PRNGKey(1)).logits
    t2 = gm(IDS, train=True, dropout_rng=jax.random.PRNGKey(2)).logits
    np.testing.assert_array_equal(np.asarray(t1), np.asarray(t1b))
    assert np.abs(np.asarray(t1) - np.asarray(eval1)).max() > 1e-4
    assert np.abs(np.asarray(t1) - np.asarray(t2)).max() > 1e-4


def test_jit_grad_only_adapters(llama):
    gm = get_gralora_model(llama, GraLoRAConfig(r=4, hybrid_r=2, init_weights=False, target_modules=["q_proj", "down_proj"]))
    train, frozen = gm.split_params()
    assert all(tree_lib.is_adapter_path(p) for p in tree_lib.flatten(train))

    @jax.jit
    def grad(t, f):
        return jax.grad(lambda t: jnp.sum(gm.logits_fn(tree_lib.combine(t, f), IDS) ** 2))(t)

    g = tree_lib.flatten(grad(train, frozen))
    assert set(g) == set(tree_lib.flatten(train)) and len(g) == 2 * 2 * 4
    assert all(float(jnp.abs(v).max()) > 0 for v in g.values())
    # and the frozen kernels do influence nothing through the adapter path: base grads are not computed at all
    assert not any(p.endswith("kernel") for p in g)


def test_parameter_count_and_refuse_double_surgery(llama):
    gm = get_gralora_model(llama, GraLoRAConfig(r=4, hybrid_r=2, target_modules=["q_proj", "k_proj"]))
    t, _ = gm.num_parameters()
    assert t == 2 * ((4 + 2) * (32 + 32) + (4 + 2) * (32 + 16))  # LoRA of rank r + hybrid_r
    with pytest.raises(ValueError, match="already hold adapter leaves"):
        add_adapters(gm.params, gm.config, jax.random.PRNGKey(0))


def test_wrong_config_type(llama):
    with pytest.raises(TypeError, match="GraLoRAConfig or LoRAConfig"):
        get_gralora_model(llama, {"r": 4})


def test_lora_scaling_against_numpy(llama):
    """LoRA path: y - y_base at one layer equals scale * x A B, computed in numpy."""
    gm = get_gralora_model(llama, LoRAConfig(r=4, lora_alpha=12, init_lora_weights=False, target_modules=["lm_head"]))
    h = np.asarray(llama(IDS, output_hidden_states=True).hidden_states[-1])
    flat = tree_lib.flatten(gm.params)
    a, b = np.asarray(flat["lm_head/lora_A"]), np.asarray(flat["lm_head/lora_B"])
    want = np.asarray(llama(IDS).logits) + 3.0 * (h @ a @ b)
    np.testing.assert_allclose(np.asarray(gm(IDS).logits), want, atol=1e-4, rtol=1e-4)


def test_from_pretrained_roundtrip_lora(llama, tmp_path):
    gm = get_gralora_model(llama, LoRAConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["o_proj"]))
    gm.save_pretrained(tmp_path)
    again = GraLoRAModel.from_pretrained(llama, str(tmp_path))
    np.testing.assert_array_equal(np.asarray(again(IDS).logits), np.asarray(gm(IDS).logits))


@pytest.mark.parametrize("config", [GraLoRAConfig(r=8, gralora_k=2, init_weights=False, target_modules=["q_proj", "up_proj"]),
                                    LoRAConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "up_proj"])],
                         ids=["gralora", "lora"])
def test_keep_sum_puts_each_adapted_output_behind_a_barrier(llama, config):
    """GraLoRA's ``base + adapter`` is an optimization barrier in every adapted layer (XLA then saves
    the sum for the backward, not both terms: kinds.AdapterKind.keep_sum); LoRA's is a plain add."""
    gm = get_gralora_model(llama, config, rng=jax.random.PRNGKey(0))
    jaxpr = str(jax.make_jaxpr(lambda p: gm.logits_fn(p, IDS))(gm.params))
    adapted = 2 * llama.config.num_hidden_layers
    assert jaxpr.count("optimization_barrier") == (adapted if isinstance(config, GraLoRAConfig) else 0)
    y, d = jnp.ones((3, 5)), jnp.full((3, 5), 0.25)
    np.testing.assert_array_equal(kinds.kind_of(config).add_output(y, d), y + d)


def test_block_layouts_give_the_same_model(llama):
    """``block_layout="concat"`` is a different arrangement of the same arithmetic: logits and
    adapter gradients equal the default's (hybrid, k=4, several projections)."""
    cfg = GraLoRAConfig(r=8, gralora_k=4, hybrid_r=4, init_weights=False, target_modules=["q_proj", "up_proj", "down_proj"])
    fast = get_gralora_model(llama, cfg, rng=jax.random.PRNGKey(3))
    lean = get_gralora_model(llama, cfg, rng=jax.random.PRNGKey(3), block_layout="concat")
    assert lean.block_layout == "concat" and fast.block_layout == "vjp"
    train, frozen = fast.split_params()
    f = lambda gm: jax.value_and_grad(lambda t: jnp.sum(jnp.tanh(gm.logits_fn(tree_lib.combine(t, frozen), IDS))))(train)
    (va, ga), (vb, gb) = f(fast), f(lean)
    np.testing.assert_allclose(vb, va, rtol=1e-6)
    for p, v in tree_lib.flatten(ga).items():
        np.testing.assert_allclose(tree_lib.flatten(gb)[p], v, rtol=1e-5, atol=1e-6)
    # and the adapters matter (the comparison is not between two base models)
    base = llama(IDS, params=llama.params).logits
    assert float(jnp.abs(fast.logits_fn(fast.params, IDS) - base).max()) > 1e-3
    with pytest.raises(ValueError, match="block_layout must be one of"):
        get_gralora_model(llama, cfg, block_layout="transposed")


class _Toy(nn.Module):
    """Two Dense layers; with ``bypass`` the second one's kernel is used directly, not through its __call__."""

    @nn.compact
    def __call__(self, x, bypass=False):
        h = nn.Dense(8, name="l0")(x)
        if bypass:
            return h @ self.variables["params"]["l1"]["kernel"]
        return nn.Dense(8, name="l1")(h)


class _ToyModel:
    """The transformers calling convention around ``_Toy`` (``jax_only``: a forward with no flax module)."""

    def __init__(self, jax_only=False):
        self.module = _Toy()
        self.params = self.module.init(jax.random.PRNGKey(0), jnp.ones((1, 8)))["params"]
        self.jax_only = jax_only

    def __call__(self, x, params=None, dropout_rng=None, train=False, bypass=False):
        if self.jax_only:
            return (x @ params["l0"]["kernel"]) @ params["l1"]["kernel"]
        return self.module.apply({"params": params}, x, bypass=bypass)


def test_noop_guard_raises_when_an_adapted_module_is_bypassed():
    cfg = GraLoRAConfig(r=4, gralora_k=2, init_weights=False, target_modules=["l0", "l1"])
    gm = get_gralora_model(_ToyModel(), cfg)
    x = jnp.ones((2, 8))
    base = gm.model.module.apply({"params": gm.model.params}, x)
    assert float(jnp.abs(gm(x) - base).max()) > 1e-3  # the normal path applies both adapters
    with pytest.raises(RuntimeError, match=r"1 adapted module\(s\) were not called through the GraLoRA interceptor.*\['l1'\]"):
        gm(x, bypass=True)
    with pytest.raises(RuntimeError, match=r"\['l1'\]"):  # also when traced under jit / grad
        jax.jit(jax.grad(lambda p: jnp.sum(gm(x, params=p, bypass=True))))(gm.params)
    with pytest.raises(RuntimeError, match="ran without calling a flax module"):
        get_gralora_model(_ToyModel(jax_only=True), cfg)(x)


def test_noop_guard_inside_intercept_context():
    """The guard also covers direct use of ``intercept()`` (as generation does)."""
    cfg = GraLoRAConfig(r=4, gralora_k=2, init_weights=False, target_modules=["l0", "l1"])
    gm = get_gralora_model(_ToyModel(), cfg)
    with gm.intercept():
        gm.model.module.apply({"params": gm.params}, jnp.ones((1, 8)))  # fine
        with pytest.raises(RuntimeError, match=r"\['l1'\]"):
            gm.model.module.apply({"params": gm.params}, jnp.ones((1, 8)), bypass=True)
