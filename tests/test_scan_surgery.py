"""GraLoRA on scanned layers (``scan_layers=True``: kernels ``[L, in, out]`` under ``model/layers/scan``).

Checked against the unrolled model (same rng -> same adapters, logits and gradients), against
PEFT on PyTorch both ways (a scanned model's adapter loads in PEFT with the same logits; a PEFT
adapter loads into a scanned model with the same logits), byte-for-byte against the unrolled
model's adapter file, and through ``gralora_jax.train.make_train_step`` with remat on a 4x2 mesh.
"""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gralora_jax import GraLoRAConfig, LoRAConfig  # noqa: E402
from gralora_jax import tree as tree_lib  # noqa: E402
from gralora_jax.models import from_pretrained, stack_layer_params, unstack_layer_params  # noqa: E402
from gralora_jax.optim import OptimConfig, make_optimizer  # noqa: E402
from gralora_jax.sharding import make_mesh, param_partition_specs  # noqa: E402
from gralora_jax.surgery import GraLoRAModel, get_gralora_model  # noqa: E402
from gralora_jax.train import init_train_state, make_causal_lm_loss_fn, make_train_step  # noqa: E402

MATMUL_PRECISION = "highest"  # set around this module by conftest.matmul_precision
ATOL = 1e-4
LAYERS = 3
IDS = np.array([[1, 5, 9, 13, 17, 21, 25, 29], [2, 4, 6, 8, 10, 12, 14, 16]], dtype=np.int64)
HYBRID = GraLoRAConfig(r=4, alpha=8, gralora_k=2, hybrid_r=2, init_weights=False,
                       target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(torch checkpoint dir, unrolled (model, params), scanned + remat (model, params)) of one random Llama."""
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attention_bias=True, attn_implementation="eager")
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-zero biases, so a bias mix-up between layers shows
        for n, p in m.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.1)
    d = tmp_path_factory.mktemp("llama")
    m.save_pretrained(d)
    return d, from_pretrained(d), from_pretrained(d, scan_layers=True, remat_policy="full")


def _torch_logits(m):
    with torch.no_grad():
        return m(input_ids=torch.tensor(IDS)).logits.numpy()


def _torch_base(d):
    return transformers.LlamaForCausalLM.from_pretrained(str(d), attn_implementation="eager").eval()


def _logits(gm, params=None):
    return np.asarray(gm.logits_fn(gm.params if params is None else params, jnp.asarray(IDS)))


def _pair(base, config, rng=3):
    _, (um, up), (sm, sp) = base
    return (get_gralora_model(um, config, params=up, rng=jax.random.PRNGKey(rng)),
            get_gralora_model(sm, config, params=sp, rng=jax.random.PRNGKey(rng)))


CONFIGS = {
    "gralora_hybrid": HYBRID,
    "gralora_k4_all_linear": GraLoRAConfig(r=8, gralora_k=4, init_weights=False, target_modules="all-linear"),
    "lora": LoRAConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["k_proj", "up_proj"]),
    "bias_all": GraLoRAConfig(r=4, alpha=8, gralora_k=2, bias="all", target_modules=["q_proj", "gate_proj"]),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_scanned_adapters_are_the_unrolled_ones_stacked(case, base, tmp_path):
    """Same rng: the scanned tree is the unrolled tree stacked (adapters drawn per layer), and the
    adapter files are byte-for-byte equal (keys, order, values, config)."""
    unrolled, scanned = _pair(base, CONFIGS[case])
    sp = tree_lib.flatten(scanned.params)
    want = tree_lib.flatten(stack_layer_params(unrolled.params))
    assert sp.keys() == want.keys()
    for p, v in want.items():
        np.testing.assert_array_equal(np.asarray(sp[p]), np.asarray(v), err_msg=p)
    a = [p for p in sp if p.endswith("gralora_A") or p.endswith("lora_A")]
    assert a and all(p.startswith("model/layers/scan/") and sp[p].shape[0] == LAYERS for p in a)
    if case == "gralora_hybrid":
        assert sp["model/layers/scan/self_attn/q_proj/gralora_A"].shape == (LAYERS, 2, 16, 4)  # [L, k, in/k, r]
    # different layers got different draws
    assert not np.array_equal(np.asarray(sp[a[0]][0]), np.asarray(sp[a[0]][1]))
    scanned.save_pretrained(tmp_path / "scanned")
    unrolled.save_pretrained(tmp_path / "unrolled")
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "scanned" / f).read_bytes() == (tmp_path / "unrolled" / f).read_bytes(), f


def test_scanned_logits_and_gradients_equal_unrolled(base):
    unrolled, scanned = _pair(base, HYBRID)
    np.testing.assert_allclose(_logits(scanned), _logits(unrolled), atol=ATOL, rtol=ATOL)
    _, (um, up), _ = base
    assert np.abs(_logits(unrolled) - _logits(unrolled, up)).max() > 10 * ATOL  # the adapters matter

    def grads(gm):
        train, frozen = gm.split_params()
        f = lambda t: jnp.sum(jnp.tanh(gm.logits_fn(tree_lib.combine(t, frozen), jnp.asarray(IDS))))  # noqa: E731
        return jax.jit(jax.grad(f))(train)

    gu, gs = tree_lib.flatten(grads(unrolled)), tree_lib.flatten(unstack_layer_params(grads(scanned)))
    assert gu.keys() == gs.keys() and len(gu) == LAYERS * 4 * 4
    for p, v in gu.items():
        assert float(jnp.abs(v).max()) > 0, p
        np.testing.assert_allclose(np.asarray(gs[p]), np.asarray(v), atol=1e-5, rtol=1e-4, err_msg=p)


def test_interceptor_sees_one_layer_slice_inside_scan(base):
    """nn.scan slices params per step: the intercepted Dense sees a 2-D kernel and 3-D GraLoRA leaves."""
    _, scanned = _pair(base, HYBRID)
    seen = []

    def record(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name == "__call__" and m.has_variable("params", "gralora_A"):
            seen.append(("/".join(m.scope.path), m.get_variable("params", "kernel").ndim,
                         m.get_variable("params", "gralora_A").ndim, m.get_variable("params", "gralora_A_general").ndim))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda p: scanned.logits_fn(p, jnp.asarray(IDS)), scanned.params)
    assert {s[0] for s in seen} == set(scanned.adapted_modules)
    assert {s[1:] for s in seen} == {(2, 3, 2)}


def test_scanned_adapter_loads_in_peft(base, tmp_path):
    """Scanned model -> PEFT: trained a few steps (B no longer zero), saved, loaded by PEFT: same logits."""
    d, _, (sm, sp) = base
    gm = get_gralora_model(sm, GraLoRAConfig(r=4, alpha=8, gralora_k=2, hybrid_r=2,
                                             target_modules=["q_proj", "k_proj", "up_proj", "down_proj"]),
                           params=sp, rng=jax.random.PRNGKey(1))
    train, frozen = gm.split_params()
    loss = make_causal_lm_loss_fn(gm)
    grad = jax.jit(jax.grad(lambda t: loss(tree_lib.combine(t, frozen), {"input_ids": jnp.asarray(IDS)}, None, False)[0]))
    for _ in range(3):
        train = jax.tree_util.tree_map(lambda p, g: p - 50.0 * g, train, grad(train))
    gm.params = tree_lib.combine(train, frozen)
    ours = _logits(gm)
    assert np.abs(ours - _logits(gm, sp)).max() > 10 * ATOL
    gm.save_pretrained(tmp_path)
    pm = peft.PeftModel.from_pretrained(_torch_base(d), str(tmp_path)).eval()
    np.testing.assert_allclose(_torch_logits(pm), ours, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("make_cfg", [
    lambda: peft.GraloraConfig(r=4, alpha=6, gralora_k=2, hybrid_r=2, init_weights=False, bias="gralora_only",
                               target_modules=["q_proj", "o_proj", "gate_proj"]),
    lambda: peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["v_proj", "down_proj"]),
], ids=["gralora_hybrid_bias", "lora"])
def test_peft_adapter_loads_into_scanned_model(make_cfg, base, tmp_path):
    d, _, (sm, sp) = base
    torch.manual_seed(1)
    pm = peft.get_peft_model(_torch_base(d), make_cfg()).eval()
    if make_cfg().bias == "gralora_only":  # trained biases of the adapted modules travel in the file
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if n.endswith(".base_layer.bias"):
                    p.add_(0.2)
    ref = _torch_logits(pm)
    pm.save_pretrained(tmp_path)
    gm = GraLoRAModel.from_pretrained(sm, str(tmp_path), params=sp)
    a = [p for p in tree_lib.flatten(gm.adapter_params()) if tree_lib.is_adapter_path(p)]
    assert a and all(p.startswith("model/layers/scan/") for p in a)
    np.testing.assert_allclose(_logits(gm), ref, atol=ATOL, rtol=ATOL)
    merged = gm.merge_and_unload()
    assert "scan" in merged["model"]["layers"] and not any(tree_lib.is_adapter_path(p) for p in tree_lib.flatten(merged))
    np.testing.assert_allclose(np.asarray(sm.apply(merged, jnp.asarray(IDS)).logits), ref, atol=ATOL, rtol=ATOL)
    assert np.abs(ref - _logits(gm, sp)).max() > 10 * ATOL


def test_partial_adapter_file_does_not_fit_scanned_model(base, tmp_path):
    """A PEFT adapter on some layers only cannot be stacked: refused with the missing keys named."""
    d, _, (sm, sp) = base
    pm = peft.get_peft_model(_torch_base(d), peft.GraloraConfig(r=4, gralora_k=2, target_modules=["q_proj"],
                                                                layers_to_transform=[1]))
    pm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"layers \[1\] of 3.*every layer or none"):
        GraLoRAModel.from_pretrained(sm, str(tmp_path), params=sp)


def test_scanned_layers_to_transform_is_a_clear_error(base):
    _, _, (sm, sp) = base
    with pytest.raises(ValueError, match=r"model/layers/scan/self_attn/q_proj: the targets select layers \[0, 2\] of 3"):
        get_gralora_model(sm, GraLoRAConfig(r=4, target_modules=["q_proj"], layers_to_transform=[0, 2]), params=sp)
    # every layer selected explicitly is fine, and equals no filter
    gm = get_gralora_model(sm, GraLoRAConfig(r=4, target_modules=["q_proj"], layers_to_transform=[0, 1, 2]), params=sp)
    assert gm.adapted_modules == ["model/layers/scan/self_attn/q_proj"]


def _train(gm, mesh, steps=4):
    mask = gm.trainable_mask()
    optim = OptimConfig(optimizer="adamw", learning_rate=2e-2, total_steps=10, warmup_steps=0)
    opt = make_optimizer(optim, gm.params, mask)
    specs = param_partition_specs(gm.params, "llama", mesh)
    step = make_train_step(make_causal_lm_loss_fn(gm), opt, mask, mesh, specs, gm.params)
    state, frozen = init_train_state(gm.params, mask, opt, mesh, specs)
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(1, 64, (8, 8)).astype(np.int32),
             "attention_mask": np.ones((8, 8), np.int32)}
    losses = []
    for _ in range(steps):
        state, m = step(state, frozen, jax.device_put(batch, step.batch_sharding))
        losses.append(float(m["loss"]))
    return np.array(losses), jax.device_get(state.params)


def test_scan_remat_gralora_trains_like_unrolled(base):
    """make_train_step on a 4x2 mesh: scan + remat ("full") + GraLoRA lowers the loss and follows
    the unrolled model's losses and adapters (no dropout: its masks are drawn per scan step, not
    per unrolled module, so the two layouts draw different ones)."""
    config = GraLoRAConfig(r=4, alpha=8, gralora_k=2, hybrid_r=2,
                           target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    unrolled, scanned = _pair(base, config)
    mesh = make_mesh("4x2")
    lu, pu = _train(unrolled, mesh)
    ls, ps = _train(scanned, mesh)
    assert np.all(np.diff(ls) < 0) and ls[-1] < ls[0] - 0.02, ls
    np.testing.assert_allclose(ls, lu, rtol=1e-5, atol=1e-5)
    fu, fs = tree_lib.flatten(pu), tree_lib.flatten(unstack_layer_params(ps))
    assert fu.keys() == fs.keys()
    for p, v in fu.items():
        np.testing.assert_allclose(fs[p], v, rtol=1e-4, atol=1e-5, err_msg=p)


def test_hidden_fn_may_skip_an_adapted_lm_head(base):
    """The no-op guard lets hidden_fn (compute_logits=False) leave an adapted lm_head unvisited,
    and only it; the full forward visits every adapted module, scanned ones included."""
    _, _, (sm, sp) = base
    gm = get_gralora_model(sm, GraLoRAConfig(r=4, gralora_k=2, target_modules=["lm_head", "q_proj"]), params=sp)
    assert gm.adapted_modules == ["lm_head", "model/layers/scan/self_attn/q_proj"]
    h = jax.eval_shape(lambda p: gm.hidden_fn(p, jnp.asarray(IDS)), gm.params)
    assert h.shape == (2, 8, 32)
    jax.eval_shape(lambda p: gm.logits_fn(p, jnp.asarray(IDS)), gm.params)


def test_qwen3_peft_adapter_in_scanned_model_with_qk_norm(tmp_path):
    """Qwen3's q_norm/k_norm stack with the layers; a PEFT GraLoRA adapter on its q/k lands in the scan."""
    cfg = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(2)
    tm = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in tm.named_parameters():
            if "_norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    tm.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(tm, peft.GraloraConfig(r=4, alpha=8, gralora_k=2, hybrid_r=2, init_weights=False,
                                                    target_modules=["q_proj", "k_proj"])).eval()
    ref = _torch_logits(pm)
    pm.save_pretrained(tmp_path / "adapter")
    sm, sp = from_pretrained(tmp_path / "base", scan_layers=True)
    assert sp["model"]["layers"]["scan"]["self_attn"]["q_norm"]["weight"].shape == (2, 16)
    gm = GraLoRAModel.from_pretrained(sm, str(tmp_path / "adapter"), params=sp)
    assert all(p.startswith("model/layers/scan/self_attn/") for p in tree_lib.flatten(gm.adapter_params()))
    np.testing.assert_allclose(_logits(gm), ref, atol=ATOL, rtol=ATOL)
    assert np.abs(ref - _logits(gm, sp)).max() > 10 * ATOL
