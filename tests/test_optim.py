"""Optimizer / schedule tests: values against hand-computed numbers, and no optimizer state
for frozen leaves."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gralora_jax import tree as tree_lib
from gralora_jax.optim import OptimConfig, make_optimizer, make_schedule, weight_decay_mask


def _params():
    # Every leaf has a distinct shape so a frozen leaf's state would be recognisable by shape.
    return {
        "model": {
            "layers": {"0": {"q_proj": {"kernel": jnp.full((6, 10), 0.5), "bias": jnp.full((10,), 0.1),
                                        "gralora_A": jnp.full((2, 3, 4), 0.3), "gralora_B": jnp.full((2, 4, 5), -0.2)}}},
            "norm": {"weight": jnp.ones((7,))},
        },
        "lm_head": {"kernel": jnp.full((11, 13), 0.25)},
    }


def _state_paths(state):
    return [(jax.tree_util.keystr(k), np.shape(v)) for k, v in jax.tree_util.tree_leaves_with_path(state)]


@pytest.mark.parametrize("name", ["adamw", "lion", "sgd"])
def test_no_state_for_frozen_leaves(name):
    params = _params()
    mask = tree_lib.trainable_mask(params)
    opt = make_optimizer(OptimConfig(optimizer=name, total_steps=10, weight_decay=0.1, b1=0.9), params, mask)
    state = opt.init(params)
    frozen_paths = [p for p, m in tree_lib.flatten(mask).items() if not m]
    frozen_shapes = {np.shape(tree_lib.flatten(params)[p]) for p in frozen_paths}
    for path, shape in _state_paths(state):
        assert shape not in frozen_shapes, f"optimizer state leaf {path} has a frozen leaf's shape {shape}"
        for fp in frozen_paths:
            assert not path.endswith("".join(f"['{x}']" for x in fp.split("/"))), path
    if name in ("adamw", "lion"):  # moments exist for the trainable leaves
        assert {(2, 3, 4), (2, 4, 5)} <= {s for _, s in _state_paths(state)}
    # frozen leaves get exactly zero updates; adapters move
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(3):
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    flat, flat0 = tree_lib.flatten(params), tree_lib.flatten(_params())
    for p, m in tree_lib.flatten(mask).items():
        if m:
            assert not np.array_equal(flat[p], flat0[p]), p
        else:
            np.testing.assert_array_equal(flat[p], flat0[p])


def test_full_finetune_mask_all_true_trains_everything():
    params = _params()
    opt = make_optimizer(OptimConfig(optimizer="adamw", total_steps=10, warmup_steps=0), params, None)
    state = opt.init(params)
    shapes = {s for _, s in _state_paths(state)}
    assert {(6, 10), (11, 13), (7,)} <= shapes


def test_adamw_two_steps_hand_computed():
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.99, 1e-8, 0.05
    cfg = OptimConfig(optimizer="adamw", learning_rate=lr, total_steps=100, schedule="constant",
                      b1=b1, b2=b2, eps=eps, weight_decay=wd, max_grad_norm=0)
    p = {"l": {"gralora_A": jnp.array([[1.0, -2.0]]), "bias": jnp.array([0.5])}}
    opt = make_optimizer(cfg, p, {"l": {"gralora_A": True, "bias": True}})
    s = opt.init(p)
    gs = [np.array([[0.5, -1.0]]), np.array([[2.0, 0.25]])]
    x = np.array([[1.0, -2.0]])
    bias = 0.5
    m = v = np.zeros_like(x)
    for t, g in enumerate(gs, start=1):
        u, s = opt.update({"l": {"gralora_A": jnp.asarray(g), "bias": jnp.array([1.0])}}, s, p)
        p = optax.apply_updates(p, u)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mh, vh = m / (1 - b1**t), v / (1 - b2**t)
        x = x - lr * (mh / (np.sqrt(vh) + eps) + wd * x)  # decoupled decay on the adapter
        bias = bias - lr * 1.0  # |g|=1 constant -> adam step = lr; no decay on bias
    np.testing.assert_allclose(p["l"]["gralora_A"], x, rtol=1e-5)
    np.testing.assert_allclose(p["l"]["bias"], [bias], rtol=1e-5)


def test_lion_hand_computed_and_paper_betas():
    cfg = OptimConfig(optimizer="lion", learning_rate=0.01, total_steps=100, schedule="constant",
                      weight_decay=0.1, max_grad_norm=0)
    assert cfg.betas == (0.9, 0.95)
    b1, b2, lr, wd = 0.9, 0.95, 0.01, 0.1
    p = {"gralora_A": jnp.array([[1.0, -1.0, 2.0]])}  # 2-D: 1-D leaves get no decay by default
    opt = make_optimizer(cfg, p, {"gralora_A": True})
    s = opt.init(p)
    x = np.array([[1.0, -1.0, 2.0]])
    m = np.zeros((1, 3))
    for g in (np.array([[0.3, -0.2, 0.0]]), np.array([[-1.0, -0.1, 0.5]])):
        u, s = opt.update({"gralora_A": jnp.asarray(g)}, s, p)
        p = optax.apply_updates(p, u)
        c = np.sign(b1 * m + (1 - b1) * g)
        x = x - lr * (c + wd * x)
        m = b2 * m + (1 - b2) * g
    np.testing.assert_allclose(p["gralora_A"], x, rtol=1e-6)


def test_global_norm_clipping():
    cfg = OptimConfig(optimizer="sgd", learning_rate=1.0, total_steps=10, schedule="constant", max_grad_norm=1.0)
    p = {"a": {"lora_A": jnp.zeros((2,))}, "b": {"kernel": jnp.zeros((3,))}}
    opt = make_optimizer(cfg, p, {"a": {"lora_A": True}, "b": {"kernel": False}})
    g = {"a": {"lora_A": jnp.array([3.0, 4.0])}, "b": {"kernel": jnp.array([100.0, 0, 0])}}  # frozen grad ignored
    u, _ = opt.update(g, opt.init(p), p)
    np.testing.assert_allclose(u["a"]["lora_A"], [-0.6, -0.8], rtol=1e-6)
    np.testing.assert_array_equal(u["b"]["kernel"], 0.0)


@pytest.mark.parametrize(
    "schedule,expected",
    [
        # peak 1.0, total 10, warmup 2 (t=0,1 warm), end 0.1 -> decay over 8 steps
        ("cosine", {0: 0.0, 1: 0.5, 2: 1.0, 6: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), 10: 0.1, 12: 0.1}),
        ("linear", {0: 0.0, 1: 0.5, 2: 1.0, 4: 1.0 - 0.9 * 0.25, 10: 0.1}),
        ("constant", {0: 0.0, 1: 0.5, 2: 1.0, 9: 1.0}),
    ],
)
def test_schedule_values(schedule, expected):
    s = make_schedule(OptimConfig(learning_rate=1.0, total_steps=10, warmup_steps=2, schedule=schedule,
                                  end_lr_ratio=0.1))
    for t, v in expected.items():
        assert float(s(t)) == pytest.approx(v, abs=1e-6), (schedule, t)


def test_warmup_ratio_is_ceil_and_schedule_drives_optimizer():
    cfg = OptimConfig(learning_rate=2.0, total_steps=25, warmup_ratio=0.1, schedule="constant",
                      optimizer="sgd", max_grad_norm=0)
    assert cfg.num_warmup_steps == 3
    p = {"lora_A": jnp.zeros(())}
    opt = make_optimizer(cfg, p, {"lora_A": True})
    s = opt.init(p)
    seen = []
    for _ in range(4):
        u, s = opt.update({"lora_A": jnp.ones(())}, s, p)
        seen.append(-float(u["lora_A"]))
    np.testing.assert_allclose(seen, [0.0, 2 / 3, 4 / 3, 2.0], rtol=1e-6)


def test_weight_decay_mask_default():
    m = tree_lib.flatten(weight_decay_mask(_params()))
    assert m["model/layers/0/q_proj/kernel"] and m["model/layers/0/q_proj/gralora_A"]
    assert not m["model/layers/0/q_proj/bias"] and not m["model/norm/weight"]
    assert all(tree_lib.flatten(weight_decay_mask(_params(), decay_norms_and_biases=True)).values())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"optimizer": "adam"}, "optimizer"),
        ({"schedule": "exp"}, "schedule"),
        ({"total_steps": 0}, "total_steps"),
        ({"warmup_ratio": 1.5}, "warmup_ratio"),
        ({"warmup_steps": 20, "total_steps": 10}, "warmup_steps"),
        ({"max_grad_norm": -1}, "max_grad_norm"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimConfig(**kwargs)


def test_mask_mismatch_and_empty_mask():
    p = _params()
    with pytest.raises(ValueError, match="different paths"):
        make_optimizer(OptimConfig(), p, {"lm_head": {"kernel": True}})
    with pytest.raises(ValueError, match="no leaf"):
        make_optimizer(OptimConfig(), p, jax.tree.map(lambda _: False, p))
