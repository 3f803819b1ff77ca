"""Device meshes, sharding rules as data, and placing params / batches on a mesh.

A mesh is written as a string: ``"4x2"`` is (data=4, model=2), ``"2x2x2"`` is
(data=2, fsdp=2, model=2). Rules are per-architecture lists of
``(regex on the '/'-joined param path, PartitionSpec)``; the first match wins and an
unmatched leaf is replicated. Specs name the logical axes ``"data"``, ``"fsdp"`` and
``"model"``; an axis the mesh lacks (e.g. ``fsdp`` on a 2-D mesh) is dropped, and an
axis whose size does not divide the dimension falls back to replicated on that dimension,
so small test shapes never crash.

Adapter leaves have no rules of their own: they follow their sibling ``kernel``, by their
kind's ``partition_spec`` (:mod:`gralora_jax.kinds`). With the kernel ``[in, out]`` sharded
``(s_in, s_out)``:
``gralora_A [k, in/k, r]`` over ``s_in`` and ``gralora_B [k, r, out/k]`` over ``s_out``, on
the block axis when that is the ``model`` axis (block j of the output is a contiguous slice
of the output features, so the blocks sit where the base layer's output already is; failing
divisibility the in/k or out/k axis), and on the in/k or out/k axis when it is ``fsdp``
(weights are gathered before use there; a block axis sharded over ``fsdp`` would collide
with the batch, which is split over ``fsdp`` too, and made XLA rematerialise the block
einsums: measured 14 "Involuntary full rematerialization" warnings on a 2x2x2 mesh, none
now). The batch must really be split over ``fsdp`` for that to hold: left alone, XLA gives the
hidden states the embedding table's layout (hidden over ``fsdp``, batch whole), and GraLoRA's
``in -> (k, in/k)`` block split of such a layer input (k = 4 blocks over 8 or 16 ``fsdp``
devices) has no efficient reshard to the adapter's layout, so XLA replicated each layer's
factors (12 warnings on 2x8x1 / 1x16x1). Our models pin the residual stream to batch over the
data axes while a mesh is in context, and the surgery pins every adapted layer's input and the
token embeddings (:data:`TOKEN_EMBEDDINGS`) of any model, transformers' included
(:mod:`gralora_jax.models.constraints`; the train step traces under its mesh). ``lora_A`` / ``gralora_A_general [in, r]`` get ``(s_in, None)``; ``lora_B`` /
``gralora_B_general [r, out]`` get ``(None, s_out)``. The rank axis is always replicated.
A leading stacked-layer (scan) axis is replicated: a rule written for ``[in, out]`` applied
to a ``[L, in, out]`` leaf gets a ``None`` prepended.

>>> parse_mesh("4x2")
{'data': 4, 'model': 2}
>>> parse_mesh("2x2x2")
{'data': 2, 'fsdp': 2, 'model': 2}
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gralora_jax import kinds
from gralora_jax import tree as tree_lib
from gralora_jax.kinds import MeshAxes
from gralora_jax.meshspec import AXES_2D, AXES_3D, BATCH_AXES, parse_mesh  # noqa: F401 - part of this API

_F = "fsdp"
_M = "model"


_token_embeddings: set[str] = set()  # every ``embeddings`` name given to _family (TOKEN_EMBEDDINGS)


def _family(column=(), row=(), embeddings=(), heads=()) -> list[tuple[str, P]]:
    """One architecture's rules from module-path regexes (Megatron-style tensor parallelism over
    ``model``, weights also split over ``fsdp``):

    * ``column``: output features over ``model`` (q/k/v, gate/up, ...), their biases too;
    * ``row``: input features over ``model`` (o, down, ...), so the pair needs one all-reduce;
    * ``embeddings`` ``[vocab, hidden]``: vocab over ``model``;
    * ``heads`` ``[hidden, vocab]`` (untied output projections): vocab over ``model``.

    The other kernel axis goes over ``fsdp``. Specs are written for ``[in, out]`` kernels; a kernel
    the family table stores ``[out, in]`` (GPT-2) gets its spec reversed (:func:`param_partition_specs`).
    """
    _token_embeddings.update(embeddings)
    col, rw = P(_F, _M), P(_M, _F)
    rules = [(rf"(^|/){m}/kernel$", col) for m in column]
    rules += [(rf"(^|/){m}/bias$", P(_M)) for m in column]
    rules += [(rf"(^|/){m}/kernel$", rw) for m in row]
    rules += [(rf"(^|/){m}/embedding$", P(_M, _F)) for m in embeddings]
    rules += [(rf"(^|/){m}/kernel$", P(_F, _M)) for m in heads]
    return rules


_DECODER_RULES = _family(column=[r"self_attn/(q|k|v)_proj", r"mlp/(gate|up)_proj"],
                         row=[r"self_attn/o_proj", r"mlp/down_proj"], embeddings=["embed_tokens"], heads=["lm_head"])
_BERT_RULES = _family(column=[r"attention/self/(query|key|value)", r"intermediate/dense"],
                      row=[r"attention/output/dense", r"layer/\d+/output/dense"], embeddings=["word_embeddings"])
_T5_RULES = _family(column=[r"(SelfAttention|EncDecAttention)/(q|k|v)", r"DenseReluDense/(wi|wi_0|wi_1)"],
                    row=[r"(SelfAttention|EncDecAttention)/o", r"DenseReluDense/wo"], embeddings=["shared"],
                    heads=["lm_head"])

# Rules per transformers ``model_type`` (HF Flax parameter names; our models use the decoder
# names, scanned layers included: a rule for ``[in, out]`` gets the leading layer axis
# replicated). Norms, position embeddings, small heads and anything unmatched: replicated.
# A model type missing here cannot use a mesh with a model or fsdp axis (see param_partition_specs).
RULES: dict[str, list[tuple[str, P]]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"), _DECODER_RULES),
    "gpt2": _family(column=[r"h/\d+/attn/c_attn", r"h/\d+/mlp/c_fc"], row=[r"h/\d+/attn/c_proj", r"h/\d+/mlp/c_proj"],
                    embeddings=["wte"]),
    "gptj": _family(column=[r"attn/(q|k|v)_proj", r"mlp/fc_in"], row=[r"attn/out_proj", r"mlp/fc_out"],
                    embeddings=["wte"], heads=["lm_head"]),
    "opt": _family(column=[r"self_attn/(q|k|v)_proj", "fc1"], row=[r"self_attn/out_proj", "fc2"],
                   embeddings=["embed_tokens"], heads=["lm_head"]),
    "bart": _family(column=[r"(self_attn|encoder_attn)/(q|k|v)_proj", "fc1"],
                    row=[r"(self_attn|encoder_attn)/out_proj", "fc2"], embeddings=["shared"], heads=["lm_head"]),
    **dict.fromkeys(("bert", "roberta", "electra"), _BERT_RULES),
    **dict.fromkeys(("t5", "mt5"), _T5_RULES),
}

# Module names of the token embeddings above ([vocab, hidden], hidden over fsdp): a lookup comes
# out with hidden split over fsdp, which the surgery re-pins to batch over the data axes while a
# mesh is in context (gralora_jax.models.constraints.embedded; our models do it themselves).
TOKEN_EMBEDDINGS: frozenset[str] = frozenset(_token_embeddings)


def make_mesh(spec: str | Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A :class:`jax.sharding.Mesh` for ``spec`` over ``devices`` (default: all devices).

    The mesh must use every device given; otherwise a ``ValueError`` names both numbers.
    """
    axes = parse_mesh(spec) if isinstance(spec, str) else dict(spec)
    devices = list(jax.devices() if devices is None else devices)
    size = math.prod(axes.values())
    if size != len(devices):
        raise ValueError(
            f"mesh {spec!r} has {size} devices ({' x '.join(f'{k}={v}' for k, v in axes.items())}) "
            f"but {len(devices)} device(s) are available ({devices[0].platform if devices else '?'}). "
            "Pick a mesh whose product equals the device count. On CPU you can fake N devices with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N set before jax is imported "
            "(see gralora_jax.hostdevices.ensure_host_devices)."
        )
    axis_types = (jax.sharding.AxisType.Auto,) * len(axes)
    return jax.make_mesh(tuple(axes.values()), tuple(axes), axis_types, devices=devices)


