"""The GraLoRA block contraction in every layout, forward and all gradients, against an
explicit k x k loop (jnp slices per block pair, differentiated by plain autodiff: it shares no
code with the layouts) and float64 numpy; the PEFT golden cases run every layout in
tests/test_layers.py. Also what the custom-VJP layout keeps for the backward pass."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from gralora_jax import layers

MATMUL_PRECISION = "highest"  # set around this module by conftest.matmul_precision

IN, OUT, R = 32, 48, 16


def _explicit(x, xg, A, B, Ag, Bg, scale):
    """``scale * (sum over pairs (n, j) of x_n @ A[n][:, j-th s columns] @ B[j][n-th s rows]
    placed in output block j  +  xg @ Ag @ Bg)``, one pair at a time."""
    k, i, r = A.shape
    s, o = r // k, B.shape[-1]
    cols = []
    for j in range(k):
        acc = 0.0
        for n in range(k):
            acc = acc + x[..., n * i:(n + 1) * i] @ A[n][:, j * s:(j + 1) * s] @ B[j][n * s:(n + 1) * s, :]
        cols.append(acc)
    out = jnp.concatenate(cols, axis=-1)
    if Ag is not None:
        out = out + xg @ Ag @ Bg
    return scale * out


def _case(k, h, ndim, dtype=jnp.float32, adapter_dtype=jnp.float32):
    p = layers.init_gralora_adapter(jax.random.PRNGKey(k + 10 * h), IN, OUT, R, k, h, adapter_dtype, init_weights=False)
    lead = (3, 5) if ndim == 3 else (7,)
    x = jax.random.normal(jax.random.PRNGKey(1), (*lead, IN)).astype(dtype)
    g = jax.random.normal(jax.random.PRNGKey(2), (*lead, OUT))
    return p, x, g


def _parts(p):
    return p["gralora_A"], p["gralora_B"], p.get("gralora_A_general"), p.get("gralora_B_general")


# every (k, hybrid, 2-D/3-D) case for the custom VJP; the einsum layouts (plain autodiff, also
# checked against PEFT's golden cases) at a few
_F32_CASES = [("vjp", k, h, nd) for k in (1, 2, 4) for h in (0, 4) for nd in (2, 3)] + [
    (layout, 4, 4, 3) for layout in layers.BLOCK_LAYOUTS if layout != "vjp"] + [
    (layout, 2, 0, 2) for layout in layers.BLOCK_LAYOUTS if layout != "vjp"]


@pytest.mark.parametrize("layout, k, h, ndim", _F32_CASES)
def test_forward_and_all_gradients_float32(layout, k, h, ndim):
    p, x, g = _case(k, h, ndim)

    def ours(x, p):
        return jnp.sum(layers.adapter_output(x, p, 0.75, block_layout=layout) * g)

    def ref(x, p):
        return jnp.sum(_explicit(x, x, *_parts(p), 0.75) * g)

    y = layers.adapter_output(x, p, 0.75, block_layout=layout)
    np.testing.assert_allclose(y, _explicit(x, x, *_parts(p), 0.75), rtol=1e-5, atol=1e-5)
    got = jax.grad(ours, argnums=(0, 1))(x, p)
    want = jax.grad(ref, argnums=(0, 1))(x, p)
    assert set(got[1]) == set(p)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    for name in p:
        np.testing.assert_allclose(got[1][name], want[1][name], rtol=1e-5, atol=1e-5, err_msg=name)
    # and the forward against float64 numpy
    xn = np.asarray(x, np.float64)
    pn = {n: np.asarray(v, np.float64) for n, v in p.items()}
    np.testing.assert_allclose(y, _explicit(xn, xn, *_parts(pn), 0.75), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout, k", [("vjp", 1), ("vjp", 2), ("vjp", 4), ("batched", 4), ("concat", 2)])
def test_separate_hybrid_input_as_with_dropout_masks(layout, k):
    """Dropout gives the two paths different inputs (independent masks): gradients reach x
    through both, the hybrid factors see only theirs."""
    p, x, g = _case(k, 4, 3)
    keep = np.asarray(layers.dropout_keep_masks(jax.random.PRNGKey(5), 0.3, x.shape, 2))
    m1, m2 = jnp.asarray(keep[0], x.dtype), jnp.asarray(keep[1], x.dtype)
    fn = layers._LAYOUT_FNS[layout]

    got = jax.grad(lambda x, p: jnp.sum(fn(x * m1, x * m2, p, 0.5, None) * g), argnums=(0, 1))(x, p)
    want = jax.grad(lambda x, p: jnp.sum(_explicit(x * m1, x * m2, *_parts(p), 0.5) * g), argnums=(0, 1))(x, p)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    for name in p:
        np.testing.assert_allclose(got[1][name], want[1][name], rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("adapter_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("layout", layers.BLOCK_LAYOUTS)
@pytest.mark.parametrize("h", [0, 4])
def test_bfloat16_input_and_adapters(h, layout, adapter_dtype):
    """bfloat16 layer input (the usual case) with float32 or bfloat16 factors: the result and
    every gradient within bfloat16 tolerance of float64 math, in the right dtypes."""
    p, x, g = _case(4, h, 3, jnp.bfloat16, adapter_dtype)

    def ours(x, p):
        return jnp.sum(layers.adapter_output(x, p, 0.75, block_layout=layout).astype(jnp.float32) * g)

    y = layers.adapter_output(x, p, 0.75, block_layout=layout)
    assert y.dtype == adapter_dtype
    gx, gp = jax.grad(ours, argnums=(0, 1))(x, p)
    assert gx.dtype == jnp.bfloat16 and all(gp[n].dtype == adapter_dtype for n in p)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    p64 = {n: np.asarray(v.astype(jnp.float32), np.float64) for n, v in p.items()}
    want_x, want_p = jax.grad(lambda x, p: jnp.sum(_explicit(x, x, *_parts(p), 0.75) * np.asarray(g, np.float64)),
                              argnums=(0, 1))(x64.astype(np.float32), {n: v.astype(np.float32) for n, v in p64.items()})
    tol = 1e-5 if adapter_dtype == jnp.float32 else 3e-2
    ref_y = _explicit(x64, x64, *_parts(p64), 0.75)
    scale = np.abs(ref_y).max()
    np.testing.assert_allclose(np.asarray(y, np.float64), ref_y, atol=tol * scale, rtol=tol)
    # x's gradient is rounded to bfloat16 whatever the layout: compare it at bfloat16 resolution
    pairs = [("x", gx, want_x, 1e-2)] + [(n, gp[n], want_p[n], tol) for n in p]
    for name, got, want, t in pairs:
        got, want = np.asarray(got.astype(jnp.float32)), np.asarray(want)
        np.testing.assert_allclose(got, want, atol=t * np.abs(want).max(), rtol=t, err_msg=name)


def _residuals(capsys, fn, *args):
    capsys.readouterr()
    print_saved_residuals(fn, *args)
    return capsys.readouterr().out.strip().splitlines()


@pytest.mark.parametrize("h", [0, 4])
def test_vjp_layout_saves_only_the_input_and_the_factors(capsys, h):
    p, x, _ = _case(4, h, 3, jnp.bfloat16)
    lines = _residuals(capsys, lambda x, p: layers.adapter_output(x, p, 2.0, block_layout="vjp"), x, p)
    assert sorted(lines) == sorted(["bf16[3,5,32] from the argument x"] + [
        f"f32[{','.join(map(str, v.shape))}] from the argument p['{n}']" for n, v in p.items()]), lines
    # the einsum layout keeps float32 activations (the cast input and the k*r latents) instead
    lines = _residuals(capsys, lambda x, p: layers.adapter_output(x, p, 2.0, block_layout="batched"), x, p)
    assert any(re.match(r"f32\[3,5,", l) for l in lines), lines


def test_vjp_layout_with_dropout_saves_no_float32_activations(capsys):
    """With dropout: the two dropped-out inputs (bfloat16) and, for the select's own gradient,
    the two keep masks (bool); no float32 copy and no latents."""
    p, x, _ = _case(2, 4, 3, jnp.bfloat16)
    lines = _residuals(capsys, lambda x, p: layers.adapter_output(
        x, p, 2.0, dropout_rate=0.1, dropout_rng=jax.random.PRNGKey(0), block_layout="vjp"), x, p)
    acts = [l.split(" ")[0] for l in lines if re.match(r"\w+\[3,5,", l)]
    assert sorted(set(acts)) == ["bf16[3,5,32]", "bool[3,5,32]"], lines  # (listed once per use)
    assert acts.count("bool[3,5,32]") == 2, lines


def test_contraction_refuses_half_a_hybrid():
    p, x, _ = _case(2, 4, 2)
    with pytest.raises(ValueError, match="A_general and B_general go together"):
        layers.gralora_contraction(x, p["gralora_A"], p["gralora_B"], p["gralora_A_general"])


def test_contraction_under_jit_scan_and_vmap():
    """The custom VJP composes with jit, vmap (stacked layers) and scan, gradients included."""
    k, h = 2, 4
    stacked = jax.vmap(lambda key: layers.init_gralora_adapter(key, IN, IN, R, k, h, init_weights=False))(
        jax.random.split(jax.random.PRNGKey(0), 3))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, IN))

    def run(layout, p, x):
        def body(h_, layer):
            return jnp.tanh(h_ + layers.adapter_output(h_, layer, 0.5, block_layout=layout)), None
        return jnp.sum(jax.lax.scan(body, x, p)[0] ** 2)

    got = jax.jit(jax.grad(lambda p, x: run("vjp", p, x), argnums=(0, 1)))(stacked, x)
    want = jax.grad(lambda p, x: run("batched", p, x), argnums=(0, 1))(stacked, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    ys = jax.vmap(lambda p: layers.adapter_output(x, p, 0.5, block_layout="vjp"))(stacked)
    np.testing.assert_allclose(ys[1], _explicit(x, x, *_parts(jax.tree.map(lambda t: t[1], stacked)), 0.5),
                               rtol=1e-5, atol=1e-5)
