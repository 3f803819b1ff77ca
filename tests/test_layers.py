"""GraLoRADense / LoRADense and the pure block math against PEFT's golden arrays."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.extend.core import jaxprs_in_params

from gralora_jax import layers
from gralora_jax.config import GraLoRAConfig
from conftest import DATA_DIR

MATMUL_PRECISION = "highest"  # set around this module by conftest.matmul_precision

MANIFEST = json.loads((DATA_DIR / "manifest.json").read_text())
CASES = {c["name"]: c for c in MANIFEST["layer_cases"]}
TOL = dict(atol=1e-5, rtol=1e-5)


def _load(name):
    case = CASES[name]
    z = dict(np.load(DATA_DIR / case["file"]))
    adapter = {"gralora_A": z["gralora_A"], "gralora_B": z["gralora_B"]}
    if case["hybrid_r"]:
        adapter["gralora_A_general"] = z["gralora_A_general_kernel"]
        adapter["gralora_B_general"] = z["gralora_B_general_kernel"]
    return case, z, {k: jnp.asarray(v) for k, v in adapter.items()}


def _module(case, block_layout="batched"):
    return layers.GraLoRADense(
        block_layout=block_layout,
        features=case["out_features"],
        use_bias=case["base_bias"],
        r=case["r"],
        alpha=case["alpha"],
        gralora_k=case["gralora_k"],
        hybrid_r=case["hybrid_r"],
    )


def _variables(case, z, adapter):
    p = {"kernel": jnp.asarray(z["base_kernel"]), **adapter}
    if case["base_bias"]:
        p["bias"] = jnp.asarray(z["base_bias"])
    return {"params": p}


@pytest.mark.parametrize("block_layout", layers.BLOCK_LAYOUTS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_3d_2d_and_grads(name, block_layout):
    case, z, adapter = _load(name)
    m = _module(case, block_layout)
    v = _variables(case, z, adapter)
    np.testing.assert_allclose(m.apply(v, jnp.asarray(z["x"])), z["y"], **TOL)
    np.testing.assert_allclose(m.apply(v, jnp.asarray(z["x_2d"])), z["y_2d"], **TOL)

    g = jnp.asarray(z["g"])

    def loss(params, x):
        return jnp.sum(m.apply({"params": params}, x) * g)

    val, (gp, gx) = jax.value_and_grad(loss, argnums=(0, 1))(v["params"], jnp.asarray(z["x"]))
    np.testing.assert_allclose(val, z["loss"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(gx, z["grad_x"], **TOL)
    np.testing.assert_allclose(gp["gralora_A"], z["grad_gralora_A"], **TOL)
    np.testing.assert_allclose(gp["gralora_B"], z["grad_gralora_B"], **TOL)
    if case["hybrid_r"]:
        np.testing.assert_allclose(gp["gralora_A_general"], z["grad_gralora_A_general_kernel"], **TOL)
        np.testing.assert_allclose(gp["gralora_B_general"], z["grad_gralora_B_general_kernel"], **TOL)


@pytest.mark.parametrize("name", sorted(CASES))
def test_delta_merge_unmerge(name):
    case, z, adapter = _load(name)
    scaling = case["scaling"]
    assert GraLoRAConfig(r=case["r"], alpha=case["alpha"], gralora_k=case["gralora_k"], hybrid_r=case["hybrid_r"]).scaling == scaling
    np.testing.assert_allclose(layers.delta_kernel(adapter, scaling), z["delta_kernel"], **TOL)
    layer = {"kernel": jnp.asarray(z["base_kernel"]), **adapter}
    merged = layers.merge(layer, scaling)
    np.testing.assert_allclose(merged["kernel"], z["merged_kernel"], **TOL)
    # merged forward: a plain Dense with the merged kernel reproduces PEFT's merged output
    dense = nn.Dense(case["out_features"], use_bias=case["base_bias"])
    p = {"kernel": merged["kernel"]}
    if case["base_bias"]:
        p["bias"] = jnp.asarray(z["base_bias"])
    np.testing.assert_allclose(dense.apply({"params": p}, jnp.asarray(z["x"])), z["y_merged"], **TOL)
    np.testing.assert_allclose(layers.unmerge(merged, scaling)["kernel"], z["base_kernel"], **TOL)
    # torch layout ([out, in]) merge, as used for GPT-2's FlaxConv1D kernels
    torch_layer = {"kernel": jnp.asarray(z["base_weight"]), **adapter}
    np.testing.assert_allclose(layers.merge(torch_layer, scaling, "out_in")["kernel"], z["merged_weight"], **TOL)


def test_k1_equals_lora():
    name = next(n for n, c in CASES.items() if c["gralora_k"] == 1)
    case, z, adapter = _load(name)
    lora = {"lora_A": adapter["gralora_A"][0], "lora_B": adapter["gralora_B"][0]}
    m = layers.LoRADense(case["out_features"], use_bias=case["base_bias"], r=case["r"], lora_alpha=case["alpha"])
    y = m.apply({"params": {"kernel": jnp.asarray(z["base_kernel"]), **lora}}, jnp.asarray(z["x"]))
    np.testing.assert_allclose(y, z["y_lora_equivalent"], **TOL)
    np.testing.assert_allclose(y, z["y"], **TOL)


@pytest.mark.parametrize("in_f,out_f,r,k,h", [(64, 32, 8, 1, 0), (48, 24, 12, 1, 4)])
def test_k1_with_hybrid_is_lora_of_rank_r_plus_h(in_f, out_f, r, k, h):
    key = jax.random.PRNGKey(3)
    a = layers.init_gralora_adapter(key, in_f, out_f, r, k, h, init_weights=False)
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 5, in_f))
    lora = {
        "lora_A": jnp.concatenate([a["gralora_A"][0]] + ([a["gralora_A_general"]] if h else []), axis=1),
        "lora_B": jnp.concatenate([a["gralora_B"][0]] + ([a["gralora_B_general"]] if h else []), axis=0),
    }
    np.testing.assert_allclose(layers.adapter_output(x, a, 0.5), layers.adapter_output(x, lora, 0.5), **TOL)


def _reference_blocks(x, A, B):
    """Independent computation: an explicit loop over the k*k pairs."""
    k, i, r = A.shape
    s, o = r // k, B.shape[-1]
    out = np.zeros(x.shape[:-1] + (k * o,), np.float64)
    for n in range(k):
        for j in range(k):
            a = A[n][:, j * s : (j + 1) * s]
            b = B[j][n * s : (n + 1) * s, :]
            out[..., j * o : (j + 1) * o] += x[..., n * i : (n + 1) * i] @ a @ b
    return out


@pytest.mark.parametrize("block_layout", layers.BLOCK_LAYOUTS)
@pytest.mark.parametrize("in_f,out_f,r,k", [(12, 20, 6, 2), (24, 36, 12, 3), (32, 16, 8, 4), (30, 30, 10, 5)])
def test_blocks_against_explicit_loop_off_golden_shapes(in_f, out_f, r, k, block_layout):
    a = layers.init_gralora_adapter(jax.random.PRNGKey(1), in_f, out_f, r, k, init_weights=False)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (2, 3, 4, in_f)))  # extra leading axes
    ref = _reference_blocks(x.astype(np.float64), np.asarray(a["gralora_A"], np.float64), np.asarray(a["gralora_B"], np.float64))
    got = layers.adapter_output(jnp.asarray(x), a, 1.0, block_layout=block_layout)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    # delta kernel consistency: x @ delta == adapter output
    np.testing.assert_allclose(x @ np.asarray(layers.delta_kernel(a, 1.0)), ref, atol=1e-5, rtol=1e-5)


def test_unknown_block_layout_is_refused():
    a = layers.init_gralora_adapter(jax.random.PRNGKey(1), 8, 8, 4, 2)
    with pytest.raises(ValueError, match="block layout 'diagonal'"):
        layers.adapter_output(jnp.ones((2, 8)), a, 1.0, block_layout="diagonal")


def test_zero_init_leaves_output_equal_to_base_and_A_bound():
    m = layers.GraLoRADense(features=48, r=16, alpha=32, gralora_k=4, hybrid_r=4)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 64))
    v = m.init(jax.random.PRNGKey(1), x)
    p = v["params"]
    base = nn.Dense(48).apply({"params": {"kernel": p["kernel"], "bias": p["bias"]}}, x)
    np.testing.assert_array_equal(m.apply(v, x), base)
    assert p["gralora_A"].shape == (4, 16, 16) and p["gralora_B"].shape == (4, 16, 12)
    assert p["gralora_A_general"].shape == (64, 4) and p["gralora_B_general"].shape == (4, 48)
    assert not np.any(p["gralora_B"]) and not np.any(p["gralora_B_general"])
    bound = 1 / math.sqrt(64 / 4)
    A = np.asarray(p["gralora_A"])
    assert np.abs(A).max() <= bound and np.abs(A).max() > 0.9 * bound  # uniform fills the interval
    assert abs(A.mean()) < 0.05 * bound
    Ag = np.asarray(p["gralora_A_general"])
    assert np.abs(Ag).max() <= 1 / math.sqrt(64) and np.abs(Ag).max() > 0.9 / math.sqrt(64)
    assert all(p[n].dtype == jnp.float32 for n in ("gralora_A", "gralora_B"))


def test_dropout_needs_rng_and_not_deterministic():
    m = layers.GraLoRADense(features=16, r=4, alpha=8, gralora_k=2, gralora_dropout=0.5, init_weights=False)
    x = jnp.ones((4, 16))
    v = m.init(jax.random.PRNGKey(0), x)
    y_det = m.apply(v, x)
    np.testing.assert_array_equal(y_det, m.apply(v, x, deterministic=True))
    with pytest.raises(Exception, match="dropout"):
        m.apply(v, x, deterministic=False)  # no rng
    y1 = m.apply(v, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    y2 = m.apply(v, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})
    assert not np.allclose(y1, y_det) and not np.allclose(y1, y2)
    # base path is never dropped: with the adapter zeroed, dropout changes nothing
    v0 = {"params": {**v["params"], "gralora_B": jnp.zeros_like(v["params"]["gralora_B"])}}
    np.testing.assert_allclose(
        m.apply(v0, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)}), m.apply(v0, x), atol=1e-6
    )


def test_dropout_expectation_matches_deterministic():
    """Inverted dropout: averaging many masks recovers the deterministic adapter output."""
    a = layers.init_gralora_adapter(jax.random.PRNGKey(0), 16, 8, 4, 2, 2, init_weights=False)
    x = jnp.ones((1, 16))
    keys = jax.random.split(jax.random.PRNGKey(5), 4000)
    ys = jax.vmap(lambda k: layers.adapter_output(x, a, 1.0, dropout_rate=0.3, dropout_rng=k))(keys)
    np.testing.assert_allclose(ys.mean(0), layers.adapter_output(x, a, 1.0), atol=0.05 * float(jnp.abs(ys).mean()) + 1e-3)


@pytest.mark.parametrize("impl", ["rbg", "threefry2x32"])
@pytest.mark.parametrize("rate", [0.05, 0.1, 0.25, 0.5, 0.9])
def test_dropout_mask_keep_rate_and_independence(rate, impl):
    n = 400_000
    m = np.asarray(layers.dropout_keep_masks(jax.random.PRNGKey(7), rate, (n // 100, 100), count=2, impl=impl))
    assert m.shape == (2, n // 100, 100) and m.dtype == np.bool_
    sd = math.sqrt(rate * (1 - rate) / n)
    for c in range(2):
        assert abs(m[c].mean() - (1 - rate)) < 5 * sd + layers.DROPOUT_RATE_TOL
    # the two masks are independent: P(both kept) = (1 - rate)^2
    assert abs((m[0] & m[1]).mean() - (1 - rate) ** 2) < 5 * sd + 1e-4
    # and neither is striped along an axis (every column and row block keeps about 1 - rate)
    cols = m[0].mean(0)
    assert abs(cols.mean() - (1 - rate)) < 5 * sd and cols.std() < 5 * math.sqrt(rate * (1 - rate) / (n // 100))


def test_dropout_mask_bits_per_platform(monkeypatch):
    assert layers.dropout_rng_impl() == "rbg"  # CPU
    before = jax.config.jax_threefry_gpu_kernel_lowering
    layers.use_gpu_threefry_kernel()  # a no-op off GPU
    assert jax.config.jax_threefry_gpu_kernel_lowering == before
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    try:
        layers.use_gpu_threefry_kernel()
        assert jax.config.jax_threefry_gpu_kernel_lowering
        assert layers.dropout_rng_impl() == "threefry2x32"
    finally:
        jax.config.update("jax_threefry_gpu_kernel_lowering", before)
    # the two generators give different masks from the same module key, each of the requested shape;
    # a 4-word (rbg) key also keys threefry
    a = layers.dropout_keep_masks(jax.random.PRNGKey(3), 0.5, (64, 32), impl="rbg")
    b = layers.dropout_keep_masks(jax.random.PRNGKey(3), 0.5, (64, 32), impl="threefry2x32")
    c = layers.dropout_keep_masks(jax.random.key(3, impl="rbg"), 0.5, (64, 32), impl="threefry2x32")
    assert a.shape == b.shape == c.shape == (1, 64, 32) and bool((a != b).any()) and bool((b != c).any())


def test_dropout_mask_width_meets_the_rate_tolerance():
    for rate in (0.05, 0.1, 1 / 3, 0.5, 0.25, 0.125, 0.01, 0.999):
        dt = layers.dropout_mask_dtype(rate)
        levels = 2 ** jnp.iinfo(dt).bits
        assert abs(round(rate * levels) / levels - rate) <= layers.DROPOUT_RATE_TOL
    assert layers.dropout_mask_dtype(0.5) == jnp.uint8 and layers.dropout_mask_dtype(0.05) == jnp.uint16


def test_dropout_draws_no_elementwise_threefry():
    """The masks' bits come from one rbg generator op; threefry only derives its 4-word seed
    (an elementwise threefry hash over the activations is what made dropout slow to compile)."""
    a = layers.init_gralora_adapter(jax.random.PRNGKey(0), 64, 32, 8, 2, 4, init_weights=False)
    x = jnp.ones((4, 16, 64), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda x, k: layers.adapter_output(x, a, 2.0, dropout_rate=0.1, dropout_rng=k))(
        x, jax.random.PRNGKey(0))

    def eqns(j):
        for e in j.eqns:
            yield e
            for sub in jaxprs_in_params(e.params):
                yield from eqns(sub)

    bits = [e for e in eqns(jaxpr.jaxpr) if e.primitive.name == "random_bits"]
    big = [e for e in bits if math.prod(e.outvars[0].aval.shape) > 16]
    # two 16-bit masks over x (rate 0.1 needs 16 bits), drawn as 32-bit words split in two
    assert [(str(e.invars[0].aval.dtype), e.outvars[0].aval.shape, e.outvars[0].aval.dtype) for e in big] == [
        ("key<rbg>", (2 * 4 * 16 * 64 // 2,), jnp.uint32)]


@pytest.mark.parametrize("hybrid_r", [0, 4])
@pytest.mark.parametrize("block_layout", layers.BLOCK_LAYOUTS)
def test_dropout_layer_equals_explicit_computation_with_the_same_masks(hybrid_r, block_layout):
    """The layer with dropout, against numpy given the masks: PEFT's ``dropout(x)`` (zero, then
    divide by 1 - p) before the block path and an independent ``dropout(x)`` before the hybrid
    path; the base output never dropped. Forward and gradients."""
    rate, k, r, in_f, out_f = 0.3, 2, 8, 32, 16
    m = layers.GraLoRADense(features=out_f, r=r, alpha=16, gralora_k=k, hybrid_r=hybrid_r, gralora_dropout=rate,
                            init_weights=False, block_layout=block_layout)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, in_f))
    v = m.init(jax.random.PRNGKey(1), x)
    rng = jax.random.PRNGKey(9)
    y = m.apply(v, x, deterministic=False, rngs={"dropout": rng})
    # the key the module draws its masks from: flax's make_rng("dropout") at the module's root
    module_key = nn.apply(lambda mod: mod.make_rng("dropout"), m)({}, rngs={"dropout": rng})
    keep = np.asarray(layers.dropout_keep_masks(module_key, rate, x.shape, 2 if hybrid_r else 1))
    assert 0.6 < keep.mean() < 0.8
    p = {n: np.asarray(t, np.float64) for n, t in v["params"].items()}
    xn = np.asarray(x, np.float64)
    drop = lambda c: xn * keep[c] / (1 - rate)
    want = xn @ p["kernel"] + p["bias"] + (16 / (r + hybrid_r)) * (
        _reference_blocks(drop(0), p["gralora_A"], p["gralora_B"])
        + ((drop(1) @ p["gralora_A_general"] @ p["gralora_B_general"]) if hybrid_r else 0.0))
    np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)
    # gradients against the same function written with the masks as constants (plain jnp)
    keep_j = jnp.asarray(keep)

    def explicit(params, x):
        xd = [x * keep_j[c] / (1 - rate) for c in range(keep_j.shape[0])]
        A, B = params["gralora_A"], params["gralora_B"]
        blocks = sum(
            (xd[0][..., n * (in_f // k):(n + 1) * (in_f // k)] @ A[n][:, j * (r // k):(j + 1) * (r // k)]
             @ B[j][n * (r // k):(n + 1) * (r // k), :]).reshape(*x.shape[:-1], 1, -1)
            * (jnp.arange(k) == j)[:, None] for n in range(k) for j in range(k)).reshape(*x.shape[:-1], out_f)
        if hybrid_r:
            blocks = blocks + xd[1] @ params["gralora_A_general"] @ params["gralora_B_general"]
        return x @ params["kernel"] + params["bias"] + (16 / (r + hybrid_r)) * blocks

    g = jax.random.normal(jax.random.PRNGKey(3), y.shape)
    got = jax.grad(lambda pp, xx: jnp.sum(m.apply({"params": pp}, xx, deterministic=False,
                                                  rngs={"dropout": rng}) * g), argnums=(0, 1))(v["params"], x)
    ref = jax.grad(lambda pp, xx: jnp.sum(explicit(pp, xx) * g), argnums=(0, 1))(v["params"], x)
    for a_, b_ in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a_, b_, atol=1e-5, rtol=1e-5)


def test_dropout_masks_differ_across_modules_and_steps(monkeypatch):
    """Two adapted modules reading the same input get different masks; the same module gets a
    new mask from a new step's rng; train=False draws none."""
    seen = []
    real = layers.dropout_keep_masks
    monkeypatch.setattr(layers, "dropout_keep_masks", lambda *a, **kw: seen.append(np.asarray(real(*a, **kw))) or real(*a, **kw))

    class Two(nn.Module):
        @nn.compact
        def __call__(self, x, deterministic):
            d = lambda name: layers.GraLoRADense(8, r=4, alpha=8, gralora_k=2, gralora_dropout=0.5, name=name)
            return d("q")(x, deterministic) + d("k")(x, deterministic)

    x = jnp.ones((4, 6, 16))
    v = Two().init(jax.random.PRNGKey(0), x, True)
    assert not seen  # deterministic: no masks drawn
    Two().apply(v, x, False, rngs={"dropout": jax.random.PRNGKey(1)})
    Two().apply(v, x, False, rngs={"dropout": jax.random.PRNGKey(2)})
    assert len(seen) == 4
    q1, k1, q2, _ = seen
    for a_, b_ in ((q1, k1), (q1, q2)):
        assert 0.4 < (a_ != b_).mean() < 0.6  # independent masks disagree on about half the elements
    Two().apply(v, x, True)
    assert len(seen) == 4


