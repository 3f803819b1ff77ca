"""Adapter configurations: ``GraLoRAConfig`` (PEFT's GraLoRA) and ``LoRAConfig`` (the baseline,
and rsLoRA with ``use_rslora=True``).

Both are frozen dataclasses with PEFT's field names and defaults, validated on construction
with PEFT's exact error messages, and convertible to and from the dict PEFT writes to
``adapter_config.json``. Which adapter kind a config stands for, and so its ``scaling``, is
the kind registry's answer (:mod:`gralora_jax.kinds`).

>>> cfg = GraLoRAConfig(r=16, alpha=32, gralora_k=4, target_modules=["q_proj", "v_proj"])
>>> cfg.scaling
2.0
>>> GraLoRAConfig.from_peft_dict(cfg.to_peft_dict()) == cfg
True
>>> GraLoRAConfig(r=6, gralora_k=4)
Traceback (most recent call last):
...
ValueError: r should be divisible by gralora_k, but got 6 and 4
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Optional, Sequence, Union

from gralora_jax import fileio

CONFIG_NAME = "adapter_config.json"

TargetModules = Union[str, tuple[str, ...], None]

_BIAS_CHOICES = ("none", "all", "gralora_only")
PEFT_VERSION = "0.21.2"


def _as_tuple(v):
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, int):
        return (v,)
    return tuple(v)


# JSON type rules for adapter_config.json fields, one table for both config classes:
# field -> (what it must be, check). Fields not listed are not read (or are free-form).
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_str_or_list_of(check):
    return lambda v: v is None or check(v) or (isinstance(v, list) and all(check(x) for x in v))


_FIELD_TYPES = {
    "r": ("an integer", _is_int),
    "hybrid_r": ("an integer", _is_int),
    "gralora_k": ("an integer", _is_int),
    "alpha": ("a number", _is_number),
    "lora_alpha": ("a number", _is_number),
    "gralora_dropout": ("a number", _is_number),
    "lora_dropout": ("a number", _is_number),
    "fan_in_fan_out": ("true or false", lambda v: isinstance(v, bool)),
    "init_weights": ("true or false", lambda v: isinstance(v, bool)),
    "init_lora_weights": ("true or false", lambda v: isinstance(v, bool)),
    "use_rslora": ("true or false", lambda v: isinstance(v, bool)),
    "use_dora": ("true or false", lambda v: isinstance(v, bool)),
    "bias": ("a string", lambda v: isinstance(v, str)),
    "target_modules": ("a string, a list of strings or null", _is_str_or_list_of(lambda x: isinstance(x, str))),
    "layers_to_transform": ("an integer, a list of integers or null", _is_str_or_list_of(_is_int)),
    "layers_pattern": ("a string, a list of strings or null", _is_str_or_list_of(lambda x: isinstance(x, str))),
    "modules_to_save": ("a list of strings or null", lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v))),
    "base_model_name_or_path": ("a string or null", lambda v: v is None or isinstance(v, str)),
    "task_type": ("a string or null", lambda v: v is None or isinstance(v, str)),
}

def _check_field_types(d: dict[str, Any]) -> None:
    for name, (want, ok) in _FIELD_TYPES.items():
        if name in d and not ok(d[name]):
            raise ValueError(f"field {name!r} must be {want}, got {d[name]!r} ({type(d[name]).__name__})")


def _kind(config):
    """The config's adapter kind (imported on use: the kind modules import this one)."""
    from gralora_jax import kinds

    return kinds.kind_of(config)


def _warn_missing_fields(d: dict[str, Any], fields: Sequence[str], cls, source: str) -> None:
    """Fields whose absence from adapter_config.json silently changes the adapter's outputs
    (PEFT's default is assumed): one warning each."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for name in fields:
        if name not in d:
            warnings.warn(
                f"{source} has no {name!r}; assuming PEFT's default {defaults.get(name, False)!r}, which may not be "
                f"what the adapter was trained with",
                stacklevel=4,
            )


def _check_rank(r: int, hybrid_r: int = 0) -> None:
    """PEFT's per-layer checks (raised when the adapter meets a layer; here also at config time)."""
    if r <= 0:
        raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
    if hybrid_r < 0:
        raise ValueError(f"`hybrid_r` should be a non-negative integer value but the value passed is {hybrid_r}")


def check_layer_divisible(in_features: int, out_features: int, gralora_k: int) -> None:
    """PEFT's layer-shape checks, with its messages."""
    if in_features % gralora_k != 0:
        raise ValueError(f"in_features should be divisible by gralora_k, but got {in_features} and {gralora_k}")
    if out_features % gralora_k != 0:
        raise ValueError(f"out_features should be divisible by gralora_k, but got {out_features} and {gralora_k}")