def _axis_size(mesh: Mesh, entry) -> int:
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[n] for n in names)


def _restrict(entry, mesh: Mesh):
    """Drop axis names the mesh lacks; () -> None."""
    if entry is None:
        return None
    names = tuple(n for n in (entry if isinstance(entry, tuple) else (entry,)) if n in mesh.shape)
    if not names:
        return None
    return names[0] if len(names) == 1 else names


def fit_spec(spec: Sequence[Any], shape: Sequence[int], mesh: Mesh) -> P:
    """``spec`` restricted to ``mesh``'s axes, padded to ``len(shape)``, with any dimension the
    axis size does not divide (or size-1 axes) replaced by ``None``."""
    spec = list(spec)
    if len(spec) == len(shape) - 1:  # stacked (scan) layout: leading layer axis replicated
        spec = [None] + spec
    if len(spec) > len(shape):
        return P(*([None] * len(shape)))
    spec = spec + [None] * (len(shape) - len(spec))
    out = []
    for entry, dim in zip(spec, shape):
        entry = _restrict(entry, mesh)
        if entry is not None:
            n = _axis_size(mesh, entry)
            if n == 1 or dim % n:
                entry = None
        out.append(entry)
    return P(*out)


def _resolve_rules(rules, mesh: Mesh) -> tuple[list[tuple[str, P]], tuple[str, ...]]:
    """``(rules, regexes of the module paths whose kernels are stored [out, in])``."""
    if rules is None or isinstance(rules, str):
        if rules in RULES:
            from gralora_jax import families  # the family table imports this module

            return RULES[rules], families.out_in_kernels(rules)
        split = {a: mesh.shape[a] for a in ("fsdp", "model") if mesh.shape.get(a, 1) > 1}
        if split:
            raise ValueError(
                f"no sharding rules for model type {rules!r} (rules exist for {', '.join(sorted(RULES))}), so the "
                f"mesh's {' and '.join(f'{a} axis ({n})' for a, n in split.items())} would leave every parameter "
                f"replicated. Use a data-parallel mesh ('{mesh.devices.size}x1') or add rules to gralora_jax.sharding.RULES"
            )
        return [], ()  # data parallel only: replicating every parameter is the plan anyway
    return list(rules), ()


