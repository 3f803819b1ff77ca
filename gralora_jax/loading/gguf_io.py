"""llama.cpp GGUF files (the family table's GGUF architectures: llama, qwen3, gemma3) -> HF config, HF PyTorch-named state dict, tokenizer.

GGUF stores llama.cpp's own tensor names (``blk.3.attn_q.weight``), possibly
quantised (Q8_0, Q4_1, ...). We dequantise every tensor with ``gguf.quants.dequantize``
to float and rename it to the transformers key (``LlamaForCausalLM``'s names), so the rest of
the loading path is the ordinary safetensors one (:func:`torch_to_flax_params`).

One real transform is needed: llama.cpp's converter reorders the rows of the q and
k projections of every head from HF's "rotate halves" rotary layout
(``[x0..x_{d/2-1}, y0..y_{d/2-1}]``) to llama.cpp's interleaved pairs
(``[x0, y0, x1, y1, ...]``). :func:`unpermute_rotary` undoes it: per head, rows
``(d/2, 2)`` -> ``(2, d/2)``. k uses the kv-head count. Only for families whose
table entry says so (``Family.gguf_rotary_permuted``): Qwen3's and Gemma3's converters keep HF's layout.
Gemma's converter stores every ``*norm.weight`` as ``1 + w`` (its RMSNorm scales by ``1 + w``;
``Family.gguf_norm_shift``): we subtract it back.

The config (the family's transformers config class) comes from the ``<arch>.*`` metadata (``llama.rope.freq_base`` ->
``rope_theta``); a missing ``output.weight`` means tied embeddings. What llama.cpp does not store
but hard-codes for an architecture (Gemma3: which layers slide, the sliding layers' rotary base,
the attention scale) is filled in by that architecture's entry of :data:`_ARCH_CONFIG`. Every
tensor the config implies must be present with the implied shape, or loading fails naming the
file and the tensor. The tokenizer is
transformers' GGUF tokenizer conversion (``AutoTokenizer.from_pretrained(dir,
gguf_file=name, trust_remote_code=False)``), which reads the metadata only (no torch); where it
builds a Unigram model from a SentencePiece ("llama") vocabulary (Gemma), the model is rebuilt to
merge by score as llama.cpp does (:func:`_spm_merge_model`).
"""

from __future__ import annotations

import functools
import os
import re
import warnings

import numpy as np

from gralora_jax import families

# The GGUF architectures we read (from the family table).
SUPPORTED_ARCHITECTURES = families.gguf_architectures()

# GGUF tensor name (per-layer names with {i}) -> transformers key, common to llama.cpp's decoders.
# Rules as data; a family's own extra names are in its family-table entry (Family.gguf_names).
_LLAMA_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
# GGUF tensors with no HF parameter (llama3 rope factors are recomputed from the config).
_SKIP = ("rope_freqs.weight",)


def _reader(path: str | os.PathLike):
    """A (cached) ``gguf.GGUFReader``: parsing a 50k-token vocabulary takes seconds, so
    reading the config and then the weights of one file parses it once."""
    p = os.path.abspath(os.fspath(path))
    st = os.stat(p)
    return _cached_reader(p, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime_ns: int, size: int):
    import gguf

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader fails in numpy (reshape/view/mmap) on a cut-off file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: truncated or corrupt GGUF file ({size} bytes; {reason})") from None


def _meta(reader) -> dict:
    """Scalar and string metadata as plain python values (long arrays are skipped)."""
    out = {}
    for name, field in reader.fields.items():
        if name in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            out[name + ".len"] = len(field.data)
            continue
        try:
            out[name] = field.contents()
        except Exception:  # a field type this gguf version can't render: not needed by us
            pass
    return out


def _arch(meta: dict, path) -> str:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {SUPPORTED_ARCHITECTURES})")
    return arch


# llama.cpp's gemma3 (src/llama-model.cpp): every 6th layer is global (``set_swa_pattern(6)``), the sliding
# layers' rotary base is 10000 unscaled, neither is in the file.
_GEMMA3_SWA_PATTERN = 6
_GEMMA3_LOCAL_ROPE_BASE = 10000.0


