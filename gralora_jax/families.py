"""The model-family table: everything the library knows about a ``config.model_type``, in one place.

Each :class:`Family` names our Flax model class (when we have one) and the reader of its
architecture quirks from a transformers config (``spec_reader``), the PEFT default target
modules, the tied output head, how its 2-D kernels are stored (``[in, out]`` like ``nn.Dense``,
or ``[out, in]`` like GPT-2's ``FlaxConv1D``), the GGUF architecture and the transformers-Flax
quirks that matter to us. Sharding rules stay data in :data:`gralora_jax.sharding.RULES`; this table is
where a family's rules are looked up (:func:`sharding_rules`), and building it fails at import
when a family has no rules, a kernel layout that is not a tuple of regexes, or our model class
without a spec reader (or the other way round), so a family without sharding rules, or a decoder
of ours whose config nobody reads, cannot exist.

Everything else (``models.spec.SUPPORTED_MODEL_TYPES`` and the family-specific fields of
``models.spec.spec_from_hf_config``, ``models.auto.MODEL_CLASSES``,
``targets.DEFAULT_TARGET_MODULES``, ``loading.convert.TIED_HEADS``, the kernel layouts of
surgery and sharding, ``loading.gguf_io.SUPPORTED_ARCHITECTURES``, the rotary-10000 warning and
the T5 patch of ``loading.pretrained.build_model``) is derived from it.

>>> family("qwen2").default_targets
('q_proj', 'v_proj')
>>> "gemma2" in OUR_MODEL_TYPES and "bert" not in OUR_MODEL_TYPES
True
>>> kernel_layout("gpt2", "transformer/h/0/attn/c_attn"), kernel_layout("gpt2", "lm_head")
('out_in', 'in_out')
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Optional

from gralora_jax import sharding as _sharding

_DECODER_TIED = ("lm_head/kernel", "model/embed_tokens/embedding")

# How a 2-D Flax kernel is stored: [in, out] (nn.Dense) or [out, in] (transformers' FlaxConv1D).
IN_OUT, OUT_IN = "in_out", "out_in"


@dataclasses.dataclass(frozen=True)
class Family:
    # transformers' ``config.model_type``.
    model_type: str
    # Our Flax causal-LM class as "module:Name", or None when only transformers' Flax class exists.
    model_class: Optional[str] = None
    # With model_class: "module:name" of ``reader(config, fields) -> dict``, the DecoderSpec fields that
    # differ from the generic reading ``fields`` of a transformers config (see gralora_jax.models.spec).
    spec_reader: Optional[str] = None
    # What PEFT targets when ``target_modules`` is None.
    default_targets: tuple[str, ...] = ("q_proj", "v_proj")
    # Regexes on '/'-joined module paths whose kernels are stored OUT_IN; every other kernel is IN_OUT.
    out_in_kernels: tuple[str, ...] = ()
    # (head kernel path, embedding path) tied when ``tie_word_embeddings``; None when no tied head.
    tied_head: Optional[tuple[str, str]] = None
    # llama.cpp's ``general.architecture`` for this family's GGUF files, None when we read none.
    gguf_arch: Optional[str] = None
    # GGUF per-layer tensor names beyond llama.cpp's common decoder ones: (GGUF name, HF key), {i} = layer.
    gguf_names: tuple[tuple[str, str], ...] = ()
    # llama.cpp's converter interleaves the q/k rows for its rotary layout (Llama yes, NeoX-style Qwen no).
    gguf_rotary_permuted: bool = False
    # llama.cpp's converter adds this to every ``*norm.weight`` (Gemma's RMSNorm scales by 1 + w: 1.0); we subtract it.
    gguf_norm_shift: float = 0.0
    # transformers' Flax class hard-codes rotary base 10000 and ignores ``rope_scaling``.
    flax_rope_10000: bool = False
    # A T5-style encoder-decoder (transformers' Flax T5 quirks apply).
    t5_like: bool = False


def _decoder(model_type: str, cls: str, reader: str, **kw) -> Family:
    """A decoder of ours: class ``cls`` ("module:Name"), spec reader ``reader`` of ``gralora_jax.models.spec``."""
    return Family(model_type, model_class=cls, spec_reader=f"gralora_jax.models.spec:{reader}", tied_head=_DECODER_TIED,
                  **kw)


_TABLE = (
    _decoder("llama", "gralora_jax.models.llama:LlamaForCausalLM", "read_llama", gguf_arch="llama",
             gguf_rotary_permuted=True, flax_rope_10000=True),
    _decoder("qwen2", "gralora_jax.models.llama:Qwen2ForCausalLM", "read_qwen2"),
    _decoder("qwen3", "gralora_jax.models.llama:Qwen3ForCausalLM", "read_qwen3", gguf_arch="qwen3", gguf_names=(
        ("blk.{i}.attn_q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight"),
        ("blk.{i}.attn_k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight"))),
    _decoder("mistral", "gralora_jax.models.llama:MistralForCausalLM", "read_mistral", flax_rope_10000=True),
    _decoder("gemma", "gralora_jax.models.gemma:GemmaForCausalLM", "read_gemma", flax_rope_10000=True),
    _decoder("gemma2", "gralora_jax.models.gemma:Gemma2ForCausalLM", "read_gemma2"),
    _decoder("gemma3_text", "gralora_jax.models.gemma:Gemma3ForCausalLM", "read_gemma3_text", gguf_arch="gemma3",
             gguf_norm_shift=1.0, gguf_names=(  # llama.cpp's gemma3 names its pre-MLP norm ffn_norm (Llama's post-attention one)
                 ("blk.{i}.post_attention_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
                 ("blk.{i}.ffn_norm.weight", "model.layers.{i}.pre_feedforward_layernorm.weight"),
                 ("blk.{i}.post_ffw_norm.weight", "model.layers.{i}.post_feedforward_layernorm.weight"),
                 ("blk.{i}.attn_q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight"),
                 ("blk.{i}.attn_k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight"))),
    Family("gpt2", default_targets=("c_attn",), tied_head=("lm_head/kernel", "transformer/wte/embedding"),
           out_in_kernels=(r"(^|/)h/\d+/(attn|crossattention|mlp)/(c_attn|q_attn|c_proj|c_fc)$",)),
    Family("gptj"),
    Family("opt"),
    Family("bart"),
    *(Family(t, default_targets=("query", "value")) for t in ("bert", "roberta", "electra")),
    *(Family(t, default_targets=("q", "v"), t5_like=True) for t in ("t5", "mt5")),
)

# model_type -> Family.
FAMILIES: dict[str, Family] = {f.model_type: f for f in _TABLE}
assert len(FAMILIES) == len(_TABLE), "a model_type appears twice in the family table"


def _is_regex(pattern) -> bool:
    try:
        re.compile(pattern)
    except (re.error, TypeError):
        return False
    return True


def _is_ref(ref) -> bool:
    """``ref`` names an attribute of a module: "module:name"."""
    return isinstance(ref, str) and re.fullmatch(r"\w+(\.\w+)*:\w+", ref) is not None


def _resolve(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def _check(table, rules) -> None:
    """At import: every family has sharding rules, its ``out_in_kernels`` are a tuple of regexes, and
    a family with our model class has a spec reader (both "module:name"), one without neither."""
    missing = sorted({f.model_type for f in table} - set(rules))
    if missing:
        raise ImportError(f"gralora_jax.families: no sharding rules in gralora_jax.sharding.RULES for {missing}")
    for f in table:
        if not (isinstance(f.out_in_kernels, tuple) and all(map(_is_regex, f.out_in_kernels))):
            raise ImportError(f"gralora_jax.families: {f.model_type!r}: out_in_kernels must be a tuple of regexes, "
                              f"got {f.out_in_kernels!r}")
        if f.model_class is None and f.spec_reader is None:
            continue
        if not (_is_ref(f.model_class) and _is_ref(f.spec_reader)):
            raise ImportError(f"gralora_jax.families: {f.model_type!r}: our model class needs a spec reader, both "
                              f"'module:name'; got model_class={f.model_class!r}, spec_reader={f.spec_reader!r}")


_check(_TABLE, _sharding.RULES)

# transformers' T5-family model types that are not in the table (no rules, no targets) but share its quirks.
_T5_EXTRA = ("longt5", "umt5")

# The model types we have our own Flax model for, in table order.
OUR_MODEL_TYPES: tuple[str, ...] = tuple(f.model_type for f in _TABLE if f.model_class)


def family(model_type: Optional[str]) -> Optional[Family]:
    """The table entry for ``model_type`` (None when the family is unknown)."""
    return FAMILIES.get(model_type)


def sharding_rules(model_type: Optional[str]) -> Optional[list]:
    """The sharding rules of ``model_type`` (None when the family is unknown)."""
    return _sharding.RULES[model_type] if model_type in FAMILIES else None


def out_in_kernels(model_type: Optional[str]) -> tuple[str, ...]:
    """Regexes on the module paths of ``model_type`` whose kernels are stored OUT_IN (() when unknown)."""
    fam = FAMILIES.get(model_type)
    return () if fam is None else fam.out_in_kernels


def kernel_layout(model_type: Optional[str], module_path: str) -> str:
    """How the 2-D kernel of ``module_path`` is stored in ``model_type``'s tree: OUT_IN or IN_OUT
    (IN_OUT for unknown families and for scanned ``[L, in, out]`` kernels)."""
    return OUT_IN if any(re.search(p, module_path) for p in out_in_kernels(model_type)) else IN_OUT


def model_class(model_type: Optional[str]):
    """Our Flax model class for ``model_type`` (None when we have none)."""
    fam = FAMILIES.get(model_type)
    return None if fam is None or fam.model_class is None else _resolve(fam.model_class)


def spec_reader(model_type: Optional[str]):
    """The spec reader of ``model_type``, ``reader(config, fields) -> dict`` (None when we have no model)."""
    fam = FAMILIES.get(model_type)
    return None if fam is None or fam.spec_reader is None else _resolve(fam.spec_reader)


def is_t5_like(model_type: Optional[str]) -> bool:
    """True for T5-family model types (transformers' Flax T5 quirks apply)."""
    fam = FAMILIES.get(model_type)
    return (fam is not None and fam.t5_like) or model_type in _T5_EXTRA


def tied_heads() -> tuple[tuple[str, str], ...]:
    """Every distinct (head kernel path, embedding path) pair of the table, in table order."""
    return tuple(dict.fromkeys(f.tied_head for f in _TABLE if f.tied_head))


def gguf_family(arch: Optional[str]) -> Optional[Family]:
    """The family whose GGUF files have ``general.architecture == arch`` (None when unknown)."""
    return next((f for f in _TABLE if f.gguf_arch is not None and f.gguf_arch == arch), None)


def gguf_architectures() -> tuple[str, ...]:
    """The GGUF ``general.architecture`` values we read, in table order."""
    return tuple(dict.fromkeys(f.gguf_arch for f in _TABLE if f.gguf_arch))