@dataclasses.dataclass(frozen=True)
class GraLoRAConfig:
    """GraLoRA adapter settings, field for field PEFT's ``GraloraConfig``."""

    r: int = 32  # GraLoRA rank (parameter count of LoRA rank r); each of the k*k blocks has rank r/k
    alpha: int = 64  # scaling numerator: scale = alpha / (r + hybrid_r)
    gralora_k: int = 2  # number of input/output blocks; r must be divisible by it
    hybrid_r: int = 0  # rank of the extra plain-LoRA path shared by all blocks (hybrid GraLoRA)
    gralora_dropout: float = 0.0  # dropout on the adapter input (never on the base path)
    target_modules: TargetModules = None  # module-name suffixes, or a regex on the dotted path
    layers_to_transform: Optional[tuple[int, ...]] = None  # only these layer indices (list targets only)
    layers_pattern: Union[str, tuple[str, ...], None] = None  # name of the layer list ("layers", "h", ...)
    fan_in_fan_out: bool = False  # the base stores its weight as (fan_in, fan_out) in torch (GPT-2 Conv1D)
    bias: str = "none"  # which biases train: none / all / gralora_only
    init_weights: bool = True  # PEFT init (B = 0); False makes B random too (testing)
    modules_to_save: Optional[tuple[str, ...]] = None  # extra fully-trained modules (recorded only)
    base_model_name_or_path: Optional[str] = None  # recorded in adapter_config.json
    task_type: Optional[str] = None  # e.g. "CAUSAL_LM"; recorded in adapter_config.json

    peft_type = "GRALORA"
    method = "gralora"

    def __post_init__(self):
        for name in ("target_modules", "layers_to_transform", "layers_pattern", "modules_to_save"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))
        if self.gralora_k <= 0:
            raise ValueError(
                f"`gralora_k` should be a positive integer value but the value passed is {self.gralora_k}"
            )
        if self.r % self.gralora_k != 0:
            raise ValueError(f"r should be divisible by gralora_k, but got {self.r} and {self.gralora_k}")
        _check_rank(self.r, self.hybrid_r)
        if self.bias not in _BIAS_CHOICES:
            raise ValueError(f"bias must be one of {_BIAS_CHOICES}, got {self.bias!r}")
        if not 0.0 <= self.gralora_dropout < 1.0:
            raise ValueError(f"gralora_dropout must be in [0, 1), got {self.gralora_dropout}")

    @property
    def scaling(self) -> float:
        """The adapter's scale, by its kind (:mod:`gralora_jax.kinds`): the only place it is computed."""
        return _kind(self).scaling(self)

    @property
    def dropout(self) -> float:
        return self.gralora_dropout

    def to_peft_dict(self) -> dict[str, Any]:
        """The dict PEFT writes as ``adapter_config.json``."""
        return {
            "peft_type": self.peft_type,
            "peft_version": PEFT_VERSION,
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "revision": None,
            "inference_mode": False,
            "r": self.r,
            "hybrid_r": self.hybrid_r,
            "alpha": self.alpha,
            "gralora_k": self.gralora_k,
            "gralora_dropout": self.gralora_dropout,
            "target_modules": _target_modules_to_json(self.target_modules),
            "fan_in_fan_out": self.fan_in_fan_out,
            "bias": self.bias,
            "init_weights": self.init_weights,
            "modules_to_save": list(self.modules_to_save) if self.modules_to_save else None,
            "layers_to_transform": list(self.layers_to_transform) if self.layers_to_transform else None,
            "layers_pattern": (
                list(self.layers_pattern) if isinstance(self.layers_pattern, tuple) else self.layers_pattern
            ),
        }

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any], *, authors_convention: bool = False) -> "GraLoRAConfig":
        """Build from an ``adapter_config.json`` dict.

        ``authors_convention=True`` reads a config written by the paper authors' code, whose
        ``r`` is the total rank including ``hybrid_r`` (and whose scale is ``alpha / r``, which
        equals PEFT's ``alpha / (r_gralora + hybrid_r)``): the GraLoRA rank becomes ``r - hybrid_r``.
        """
        peft_type = d.get("peft_type", "GRALORA")
        if str(peft_type).upper() != "GRALORA":
            raise ValueError(f"not a GraLoRA adapter config: peft_type is {peft_type!r}")
        _check_field_types(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        if authors_convention:
            hybrid = int(kw.get("hybrid_r", 0))
            kw["r"] = int(kw.get("r", 32)) - hybrid
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Plain LoRA settings with PEFT LoRA's names: the baseline GraLoRA is compared against."""

    r: int = 8  # rank
    lora_alpha: int = 8  # scale = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora)
    lora_dropout: float = 0.0  # dropout on the adapter input
    target_modules: TargetModules = None  # as in GraLoRAConfig
    layers_to_transform: Optional[tuple[int, ...]] = None  # as in GraLoRAConfig
    layers_pattern: Union[str, tuple[str, ...], None] = None  # as in GraLoRAConfig
    fan_in_fan_out: bool = False  # as in GraLoRAConfig
    bias: str = "none"  # none / all / lora_only
    init_lora_weights: bool = True  # PEFT init: A Kaiming-uniform, B zeros
    use_rslora: bool = False  # rank-stabilised LoRA (the rslora kind): scale lora_alpha / sqrt(r)
    modules_to_save: Optional[tuple[str, ...]] = None  # recorded only
    base_model_name_or_path: Optional[str] = None  # recorded in adapter_config.json
    task_type: Optional[str] = None  # recorded in adapter_config.json

    peft_type = "LORA"
    method = "lora"

    def __post_init__(self):
        for name in ("target_modules", "layers_to_transform", "layers_pattern", "modules_to_save"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))
        _check_rank(self.r)
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be one of none/all/lora_only, got {self.bias!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")

    @property
    def scaling(self) -> float:
        """The adapter's scale, by its kind (:mod:`gralora_jax.kinds`): the only place it is computed."""
        return _kind(self).scaling(self)

    @property
    def dropout(self) -> float:
        return self.lora_dropout

    @property
    def init_weights(self) -> bool:
        return self.init_lora_weights

    def to_peft_dict(self) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type,
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "inference_mode": False,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": _target_modules_to_json(self.target_modules),
            "fan_in_fan_out": self.fan_in_fan_out,
            "bias": self.bias,
            "init_lora_weights": self.init_lora_weights,
            "modules_to_save": list(self.modules_to_save) if self.modules_to_save else None,
            "layers_to_transform": list(self.layers_to_transform) if self.layers_to_transform else None,
            "layers_pattern": (
                list(self.layers_pattern) if isinstance(self.layers_pattern, tuple) else self.layers_pattern
            ),
            "use_rslora": self.use_rslora,
            "use_dora": False,
        }

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any], *, authors_convention: bool = False) -> "LoRAConfig":
        """Build from an ``adapter_config.json`` dict (``authors_convention`` is GraLoRA's; ignored)."""
        if str(d.get("peft_type", "LORA")).upper() != "LORA":
            raise ValueError(f"not a LoRA adapter config: peft_type is {d.get('peft_type')!r}")
        _check_field_types(d)
        if d.get("use_dora"):
            raise ValueError("LoRA variant use_dora=True is not supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


AdapterConfig = Union[GraLoRAConfig, LoRAConfig]


def _target_modules_to_json(t):
    if t is None or isinstance(t, str):
        return t
    return sorted(t)


def config_from_peft_dict(
    d: dict[str, Any], *, authors_convention: bool = False, source: str = "the adapter config"
) -> AdapterConfig:
    """Pick the config class by the adapter kind the dict describes (:func:`gralora_jax.kinds.kind_for_peft_dict`).

    Field types are checked first (``r: "8"`` is an error, not a silent string); each field
    that changes the adapter's outputs but is missing (``alpha``, ``r``, ...) gets a one-line
    warning naming ``source``, since PEFT's default is then assumed.
    """
    from gralora_jax import kinds

    if not isinstance(d, dict):
        raise ValueError(f"an adapter config must be a JSON object, got {type(d).__name__}")
    kind = kinds.kind_for_peft_dict(d)  # an unknown peft_type is refused here
    _check_field_types(d)  # before the warnings: a present but wrong-typed field is an error, not "missing"
    _warn_missing_fields(d, kind.output_fields, kind.config_class, source)
    return kind.config_class.from_peft_dict(d, authors_convention=authors_convention)


def load_adapter_config(directory: Union[str, os.PathLike], **kw) -> AdapterConfig:
    """Read ``adapter_config.json`` from a PEFT adapter directory (``kw`` as in :func:`config_from_peft_dict`).

    Every problem with the file is a one-line ``ValueError`` that starts with its path.
    """
    path = fileio.join(directory, CONFIG_NAME)
    if not fileio.exists(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {fileio.path_str(directory)}")
    d = fileio.read_json_object(path, "adapter config")
    try:
        return config_from_peft_dict(d, source=path, **kw)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
