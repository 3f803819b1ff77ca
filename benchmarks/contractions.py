"""Alternative GraLoRA/LoRA adapter arithmetic, for measuring against the library's.

The library (:func:`gralora_jax.layers.gralora_blocks`) evaluates all ``k*k`` block pairs
with two batched einsums. The variants here compute the same function so their speed can
be compared inside the same model; :func:`use` swaps one in for the duration of a run by
rebinding the module attribute that :func:`gralora_jax.layers.adapter_output` calls (a
benchmark-only patch: the library files are untouched).

* ``library``  the library's two batched einsums (the default)
* ``unrolled`` a Python loop over blocks: ``k`` plain 2-D matmuls for A, ``k`` for B, then a
  concatenation; exactly the same products and sums, no batched dot or transposed output
* ``mixed``    the library's batched einsum for the A side (input blocks -> latents, regrouped
  by output block), then ``k`` plain 2-D matmuls for the B side whose outputs are concatenated
  along the feature axis: the output keeps its natural ``[..., out]`` layout (the batched B
  einsum produces ``[j, ..., o]``, which XLA on the GPU transposed and kept, with the MLP
  activations, in that layout for the backward pass)
* ``jfirst``   (= the library's ``block_layout="concat"``) the A side writes its latents output-block-major (``[j, ..., (n, s)]``), the B
  side is a batched einsum over ``j`` whose ``[j, ..., o]`` result is concatenated along the
  feature axis (a concatenation instead of a transpose, to keep the output's layout natural)
* ``jfirst_unrolled`` latents as in ``jfirst`` (each ``j`` a contiguous ``[..., r]`` slab),
  then ``k`` plain B-side matmuls concatenated (``mixed`` without the strided slices)
* ``remat``    the library's arithmetic inside ``jax.checkpoint`` (nothing saved): the backward
  pass keeps the layer's bf16 input instead of its float32 copy and the ``k*r`` latents, and
  recomputes the cheap A-side product; exact (the bf16 -> f32 cast is exact)
* ``bf16``     NOT exact: the adapter matmuls take bf16 operands (float32 accumulation)
  instead of casting ``x`` to float32; shows what float32 adapter math costs

>>> import jax, jax.numpy as jnp
>>> from gralora_jax import layers
>>> p = layers.init_gralora_adapter(jax.random.PRNGKey(0), 8, 4, r=4, k=2, init_weights=False)
>>> x = jax.random.normal(jax.random.PRNGKey(1), (3, 8))
>>> ref = layers.gralora_blocks(x, p["gralora_A"], p["gralora_B"])
>>> bool(jnp.allclose(gralora_blocks_unrolled(x, p["gralora_A"], p["gralora_B"]), ref, atol=1e-6))
True
>>> bool(jnp.allclose(gralora_blocks_mixed(x, p["gralora_A"], p["gralora_B"]), ref, atol=1e-6))
True
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

from gralora_jax import layers

CONTRACTIONS = ("library", "unrolled", "mixed", "jfirst", "concat", "jfirst_unrolled", "bf16", "remat")


def gralora_blocks_unrolled(x, A, B, precision=None, layout=None):
    """Same function as ``layers.gralora_blocks``, as 2k plain matmuls."""
    k, i, r = A.shape
    s = r // k
    # latents of input block n: [..., r], columns grouped by output block j
    h = [jnp.matmul(x[..., n * i:(n + 1) * i], A[n], precision=precision) for n in range(k)]
    outs = []
    for j in range(k):
        z = jnp.concatenate([h[n][..., j * s:(j + 1) * s] for n in range(k)], axis=-1)  # [..., (n, s)]
        outs.append(jnp.matmul(z, B[j], precision=precision))
    return jnp.concatenate(outs, axis=-1)


def gralora_blocks_mixed(x, A, B, precision=None, layout=None):
    """Same function as ``layers.gralora_blocks``: batched A side, ``k`` plain matmuls on the B side."""
    k, i, r = A.shape
    s = r // k
    o = B.shape[-1]
    xb = x.reshape(*x.shape[:-1], k, i)
    z = jnp.einsum("...ni,nijs->...jns", xb, A.reshape(k, i, k, s), precision=precision)
    z = z.reshape(*x.shape[:-1], k, k * s)  # [..., j, (n, s)]
    outs = [jnp.matmul(z[..., j, :], B[j], precision=precision) for j in range(k)]
    return jnp.concatenate(outs, axis=-1)


def _latents_jfirst(x, A, precision):
    k, i, r = A.shape
    s = r // k
    xb = x.reshape(*x.shape[:-1], k, i)
    z = jnp.einsum("...ni,nijs->j...ns", xb, A.reshape(k, i, k, s), precision=precision)
    return z.reshape(k, *x.shape[:-1], r)  # [j, ..., (n, s)]


_LIBRARY_BLOCKS = layers.gralora_blocks  # unpatched, for variants that are library layouts


def gralora_blocks_jfirst(x, A, B, precision=None, layout=None):
    """The library's ``layout="concat"`` (kept under its benchmark name ``jfirst``)."""
    return _LIBRARY_BLOCKS(x, A, B, precision, layout="concat")


