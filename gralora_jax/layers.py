"""GraLoRA and LoRA layers for flax.linen, and the pure block math behind them.

GraLoRA splits a dense layer's ``in`` features into ``k`` input blocks and its ``out``
features into ``k`` output blocks, and gives every (input block n, output block j) pair its
own rank ``s = r / k`` adapter. The ``k*k`` adapters are stored as two stacked tensors,
exactly PEFT's layout:

* ``gralora_A``: ``[k, in/k, r]``; ``A[n][:, j*s:(j+1)*s]`` is the A-factor of pair (n, j)
* ``gralora_B``: ``[k, r, out/k]``; ``B[j][n*s:(n+1)*s, :]`` is the B-factor of pair (n, j)

plus an optional plain-LoRA "hybrid" path ``gralora_A_general [in, h]``,
``gralora_B_general [h, out]``. The output is
``base(x) + scale * (blocks(x) + x @ A_general @ B_general)`` with
``scale = alpha / (r + h)``. All k*k pairs are evaluated by two einsums (no Python loop
over blocks): the first projects every input block to its ``r`` latents already grouped
by output block, the second contracts each output block's ``k*s`` latents with its B.

Everything here is a pure function of a layer's parameter dict, so the same math serves
the ``GraLoRADense`` module, the surgery that routes Hugging Face models' ``nn.Dense``
calls through adapters, merging, and export. What differs between adapter kinds (leaves,
init, output, delta, scale) is each kind's module in :mod:`gralora_jax.kinds`; the
functions here that take any adapter (:func:`adapter_output`, :func:`delta_kernel`,
:func:`merge`) ask that registry which kind a leaf dict is:

>>> import jax, jax.numpy as jnp
>>> p = init_gralora_adapter(jax.random.PRNGKey(0), 8, 4, r=4, k=2)
>>> {k: v.shape for k, v in p.items()}
{'gralora_A': (2, 4, 4), 'gralora_B': (2, 4, 2)}
>>> float(jnp.abs(delta_kernel(p, scaling=2.0)).max())  # B starts at zero
0.0

This module knows nothing of transformers, optax or orbax.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn


Array = jax.Array
Adapter = Mapping[str, Array]

# ----------------------------------------------------------------------------- init


def _kinds():
    """The adapter-kind registry (imported on use: the kind modules build on this module's math)."""
    from gralora_jax import kinds

    return kinds


def init_gralora_adapter(
    key: Array,
    in_features: int,
    out_features: int,
    r: int,
    k: int,
    hybrid_r: int = 0,
    dtype: Any = jnp.float32,
    init_weights: bool = True,
) -> dict[str, Array]:
    """PEFT's GraLoRA initialisation: A Kaiming-uniform on fan-in ``in/k``, B zeros.

    With ``init_weights=False`` B is random too (PEFT's testing mode). The hybrid path,
    when ``hybrid_r > 0``, has A Kaiming-uniform on fan-in ``in`` and B zeros. The rules are
    the GraLoRA kind's ``init`` (:mod:`gralora_jax.kinds.gralora`), drawn from ``key``.
    """
    from gralora_jax.config import GraLoRAConfig

    config = GraLoRAConfig(r=r, gralora_k=k, hybrid_r=hybrid_r, init_weights=init_weights)
    return _kinds().init_from_key(key, config, in_features, out_features, dtype)


def init_lora_adapter(
    key: Array, in_features: int, out_features: int, r: int, dtype: Any = jnp.float32, init_weights: bool = True
) -> dict[str, Array]:
    """PEFT LoRA's initialisation: ``lora_A [in, r]`` Kaiming-uniform, ``lora_B [r, out]`` zeros
    (the LoRA kind's ``init``, :mod:`gralora_jax.kinds.lora`, drawn from ``key``)."""
    from gralora_jax.config import LoRAConfig

    config = LoRAConfig(r=r, init_lora_weights=init_weights)
    return _kinds().init_from_key(key, config, in_features, out_features, dtype)


# Adapter dropout. PEFT draws ``torch.nn.Dropout`` masks (float32 uniforms). A threefry
# ``jax.random.bernoulli`` per adapted module is a large elementwise hash that XLA fuses into
# the adapter's fusions (issue 12: 3.5x the compile time and 2x the step time of a SmolLM2
# train step on CPU, 80 s vs 18 s compile on an H200). So the mask bits come from one random-bits
# op per mask, drawn as 32-bit words and split into integers of the narrowest width that puts the
# rate within DROPOUT_RATE_TOL; which generator depends on the platform (DROPOUT_RNG_IMPLS):
# * CPU/TPU: the module's key words seed an ``rbg`` key (one XLA RngBitGenerator op per mask).
# * GPU: threefry lowered to jax's CUDA kernel (``jax_threefry_gpu_kernel_lowering``, turned on
#   by :func:`use_gpu_threefry_kernel`). XLA compiles every RngBitGenerator op (and every HLO
#   threefry) as its own kernel: on an H200 (jax 0.11.2) 112 masks of 4096x2048, one per adapted
#   module of a 16-layer model, compiled in 21.6 s with rbg and 29.7 s with HLO threefry, against
#   1.6 s with the CUDA threefry kernel (run time 2.6 ms vs 8.3 ms for all 112: the compile
#   saving is what an unrolled model's first step needs).
DROPOUT_RNG_IMPLS = {"gpu": "threefry2x32", "default": "rbg"}  # mask-bit generator per platform
DROPOUT_RATE_TOL = 2.0 ** -17  # max |effective drop probability - rate| (16-bit masks always meet it)
_MASK_WIDTHS = (jnp.uint8, jnp.uint16, jnp.uint32)


def dropout_mask_dtype(rate: float):
    """The narrowest unsigned dtype whose ``2**bits`` levels put ``rate`` within
    :data:`DROPOUT_RATE_TOL`: ``uint8`` for rates like 0.5 or 0.25, else ``uint16``.

    >>> dropout_mask_dtype(0.5).__name__, dropout_mask_dtype(0.05).__name__
    ('uint8', 'uint16')
    """
    for dt in _MASK_WIDTHS:
        levels = 2 ** jnp.iinfo(dt).bits
        if abs(round(rate * levels) / levels - rate) <= DROPOUT_RATE_TOL:
            return dt
    return jnp.uint32


_SEED_MIX = (0x9E3779B9, 0x7F4A7C15)  # odd constants: the second half of an rbg seed made from a 2-word key


def _rbg_seed(rng: Array) -> Array:
    """The 4 uint32 words of an ``rbg`` key taken from ``rng``'s own words (no hashing: a
    threefry call per adapted module costs seconds of compile time over a model on CPU).
    A 2-word (threefry) key fills the other half with its words mixed with odd constants."""
    try:
        data = jax.random.key_data(rng)
    except TypeError:  # a raw uint32 key array
        data = jnp.asarray(rng)
    data = data.reshape(-1).astype(jnp.uint32)
    if data.shape[0] >= 4:
        return data[:4]
    data = jnp.concatenate([data, jnp.zeros((2 - data.shape[0],), jnp.uint32)])
    return jnp.concatenate([data, data ^ jnp.asarray(_SEED_MIX, jnp.uint32)])


def use_gpu_threefry_kernel() -> None:
    """On a GPU backend, lower threefry to jax's CUDA kernel (the same bits as the HLO lowering,
    compiled in milliseconds instead of seconds per mask). Called by :func:`gralora_jax.train.make_train_step`;
    a no-op elsewhere. It sets the global ``jax_threefry_gpu_kernel_lowering`` option, which only
    changes how threefry is compiled, never the numbers it produces."""
    if jax.default_backend() == "gpu" and not jax.config.jax_threefry_gpu_kernel_lowering:
        jax.config.update("jax_threefry_gpu_kernel_lowering", True)


def dropout_rng_impl() -> str:
    """The mask-bit generator for this process's backend (see DROPOUT_RNG_IMPLS): threefry on a
    GPU whose threefry lowers to the CUDA kernel, else ``rbg``."""
    if jax.default_backend() == "gpu" and jax.config.jax_threefry_gpu_kernel_lowering:
        return DROPOUT_RNG_IMPLS["gpu"]
    return DROPOUT_RNG_IMPLS["default"]


def _mask_key(rng: Array, impl: str) -> Array:
    """A typed key of ``impl`` from ``rng`` (raw ``uint32`` words or a typed key)."""
    if impl == "rbg":
        return jax.random.wrap_key_data(_rbg_seed(rng), impl="rbg")
    try:
        data = jax.random.key_data(rng)
    except TypeError:  # a raw uint32 key array
        data = jnp.asarray(rng)
    data = data.reshape(-1).astype(jnp.uint32)
    if data.shape[0] != 2:  # a wider key (rbg): fold its words into two
        data = data.reshape(-1, 2)
        data = data[0] ^ data[1:].sum(0, dtype=jnp.uint32)
    return jax.random.wrap_key_data(data, impl="threefry2x32")


def dropout_keep_masks(rng: Array, rate: float, shape: tuple[int, ...], count: int = 1,
                       impl: Optional[str] = None) -> Array:
    """``count`` independent keep masks ``bool[count, *shape]``, each element kept with
    probability ``1 - rate`` (to within :data:`DROPOUT_RATE_TOL`).

    ``rng`` is any jax key (raw ``uint32[2]`` or typed; a module's ``make_rng``); its words
    key the mask-bit generator ``impl`` (``"rbg"`` or ``"threefry2x32"``; default
    :func:`dropout_rng_impl`) whose bits, at the width of :func:`dropout_mask_dtype`, are
    compared with a threshold.

    >>> m = dropout_keep_masks(jax.random.PRNGKey(0), 0.25, (1000, 100), count=2)
    >>> m.shape, m.dtype, round(float(m.mean()), 2), bool((m[0] != m[1]).any())
    ((2, 1000, 100), dtype('bool'), 0.75, True)
    """
    dt = dropout_mask_dtype(rate)
    key = _mask_key(rng, impl or dropout_rng_impl())
    n = count * math.prod(shape)
    per_word = 32 // jnp.iinfo(dt).bits  # draw 32-bit words and split them: 2-4x fewer draws
    words = jax.random.bits(key, (-(-n // per_word),), jnp.uint32)
    bits = jax.lax.bitcast_convert_type(words, dt).reshape(-1)[:n].reshape(count, *shape)
    threshold = min(round(rate * 2 ** jnp.iinfo(dt).bits), int(jnp.iinfo(dt).max))
    return bits >= jnp.asarray(threshold, dt)


def dropped_inputs(x: Array, rate: float, rng: Optional[Array], count: int) -> tuple[list[Array], float]:
    """``count`` dropped-out copies of ``x`` (independent masks, applied in ``x``'s dtype by a
    select: exact) and the inverted-dropout factor ``1 / (1 - rate)`` that the caller folds
    into its output scale (the adapter paths are linear in their input). Without dropout:
    ``count`` references to ``x`` itself and factor 1."""
    if rate == 0.0 or rng is None:
        return [x] * count, 1.0
    keep = dropout_keep_masks(rng, rate, x.shape, count)
    zero = jnp.zeros((), x.dtype)
    return [jnp.where(keep[c], x, zero) for c in range(count)], 1.0 / (1.0 - rate)


def _blocks_einsum(x: Array, A: Array, B: Array, precision, layout: str) -> Array:
    """The k*k block adapters (no scale) as two einsums; ``layout`` "batched" or "concat"."""
    k, i, r = A.shape
    s = r // k
    o = B.shape[-1]
    xb = x.reshape(*x.shape[:-1], k, i)  # [..., n, i]
    a = A.reshape(k, i, k, s)  # [n, i, j, s]
    if layout == "concat":
        z = jnp.einsum("...ni,nijs->j...ns", xb, a, precision=precision).reshape(k, *x.shape[:-1], r)
        out = jnp.einsum("j...r,jro->j...o", z, B, precision=precision)  # B[j] rows are (n, s)
        return jnp.concatenate([out[j] for j in range(k)], axis=-1)
    z = jnp.einsum("...ni,nijs->...jns", xb, a, precision=precision)  # latents grouped by output block
    b = B.reshape(k, k, s, o)  # [j, n, s, o]
    out = jnp.einsum("...jns,jnso->...jo", z, b, precision=precision)
    return out.reshape(*x.shape[:-1], k * o)


# ----------------------------------------------------------------------------- the VJP contraction
#
# One GraLoRA layer's adapter as a jax.custom_vjp: the backward pass keeps only the layer input
# (in its own dtype, usually bfloat16) and the small factors, and recomputes the k*r latents,
# instead of whatever XLA would keep (float32 copies of the input, the latents, transposed
# activations). The hybrid path is one more block of the B side: every output block j reads
# its r latents plus the h shared ones, B_j extended by B_general's columns of block j, so the
# two paths are one contraction of width r + h. With one input for both paths (no dropout) the
# A side is fused the same way: input block n's A[n] extended by A_general's rows of block n,
# the h shared latents being the sum over n.


def _extended_factors(A, B, Ag, Bg, fuse_a: bool):
    """``(A_ext [n, i, r(+h)], B_ext [j, r+h, o])``: the hybrid factors as one more block."""
    if Ag is None:
        return A, B
    k, i, _ = A.shape
    h, o = Ag.shape[-1], B.shape[-1]
    b_ext = jnp.concatenate([B, jnp.swapaxes(Bg.reshape(h, k, o), 0, 1)], axis=1)
    a_ext = jnp.concatenate([A, Ag.reshape(k, i, h)], axis=2) if fuse_a else A
    return a_ext, b_ext


def _vjp_latents(x, xg, A, Ag, a_ext, precision):
    """``z [T, j, r(+h)]``: block latents regrouped by output block (then the hybrid latents,
    shared by every j), from ``x`` and ``xg`` ``[T, in]`` in the adapter dtype."""
    k, i, r = A.shape
    s = r // k
    t = x.shape[0]
    zt = jnp.einsum("tni,nic->tnc", x.reshape(t, k, i), a_ext, precision=precision)  # [T, n, r(+h)]
    z = jnp.swapaxes(zt[..., :r].reshape(t, k, k, s), 1, 2).reshape(t, k, r)  # [T, j, (n, s)]
    if Ag is None:
        return z
    zg = zt[..., r:].sum(1) if xg is None else jnp.matmul(xg, Ag, precision=precision)  # [T, h]
    return jnp.concatenate([z, jnp.broadcast_to(zg[:, None, :], (t, k, zg.shape[-1]))], axis=-1)


def _vjp_flat(x, xg, dt):
    t = math.prod(x.shape[:-1])
    return x.reshape(t, x.shape[-1]).astype(dt), None if xg is None else xg.reshape(t, x.shape[-1]).astype(dt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))  # scale, precision: static
def _gralora_vjp(x, xg, A, B, Ag, Bg, scale, precision):
    out, _ = _gralora_vjp_fwd(x, xg, A, B, Ag, Bg, scale, precision)
    return out


def _gralora_vjp_fwd(x, xg, A, B, Ag, Bg, scale, precision):
    dt = A.dtype
    xf, xgf = _vjp_flat(x, xg, dt)
    a_ext, b_ext = _extended_factors(A, B, Ag, Bg, fuse_a=xg is None)
    z = _vjp_latents(xf, xgf, A, Ag, a_ext, precision)
    out = jnp.einsum("tjc,jco->tjo", z, b_ext, precision=precision)
    out = (scale * out).reshape(*x.shape[:-1], -1).astype(dt)
    return out, (x, xg, A, B, Ag, Bg)


def _gralora_vjp_bwd(scale, precision, res, g):
    x, xg, A, B, Ag, Bg = res
    dt = A.dtype
    k, i, r = A.shape
    s = r // k
    xf, xgf = _vjp_flat(x, xg, dt)
    t = xf.shape[0]
    fuse_a = xg is None
    a_ext, b_ext = _extended_factors(A, B, Ag, Bg, fuse_a)
    z = _vjp_latents(xf, xgf, A, Ag, a_ext, precision)  # recomputed, never saved
    dy = (scale * g.astype(dt)).reshape(t, k, -1)  # [T, j, o]
    dz = jnp.einsum("tjo,jco->tjc", dy, b_ext, precision=precision)  # [T, j, r(+h)]
    db_ext = jnp.einsum("tjc,tjo->jco", z, dy, precision=precision)
    dzl = jnp.swapaxes(dz[..., :r].reshape(t, k, k, s), 1, 2).reshape(t, k, r)  # [T, n, (j, s)]
    dAg = dBg = dxg = None
    if Ag is not None:
        h = Ag.shape[-1]
        dBg = jnp.swapaxes(db_ext[:, r:], 0, 1).reshape(h, -1)
        dzg = dz[..., r:].sum(1)  # [T, h]: the shared latents feed every output block
        if fuse_a:
            dzl = jnp.concatenate([dzl, jnp.broadcast_to(dzg[:, None, :], (t, k, h))], axis=-1)
        else:
            dAg = jnp.matmul(xgf.T, dzg, precision=precision)
            dxg = jnp.matmul(dzg, Ag.T, precision=precision).reshape(xg.shape).astype(xg.dtype)
    xb = xf.reshape(t, k, i)
    da_ext = jnp.einsum("tni,tnc->nic", xb, dzl, precision=precision)
    dx = jnp.einsum("tnc,nic->tni", dzl, a_ext, precision=precision).reshape(x.shape).astype(x.dtype)
    if Ag is not None and fuse_a:
        dAg = da_ext[..., r:].reshape(k * i, -1)
    return (dx, dxg, da_ext[..., :r].astype(A.dtype), db_ext[:, :r].astype(B.dtype),
            None if Ag is None else dAg.astype(Ag.dtype), None if Bg is None else dBg.astype(Bg.dtype))


_gralora_vjp.defvjp(_gralora_vjp_fwd, _gralora_vjp_bwd)


def gralora_contraction(
    x: Array,
    A: Array,
    B: Array,
    A_general: Optional[Array] = None,
    B_general: Optional[Array] = None,
    *,
    x_general: Optional[Array] = None,
    scale: float = 1.0,
    precision=None,
) -> Array:
    """``scale * (blocks(x) + x_general @ A_general @ B_general)`` with a custom VJP.

    ``x`` ``[..., in]`` stays in its own dtype until the contraction casts it to the factors'
    dtype; the backward pass saves only ``x`` (and ``x_general`` when it is a different array,
    e.g. an independently dropped-out copy) and the factors, and recomputes the latents. The
    hybrid factors (both or neither) are fused into the block contraction as one more block;
    ``x_general`` defaults to ``x``. Same function as the einsum layouts of
    :func:`gralora_blocks`:

    >>> p = init_gralora_adapter(jax.random.PRNGKey(0), 8, 4, r=4, k=2, hybrid_r=2, init_weights=False)
    >>> x = jax.random.normal(jax.random.PRNGKey(1), (3, 8))
    >>> y = gralora_contraction(x, *p.values(), scale=0.5)
    >>> ref = 0.5 * (gralora_blocks(x, p["gralora_A"], p["gralora_B"], layout="batched")
    ...              + x @ p["gralora_A_general"] @ p["gralora_B_general"])
    >>> bool(jnp.allclose(y, ref, atol=1e-5))
    True
    """
    if (A_general is None) != (B_general is None):
        raise ValueError("A_general and B_general go together: give both or neither")
    if A_general is None or x_general is x:
        x_general = None
    return _gralora_vjp(x, x_general, A, B, A_general, B_general, float(scale), precision)


# ----------------------------------------------------------------------------- layouts
#
# A layout is one arrangement of the same arithmetic: ``fn(x, x_general, adapter, scale,
# precision) -> scale * (blocks(x) + x_general @ A_general @ B_general)`` in the adapter dtype,
# ``x`` and ``x_general`` (None without hybrid) in the layer input's dtype.


def _einsum_layout(layout: str) -> Callable:
    def fn(x, xg, adapter, scale, precision):
        A, B = adapter["gralora_A"], adapter["gralora_B"]
        dt = A.dtype
        out = _blocks_einsum(x.astype(dt), A, B, precision, layout)
        if xg is not None:
            out = out + (xg.astype(dt) @ adapter["gralora_A_general"]) @ adapter["gralora_B_general"]
        return (scale * out).astype(dt)

    return fn


def _vjp_layout(x, xg, adapter, scale, precision):
    return gralora_contraction(x, adapter["gralora_A"], adapter["gralora_B"], adapter.get("gralora_A_general"),
                               adapter.get("gralora_B_general"), x_general=xg, scale=scale, precision=precision)


# Measured 2026-12-04 on one H200, Llama-3.2-1B shape, batch 8 x 1024, k=4, with the adapted
# output kept behind a barrier (kinds.AdapterKind.keep_sum), against LoRA r64 at 128.2 ms / 16.4 GiB:
_LAYOUT_FNS: dict[str, Callable] = {
    # custom VJP: saves the input only, recomputes the latents; hybrid fused into the blocks
    # (131.8 ms / 15.4 GiB; hybrid r48+16: 134.0 ms / 15.2 GiB)
    "vjp": _vjp_layout,
    # two einsums, latents grouped by output block; XLA picks what the backward keeps
    # (132.2 ms / 15.3 GiB; hybrid: 150.7 ms, its general path is a separate matmul pair)
    "batched": _einsum_layout("batched"),
    # latents written output-block-major, the B side's k results concatenated (before the
    # barrier: 5% below LoRA's memory at +12% step time)
    "concat": _einsum_layout("concat"),
}
BLOCK_LAYOUTS = tuple(_LAYOUT_FNS)
DEFAULT_BLOCK_LAYOUT = "vjp"  # the layout GraLoRADense and get_gralora_model use unless told


def layout_fn(layout: str) -> Callable:
    if layout not in _LAYOUT_FNS:
        raise ValueError(f"unknown GraLoRA block layout {layout!r}; choose from {BLOCK_LAYOUTS}")
    return _LAYOUT_FNS[layout]


def gralora_blocks(x: Array, A: Array, B: Array, precision=None, layout: str = DEFAULT_BLOCK_LAYOUT) -> Array:
    """The k*k block adapters (no scale): ``[..., in] -> [..., out]`` in the factors' dtype.

    Pair (n, j) maps input block n through ``A[n][:, j*s:(j+1)*s]`` and
    ``B[j][n*s:(n+1)*s, :]`` into output block j; all pairs in two contractions. ``layout``
    (one of :data:`BLOCK_LAYOUTS`) picks how they are arranged, same function either way:
    ``"vjp"`` (:func:`gralora_contraction`), ``"batched"`` or ``"concat"`` (einsums).
    """
    return layout_fn(layout)(x, None, {"gralora_A": A, "gralora_B": B}, 1.0, precision)


def adapter_output(
    x: Array,
    adapter: Adapter,
    scaling: float,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: Optional[Array] = None,
    precision=None,
    block_layout: str = DEFAULT_BLOCK_LAYOUT,
) -> Array:
    """The adapter's contribution ``scale * (...)`` for input ``x`` (base output excluded).

    The kind is the one whose leaves ``adapter`` holds (:func:`gralora_jax.kinds.kind_of_adapter`:
    ``gralora_A``/``gralora_B`` (+ hybrid ``*_general``) or ``lora_A``/``lora_B``); ``scaling``
    comes from the config (``config.scaling``). ``x`` is cast to the adapter's dtype (PEFT does
    the same); the result is in that dtype. Dropout on ``x`` is applied only when ``dropout_rng``
    is given and the rate is positive; the hybrid path draws its own mask, as in PEFT. The masks
    (:func:`dropout_keep_masks`) zero elements of ``x`` in its own dtype and the ``1/(1-rate)``
    of inverted dropout multiplies ``scaling``: the same function as PEFT's ``dropout(x) @ ...``.
    ``block_layout`` is one of :data:`BLOCK_LAYOUTS` (GraLoRA only; see :func:`gralora_blocks`).
    """
    kind = _kinds().kind_of_adapter(adapter)
    return kind.apply(x, adapter, scaling, dropout_rate=dropout_rate, dropout_rng=dropout_rng, precision=precision,
                      block_layout=block_layout)


def delta_kernel(adapter: Adapter, scaling: float) -> Array:
    """The adapter's weight update in Flax kernel layout ``[in, out]``, scale included, by the
    kind whose leaves ``adapter`` holds (GraLoRA: :func:`gralora_delta`). Leading (e.g.
    stacked-layer) axes are carried through."""
    return _kinds().kind_of_adapter(adapter).delta(adapter, scaling)


def gralora_delta(A: Array, B: Array, A_general: Optional[Array] = None, B_general: Optional[Array] = None) -> Array:
    """GraLoRA's unscaled weight update ``[..., in, out]``.

    Block (n, j) of the result (rows of input block n, columns of output block j) is
    ``A[n][:, j*s:(j+1)*s] @ B[j][n*s:(n+1)*s, :]``; the hybrid path adds
    ``A_general @ B_general``. Leading (e.g. stacked-layer) axes are carried through.
    """
    *lead, k, i, r = A.shape
    s = r // k
    o = B.shape[-1]
    a = A.reshape(*lead, k, i, k, s)  # [..., n, i, j, s]
    b = B.reshape(*lead, k, k, s, o)  # [..., j, n, s, o]
    d = jnp.einsum("...nijs,...jnso->...nijo", a, b, precision=jax.lax.Precision.HIGHEST)
    d = d.reshape(*lead, k * i, k * o)
    if A_general is not None:
        d = d + jnp.matmul(A_general, B_general, precision=jax.lax.Precision.HIGHEST)
    return d


def _kernel_delta(layer: Mapping[str, Array], scaling: float, kernel_layout: str) -> Array:
    if kernel_layout not in ("in_out", "out_in"):
        raise ValueError(f"kernel_layout must be 'in_out' or 'out_in', got {kernel_layout!r}")
    d = delta_kernel(layer, scaling)
    return jnp.swapaxes(d, -1, -2) if kernel_layout == "out_in" else d


def merge(layer: Mapping[str, Array], scaling: float, kernel_layout: str = "in_out") -> dict[str, Array]:
    """A layer dict with the delta added to ``kernel`` (adapter leaves kept, for ``unmerge``).

    ``kernel_layout="out_in"`` is for kernels stored ``[out, in]`` (transformers'
    FlaxConv1D in GPT-2). The addition happens in float32 and is cast back to the kernel dtype.
    """
    kernel = layer["kernel"]
    d = _kernel_delta(layer, scaling, kernel_layout)
    return {**layer, "kernel": (kernel.astype(jnp.float32) + d.astype(jnp.float32)).astype(kernel.dtype)}


def unmerge(layer: Mapping[str, Array], scaling: float, kernel_layout: str = "in_out") -> dict[str, Array]:
    """Inverse of :func:`merge`: subtract the delta from ``kernel``."""
    kernel = layer["kernel"]
    d = _kernel_delta(layer, scaling, kernel_layout)
    return {**layer, "kernel": (kernel.astype(jnp.float32) - d.astype(jnp.float32)).astype(kernel.dtype)}


# ----------------------------------------------------------------------------- modules


class _AdaptedDense(nn.Module):
    """``nn.Dense`` with an adapter beside the kernel. Subclasses name the adapter's config
    (:meth:`adapter_config`); its kind (:mod:`gralora_jax.kinds`) gives the leaves, their
    init, the output, and the config its scale."""

    features: int
    use_bias: bool = True
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    adapter_dtype: Any = jnp.float32  # adapters stay float32 even when the base is bfloat16
    init_weights: bool = True  # PEFT init (B = 0); False: B random too

    def adapter_config(self):  # the adapter config made of this module's fields
        raise NotImplementedError

    def _output_options(self) -> dict:  # extra keywords of the kind's apply
        return {}

    def _adapter(self, config, in_features: int) -> dict[str, Array]:
        """Declares the adapter params: the kind's init drawn from each param's key."""
        kinds = _kinds()
        kind = kinds.kind_of(config)
        kind.check_shape(config, in_features, self.features)
        init = lambda key: kinds.init_from_key(key, config, in_features, self.features, self.adapter_dtype)  # noqa: E731
        names = jax.eval_shape(init, jax.ShapeDtypeStruct((2,), jnp.uint32))
        return {n: self.param(n, lambda key, n=n: init(key)[n]) for n in names}

    @nn.compact
    def __call__(self, inputs: Array, deterministic: bool = True) -> Array:
        in_features = inputs.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (in_features, self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, k, b = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(x, k, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        if b is not None:
            y = y + jnp.reshape(b, (1,) * (y.ndim - 1) + (-1,))
        config = self.adapter_config()
        adapter = self._adapter(config, in_features)
        rate = config.dropout
        rng = self.make_rng("dropout") if (not deterministic and rate > 0.0) else None
        kind = _kinds().kind_of(config)
        delta = kind.apply(
            inputs, adapter, config.scaling, dropout_rate=rate, dropout_rng=rng, precision=self.precision,
            **self._output_options(),
        )
        return kind.add_output(y, delta)


class GraLoRADense(_AdaptedDense):
    """Drop-in ``nn.Dense`` with a GraLoRA adapter (PEFT semantics).

    Same constructor arguments and ``kernel``/``bias`` names as ``nn.Dense`` (base checkpoints
    load unchanged), plus ``r``, ``alpha``, ``gralora_k``, ``hybrid_r``, ``gralora_dropout``.
    Dropout needs ``deterministic=False`` and a ``dropout`` rng.

    >>> import jax, jax.numpy as jnp
    >>> layer = GraLoRADense(features=8, r=4, alpha=8, gralora_k=2)
    >>> v = layer.init(jax.random.PRNGKey(0), jnp.ones((2, 3, 16)))
    >>> sorted(v["params"])
    ['bias', 'gralora_A', 'gralora_B', 'kernel']
    >>> layer.apply(v, jnp.ones((2, 3, 16))).shape
    (2, 3, 8)
    """

    r: int = 32
    alpha: float = 64
    gralora_k: int = 2
    hybrid_r: int = 0
    gralora_dropout: float = 0.0
    block_layout: str = DEFAULT_BLOCK_LAYOUT  # one of BLOCK_LAYOUTS: how the block contraction is arranged

    def adapter_config(self):
        from gralora_jax.config import GraLoRAConfig

        return GraLoRAConfig(r=self.r, alpha=self.alpha, gralora_k=self.gralora_k, hybrid_r=self.hybrid_r,
                             gralora_dropout=self.gralora_dropout, init_weights=self.init_weights)

    def _output_options(self):
        return {"block_layout": self.block_layout}


class LoRADense(_AdaptedDense):
    """Drop-in ``nn.Dense`` with a plain LoRA adapter (PEFT LoRA: scale ``lora_alpha / r``, or
    ``lora_alpha / sqrt(r)`` with ``use_rslora=True``).

    >>> import jax, jax.numpy as jnp
    >>> layer = LoRADense(features=8, r=4, lora_alpha=8)
    >>> sorted(layer.init(jax.random.PRNGKey(0), jnp.ones((3, 16)))["params"])
    ['bias', 'kernel', 'lora_A', 'lora_B']
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False  # rank-stabilised LoRA: scale lora_alpha / sqrt(r)

    def adapter_config(self):
        from gralora_jax.config import LoRAConfig

        return LoRAConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          init_lora_weights=self.init_weights, use_rslora=self.use_rslora)