@pytest.mark.parametrize("name", sorted(CASES))
def test_peft_parity_in_eval_mode_with_dropout_configured(name):
    """A layer configured with dropout is exactly PEFT's in eval mode (dropout is the identity)."""
    case, z, adapter = _load(name)
    m = layers.GraLoRADense(features=case["out_features"], use_bias=case["base_bias"], r=case["r"],
                            alpha=case["alpha"], gralora_k=case["gralora_k"], hybrid_r=case["hybrid_r"],
                            gralora_dropout=0.05)
    v = _variables(case, z, adapter)
    np.testing.assert_allclose(m.apply(v, jnp.asarray(z["x"])), z["y"], **TOL)
    np.testing.assert_allclose(m.apply(v, jnp.asarray(z["x"]), deterministic=True,
                                       rngs={"dropout": jax.random.PRNGKey(0)}), z["y"], **TOL)


def test_bf16_base_fp32_adapters_under_jit():
    m = layers.GraLoRADense(features=32, r=8, alpha=16, gralora_k=2, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, init_weights=False)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 64), jnp.bfloat16)
    v = m.init(jax.random.PRNGKey(1), x)
    p = v["params"]
    assert p["kernel"].dtype == jnp.bfloat16 and p["gralora_A"].dtype == jnp.float32 and p["gralora_B"].dtype == jnp.float32
    y = jax.jit(m.apply)(v, x)
    assert y.dtype == jnp.bfloat16
    ref = np.asarray(x, np.float32) @ np.asarray(p["kernel"], np.float32) + np.asarray(
        layers.adapter_output(x.astype(jnp.float32), p, 2.0)
    )
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=0.1, rtol=0.02)
    grads = jax.jit(jax.grad(lambda pp: jnp.sum(m.apply({"params": pp}, x).astype(jnp.float32))))(p)
    assert grads["gralora_A"].dtype == jnp.float32