def _gemma3_config(meta: dict, kw: dict) -> dict:
    """Gemma3TextConfig fields beyond the common ones, as llama.cpp reads a gemma3 file.

    No ``attention.sliding_window`` (or 0): every layer global. The attention scale is
    ``1/sqrt(head_dim)``, except for the 62-layer 27B where it is ``1/sqrt(hidden/heads)``
    (llama.cpp's ``f_attention_scale``; HF's ``query_pre_attn_scalar``).
    """
    n = kw["num_hidden_layers"]
    window = int(meta.get("gemma3.attention.sliding_window") or 0)
    softcap = meta.get("gemma3.final_logit_softcapping")
    return dict(
        sliding_window=window or None,
        layer_types=["sliding_attention" if window and (i + 1) % _GEMMA3_SWA_PATTERN else "full_attention"
                     for i in range(n)],
        rope_local_base_freq=_GEMMA3_LOCAL_ROPE_BASE,
        query_pre_attn_scalar=kw["hidden_size"] // kw["num_attention_heads"] if n == 62 else kw["head_dim"],
        final_logit_softcapping=float(softcap) if softcap else None,
    )


# GGUF architecture -> (metadata, common config kwargs) -> its extra config kwargs.
_ARCH_CONFIG = {"gemma3": _gemma3_config}


def _config_from_meta(meta: dict, has_output: bool, vocab_rows: int | None, path="gguf"):
    a = _arch(meta, path)
    cls = families.model_class(families.gguf_family(a).model_type)
    config_class = cls.config_class

    def need(key):
        full = f"{a}.{key}"
        if full not in meta:
            raise ValueError(f"{path}: GGUF metadata lacks {full!r}")
        return meta[full]

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    vocab = meta.get(f"{a}.vocab_size") or meta.get("tokenizer.ggml.tokens.len") or vocab_rows
    kw = dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get(f"{a}.attention.head_count_kv", heads)),
        head_dim=int(meta.get(f"{a}.attention.key_length", hidden // heads)),
        max_position_embeddings=int(meta.get(f"{a}.context_length", 2048)),
        rms_norm_eps=float(meta.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta.get(f"{a}.rope.freq_base", 10000.0)),
        tie_word_embeddings=not has_output,
        architectures=[cls.__name__],  # our class names are transformers' (Gemma3ForCausalLM, not Gemma3Text...)
    )
    if meta.get(f"{a}.rope.scaling.type") == "linear":
        kw["rope_scaling"] = {"rope_type": "linear", "factor": float(meta[f"{a}.rope.scaling.factor"])}
    for ours, theirs in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{theirs}" in meta:
            kw[ours] = int(meta[f"tokenizer.ggml.{theirs}"])
    if a in _ARCH_CONFIG:
        kw.update(_ARCH_CONFIG[a](meta, kw))
    return config_class(**kw)


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head, interleaved pairs -> rotate-halves.

    ``w`` is ``[n_heads * head_dim, in]``. Inverse of llama.cpp's ``LlamaModel.permute``.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"can't unpermute {w.shape}: rows not divisible by 2 * {n_heads} heads")
    d2 = rows // n_heads // 2
    return w.reshape(n_heads, d2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _names(family: families.Family) -> dict:
    """GGUF name -> transformers key of ``family`` (its own names override the common ones)."""
    return {**_LLAMA_NAMES, **dict(family.gguf_names)}


def _required(family: families.Family, config) -> list[str]:
    """Every GGUF tensor name a file of ``family`` with ``config`` must hold, in table order."""
    names = [n for n in _names(family) if not (n == "output.weight" and config.tie_word_embeddings)]
    return [n for n in names if "{i}" not in n] + [
        n.replace("{i}", str(i)) for i in range(config.num_hidden_layers) for n in names if "{i}" in n]


def _want_shape(key: str, config) -> tuple | None:
    """The shape ``config`` implies for transformers key ``key`` (None: not checked)."""
    h, d, ff, vocab = config.hidden_size, config.head_dim, config.intermediate_size, config.vocab_size
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    module = key.rsplit(".", 2)[-2]
    shapes = {"embed_tokens": (vocab, h), "lm_head": (vocab, h), "q_proj": (q, h), "k_proj": (kv, h),
              "v_proj": (kv, h), "o_proj": (h, q), "gate_proj": (ff, h), "up_proj": (ff, h),
              "down_proj": (h, ff), "q_norm": (d,), "k_norm": (d,)}
    return shapes.get(module, (h,) if module == "norm" or module.endswith("layernorm") else None)


def _hf_name(gguf_name: str, family: families.Family) -> str | None:
    names = _names(family)
    m = _LAYER_RE.match(gguf_name)
    if m:
        return names.get("blk.{i}." + m.group(2), "").replace("{i}", m.group(1)) or None
    return names.get(gguf_name)


def _shape(t) -> tuple[int, ...]:
    return tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims fastest-first


def _dequantize(t) -> np.ndarray:
    import gguf

    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(_shape(t))


def load_gguf_config(path: str | os.PathLike):
    """Only the transformers config (LlamaConfig, Qwen3Config, Gemma3TextConfig) of a GGUF file."""
    reader = _reader(path)
    names = {t.name: t for t in reader.tensors}
    emb = names.get("token_embd.weight")
    return _config_from_meta(_meta(reader), "output.weight" in names, int(emb.shape[-1]) if emb is not None else None,
                             path)


def _spm_merge_model(reader, unk_id):
    """llama.cpp's SentencePiece tokenisation (``tokenizer.ggml.model == "llama"``) as a tokenizers BPE.

    llama.cpp splits text into characters, then repeatedly joins the adjacent pair whose joined
    piece is in the vocabulary with the highest score, falling back to ``<0xXX>`` byte tokens. That
    is BPE whose merges are ranked by the joined piece's score, every (left, right) split of a
    piece into two vocabulary pieces being one merge.
    """
    from tokenizers import models

    def strings(name):
        f = reader.fields[name]
        return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]

    pieces = strings("tokenizer.ggml.tokens")
    f = reader.fields["tokenizer.ggml.scores"]
    scores = [float(f.parts[i][0]) for i in f.data]
    vocab = {}
    for i, p in enumerate(pieces):
        vocab.setdefault(p, i)
    ranked = []
    for i, piece in enumerate(pieces):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], vocab[left], vocab[right], left, right))
    ranked.sort(key=lambda m: m[:3])
    return models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in ranked], unk_token=pieces[unk_id],
                      fuse_unk=True, byte_fallback=True)


