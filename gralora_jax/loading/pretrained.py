"""``load_pretrained``: a checkpoint directory, hub id or ``.gguf`` file -> ``(model, params)``.

Steps, each a small function below:

1. resolve the source: a local directory, a local ``.gguf`` file, or a hub id
   (downloaded with ``huggingface_hub.snapshot_download``; config, weights and
   tokenizer files only);
2. read the config (``config.json`` via ``transformers.AutoConfig``, or GGUF metadata);
3. build the model: our own ``gralora_jax.models`` class when it supports the
   ``model_type`` (and ``use_ours`` is not False), else the transformers Flax class
   (``_do_init=False``, so nothing is initialised);
4. load weights, in this order: ``flax_model.msgpack`` (HF Flax, possibly sharded),
   then PyTorch safetensors (single or sharded, converted by
   :func:`~gralora_jax.loading.convert.torch_to_flax_params` against the model's
   shape tree), then GGUF;
5. cast to ``param_dtype``; with tied embeddings, materialise ``lm_head/kernel``
   (= embedding transposed) when the model has a head kernel and the checkpoint none.

>>> model, params = load_pretrained("tests/data/model_tiny_llama_r8_k2_h0/base")  # doctest: +SKIP
>>> model(input_ids, params=params).logits.shape                                    # doctest: +SKIP
(2, 16, 256)
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gralora_jax import families, fileio, quirks
from gralora_jax.loading.convert import is_floating, match_flax_params, torch_to_flax_params
from gralora_jax.loading.safetensors_io import INDEX_FILE, SINGLE_FILE, read_safetensors, read_weight_map
from gralora_jax.models.layout import is_scanned, stack_layer_params, unstack_layer_params
from gralora_jax.tree import flatten, unflatten

FLAX_FILE = "flax_model.msgpack"
FLAX_INDEX_FILE = "flax_model.msgpack.index.json"

# Files a hub download needs (weights are chosen separately, see _hub_download).
_HUB_META_PATTERNS = ["*.json", "tokenizer*", "*.model", "*.tiktoken", "merges.txt", "vocab.txt", "vocab.json"]

# model_family -> transformers Flax auto class name.
_FAMILIES = {
    "causal_lm": "FlaxAutoModelForCausalLM",
    "seq_cls": "FlaxAutoModelForSequenceClassification",
    "sequence_classification": "FlaxAutoModelForSequenceClassification",
    "masked_lm": "FlaxAutoModelForMaskedLM",
    "seq2seq": "FlaxAutoModelForSeq2SeqLM",
    "base": "FlaxAutoModel",
}

# transformers Flax models that hard-code rotary base 10000 and ignore rope_scaling (from the family table).
_FLAX_ROPE_10000 = tuple(t for t, f in families.FAMILIES.items() if f.flax_rope_10000)


# ---------------------------------------------------------------------------------------------- sources
def _hub_download(repo_id: str, revision: str | None) -> str:
    """Download config, tokenizer and one weight format of a hub repo; return the local dir."""
    from huggingface_hub import HfApi, snapshot_download

    files = HfApi().list_repo_files(repo_id, revision=revision)
    if any(f.endswith(".safetensors") for f in files):
        weights = ["*.safetensors", INDEX_FILE]
    elif any(f.startswith(FLAX_FILE) for f in files):
        weights = [FLAX_FILE, FLAX_INDEX_FILE, "flax_model-*.msgpack"]
    else:
        raise FileNotFoundError(
            f"hub repo {repo_id!r} has neither safetensors nor flax_model.msgpack weights "
            "(PyTorch .bin pickles are not supported: convert them to safetensors)"
        )
    return snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_META_PATTERNS + weights)


def resolve_source(path_or_hub_id: str | os.PathLike, revision: str | None = None) -> str:
    """A local directory or ``.gguf`` file for ``path_or_hub_id`` (downloading hub ids)."""
    p = os.fspath(path_or_hub_id)
    if os.path.exists(p):
        return p
    if p.endswith(".gguf"):
        raise FileNotFoundError(f"GGUF file {p!r} does not exist")
    if p.startswith((".", "/", "~")) or p.count("/") > 1 or not p.strip():
        raise FileNotFoundError(f"{p!r} is neither an existing path nor a hub id of the form 'org/name'")
    try:
        return _hub_download(p, revision)
    except FileNotFoundError:
        raise
    except Exception as e:  # offline, unknown repo, gated model, ...
        raise FileNotFoundError(f"{p!r} is not a local path, and downloading it from the hub failed: {e}") from e


def _is_gguf(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(".gguf")


def load_config(path: str):
    """The transformers config of a local checkpoint directory or ``.gguf`` file."""
    if _is_gguf(path):
        from gralora_jax.loading.gguf_io import load_gguf_config

        return load_gguf_config(path)
    from transformers import AutoConfig

    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"no config.json in {path!r}")
    fields = fileio.read_json_object(config_file, "model config")  # one-line error for lists, bad JSON
    if "model_type" in fields and not isinstance(fields["model_type"], str):
        raise ValueError(f"{config_file}: not a valid model config: 'model_type' must be a string")
    return _without_remote_code(AutoConfig.from_pretrained, path, config_file)


def _without_remote_code(from_pretrained, path: str, described: str, **kw):
    """``from_pretrained(path, ...)`` that never runs code shipped with a checkpoint.

    ``trust_remote_code=False``: a checkpoint whose ``auto_map`` needs its own Python classes
    is refused (transformers would otherwise ask on a terminal, and run it on "y"). Errors are
    one line naming ``described`` (the file or directory).
    """
    try:
        return from_pretrained(path, local_files_only=True, trust_remote_code=False, **kw)
    except ValueError as e:
        if "trust_remote_code" in str(e) or "custom code" in str(e):
            raise ValueError(
                f"{described}: this checkpoint needs its own Python code (auto_map), which gralora_jax never runs "
                "(trust_remote_code=False)"
            ) from None
        raise


# ---------------------------------------------------------------------------------------------- models
def _ours(config, dtype, param_dtype, options):
    """Our own model for this config (``options``: scan_layers, remat_policy, ...), or None when we have none."""
    if families.model_class(getattr(config, "model_type", None)) is None:
        return None
    from gralora_jax.models.auto import auto_model

    return auto_model(config, dtype=dtype, param_dtype=param_dtype, **options)


def _transformers_class(config, model_family: str | None):
    import transformers

    if model_family and model_family.startswith("Flax"):
        return getattr(transformers, model_family)
    if model_family is None:
        for arch in getattr(config, "architectures", None) or []:
            cls = getattr(transformers, "Flax" + arch, None)
            if cls is not None:
                return cls
        model_family = "causal_lm"
    if model_family not in _FAMILIES:
        raise ValueError(f"model_family must be one of {sorted(_FAMILIES)} or a transformers Flax class name, got {model_family!r}")
    auto = getattr(transformers, _FAMILIES[model_family])
    try:
        return auto._model_mapping[type(config)]
    except KeyError:
        raise ValueError(f"transformers has no {_FAMILIES[model_family]} class for model_type {config.model_type!r}") from None


def build_model(config, *, dtype=jnp.float32, param_dtype=None, model_family=None, use_ours=None,
                model_options=None):
    """The (uninitialised) model for ``config``: ours if possible and allowed, else transformers Flax.

    ``model_options`` (``scan_layers``, ``remat_policy``, ``attn_implementation``, ...) go to our
    model class and need one.
    """
    if model_options and use_ours is False:
        raise ValueError(f"model_options {sorted(model_options)} need gralora_jax.models (use_ours is False)")
    if use_ours is not False and model_family in (None, "causal_lm"):
        model = _ours(config, dtype, param_dtype or dtype, dict(model_options or {}))
        if model is not None:
            return model
        if use_ours or model_options:
            raise ValueError(f"gralora_jax.models has no model for model_type {config.model_type!r}")
    cls = _transformers_class(config, model_family)
    if config.model_type in _FLAX_ROPE_10000:
        theta = getattr(config, "rope_theta", 10000.0)
        if theta != 10000.0 or getattr(config, "rope_scaling", None):
            warnings.warn(
                f"transformers' {cls.__name__} hard-codes rope_theta=10000 and ignores rope_scaling, but this "
                f"checkpoint has rope_theta={theta}, rope_scaling={getattr(config, 'rope_scaling', None)}: "
                "its outputs will be wrong. Use gralora_jax.models (use_ours=True) for this checkpoint.",
                stacklevel=3,
            )
    if families.is_t5_like(config.model_type):
        quirks.patch_t5_clip()  # before its first trace: transformers' Flax T5 needs it to build and run
    return cls(config, dtype=dtype, _do_init=False)


def param_shapes(model) -> dict:
    """Nested dict of ShapeDtypeStruct for the model's parameters (no allocation)."""
    tree = getattr(model, "params_shape_tree", None)
    if tree is None and hasattr(model, "init_params"):
        tree = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
    if tree is None:
        raise TypeError(f"can't find the parameter shapes of {type(model).__name__} (no params_shape_tree)")
    tree = dict(tree)
    return dict(tree["params"]) if set(tree) == {"params"} else tree


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What every loader starts from: the source found, its config read, its model built."""

    source: str  # a local checkpoint directory or .gguf file (hub ids already downloaded)
    config: Any  # the transformers config read from it
    model: Any  # the model built from the config by build_model (uninitialised)
    shapes: dict  # the unrolled parameter shapes the checkpoint's weights are mapped onto
    scanned: bool  # the model holds its layers stacked (model/layers/scan): loaded weights must be stacked


def prepare(path_or_hub_id: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None, model_family=None,
            use_ours=None, revision: str | None = None, model_options=None) -> Prepared:
    """Resolve ``path_or_hub_id``, read its config and build its model with :func:`build_model`
    (arguments as in :func:`load_pretrained`); the one way the loaders build a model."""
    source = resolve_source(path_or_hub_id, revision)
    config = load_config(source)
    model = build_model(config, dtype=dtype, param_dtype=param_dtype or dtype, model_family=model_family,
                        use_ours=use_ours, model_options=model_options)
    shapes = param_shapes(model)
    scanned = is_scanned(shapes)
    return Prepared(source, config, model, jax.eval_shape(unstack_layer_params, shapes) if scanned else shapes, scanned)


def read_weights(prepared: Prepared, *, strict: bool = True) -> dict:
    """The checkpoint's weights mapped onto ``prepared.shapes`` (unrolled; checkpoint dtypes)."""
    tie = getattr(prepared.config, "tie_word_embeddings", False)
    return load_params(prepared.source, prepared.shapes, tie_word_embeddings=tie, strict=strict)


