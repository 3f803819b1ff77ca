"""One hashable description of a decoder-only architecture, read from a transformers config.

transformers config objects are mutable and unhashable, and every architecture spells
its quirks differently (Qwen2 has q/k/v bias but no ``attention_bias`` field, Mistral
windows every layer, Gemma2 alternates, ...). :func:`spec_from_hf_config` reads them
once into a frozen :class:`DecoderSpec` that the linen modules take as a field, so
``nn.scan``/``nn.remat`` can hash it and no module ever looks at the HF config. The fields
every family spells alike are read here; a family's quirks by its spec reader
(``read_<model_type>`` below), which its entry in the family table ``gralora_jax.families`` names.

>>> from transformers import LlamaConfig
>>> s = spec_from_hf_config(LlamaConfig(hidden_size=64, num_attention_heads=4,
...     num_key_value_heads=2, num_hidden_layers=2, intermediate_size=128, vocab_size=128))
>>> s.head_dim, s.num_kv_heads, s.windows, s.qkv_bias
(16, 2, (None, None), False)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from gralora_jax import families

# The model types we have our own Flax model for (from the family table).
SUPPORTED_MODEL_TYPES = families.OUR_MODEL_TYPES
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
REMAT_POLICIES = (
    "none",  # no rematerialisation
    "full",  # save nothing, recompute the whole layer in the backward pass
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "nothing_saveable",
    "everything_saveable",
    "checkpoint_dots",
    "checkpoint_dots_with_no_batch_dims",
)


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    theta: float  # rotary base (config.rope_theta)
    rotary_dim: int  # number of rotated features per head (head_dim * partial_rotary_factor)
    rope_type: str = "default"  # one of SUPPORTED_ROPE_TYPES
    factor: float = 1.0  # scaling factor for linear / dynamic / llama3
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3: pre-training context length
    max_position_embeddings: int = 2048  # dynamic: length above which the base grows


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    model_type: str  # one of SUPPORTED_MODEL_TYPES (gralora_jax.families)
    vocab_size: int  # rows of the embedding
    hidden_size: int  # model width
    intermediate_size: int  # MLP width
    num_layers: int  # decoder layers
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when < num_heads)
    head_dim: int  # per-head width
    rms_norm_eps: float  # RMSNorm epsilon
    hidden_act: str  # MLP activation name (silu, gelu, gelu_pytorch_tanh, ...)
    rope: RopeSpec  # rotary embedding parameters (Gemma3: of the full-attention layers)
    windows: tuple  # per layer: sliding window length (tokens incl. self) or None
    qkv_bias: bool = False  # bias on q/k/v projections
    o_bias: bool = False  # bias on o_proj
    mlp_bias: bool = False  # bias on gate/up/down
    tie_word_embeddings: bool = False  # logits via embed_tokens.attend, no lm_head param
    norm_offset: float = 0.0  # RMSNorm multiplies by (norm_offset + weight); Gemma uses 1
    embed_scale: bool = False  # multiply embeddings by sqrt(hidden_size) (Gemma)
    sandwich_norms: bool = False  # Gemma2: post-attention and pre/post feed-forward norms
    qk_norm: bool = False  # Qwen3/Gemma3: RMSNorm over head_dim on q and k (q_norm, k_norm) before rope
    local_rope: Optional[RopeSpec] = None  # Gemma3: rotary of the sliding-window layers; None -> rope everywhere
    query_scale: Optional[float] = None  # attention logit scale; None -> head_dim ** -0.5
    attn_logit_softcap: Optional[float] = None  # Gemma2: tanh soft-capping of attention logits
    final_logit_softcap: Optional[float] = None  # Gemma2: tanh soft-capping of output logits
    initializer_range: float = 0.02  # std of the normal init of kernels and embeddings
    scan_layers: bool = False  # nn.scan over layers (params under model/layers/scan, leading layer axis)
    scan_unroll: int = 1  # scan_layers: layers per scan iteration (>1 trades compile time for fusion across layers)
    remat_policy: str = "none"  # jax.checkpoint policy per layer, one of REMAT_POLICIES
    attn_implementation: Optional[str] = None  # None: cuDNN on GPU where it applies, else XLA; or force "xla"/"cudnn"/"splash"
    attention_mask_mode: str = "mask"  # "mask": any padding; "lengths": right padding only, cuDNN-friendly

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {self.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")
        if len(self.windows) != self.num_layers:
            raise ValueError(f"windows has {len(self.windows)} entries for {self.num_layers} layers")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {self.remat_policy!r}; choose from {REMAT_POLICIES}")
        if self.attention_mask_mode not in ("mask", "lengths"):
            raise ValueError(f"attention_mask_mode must be 'mask' or 'lengths', got {self.attention_mask_mode!r}")
        if self.attn_implementation not in (None, "xla", "cudnn", "splash"):
            raise ValueError(f"attn_implementation must be None, 'xla', 'cudnn' or 'splash', "
                             f"got {self.attn_implementation!r}")
        if not (isinstance(self.scan_unroll, int) and 1 <= self.scan_unroll <= self.num_layers):
            raise ValueError(f"scan_unroll must be an integer in [1, {self.num_layers}], got {self.scan_unroll!r}")
        if self.scan_layers and len(set(self.windows)) > 1:
            raise ValueError("scan_layers=True needs every layer to have the same attention window; "
                             f"got {self.windows}")
        if self.rope.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope_scaling type {self.rope.rope_type!r}; "
                             f"supported: {SUPPORTED_ROPE_TYPES}")


def _rope_spec(config: Any, head_dim: int) -> RopeSpec:
    partial = float(getattr(config, "partial_rotary_factor", 1.0) or 1.0)
    rotary_dim = int(head_dim * partial)
    theta = getattr(config, "rope_theta", None)
    max_pos = int(getattr(config, "max_position_embeddings", 2048))
    scaling = getattr(config, "rope_scaling", None) or {}
    # transformers >= 5 keeps theta and the scaling type together in ``rope_parameters``
    rope_parameters = getattr(config, "rope_parameters", None)
    if isinstance(rope_parameters, dict) and "rope_theta" in rope_parameters:
        scaling = scaling or rope_parameters
        theta = rope_parameters["rope_theta"] if theta is None else theta
    theta = float(10000.0 if theta is None else theta)
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
    kw: dict = {}
    if rope_type != "default":
        kw["factor"] = float(scaling["factor"])
    if rope_type == "llama3":
        kw["low_freq_factor"] = float(scaling["low_freq_factor"])
        kw["high_freq_factor"] = float(scaling["high_freq_factor"])
        kw["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
    return RopeSpec(theta=theta, rotary_dim=rotary_dim, rope_type=rope_type,
                    max_position_embeddings=max_pos, **kw)


def _windows(config: Any, n: int) -> tuple:
    """Per-layer windows from ``layer_types`` and ``sliding_window`` (no window when either is unset)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and window is not None:
        return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    return (None,) * n


