"""HF PyTorch state dicts <-> Flax parameter trees, decided by the target tree.

The Flax tree whose leaf shapes we want (from ``jax.eval_shape(module.init, ...)``
or a transformers Flax model's ``params_shape_tree``) is the authority: for each
torch key ``a.b.c.<leaf>`` we look at which leaf the target has under ``a/b/c``
and convert to it. The rules, as data (``_LEAF_RULES``):

=================  ==========================  ===============================
torch leaf         Flax leaf under the module  conversion
=================  ==========================  ===============================
``weight`` (2-D)   ``kernel``                  transpose (nn.Linear [out, in] -> [in, out];
                                               GPT-2 Conv1D [in, out] -> FlaxConv1D [out, in])
``weight`` (4-D)   ``kernel``                  [out, in, kh, kw] -> [kh, kw, in, out]
``weight``         ``embedding``               as is
``weight``/gamma   ``scale`` or ``weight``     as is (LayerNorm / RMSNorm)
``bias``/beta      ``bias``                    as is
anything else      same name                   as is
=================  ==========================  ===============================

A 2-D kernel is transposed whenever the transpose fits; only a non-square tensor
that fits untransposed (and not transposed) is taken as is. Both torch ``Linear``
and ``Conv1D`` need the transpose, so square matrices are always transposed.

Prefixes: one side may carry the base-model prefix and the other not
(``model.layers.0...`` vs ``layers/0/...``; ``bert.`` / ``transformer.``); the
prefix change that matches the most keys is chosen once for the whole dict.
Non-persistent buffers some checkpoints still carry (``rotary_emb.inv_freq``,
``position_ids``, GPT-2's ``attn.bias`` mask) are ignored when unexpected.

>>> import numpy as np, jax
>>> sd = {"model.proj.weight": np.arange(6.).reshape(3, 2)}   # torch [out=3, in=2]
>>> tree = {"model": {"proj": {"kernel": jax.ShapeDtypeStruct((2, 3), np.float32)}}}
>>> torch_to_flax_params(sd, tree)["model"]["proj"]["kernel"].shape
(2, 3)
>>> sorted(flax_to_torch_state_dict(torch_to_flax_params(sd, tree)))
['model.proj.weight']
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import numpy as np

from gralora_jax import families
from gralora_jax.tree import ADAPTER_LEAVES, flatten, unflatten

# torch leaf name -> Flax leaf names it may become, in order of preference.
_LEAF_RULES: dict[str, tuple[str, ...]] = {
    "weight": ("kernel", "embedding", "scale", "weight"),
    "gamma": ("scale", "weight"),
    "beta": ("bias",),
    "bias": ("bias",),
}
# Flax leaf name -> torch leaf name (inverse direction).
_FLAX_TO_TORCH_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight"}

# Buffers that are not parameters; ignored when the target tree has no place for them.
IGNORABLE_UNEXPECTED = (
    r"(^|\.)rotary_emb\.inv_freq$",
    r"(^|\.)position_ids$",
    r"(^|\.)attn\.(masked_)?bias$",
    r"(^|\.)embed_positions\._float_tensor$",
)

# Torch keys whose module is tied to the input embedding: (head kernel path, embedding path).
# (From the family table, gralora_jax.families.)
TIED_HEADS = families.tied_heads()


def is_floating(x) -> bool:
    """True for float arrays, ml_dtypes ones (bf16, fp8) included."""
    dt = np.asarray(x).dtype
    return np.issubdtype(dt, np.floating) or dt.kind == "V" or "float" in dt.name


def _shape(leaf) -> tuple[int, ...]:
    return tuple(getattr(leaf, "shape", np.shape(leaf)))


def _unwrap(tree: Mapping) -> tuple[Mapping, bool]:
    """Accept ``{"params": {...}}`` (a full variables dict) as well as the params tree."""
    if isinstance(tree, Mapping) and set(tree.keys()) == {"params"} and isinstance(tree["params"], Mapping):
        return tree["params"], True
    return tree, False


def _prefix_transforms(torch_keys: Iterable[str], target_paths: Iterable[str]):
    """Candidate ``torch dotted key -> dotted target path`` rewrites: identity, strip p., add p.."""
    firsts = {k.split(".", 1)[0] for k in torch_keys} | {p.split("/", 1)[0] for p in target_paths}
    yield "", lambda k: k
    for p in sorted(firsts):
        yield f"strip {p}.", (lambda k, p=p: k[len(p) + 1 :] if k.startswith(p + ".") else k)
        yield f"add {p}.", (lambda k, p=p: f"{p}.{k}")


def _module_and_leaf(dotted: str) -> tuple[str, str]:
    if "." in dotted:
        mod, leaf = dotted.rsplit(".", 1)
        return mod.replace(".", "/"), leaf
    return "", dotted


def _map_key(dotted: str, leaves_by_module: Mapping[str, set]) -> str | None:
    """Dotted torch key (already prefix-fixed) -> target Flax path, or None."""
    mod, leaf = _module_and_leaf(dotted)
    present = leaves_by_module.get(mod)
    if not present:
        return None
    for cand in _LEAF_RULES.get(leaf, ()) + (leaf,):
        if cand in present:
            return f"{mod}/{cand}" if mod else cand
    return None


def _convert_tensor(x: np.ndarray, flax_leaf: str, want: tuple[int, ...], key: str, path: str) -> np.ndarray:
    x = np.asarray(x)
    if flax_leaf == "kernel" and x.ndim == 2:
        if x.T.shape == want:
            return x.T
        if x.shape == want:
            return x
    elif flax_leaf == "kernel" and x.ndim == 4:
        y = np.transpose(x, (2, 3, 1, 0))
        if y.shape == want:
            return y
    elif x.shape == want:
        return x
    raise ValueError(
        f"shape mismatch for torch key {key!r} -> Flax path {path!r}: checkpoint has {x.shape}, "
        f"model expects {want}"
    )


def torch_to_flax_params(
    state_dict: Mapping[str, Any],
    target_shapes: Mapping,
    *,
    dtype=None,
    strict: bool = True,
    tie_word_embeddings: bool | None = None,
) -> dict:
    """Map an HF PyTorch state dict onto the Flax tree whose leaf shapes are ``target_shapes``.

    Args:
      state_dict: ``{torch key: array}`` (numpy, ml_dtypes bf16, or anything ``np.asarray`` takes).
      target_shapes: nested dict of leaves with ``.shape`` (ShapeDtypeStruct or arrays);
        ``{"params": tree}`` is accepted and the result is wrapped the same way.
      dtype: cast every floating tensor to this dtype (None keeps the checkpoint's).
      strict: raise on missing or unexpected keys (listing them); else skip
        unexpected and leave missing paths out of the result.
      tie_word_embeddings: when the head kernel is missing from the checkpoint,
        materialise it as the embedding's transpose. ``None`` (default) does so
        whenever the checkpoint lacks the head and has the embedding; ``False`` never.

    Returns a nested dict of numpy arrays with the target's structure.
    """
    target, wrapped = _unwrap(target_shapes)
    flat_t = {p: _shape(v) for p, v in flatten(target).items()}
    leaves_by_module: dict[str, set] = {}
    for p in flat_t:
        mod, _, leaf = p.rpartition("/")
        leaves_by_module.setdefault(mod, set()).add(leaf)

    keys = list(state_dict)
    best = None
    for name, fn in _prefix_transforms(keys, flat_t):
        mapping = {k: _map_key(fn(k), leaves_by_module) for k in keys}
        score = sum(v is not None for v in mapping.values())
        if best is None or score > best[0]:
            best = (score, name, mapping)
    _, _, mapping = best

    out: dict[str, np.ndarray] = {}
    unexpected = []
    for k in keys:
        path = mapping[k]
        if path is None:
            tied_extra = tie_word_embeddings and k.split(".")[-2:] in (["lm_head", "weight"],)
            if not tied_extra and not any(re.search(pat, k) for pat in IGNORABLE_UNEXPECTED):
                unexpected.append(k)
            continue
        if path in out:
            raise ValueError(f"two torch keys map onto Flax path {path!r} (second: {k!r})")
        x = _convert_tensor(state_dict[k], path.rsplit("/", 1)[-1], flat_t[path], k, path)
        if dtype is not None and is_floating(x):
            x = x.astype(dtype)
        out[path] = x

    _fill_tied(out, flat_t, tie_word_embeddings)
    missing = [p for p in flat_t if p not in out]
    _check(missing, unexpected, strict)
    tree = unflatten({p: out[p] for p in flat_t if p in out})
    return {"params": tree} if wrapped else tree


def _fill_tied(out: dict, flat_t: Mapping[str, tuple], tie: bool | None) -> None:
    """Materialise a missing head kernel as the embedding's transpose (tied embeddings)."""
    if tie is False:
        return
    for head, emb in TIED_HEADS:
        if head in flat_t and head not in out and emb in out and flat_t[head] == out[emb].T.shape:
            out[head] = out[emb].T


def _check(missing: list, unexpected: list, strict: bool) -> None:
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (in the model, not in the checkpoint): {missing[:20]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (in the checkpoint, not in the model): {unexpected[:20]}")
        raise ValueError("checkpoint does not match the model: " + "; ".join(parts))


def match_flax_params(
    params: Mapping, target_shapes: Mapping, *, dtype=None, strict: bool = True, tie_word_embeddings: bool | None = None
) -> dict:
    """Check a Flax tree (e.g. from ``flax_model.msgpack``) against ``target_shapes``.

    Same contract as :func:`torch_to_flax_params` (shape errors name the path and
    both shapes; missing/unexpected listed when strict; tied head materialised),
    but paths are matched as they are, with the same prefix search (a headless
    ``layers/...`` tree into a ``model/layers/...`` target and the reverse).
    """
    target, wrapped = _unwrap(target_shapes)
    src, _ = _unwrap(params)
    flat_t = {p: _shape(v) for p, v in flatten(target).items()}
    flat_s = flatten(src)
    best = None
    for _, fn in _prefix_transforms([k.replace("/", ".") for k in flat_s], flat_t):
        mapping = {k: fn(k.replace("/", ".")).replace(".", "/") for k in flat_s}
        mapping = {k: (v if v in flat_t else None) for k, v in mapping.items()}
        score = sum(v is not None for v in mapping.values())
        if best is None or score > best[0]:
            best = (score, mapping)
    mapping = best[1]
    out: dict[str, np.ndarray] = {}
    unexpected = []
    for k, x in flat_s.items():
        path = mapping[k]
        if path is None:
            unexpected.append(k)
            continue
        x = np.asarray(x)
        if x.shape != flat_t[path]:
            raise ValueError(f"shape mismatch for {path!r}: checkpoint has {x.shape}, model expects {flat_t[path]}")
        out[path] = x.astype(dtype) if dtype is not None and is_floating(x) else x
    _fill_tied(out, flat_t, tie_word_embeddings)
    _check([p for p in flat_t if p not in out], unexpected, strict)
    tree = unflatten({p: out[p] for p in flat_t if p in out})
    return {"params": tree} if wrapped else tree


def flax_to_torch_state_dict(
    params: Mapping,
    *,
    prefix: str = "",
    drop: Iterable[str] = (),
    allow_adapters: bool = False,
    dtype=None,
    tie_word_embeddings: bool = False,
) -> dict[str, np.ndarray]:
    """Inverse of :func:`torch_to_flax_params`: Flax tree -> ``{HF torch key: numpy array}``.

    ``kernel`` -> ``weight`` transposed (4-D: back to [out, in, kh, kw]),
    ``embedding``/``scale`` -> ``weight``, everything else keeps its name.
    ``prefix`` is prepended to every key (e.g. ``"model."`` for a headless tree);
    ``drop`` lists Flax paths to leave out (e.g. ``["lm_head/kernel"]`` for tied embeddings).
    ``tie_word_embeddings=True`` also drops a head kernel that is tied to the embedding
    (``lm_head/kernel``), as transformers' ``save_pretrained`` does.
    Adapter leaves are an error (merge them first with ``merge_and_unload``) unless
    ``allow_adapters``, which passes them through under their own names.
    """
    params, _ = _unwrap(params)
    drop = set(drop) | ({head for head, _ in TIED_HEADS} if tie_word_embeddings else set())
    out: dict[str, np.ndarray] = {}
    for path, leaf in flatten(params).items():
        if path in drop:
            continue
        mod, _, name = path.rpartition("/")
        if name in ADAPTER_LEAVES and not allow_adapters:
            raise ValueError(
                f"{path!r} is an adapter leaf; merge adapters into the kernels first (merge_and_unload) "
                "or pass allow_adapters=True"
            )
        x = np.asarray(leaf)
        if name == "kernel" and x.ndim == 2:
            x = x.T
        elif name == "kernel" and x.ndim == 4:
            x = np.transpose(x, (3, 2, 0, 1))
        if dtype is not None and is_floating(x):
            x = x.astype(dtype)
        tname = _FLAX_TO_TORCH_LEAF.get(name, name)
        key = prefix + (mod.replace("/", ".") + "." if mod else "") + tname
        if key in out:
            raise ValueError(f"two Flax leaves map onto torch key {key!r} (second: {path!r})")
        out[key] = np.ascontiguousarray(x)
    return out