# llama.cpp's token types (gguf.TokenType) that it matches whole in text before tokenising the rest
# (``tokenizer_st_partition``; CONTROL and UNKNOWN only with parse_special, as transformers always does).
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4


def _added_tokens(reader) -> list:
    """The vocabulary's whole-match pieces as tokenizers ``AddedToken``s: control and unknown pieces
    (``<start_of_turn>``, ``<bos>``, ...) special, user-defined ones (whitespace runs, ...) plain; all
    matched in the raw text (``normalized=False``). Empty when the file has no token types."""
    from tokenizers import AddedToken

    types, tokens = reader.fields.get("tokenizer.ggml.token_type"), reader.fields.get("tokenizer.ggml.tokens")
    if types is None or tokens is None:
        return []
    out = []
    for i, j in zip(types.data, tokens.data):
        kind = int(types.parts[i][0])
        if kind in (_UNKNOWN, _CONTROL, _USER_DEFINED):
            out.append(AddedToken(bytes(tokens.parts[j]).decode("utf-8", errors="replace"), normalized=False,
                                  special=kind != _USER_DEFINED))
    return out


def load_gguf_tokenizer(path: str | os.PathLike):
    """transformers fast tokenizer built from the GGUF metadata (offline, local file).

    The vocabulary's control pieces (``<start_of_turn>``, ``<bos>``, ...) are special tokens, matched whole
    in text and dropped by ``decode(skip_special_tokens=True)``; its user-defined pieces are matched whole
    too but kept: as llama.cpp tokenises with ``parse_special``."""
    from transformers import AutoTokenizer

    path = os.path.abspath(os.fspath(path))
    try:  # our config picks the same tokenizer class and spares transformers one more parse of the file
        config = load_gguf_config(path)
    except ValueError:  # an architecture we do not load: transformers reads the config itself
        config = None
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), local_files_only=True,
                                        trust_remote_code=False, config=config)
    # transformers 4.57 reads a Gemma SentencePiece vocabulary as Unigram, but llama.cpp (and Gemma's own
    # SentencePiece model) merge by score: "The capital" becomes 'The', '▁c', 'ap', 'it', 'al' instead of
    # 'The', '▁capital'. Rebuild the model as llama.cpp tokenises ("llama" = SentencePiece in GGUF).
    reader = _reader(path)
    meta = _meta(reader)
    if type(tok.backend_tokenizer.model).__name__ == "Unigram" and meta.get("tokenizer.ggml.model") == "llama":
        tok.backend_tokenizer.model = _spm_merge_model(reader, int(meta.get("tokenizer.ggml.unknown_token_id", 0)))
    # transformers registers the control pieces of a BPE ("gpt2") vocabulary but not of a SentencePiece one
    # (Gemma's <start_of_turn> came out as '<', 'start', '_', ...): register them, and the user-defined
    # pieces, for every vocabulary (a piece already registered is only updated).
    added = _added_tokens(reader)
    tok.add_tokens([t for t in added if not t.special])
    tok.add_tokens([t for t in added if t.special], special_tokens=True)
    # transformers' conversion always adds BOS for Llama; follow the file's own flag when it has one.
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is not None and hasattr(tok, "add_bos_token") and tok.add_bos_token != bool(add_bos):
        tok.add_bos_token = bool(add_bos)
    # transformers 4.57 takes eos from the wrong id for some GGUF vocabularies; the file's ids win.
    for attr, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        tid = meta.get(f"tokenizer.ggml.{key}")
        if tid is not None and 0 <= int(tid) < len(tok):
            setattr(tok, attr, tok.convert_ids_to_tokens(int(tid)))
    return tok


