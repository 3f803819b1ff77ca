"""Paths over the parameter tree: the one source of truth for what is an adapter.

Adapters live beside the kernel they adapt
(``model/layers/0/self_attn/q_proj/{kernel, gralora_A, gralora_B}``), so whether a
leaf trains, how it is sharded and what PEFT calls it are all functions of its
``/``-joined path. This module holds those path helpers and nothing else; which leaf names
are adapters, and which ``bias`` choices exist, is the kind registry's (:mod:`gralora_jax.kinds`).

>>> params = {"q_proj": {"kernel": 1, "gralora_A": 2, "gralora_B": 3}}
>>> adapters, base = split_adapters(params)
>>> adapters, base
({'q_proj': {'gralora_A': 2, 'gralora_B': 3}}, {'q_proj': {'kernel': 1}})
>>> combine(adapters, base) == params
True
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from gralora_jax import kinds

ADAPTER_LEAVES = kinds.ADAPTER_LEAVES  # every registered kind's leaf names

Tree = Mapping[str, Any]


def _as_dict(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _as_dict(v) for k, v in tree.items()}
    return tree


def flatten(tree: Tree, sep: str = "/") -> dict[str, Any]:
    """Nested mapping -> ``{"a/b/c": leaf}`` (keys in insertion order)."""
    out: dict[str, Any] = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}{sep}{k}" if prefix else str(k))
        else:
            out[prefix] = node

    walk(tree, "")
    return out


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """Inverse of :func:`flatten`."""
    out: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = out
        *parents, last = path.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return out


def leaf_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def is_adapter_path(path: str) -> bool:
    """True for adapter leaves (``.../gralora_A`` etc.)."""
    return leaf_name(path) in ADAPTER_LEAVES


def adapted_modules(params: Tree) -> list[str]:
    """Paths of the modules that hold adapter leaves, in tree order."""
    seen: dict[str, None] = {}
    for path in flatten(params):
        if is_adapter_path(path):
            seen[path.rsplit("/", 1)[0]] = None
    return list(seen)


def filter_tree(tree: Tree, keep: Callable[[str], bool]) -> dict[str, Any]:
    """The sub-tree of leaves whose path satisfies ``keep`` (empty dicts dropped)."""
    return unflatten({p: v for p, v in flatten(tree).items() if keep(p)})


def split_adapters(params: Tree) -> tuple[dict, dict]:
    """``(adapter leaves, everything else)`` as two disjoint nested dicts."""
    return filter_tree(params, is_adapter_path), filter_tree(params, lambda p: not is_adapter_path(p))


def combine(*trees: Tree) -> dict[str, Any]:
    """Union of disjoint trees; a path present in two trees is an error."""
    out: dict[str, Any] = {}
    for t in trees:
        for p, v in flatten(t).items():
            if p in out:
                raise ValueError(f"combine: path {p!r} is present in more than one tree")
            out[p] = v
    return unflatten(out)


def trainable_predicate(bias: str = "none", full: bool = False) -> Callable[[str], bool]:
    """Which leaves train, as a predicate on the path.

    ``bias`` follows PEFT: ``"none"`` (adapters only), a kind's ``"<kind>_only"``
    (``gralora_only``, ``lora_only``: also the bias of adapted modules, see
    :func:`trainable_mask`), ``"all"`` (also every bias). ``full=True`` trains everything
    (full fine-tuning).
    """
    if bias not in kinds.BIAS_CHOICES:
        raise ValueError(f"bias must be one of {'/'.join(kinds.BIAS_CHOICES)}, got {bias!r}")

    def pred(path: str) -> bool:
        if full or is_adapter_path(path):
            return True
        if leaf_name(path) != "bias":
            return False
        return bias == "all"

    return pred


def trainable_mask(params: Tree, bias: str = "none", full: bool = False) -> dict[str, Any]:
    """Same structure as ``params`` with ``True`` on trainable leaves (an optax mask)."""
    pred = trainable_predicate(bias, full)
    flat = flatten(params)
    adapted = set(adapted_modules(params)) if bias in kinds.BIAS_ONLY else set()
    return unflatten(
        {p: bool(pred(p) or (leaf_name(p) == "bias" and p.rsplit("/", 1)[0] in adapted)) for p in flat}
    )


def split_trainable(params: Tree, mask: Tree) -> tuple[dict, dict]:
    """``(trainable, frozen)`` according to a boolean mask of the same structure."""
    m = flatten(mask)
    return filter_tree(params, lambda p: m[p]), filter_tree(params, lambda p: not m[p])