def attach_params(model, params) -> None:
    """Keep ``params`` on our models too (``model.params``), as transformers' Flax models do not."""
    if not hasattr(model, "_do_init"):
        try:
            model.params = params
        except (AttributeError, ValueError):
            pass


# ---------------------------------------------------------------------------------------------- weights
def read_flax_msgpack(path: str) -> dict:
    """HF Flax weights (``flax_model.msgpack`` or its sharded index) -> nested dict of numpy arrays."""
    from flax.serialization import msgpack_restore

    index = os.path.join(path, FLAX_INDEX_FILE)
    if os.path.isfile(index):
        shards = sorted(set(read_weight_map(index, "Flax msgpack index").values()))
        missing = [os.path.basename(s) for s in shards if not os.path.isfile(s)]
        if missing:
            raise FileNotFoundError(f"sharded Flax checkpoint {path!r} is missing shard file(s) {missing}")
    else:
        shards = [os.path.join(path, FLAX_FILE)]
    flat: dict[str, Any] = {}
    for s in shards:
        with open(s, "rb") as f:
            data = f.read()
        try:
            tree = msgpack_restore(data)
        except Exception as e:  # msgpack raises several types (ExtraData, ValueError, ...) on garbage
            raise ValueError(f"{s}: not a valid Flax msgpack checkpoint (truncated or corrupt: {type(e).__name__})") from None
        if not isinstance(tree, dict):
            raise ValueError(f"{s}: not a valid Flax msgpack checkpoint (holds a {type(tree).__name__}, not a parameter tree)")
        flat.update(flatten(tree))
    return unflatten(flat)


