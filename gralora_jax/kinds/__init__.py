"""Adapter kinds: one module per kind, one table that the rest of the package asks.

A kind (GraLoRA, LoRA, rsLoRA) is everything that differs between adapters, held by one
:class:`~gralora_jax.kinds.base.AdapterKind` in its own module: the config class that selects
it, its leaf names, its init (one function, drawn on the host by surgery and from a jax key by
the Flax layers), its output and weight delta, its scale (read as ``config.scaling``), its PEFT
key names and which are stored transposed, its partition-spec rule, and its ``order`` among the
kinds (the first kind holding a leaf owns it). :data:`KINDS` is the table; config reading
(:func:`gralora_jax.config.config_from_peft_dict`), surgery, the tree masks, the train mask,
sharding and PEFT I/O ask it, never ``isinstance`` or a leaf-name branch.

>>> from gralora_jax.config import LoRAConfig
>>> [k for k in KINDS]
['gralora', 'lora', 'rslora']
>>> _kind_modules(__path__)  # the modules found in this package (registered by order, not by name)
['gralora', 'lora', 'rslora']
>>> kind_of(LoRAConfig(r=4, lora_alpha=8, use_rslora=True)).name, LoRAConfig(r=4, lora_alpha=8, use_rslora=True).scaling
('rslora', 4.0)
>>> kind_for_peft_dict({"peft_type": "LORA", "r": 4}).name
'lora'

Adding a kind is one new file plus tests: write ``gralora_jax/kinds/<name>.py`` defining
``KIND = AdapterKind(...)`` (or ``dataclasses.replace`` of a kind it varies, as
:mod:`~gralora_jax.kinds.rslora` does) with an unused ``order``. Every public module of this
package but ``base`` is a kind module, found at import (:func:`_load`) and registered by
``order``, so nothing else lists it. Then test it (``tests/test_kinds.py`` checks every
registered kind for completeness, host/jax init agreement and a PEFT round trip). A kind that
shares its config class and ``peft_type`` with another sets ``selects``, a predicate on the
config's fields.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Mapping

import numpy as np

from gralora_jax.kinds.base import AdapterKind, MeshAxes, host_uniform, key_uniform

__all__ = ["AdapterKind", "MeshAxes", "KINDS", "ADAPTER_LEAVES", "PEFT_KEYS", "BIAS_CHOICES", "BIAS_ONLY",
           "kind_of", "kind_for_peft_dict", "kind_of_adapter", "kind_of_leaf", "init_on_host", "init_from_key"]

_NOT_KINDS = ("base",)  # modules of the package that define no kind


def _kind_modules(path) -> list[str]:
    """The kind modules under ``path`` (a package's ``__path__``): every module but ``base``,
    private (``_x``) and test (``x_test``) ones, by name."""
    return sorted(m.name for m in pkgutil.iter_modules(path)
                  if not (m.ispkg or m.name in _NOT_KINDS or m.name.startswith("_") or m.name.endswith("_test")))


def _load(package: str = __name__, path=__path__) -> dict[str, AdapterKind]:
    """Import every kind module of ``package`` and register its ``KIND``, lowest ``order`` first."""
    found = []
    for name in _kind_modules(path):
        kind = getattr(importlib.import_module(f"{package}.{name}"), "KIND", None)
        if not isinstance(kind, AdapterKind):
            raise ImportError(f"{package}.{name} is a kind module but defines no KIND = AdapterKind(...)")
        found.append(kind)
    kinds: dict[str, AdapterKind] = {}
    for kind in sorted(found, key=lambda k: k.order):
        clash = next((k for k in kinds.values() if kind.order == k.order or kind.name == k.name), None)
        if clash is not None:
            raise ValueError(f"adapter kinds {clash.name!r} and {kind.name!r} share a name or an order ({kind.order})")
        kinds[kind.name] = kind
    return kinds


KINDS: dict[str, AdapterKind] = _load()


def _check(kinds: Mapping[str, AdapterKind]) -> None:
    """At import: each kind complete; kinds sharing a leaf agree on it; one default per config class."""
    owner: dict[str, AdapterKind] = {}
    defaults: dict[type, str] = {}
    for kind in kinds.values():
        if set(kind.peft_keys) != set(kind.leaves) or not kind.leaves:
            raise ValueError(f"adapter kind {kind.name!r}: peft_keys must name exactly its leaves {kind.leaves}")
        if kind.selects is None:
            if kind.config_class in defaults:
                raise ValueError(f"kinds {defaults[kind.config_class]!r} and {kind.name!r} are both the default "
                                 f"of {kind.config_class.__name__}: give one a `selects` predicate")
            defaults[kind.config_class] = kind.name
        for leaf in kind.leaves:
            first = owner.setdefault(leaf, kind)
            if (first.peft_keys[leaf], first.partition_spec) != (kind.peft_keys[leaf], kind.partition_spec):
                raise ValueError(f"kinds {first.name!r} and {kind.name!r} share the leaf {leaf!r} but disagree "
                                 "on its PEFT key or partition spec")
    for kind in kinds.values():
        if kind.config_class not in defaults:
            raise ValueError(f"adapter kind {kind.name!r}: {kind.config_class.__name__} has no default kind")


_check(KINDS)

ADAPTER_LEAVES: tuple[str, ...] = tuple(dict.fromkeys(leaf for k in KINDS.values() for leaf in k.leaves))
PEFT_KEYS: dict[str, tuple[str, bool]] = {leaf: (s, t) for k in KINDS.values() for leaf, (s, t) in k.peft_keys.items()}
BIAS_ONLY: tuple[str, ...] = tuple(dict.fromkeys(k.bias_only for k in KINDS.values()))
BIAS_CHOICES: tuple[str, ...] = ("none", "all") + BIAS_ONLY  # every ``bias`` value some kind accepts
PEFT_TYPES: tuple[str, ...] = tuple(dict.fromkeys(k.peft_type for k in KINDS.values()))
CONFIG_CLASSES: tuple[type, ...] = tuple(dict.fromkeys(k.config_class for k in KINDS.values()))


def _pick(candidates: list[AdapterKind], get) -> AdapterKind:
    """The candidate whose ``selects`` holds, else the default (``selects=None``) one."""
    chosen = [k for k in candidates if k.selects is not None and k.selects(get)]
    if len(chosen) > 1:
        raise ValueError(f"adapter kinds {[k.name for k in chosen]} all claim this config")
    return chosen[0] if chosen else next(k for k in candidates if k.selects is None)


def kind_of(config: Any) -> AdapterKind:
    """The kind of an adapter config object; ``TypeError`` for anything else."""
    candidates = [k for k in KINDS.values() if isinstance(config, k.config_class)]
    if not candidates:
        raise TypeError(f"config must be a {' or '.join(c.__name__ for c in CONFIG_CLASSES)}, "
                        f"got {type(config).__name__}")
    return _pick(candidates, lambda name, default: getattr(config, name, default))


def kind_for_peft_dict(d: Mapping[str, Any]) -> AdapterKind:
    """The kind an ``adapter_config.json`` dict describes (its ``peft_type``, then ``selects``)."""
    peft_type = str(d.get("peft_type", "")).upper()
    candidates = [k for k in KINDS.values() if k.peft_type == peft_type]
    if not candidates:
        raise ValueError(f"unsupported peft_type {d.get('peft_type')!r}: expected {' or '.join(PEFT_TYPES)}")
    return _pick(candidates, d.get)


def kind_of_leaf(leaf: str) -> AdapterKind:
    """The first registered kind (lowest ``order``) holding ``leaf`` (kinds sharing a leaf agree on it, see ``_check``)."""
    for kind in KINDS.values():
        if leaf in kind.leaves:
            return kind
    raise ValueError(f"{leaf!r} is not an adapter leaf (adapter leaves: {ADAPTER_LEAVES})")


def kind_of_adapter(adapter: Mapping[str, Any]) -> AdapterKind:
    """The kind of a module's leaf dict (extra leaves such as ``kernel`` ignored): the first
    registered kind whose first leaf it holds. Kinds sharing leaves (LoRA, rsLoRA) differ only
    in their scale, which the caller passes from the config."""
    for kind in KINDS.values():
        if kind.leaves[0] in adapter:
            return kind
    raise ValueError(f"not an adapter: keys {sorted(adapter)}")


def init_on_host(gen: np.random.Generator, config: Any, in_features: int, out_features: int, dtype) -> dict:
    """The config's kind's init, drawn from a numpy generator (surgery)."""
    return kind_of(config).init(host_uniform(gen), config, in_features, out_features, dtype)


def init_from_key(key, config: Any, in_features: int, out_features: int, dtype) -> dict:
    """The config's kind's init, drawn from a jax key (the Flax layers)."""
    kind = kind_of(config)
    return kind.init(key_uniform(key, kind.leaves), config, in_features, out_features, dtype)
