"""Which modules get adapters: PEFT's target matching, over dotted module paths.

A module is a candidate when its parameter dict holds a ``kernel`` (linear layers). Matching
follows PEFT: ``target_modules`` as a string is a regex that must match the whole dotted path;
as a list, each entry matches the last name(s) of the path (``"q_proj"`` matches
``model.layers.0.self_attn.q_proj``). ``"all-linear"`` takes every linear layer but the output
head. ``layers_to_transform`` keeps only modules under the given layer indices of the layer
list: the number after the first ``<layers_pattern>.`` in the path, or (no pattern) the
first numbered segment ``<name>.<i>.`` after a dot, as PEFT does (``model.layers.3.mlp`` -> 3,
``encoder.block.1.layer.0.SelfAttention.q`` -> 1).

>>> select_targets(["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
...                 "model.layers.1.mlp.up_proj"], ["q_proj"], layers_to_transform=[1])
['model.layers.1.self_attn.q_proj']
"""

from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence, Union

from gralora_jax.families import FAMILIES

OUTPUT_HEADS = ("lm_head", "classifier", "qa_outputs", "score", "cls", "head")

# What PEFT targets when ``target_modules`` is None, per ``config.model_type`` (the families we test).
# (From the family table, gralora_jax.families.)
DEFAULT_TARGET_MODULES = {t: f.default_targets for t, f in FAMILIES.items()}


def default_target_modules(model_type: Optional[str]) -> Optional[tuple[str, ...]]:
    """PEFT's default targets for a transformers ``model_type`` (None when unknown).

    >>> default_target_modules("llama")
    ('q_proj', 'v_proj')
    """
    return DEFAULT_TARGET_MODULES.get(model_type)


def _matches(path: str, target_modules: Union[str, Sequence[str]]) -> bool:
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return path.rsplit(".", 1)[-1] not in OUTPUT_HEADS and not path.startswith(OUTPUT_HEADS)
        return re.fullmatch(target_modules, path) is not None
    return any(path == t or path.endswith("." + t) for t in target_modules)


def _layer_index(path: str, layers_pattern) -> Optional[int]:
    """PEFT's rule: the first ``<name>.<digits>.`` segment after a dot (any name when no pattern)."""
    if isinstance(layers_pattern, str):
        layers_pattern = (layers_pattern,)
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", path)
    else:
        m = None
        for pat in layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pat}\.(\d+)\.", path)
            if m is not None:
                break
    return int(m.group(1)) if m else None


def select_targets(
    module_paths: Iterable[str],
    target_modules: Union[str, Sequence[str], None],
    layers_to_transform: Union[int, Sequence[int], None] = None,
    layers_pattern: Union[str, Sequence[str], None] = None,
) -> list[str]:
    """The dotted module paths that get an adapter, in the given order.

    Raises ``ValueError`` when ``target_modules`` is missing or matches nothing; the message
    lists the module names that exist.
    """
    paths = list(module_paths)
    if target_modules is None:
        raise ValueError(
            "target_modules must be given (a list of module-name suffixes, a regex, or 'all-linear'); "
            f"linear modules in this model: {sorted({p.rsplit('.', 1)[-1] for p in paths})}"
        )
    if isinstance(layers_to_transform, int):
        layers_to_transform = [layers_to_transform]
    if layers_to_transform and isinstance(target_modules, str) and target_modules != "all-linear":
        raise ValueError("layers_to_transform only works when target_modules is a list of module names (as in PEFT)")
    chosen = []
    for p in paths:
        if not _matches(p, target_modules):
            continue
        exact = not isinstance(target_modules, str) and p in target_modules  # PEFT: no layer filter then
        if layers_to_transform and not exact:
            idx = _layer_index(p, layers_pattern)
            if idx is None or idx not in layers_to_transform:
                continue
        chosen.append(p)
    if not chosen:
        names = sorted({p.rsplit(".", 1)[-1] for p in paths})
        extra = f" within layers {list(layers_to_transform)}" if layers_to_transform else ""
        raise ValueError(
            f"target_modules {target_modules!r} matched no linear module{extra}. "
            f"Linear module names in this model: {names}"
        )
    return chosen