def gralora_blocks_jfirst_unrolled(x, A, B, precision=None, layout=None):
    """Same function as ``layers.gralora_blocks``: output-block-major latents, ``k`` plain B matmuls."""
    z = _latents_jfirst(x, A, precision)
    return jnp.concatenate([jnp.matmul(z[j], B[j], precision=precision) for j in range(A.shape[0])], axis=-1)


def _adapter_output_bf16(x, adapter, scaling, *, dropout_rate=0.0, dropout_rng=None, precision=None,
                         block_layout=None):
    """bf16 operands, float32 accumulation and result (dropout ignored: benchmarks use none)."""
    del dropout_rate, dropout_rng
    bf = jnp.bfloat16
    xb = x.astype(bf)
    dot = lambda a, b: jnp.matmul(a, b.astype(bf), preferred_element_type=jnp.float32)
    if "gralora_A" in adapter:
        A, B = adapter["gralora_A"], adapter["gralora_B"]
        k, i, r = A.shape
        s = r // k
        o = B.shape[-1]
        xk = xb.reshape(*x.shape[:-1], k, i)
        z = jnp.einsum("...ni,nijs->...jns", xk, A.reshape(k, i, k, s).astype(bf), preferred_element_type=jnp.float32)
        out = jnp.einsum("...jns,jnso->...jo", z.astype(bf), B.reshape(k, k, s, o).astype(bf),
                         preferred_element_type=jnp.float32).reshape(*x.shape[:-1], k * o)
        if "gralora_A_general" in adapter:
            out = out + dot(dot(xb, adapter["gralora_A_general"]).astype(bf), adapter["gralora_B_general"])
        return scaling * out
    A, B = adapter["lora_A"], adapter["lora_B"]
    return scaling * dot(dot(xb, A).astype(bf), B)


def _remat_adapter_output(library_fn):
    def adapter_output(x, adapter, scaling, *, dropout_rate=0.0, dropout_rng=None, precision=None,
                       block_layout="batched"):
        def f(x, adapter, dropout_rng):
            return library_fn(x, adapter, scaling, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                              precision=precision, block_layout=block_layout)

        return jax.checkpoint(f, policy=jax.checkpoint_policies.nothing_saveable)(x, dict(adapter), dropout_rng)

    return adapter_output


@contextlib.contextmanager
def use(name: str):
    """Run the enclosed tracing with contraction ``name`` (one of :data:`CONTRACTIONS`)."""
    if name not in CONTRACTIONS:
        raise ValueError(f"unknown contraction {name!r}; choose from {CONTRACTIONS}")
    saved = layers.gralora_blocks, layers.adapter_output
    try:
        if name == "unrolled":
            layers.gralora_blocks = gralora_blocks_unrolled
        elif name == "mixed":
            layers.gralora_blocks = gralora_blocks_mixed
        elif name in ("jfirst", "concat"):
            layers.gralora_blocks = gralora_blocks_jfirst
        elif name == "jfirst_unrolled":
            layers.gralora_blocks = gralora_blocks_jfirst_unrolled
        elif name == "bf16":
            layers.adapter_output = _adapter_output_bf16
        elif name == "remat":
            layers.adapter_output = _remat_adapter_output(saved[1])
        yield
    finally:
        layers.gralora_blocks, layers.adapter_output = saved