def test_works_inside_scan_and_vmap():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return jnp.tanh(layers.GraLoRADense(16, r=4, alpha=8, gralora_k=2, init_weights=False)(h)), None

    Scanned = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    x = jnp.ones((2, 16))
    v = Scanned().init(jax.random.PRNGKey(0), x, None)
    assert v["params"]["GraLoRADense_0"]["gralora_A"].shape == (3, 2, 8, 4)
    y, _ = Scanned().apply(v, x, None)
    # independent: unroll the three layers with the pure functions
    h = x
    for i in range(3):
        p = jax.tree_util.tree_map(lambda t: t[i], v["params"]["GraLoRADense_0"])
        h = jnp.tanh(h @ p["kernel"] + p["bias"] + layers.adapter_output(h, p, 2.0))
    np.testing.assert_allclose(y, h, atol=1e-5)
    # stacked delta kernels carry the layer axis
    assert layers.delta_kernel(v["params"]["GraLoRADense_0"], 2.0).shape == (3, 16, 16)

    VM = nn.vmap(layers.GraLoRADense, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=0)
    m = VM(8, r=4, alpha=4, gralora_k=2)
    xs = jnp.ones((5, 3, 16))
    vv = m.init(jax.random.PRNGKey(0), xs)
    assert vv["params"]["gralora_A"].shape == (5, 2, 8, 4)
    assert m.apply(vv, xs).shape == (5, 3, 8)


@pytest.mark.parametrize("case", MANIFEST["error_cases"], ids=lambda c: c["name"])
def test_peft_error_messages(case):
    cfg = case["config"]
    with pytest.raises(ValueError) as e:
        c = GraLoRAConfig(**cfg)
        layers.init_gralora_adapter(jax.random.PRNGKey(0), case["in_features"], case["out_features"], c.r, c.gralora_k, c.hybrid_r)
    assert str(e.value) == case["message"]
    # the module raises the same
    with pytest.raises(ValueError) as e2:
        m = layers.GraLoRADense(case["out_features"], r=cfg["r"], gralora_k=cfg["gralora_k"], hybrid_r=cfg.get("hybrid_r", 0))
        m.init(jax.random.PRNGKey(0), jnp.ones((1, case["in_features"])))
    assert str(e2.value) == case["message"]
