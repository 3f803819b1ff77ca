"""TPU splash attention (Pallas) behind the same interface as :func:`attention.attention`.

``splash_attention(q, k, v, scale=..., window=..., kv_lengths=..., key_mask=..., softcap=...)``
runs jax's Pallas TPU splash-attention kernel (``jax.experimental.pallas.ops.tpu``) on
``q [B, T, N, H]``, ``k``/``v`` ``[B, T, K, H]``: the causal (or sliding-window) structure is a
lazy block mask, so fully masked blocks are skipped; GQA uses the kernel's multi-query form
once per KV head (``vmap`` over batch and KV heads); padding becomes segment ids (real tokens
segment 1, padding segment 0), which is exact for either padding side; Gemma2's logit
soft-capping is native to the kernel. ``interpret=True`` runs the same kernel through the
Pallas interpreter on any backend (how the tests check it on CPU).

The kernel is one device's computation, and XLA cannot partition a Pallas call inside ``jit``
over a mesh. :func:`sharded_splash_attention` therefore runs it under ``shard_map`` over the
mesh in context (``with jax.set_mesh(mesh):``, what the commonsense CLI does around training and
evaluation): the batch axis is split over the mesh's data axes (``data``, ``fsdp``) and the heads
over ``model`` (query heads stay with their KV head: ``N = K * G`` heads are split in
contiguous groups), so every device runs the kernel on its own rows and heads, with no
communication. Axes that do not divide the batch or the KV heads are left whole (those devices
then repeat the work). Without a mesh in context it is the plain per-device call.

Selected with ``attn_implementation="splash"``, and automatically on TPU (``None``) where it
applies: no KV cache, sequence length and head_dim multiples of 128, and one device or a mesh in
context (see :func:`gralora_jax.models.attention.choose_implementation`). Checked here in
interpret mode only (no TPU in this project's CI).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gralora_jax.meshspec import BATCH_AXES
from gralora_jax.models.constraints import context_mesh, split_axes

BLOCK_CHOICES = (512, 256, 128)


def _block(T: int) -> int:
    for b in BLOCK_CHOICES:
        if T % b == 0:
            return b
    raise ValueError(f"splash attention needs a sequence length that is a multiple of 128, got {T}")


def _kernel(T: int, heads_per_kv: int, window: Optional[int], softcap: Optional[float], interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if window is None:
        mask = sm.CausalMask((T, T))
    else:  # transformers' window counts the query itself: keys i-w+1 .. i
        mask = sm.LocalMask((T, T), window_size=(window - 1, 0), offset=0)
    b = _block(T)
    sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, use_fused_bwd_kernel=True)
    return sk.make_splash_mqa_single_device(sm.MultiHeadMask([mask] * heads_per_kv), block_sizes=sizes,
                                            attn_logits_soft_cap=softcap, interpret=interpret)


def splash_attention(q, k, v, *, scale: float, window: Optional[int] = None, key_mask=None, kv_lengths=None,
                     softcap: Optional[float] = None, interpret: bool = False):
    """Causal attention through the splash kernel; see the module docstring."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if S != T:
        raise ValueError(f"splash attention is for the no-cache path (queries = keys), got T={T}, S={S}")
    if N % K:
        raise ValueError(f"query heads ({N}) must be a multiple of key/value heads ({K})")
    G = N // K
    kernel = _kernel(T, G, window, softcap, interpret)
    qg = (q * jnp.asarray(scale, q.dtype)).reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
    if key_mask is not None and kv_lengths is not None:
        raise ValueError("give key_mask or kv_lengths, not both")
    if key_mask is not None:
        seg = key_mask.reshape(B, -1)[:, -T:].astype(jnp.int32)
    elif kv_lengths is not None:
        seg = (jnp.arange(T)[None, :] < kv_lengths[:, None]).astype(jnp.int32)
    else:
        seg = None
    if seg is None:
        out = jax.vmap(jax.vmap(kernel))(qg, kt, vt)
    else:
        per_head = lambda q_, k_, v_, s_: kernel(q_, k_, v_, segment_ids=sk.SegmentIds(q=s_, kv=s_))
        out = jax.vmap(jax.vmap(per_head, in_axes=(0, 0, 0, None)))(qg, kt, vt, seg)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q.dtype)


def sharded_splash_attention(q, k, v, *, scale: float, window: Optional[int] = None, key_mask=None,
                             kv_lengths=None, softcap: Optional[float] = None, interpret: bool = False, mesh=None):
    """:func:`splash_attention` under ``shard_map`` over ``mesh`` (default: the mesh in context):
    batch over the data axes, heads over ``model``; the plain call when there is no mesh."""
    mesh = mesh if mesh is not None else context_mesh()
    kw = dict(scale=scale, window=window, softcap=softcap, interpret=interpret)
    if mesh is None:
        return splash_attention(q, k, v, key_mask=key_mask, kv_lengths=kv_lengths, **kw)
    b = split_axes(mesh, BATCH_AXES, q.shape[0])
    h = split_axes(mesh, ("model",), k.shape[2])
    qkv = P(b, None, h, None)
    extra, extra_specs = {}, {}
    if key_mask is not None:
        extra["key_mask"], extra_specs["key_mask"] = key_mask, P(b, *([None] * (key_mask.ndim - 1)))
    if kv_lengths is not None:
        extra["kv_lengths"], extra_specs["kv_lengths"] = kv_lengths, P(b)

    def local(q, k, v, extra):
        return splash_attention(q, k, v, **extra, **kw)

    return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, extra_specs), out_specs=qkv,
                         check_vma=False)(q, k, v, extra)