def _weights_kind(path: str) -> str:
    if _is_gguf(path):
        return "gguf"
    if os.path.isfile(os.path.join(path, FLAX_FILE)) or os.path.isfile(os.path.join(path, FLAX_INDEX_FILE)):
        return "flax"
    if os.path.isfile(os.path.join(path, SINGLE_FILE)) or os.path.isfile(os.path.join(path, INDEX_FILE)):
        return "safetensors"
    raise FileNotFoundError(
        f"no weights in {path!r}: expected {FLAX_FILE}, {SINGLE_FILE} or {INDEX_FILE} "
        "(PyTorch .bin pickles are not supported: convert them to safetensors)"
    )


def load_params(path: str, shapes: dict, *, tie_word_embeddings: bool = False, strict: bool = True) -> dict:
    """Weights at ``path`` mapped onto ``shapes`` (nested dict of numpy, checkpoint dtypes)."""
    kind = _weights_kind(path)
    tie = bool(tie_word_embeddings)
    if kind == "flax":
        return match_flax_params(read_flax_msgpack(path), shapes, strict=strict, tie_word_embeddings=tie)
    if kind == "gguf":
        from gralora_jax.loading.gguf_io import load_gguf

        _, state_dict, _ = load_gguf(path, with_tokenizer=False)
    else:
        state_dict = read_safetensors(path)
    return torch_to_flax_params(state_dict, shapes, strict=strict, tie_word_embeddings=tie)