# ------------------------------------------------------------------ family spec readers
# Each model type of ours names one in the family table (gralora_jax.families, ``spec_reader``):
# ``reader(config, fields) -> dict``, the fields that differ from the generic reading ``fields``.


def read_llama(config: Any, fields: dict) -> dict:
    """Llama: the generic reading."""
    return {}


def read_qwen2(config: Any, fields: dict) -> dict:
    """Qwen2: bias on q/k/v, none on o_proj, whatever ``attention_bias`` says (it has no such field)."""
    return dict(qkv_bias=True, o_bias=False)


def read_qwen3(config: Any, fields: dict) -> dict:
    """Qwen3: RMSNorm on q and k."""
    return dict(qk_norm=True)


def read_mistral(config: Any, fields: dict) -> dict:
    """Mistral: ``sliding_window`` windows every layer (when no ``layer_types`` says which)."""
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "layer_types", None) is not None:
        return {}
    return dict(windows=(int(window),) * fields["num_layers"])


_GEMMA = dict(norm_offset=1.0, embed_scale=True)  # every Gemma: RMSNorm by (1 + w), embeddings by sqrt(hidden)


def read_gemma(config: Any, fields: dict) -> dict:
    """Gemma: its norms and embedding scale; ``gelu_pytorch_tanh`` when ``hidden_activation`` is unset
    (transformers' Gemma default, whatever ``hidden_act`` says)."""
    act = {} if getattr(config, "hidden_activation", None) is not None else dict(hidden_act="gelu_pytorch_tanh")
    return dict(_GEMMA, **act)


def read_gemma2(config: Any, fields: dict) -> dict:
    """Gemma2: Gemma's norms, sandwich norms, ``query_pre_attn_scalar`` and tanh soft-capping."""
    return dict(
        _GEMMA,
        sandwich_norms=True,
        query_scale=float(config.query_pre_attn_scalar) ** -0.5,
        attn_logit_softcap=getattr(config, "attn_logit_softcapping", None),
        final_logit_softcap=getattr(config, "final_logit_softcapping", None),
    )


def read_gemma3_text(config: Any, fields: dict) -> dict:
    """Gemma3: Gemma2's fields, RMSNorm on q and k, and the sliding layers' own rotary."""
    return dict(
        read_gemma2(config, fields),
        qk_norm=True,
        # sliding layers: rope_local_base_freq, no scaling (rope_theta / rope_scaling are the global layers')
        local_rope=RopeSpec(theta=float(config.rope_local_base_freq), rotary_dim=fields["head_dim"],
                            max_position_embeddings=int(getattr(config, "max_position_embeddings", 2048))),
    )


def spec_from_hf_config(config: Any, **overrides) -> DecoderSpec:
    """Read a transformers ``PretrainedConfig`` of one of our model types into a DecoderSpec: the
    fields every family spells alike, then those of the family's spec reader (the family table).

    ``overrides`` set the run-time fields (``scan_layers``, ``scan_unroll``, ``remat_policy``,
    ``attn_implementation``, ``attention_mask_mode``).
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
    n_heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    n_layers = int(config.num_hidden_layers)
    kv = getattr(config, "num_key_value_heads", None) or n_heads
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    attention_bias = bool(getattr(config, "attention_bias", False))
    fields = dict(
        model_type=model_type,
        vocab_size=int(config.vocab_size),
        hidden_size=int(config.hidden_size),
        intermediate_size=int(config.intermediate_size),
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=int(kv),
        head_dim=int(head_dim),
        rms_norm_eps=float(config.rms_norm_eps),
        hidden_act=str(act),
        rope=_rope_spec(config, int(head_dim)),
        windows=_windows(config, n_layers),
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        initializer_range=float(getattr(config, "initializer_range", 0.02)),
    )
    fields.update(families.spec_reader(model_type)(config, fields))
    fields.update(overrides)
    return DecoderSpec(**fields)