def load_gguf(path: str | os.PathLike, *, dtype=np.float32, with_tokenizer: bool = True):
    """A GGUF decoder -> ``(transformers config, {HF torch key: numpy array}, tokenizer or None)``.

    Every tensor is dequantised to float32, q/k rows un-permuted, norm shifts undone, then cast to
    ``dtype``. ``with_tokenizer=False`` skips the tokenizer (third item None). A tensor that is
    missing, unknown, or shaped other than the metadata implies is a ``ValueError`` naming the file.
    """
    reader = _reader(path)
    meta = _meta(reader)
    family = families.gguf_family(_arch(meta, path))
    tensors = {t.name: t for t in reader.tensors}
    emb = tensors.get("token_embd.weight")
    config = _config_from_meta(meta, "output.weight" in tensors, int(emb.shape[-1]) if emb is not None else None,
                               path)
    missing = [n for n in _required(family, config) if n not in tensors]
    if missing:
        raise ValueError(f"{path}: GGUF tensor {missing[0]!r} is missing (a {family.gguf_arch} file of "
                         f"{config.num_hidden_layers} layers needs it; {len(missing)} missing in all)")
    keys = {name: _hf_name(name, family) for name in tensors if name not in _SKIP}
    unknown = [name for name, key in keys.items() if key is None]
    if unknown:
        raise ValueError(f"{path}: GGUF tensors with no {type(config).__name__} equivalent: {unknown[:20]}")
    if "rope_freqs.weight" in tensors:
        warnings.warn(f"{path}: rope_freqs (llama3 rope scaling) is ignored; set rope_scaling on the config")
    state_dict: dict[str, np.ndarray] = {}
    for name, key in keys.items():
        want = _want_shape(key, config)
        if want is not None and _shape(tensors[name]) != want:
            raise ValueError(f"{path}: GGUF tensor {name!r} has shape {_shape(tensors[name])}, "
                             f"but the metadata implies {want}")
    for name, key in keys.items():
        w = _dequantize(tensors[name]).astype(np.float32)
        if family.gguf_norm_shift and key.endswith("norm.weight"):
            w = w - np.float32(family.gguf_norm_shift)
        if family.gguf_rotary_permuted and key.endswith("q_proj.weight"):
            w = unpermute_rotary(w, config.num_attention_heads)
        elif family.gguf_rotary_permuted and key.endswith("k_proj.weight"):
            w = unpermute_rotary(w, config.num_key_value_heads)
        state_dict[key] = w.astype(dtype)
    tokenizer = load_gguf_tokenizer(path) if with_tokenizer else None
    return config, state_dict, tokenizer