def _is_batch_axis(entry) -> bool:
    return any(n in BATCH_AXES for n in (entry if isinstance(entry, tuple) else (entry,)))


def _adapter_spec(name: str, shape, s_in, s_out, mesh: Mesh) -> P:
    """The leaf's kind's rule (:mod:`gralora_jax.kinds`) from the kernel's in/out entries; a
    leading stacked-layer axis replicated."""
    axes = MeshAxes(size=lambda e: _axis_size(mesh, e), is_batch=_is_batch_axis)
    body = list(kinds.kind_of_leaf(name).partition_spec(name, tuple(shape), s_in, s_out, axes))
    return fit_spec([None] * (len(shape) - len(body)) + body, shape, mesh)


def param_partition_specs(params: Mapping[str, Any], rules, mesh: Mesh, *, out_in_kernels=()) -> dict:
    """Tree of :class:`PartitionSpec` for ``params`` (arrays or shape structs).

    ``rules`` is a model type (key of :data:`RULES`) or a list of ``(regex, spec)``, specs written
    for ``[in, out]`` kernels. A kernel stored ``[out, in]`` (its module path matches the family
    table's ``out_in_kernels``, or a regex of ``out_in_kernels`` here) gets its spec reversed,
    and its adapters take their in/out entries accordingly. A model type without rules
    (or None) replicates everything on a data-parallel mesh and raises ``ValueError`` when the
    mesh has a ``model`` or ``fsdp`` axis larger than 1.
    """
    rule_list, out_in = _resolve_rules(rules, mesh)
    out_in = [re.compile(r) for r in (*out_in, *out_in_kernels)]
    compiled = [(re.compile(r), spec) for r, spec in rule_list]
    flat = tree_lib.flatten(params)

    def stored_out_in(kpath):
        return kpath.endswith("/kernel") and any(rx.search(kpath[: -len("/kernel")]) for rx in out_in)

    def base_spec(path, leaf):
        for rx, spec in compiled:
            if rx.search(path):
                return fit_spec(tuple(spec)[::-1] if stored_out_in(path) else tuple(spec), np.shape(leaf), mesh)
        return P(*([None] * len(np.shape(leaf))))

    specs = {p: base_spec(p, v) for p, v in flat.items() if not tree_lib.is_adapter_path(p)}
    for p, v in flat.items():
        if not tree_lib.is_adapter_path(p):
            continue
        kpath = p.rsplit("/", 1)[0] + "/kernel"
        kspec = specs.get(kpath)
        s_in = s_out = None
        if kspec is not None and len(kspec) >= 2:
            s_in, s_out = kspec[-2], kspec[-1]
            if stored_out_in(kpath):
                s_in, s_out = s_out, s_in
        specs[p] = _adapter_spec(tree_lib.leaf_name(p), np.shape(v), s_in, s_out, mesh)
    return tree_lib.unflatten({p: specs[p] for p in flat})


def named_shardings(mesh: Mesh, specs: Any) -> Any:
    """Tree of PartitionSpec -> tree of NamedSharding."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def shard_params(params: Any, mesh: Mesh, specs: Any) -> Any:
    """Place ``params`` on ``mesh`` according to ``specs`` (a tree of PartitionSpec).

    Host leaves go through :func:`gralora_jax.distributed.put_global` (each device copies
    its slice; no cross-process equality gather), placed arrays are resharded on device."""
    from gralora_jax.distributed import put_global

    return put_global(params, named_shardings(mesh, specs))


def batch_spec(mesh: Mesh) -> P:
    """Leading (batch) axis over every data-parallel mesh axis (``data`` and, if present, ``fsdp``)."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    return P(axes if len(axes) > 1 else axes[0])


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch array: leading axis split over ``data`` (and ``fsdp``), rest replicated."""
    return NamedSharding(mesh, batch_spec(mesh))


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)
