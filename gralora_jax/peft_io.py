"""PEFT's adapter format: tree paths <-> ``adapter_model.safetensors`` keys, and the files.

One mapping, both ways, made of each adapter kind's key table (:mod:`gralora_jax.kinds`; the
table below is today's kinds). A module at tree path ``model/layers/0/self_attn/q_proj`` is PEFT's
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

from gralora_jax import fileio, kinds
from gralora_jax import tree as tree_lib
from gralora_jax.config import CONFIG_NAME, AdapterConfig, load_adapter_config
from gralora_jax.loading.convert import is_floating
from gralora_jax.models import layout as layout_lib

PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"

# tree leaf name -> (PEFT key suffix, transposed?): every kind's table (gralora_jax.kinds), and biases
_LEAVES = {**kinds.PEFT_KEYS, "bias": ("bias", False)}
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
    flat, source = {}, {}
    for original, v in state_dict.items():
        key = original.replace(".default.weight", ".weight")
        if key.endswith(".default"):
            key = key[: -len(".default")]
        path = adapter_path(key)
        if path in source:
            raise ValueError(f"keys {source[path]!r} and {original!r} both name the adapter leaf {path!r}")
        source[path] = original
        a = np.asarray(v)
        flat[path] = a.T if _transposed(tree_lib.leaf_name(path)) else a
    return tree_lib.unflatten(flat)


def check_adapter_tensors(state_dict: Mapping[str, Any], where: str) -> None:
    """Refuse what no adapter file may hold: no tensors at all, non-float tensors (int/bool
    would be cast silently), NaN or Inf values. ``where`` starts each one-line error
    (the file being read, or what is being saved).

    >>> check_adapter_tensors({"a": np.array([1.0, np.nan])}, "adapter.safetensors")
    Traceback (most recent call last):
    ...
    ValueError: adapter.safetensors: tensor 'a' has 1 non-finite value(s) (NaN/Inf) out of 2
    """
    if not state_dict:
        raise ValueError(f"{where}: no adapter tensors")
    for key, v in state_dict.items():
        a = np.asarray(v)
        if not is_floating(a):
            raise ValueError(f"{where}: tensor {key!r} has dtype {a.dtype}; adapter tensors must be floating point")
        bad = a.size - int(np.count_nonzero(np.isfinite(a.astype(np.float32))))
        if bad:
            raise ValueError(f"{where}: tensor {key!r} has {bad} non-finite value(s) (NaN/Inf) out of {a.size}")


def save_adapter(directory: Union[str, os.PathLike], config: AdapterConfig, adapters: Mapping[str, Any], *, config_overrides=None) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` as PEFT does.

    Everything is checked before anything is written (there are tensors, all floating point
    and finite: :func:`check_adapter_tensors`); then the tensors and after them the config are
    each written atomically (:mod:`gralora_jax.fileio`), so an interrupted or refused save
    never leaves a new config beside old weights, nor a partial weights file.
    """
    from gralora_jax.loading import write_safetensors

    d = config.to_peft_dict()
    d.update(config_overrides or {})
    text = json.dumps(d, indent=2, sort_keys=True)
    sd = to_peft_state_dict(adapters)
    check_adapter_tensors(sd, f"refusing to save the adapter to {fileio.path_str(directory)}")
    fileio.makedirs(directory)
    write_safetensors(sd, fileio.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    fileio.atomic_write_text(fileio.join(directory, CONFIG_NAME), text)


def load_adapter(directory: Union[str, os.PathLike], *, authors_convention: bool = False) -> tuple[AdapterConfig, dict]:
    """Read a PEFT adapter directory -> ``(config, adapter sub-tree)``.

    Refuses, with one line naming the file and key: a malformed config, non-float or
    non-finite tensors, and two keys naming one leaf (``X`` and ``X.default``).
    """
    from gralora_jax.loading import read_safetensors_file

    config = load_adapter_config(directory, authors_convention=authors_convention)
    w = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(w):
        sd = read_safetensors_file(w)
    elif os.path.isfile(os.path.join(directory, "adapter_model.bin")):
        raise ValueError(f"{directory}: adapter_model.bin (torch pickle) is not supported; re-save with safetensors")
    else:
        raise FileNotFoundError(f"{directory}: no {WEIGHTS_NAME}")
    check_adapter_tensors(sd, w)
    try:
        return config, from_peft_state_dict(sd)
    except ValueError as e:
        raise ValueError(f"{w}: {e}") from None