def load_pretrained(
    path_or_hub_id: str | os.PathLike,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    model_family: str | None = None,
    use_ours: bool | None = None,
    revision: str | None = None,
    strict: bool = True,
    as_numpy: bool = False,
    model_options: dict | None = None,
):
    """Load an HF checkpoint (dir, hub id or ``.gguf`` file) -> ``(model, params)``.

    Args:
      path_or_hub_id: a local checkpoint directory, a local ``.gguf`` file, or a hub id
        ``"org/name"`` (downloaded: config, tokenizer and safetensors/msgpack weights).
      dtype: the model's computation dtype.
      param_dtype: dtype of the returned floating params (None: same as ``dtype``).
      model_family: which head: ``"causal_lm"``, ``"seq_cls"``, ``"masked_lm"``, ``"seq2seq"``,
        ``"base"``, or a transformers Flax class name; None picks from ``config.architectures``.
      use_ours: True: require ``gralora_jax.models``; False: always transformers Flax;
        None: ours when it supports the model type (causal LMs only).
      revision: hub revision (branch, tag or commit) for hub ids.
      strict: missing/unexpected weights are an error (tied heads excepted).
      as_numpy: return host numpy arrays instead of jax arrays.
      model_options: options of our model class (``scan_layers``, ``remat_policy``,
        ``attn_implementation``, ``attention_mask_mode``); with ``scan_layers`` the weights are
        read into the unrolled tree, then stacked.

    Returns ``(model, params)`` with ``model(input_ids, params=params).logits``.
    """
    param_dtype = param_dtype or dtype
    prepared = prepare(path_or_hub_id, dtype=dtype, param_dtype=param_dtype, model_family=model_family,
                       use_ours=use_ours, revision=revision, model_options=model_options)

    def cast(x):
        x = np.asarray(x).astype(param_dtype) if is_floating(x) else np.asarray(x)
        return x if as_numpy else jnp.asarray(x)

    params = jax.tree_util.tree_map(cast, read_weights(prepared, strict=strict))
    if prepared.scanned:
        params = stack_layer_params(params)
    attach_params(prepared.model, params)
    return prepared.model, params


def load_tokenizer(path_or_hub_id: str | os.PathLike, *, revision: str | None = None):
    """The tokenizer of a checkpoint: ``AutoTokenizer`` on a dir/hub id, GGUF metadata for ``.gguf``."""
    src = resolve_source(path_or_hub_id, revision)
    if _is_gguf(src):
        from gralora_jax.loading.gguf_io import load_gguf_tokenizer

        return load_gguf_tokenizer(src)
    from transformers import AutoTokenizer

    return _without_remote_code(AutoTokenizer.from_pretrained, src, src)
