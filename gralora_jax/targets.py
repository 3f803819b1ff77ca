"""Which modules get adapters: PEFT's target matching, over dotted module paths.

A module is a candidate when its parameter dict holds a ``kernel`` (linear layers). Matching
follows PEFT: ``target_modules`` as a string is a regex that must match the whole dotted path;
as a list, each entry matches the last name(s) of the path (``"q_proj"`` matches
``model.layers.0.self_attn.q_proj``). ``"all-linear"`` takes every linear layer but the output
head. ``layers_to_transform`` keeps only modules under the given layer indices of the layer
list (``layers_pattern``, else the usual names ``layers``, ``h``, ``layer``, ``block``, ``blocks``).

>>> select_targets(["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
...                 "model.layers.1.mlp.up_proj"], ["q_proj"], layers_to_transform=[1])
['model.layers.1.self_attn.q_proj']
"""

from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence, Union

COMMON_LAYER_PATTERNS = ("layers", "h", "layer", "block", "blocks", "encoder.layer", "decoder.block")
OUTPUT_HEADS = ("lm_head", "classifier", "qa_outputs", "score", "cls", "head")


def _matches(path: str, target_modules: Union[str, Sequence[str]]) -> bool:
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return path.rsplit(".", 1)[-1] not in OUTPUT_HEADS and not path.startswith(OUTPUT_HEADS)
        return re.fullmatch(target_modules, path) is not None
    return any(path == t or path.endswith("." + t) for t in target_modules)


def _layer_index(path: str, layers_pattern) -> Optional[int]:
    patterns = (layers_pattern,) if isinstance(layers_pattern, str) else (layers_pattern or COMMON_LAYER_PATTERNS)
    for pat in patterns:
        m = re.search(rf"(?:^|\.){re.escape(pat)}\.(\d+)(?:\.|$)", path)
        if m:
            return int(m.group(1))
    return None


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
    if layers_to_transform is not None and isinstance(target_modules, str) and target_modules != "all-linear":
        raise ValueError("layers_to_transform only works when target_modules is a list of module names (as in PEFT)")
    chosen = []
    for p in paths:
        if not _matches(p, target_modules):
            continue
        if layers_to_transform is not None:
            idx = _layer_index(p, layers_pattern)
            if idx is None or idx not in layers_to_transform:
                continue
        chosen.append(p)
    if not chosen:
        names = sorted({p.rsplit(".", 1)[-1] for p in paths})
        extra = f" within layers {list(layers_to_transform)}" if layers_to_transform is not None else ""
        raise ValueError(
            f"target_modules {target_modules!r} matched no linear module{extra}. "
            f"Linear module names in this model: {names}"
        )
    return chosen
