"""PEFT's adapter format: tree paths <-> ``adapter_model.safetensors`` keys, and the files.

One mapping, both ways. A module at tree path ``model/layers/0/self_attn/q_proj`` is PEFT's
``model.layers.0.self_attn.q_proj``; its saved keys are prefixed ``base_model.model.``:

==========================  ==========================================  =================
tree leaf                   PEFT key suffix                             layout change
==========================  ==========================================  =================
``gralora_A`` [k, in/k, r]  ``.gralora_A``                              none
``gralora_B`` [k, r, out/k] ``.gralora_B``                              none
``gralora_A_general``       ``.gralora_A_general.weight``               transpose
``gralora_B_general``       ``.gralora_B_general.weight``               transpose
``lora_A`` [in, r]          ``.lora_A.weight``                          transpose
``lora_B`` [r, out]         ``.lora_B.weight``                          transpose
``bias`` (bias != none)     ``.bias``, or ``.base_layer.bias`` on an    none
                            adapted module (PEFT wraps it)
==========================  ==========================================  =================

>>> adapter_key("model/layers/0/self_attn/q_proj/gralora_A")
'base_model.model.model.layers.0.self_attn.q_proj.gralora_A'
>>> adapter_path("base_model.model.model.layers.0.self_attn.q_proj.gralora_A_general.weight")
'model/layers/0/self_attn/q_proj/gralora_A_general'

Stacked (``scan_layers=True``) adapters ``model/layers/scan/...`` ``[L, ...]`` are written as the
L unrolled layers' keys, so a scanned model's file is the unrolled model's file; reading always
gives the unrolled tree (:meth:`gralora_jax.surgery.GraLoRAModel.from_pretrained` stacks it).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Union

import numpy as np

from gralora_jax import tree as tree_lib
from gralora_jax.config import AdapterConfig, load_adapter_config
from gralora_jax.models import layout as layout_lib

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# tree leaf name -> (PEFT key suffix, transposed?)
_LEAVES = {
    "gralora_A": ("gralora_A", False),
    "gralora_B": ("gralora_B", False),
    "gralora_A_general": ("gralora_A_general.weight", True),
    "gralora_B_general": ("gralora_B_general.weight", True),
    "lora_A": ("lora_A.weight", True),
    "lora_B": ("lora_B.weight", True),
    "bias": ("bias", False),
}
_SUFFIXES = sorted(((s, name, t) for name, (s, t) in _LEAVES.items()), key=lambda x: -len(x[0]))


def adapter_key(path: str, *, adapted: bool = False) -> str:
    """Tree path of an adapter leaf -> PEFT saved key.

    ``adapted=True`` marks a ``bias`` whose module holds an adapter: PEFT wraps such a module,
    so its bias is saved as ``<module>.base_layer.bias``.
    """
    module, leaf = path.rsplit("/", 1)
    if leaf not in _LEAVES:
        raise ValueError(f"{path!r} is not an adapter leaf")
    suffix = "base_layer.bias" if (leaf == "bias" and adapted) else _LEAVES[leaf][0]
    return PREFIX + module.replace("/", ".") + "." + suffix


def adapter_path(key: str) -> str:
    """PEFT saved key -> tree path of the adapter leaf."""
    if not key.startswith(PREFIX):
        raise ValueError(f"PEFT adapter key {key!r} does not start with {PREFIX!r}")
    body = key[len(PREFIX):]
    if body.endswith(".base_layer.bias"):
        return body[: -len(".base_layer.bias")].replace(".", "/") + "/bias"
    for suffix, name, _ in _SUFFIXES:
        if body.endswith("." + suffix):
            return body[: -len(suffix) - 1].replace(".", "/") + "/" + name
    raise ValueError(f"unrecognised PEFT adapter key {key!r}")


def _transposed(leaf: str) -> bool:
    return _LEAVES[leaf][1]


def to_peft_state_dict(adapters: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Adapter sub-tree (nested dict, unrolled or scanned) -> ``{peft_key: array}`` in PEFT's layouts."""
    if layout_lib.is_scanned(adapters):
        adapters = layout_lib.unstack_layer_params(adapters)
    out = {}
    adapted = set(tree_lib.adapted_modules(adapters))
    for path, v in tree_lib.flatten(adapters).items():
        a = np.asarray(v)
        key = adapter_key(path, adapted=path.rsplit("/", 1)[0] in adapted)
        if key in out:
            raise ValueError(f"two tree leaves map to the PEFT key {key!r}")
        out[key] = np.ascontiguousarray(a.T if _transposed(tree_lib.leaf_name(path)) else a)
    return dict(sorted(out.items()))  # one key order whatever the tree's (scanned or not): same file bytes


def from_peft_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``{peft_key: array}`` -> adapter sub-tree in this project's layouts.

    Also accepts PEFT's in-memory keys (with the adapter name ``.default``).
    """
    flat = {}
    for key, v in state_dict.items():
        key = key.replace(".default.weight", ".weight")
        if key.endswith(".default"):
            key = key[: -len(".default")]
        path = adapter_path(key)
        a = np.asarray(v)
        flat[path] = a.T if _transposed(tree_lib.leaf_name(path)) else a
    return tree_lib.unflatten(flat)


def save_adapter(directory: Union[str, os.PathLike], config: AdapterConfig, adapters: Mapping[str, Any], *, config_overrides=None) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT does."""
    from gralora_jax.loading import write_safetensors

    os.makedirs(directory, exist_ok=True)
    d = config.to_peft_dict()
    d.update(config_overrides or {})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
    sd = to_peft_state_dict(adapters)
    if not sd:
        raise ValueError("no adapter tensors to save")
    write_safetensors(sd, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})


def load_adapter(directory: Union[str, os.PathLike], *, authors_convention: bool = False) -> tuple[AdapterConfig, dict]:
    """Read a PEFT adapter directory -> ``(config, adapter sub-tree)``."""
    from gralora_jax.loading import read_safetensors_file

    config = load_adapter_config(directory, authors_convention=authors_convention)
    w = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(w):
        sd = read_safetensors_file(w)
    elif os.path.isfile(os.path.join(directory, "adapter_model.bin")):
        raise ValueError(f"{directory}: adapter_model.bin (torch pickle) is not supported; re-save with safetensors")
    else:
        raise FileNotFoundError(f"{directory}: no {WEIGHTS_NAME}")
    return config, from_peft_state_dict(sd)
