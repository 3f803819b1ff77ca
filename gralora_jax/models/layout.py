"""Convert between the unrolled (``model/layers/<i>/...``) and scanned (``model/layers/scan/...``) layouts.

``scan_layers=True`` models keep one stacked copy of every layer leaf with a leading
layer axis. Checkpoints, PEFT adapters and the surgery all use the unrolled layout, so
convert at the boundary. Any leaf under a layer is stacked, adapter leaves included.
Paths are named the same way: a scanned module ``model/layers/scan/mlp/up_proj`` stands for
the unrolled modules ``model/layers/<i>/mlp/up_proj`` (:func:`layer_path`), which is how
target matching and PEFT keys see it.

>>> import numpy as np
>>> p = {"model": {"layers": {"0": {"w": np.zeros(2)}, "1": {"w": np.ones(2)}}, "norm": {"weight": 1}}}
>>> s = stack_layer_params(p)
>>> s["model"]["layers"]["scan"]["w"].shape
(2, 2)
>>> unstack_layer_params(s)["model"]["layers"]["1"]["w"].tolist()
[1.0, 1.0]
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


SCAN = "scan"  # name of the nn.scan sub-module that holds the stacked layers (under model/layers)
_SCAN_SEGMENT = "/layers/" + SCAN + "/"


def is_scanned_path(path: str) -> bool:
    """True for a ``/``-joined path inside the stacked layers (``model/layers/scan/...``).

    >>> is_scanned_path("model/layers/scan/self_attn/q_proj"), is_scanned_path("model/layers/3/mlp")
    (True, False)
    """
    return _SCAN_SEGMENT in "/" + path + "/"


def layer_path(path: str, i: int) -> str:
    """The unrolled path of layer ``i`` of a scanned path.

    >>> layer_path("model/layers/scan/self_attn/q_proj", 3)
    'model/layers/3/self_attn/q_proj'
    """
    if not is_scanned_path(path):
        raise ValueError(f"{path!r} is not a path inside scanned layers (.../layers/{SCAN}/...)")
    head, tail = ("/" + path + "/").split(_SCAN_SEGMENT, 1)
    return f"{head}/layers/{i}/{tail}".strip("/")


def is_scanned(params: Mapping) -> bool:
    """True when ``params`` holds stacked layers (``model/layers/scan``)."""
    try:
        return SCAN in params["model"]["layers"]
    except (KeyError, TypeError):
        return False


def _layers(params: Mapping) -> Mapping:
    try:
        return params["model"]["layers"]
    except (KeyError, TypeError):
        raise ValueError("params have no model/layers sub-tree") from None


def _with_layers(params: Mapping, layers: Any) -> dict:
    out = dict(params)
    out["model"] = dict(params["model"])
    out["model"]["layers"] = layers
    return out


def stack_layer_params(params: Mapping) -> dict:
    """``model/layers/<i>/...`` -> ``model/layers/scan/...`` with a leading layer axis."""
    layers = _layers(params)
    if "scan" in layers:
        return dict(params)
    keys = sorted(layers, key=int)
    if keys != [str(i) for i in range(len(keys))]:
        raise ValueError(f"layer keys must be 0..n-1, got {keys}")
    per_layer = [layers[k] for k in keys]
    structs = {jax.tree_util.tree_structure(p) for p in per_layer}
    if len(structs) > 1:
        raise ValueError("layers have different parameter structures; they can't be stacked for nn.scan")

    def stack(*xs):
        if all(isinstance(x, np.ndarray) for x in xs):
            return np.stack(xs)
        return jnp.stack(xs)

    return _with_layers(params, {"scan": jax.tree_util.tree_map(stack, *per_layer)})


def unstack_layer_params(params: Mapping) -> dict:
    """``model/layers/scan/...`` -> ``model/layers/<i>/...`` (inverse of :func:`stack_layer_params`)."""
    layers = _layers(params)
    if "scan" not in layers:
        return dict(params)
    stacked = layers["scan"]
    leaves = jax.tree_util.tree_leaves(stacked)
    n = leaves[0].shape[0]
    return _with_layers(
        params, {str(i): jax.tree_util.tree_map(lambda x, i=i: x[i], stacked) for i in range(n)})
