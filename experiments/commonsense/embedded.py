"""The embedded default: a tiny random Llama and a word-level tokenizer, in HF layout.

With no ``--model`` the experiment still runs end to end with no network: this module
writes, once per spec, a cache directory that looks exactly like a user's checkpoint::

    <cache>/embedded-<fingerprint>/
        model/config.json, model.safetensors       (PyTorch names, seeded random weights)
        model/tokenizer.json, tokenizer_config.json, special_tokens_map.json
        data/train.json, data/<task>/test.json     (synthetic.write_synthetic)

and the CLI then loads ``model/`` through the same ``gralora_jax.loading.load_pretrained``
as any checkpoint. The tokenizer is a ``tokenizers`` WordLevel model over the synthetic
corpus and the prompt template (every word one token, so "answer2" is one token),
wrapped as ``transformers.PreTrainedTokenizerFast`` with ``<s>`` (prepended), ``</s>``,
``<pad>`` and ``<unk>``. Weights are drawn from a numpy generator seeded by
``EmbeddedSpec.seed`` (no torch needed) with *unit gain* (``normal(0, 1/sqrt(fan_in))``,
norms at one) rather than HF's ``normal(0, 0.02)``: with adapters only, the frozen
final norm and ``lm_head`` bound every logit by ``|h| * |w_token|``, and at std 0.02 that
bound (~2.6 for width 128) keeps the softmax near uniform however the adapters train.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile

import numpy as np

from experiments.commonsense import prompt as prompt_lib
from experiments.commonsense import synthetic

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
_VERSION = 3  # bump when the generated files change meaning


@dataclasses.dataclass(frozen=True)
class EmbeddedSpec:
    seed: int = 0  # seeds the weights and the synthetic data
    hidden_size: int = 128  # model width
    intermediate_size: int = 256  # MLP width
    num_hidden_layers: int = 2  # decoder layers
    num_attention_heads: int = 4  # query heads
    num_key_value_heads: int = 2  # key/value heads (grouped-query attention)
    max_position_embeddings: int = 512  # longest sequence
    init_gain: float = 1.0  # weights ~ normal(0, gain / sqrt(fan_in)); embeddings ~ normal(0, gain)
    n_train_per_task: int = 400  # synthetic training records per task
    n_test_per_task: int = 100  # synthetic held-out records per task

    def fingerprint(self) -> str:
        blob = json.dumps({"v": _VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_cache_dir() -> pathlib.Path:
    root = os.environ.get("GRALORA_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "gralora_jax"
    )
    return pathlib.Path(root) / "commonsense"


def build_tokenizer(texts: list[str]):
    """A ``PreTrainedTokenizerFast`` whose vocabulary is every word of ``texts`` (+ the prompt)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1)
    template = [prompt_lib.build_prompt("x", "y", "z"), prompt_lib.build_prompt("x")]
    tok.train_from_iterator(list(texts) + template, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _hf_config(spec: EmbeddedSpec, vocab_size: int, tokenizer) -> dict:
    heads = spec.num_attention_heads
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.hidden_size // heads,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "initializer_range": spec.init_gain / spec.hidden_size**0.5,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def random_state_dict(spec: EmbeddedSpec, vocab_size: int) -> dict[str, np.ndarray]:
    """HF-PyTorch-named float32 weights (``.weight`` of Linear is ``[out, in]``)."""
    rng = np.random.default_rng(spec.seed)
    h, m, g = spec.hidden_size, spec.intermediate_size, spec.init_gain
    hd = h // spec.num_attention_heads
    kv = spec.num_key_value_heads * hd

    def normal(out_f, in_f):  # a Linear weight [out, in]: unit gain at init
        return (rng.standard_normal((out_f, in_f)) * g / np.sqrt(in_f)).astype(np.float32)

    sd = {"model.embed_tokens.weight": (rng.standard_normal((vocab_size, h)) * g).astype(np.float32)}
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = normal(h, h)
        sd[p + "self_attn.k_proj.weight"] = normal(kv, h)
        sd[p + "self_attn.v_proj.weight"] = normal(kv, h)
        sd[p + "self_attn.o_proj.weight"] = normal(h, h)
        sd[p + "mlp.gate_proj.weight"] = normal(m, h)
        sd[p + "mlp.up_proj.weight"] = normal(m, h)
        sd[p + "mlp.down_proj.weight"] = normal(h, m)
        sd[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        sd[p + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
    sd["model.norm.weight"] = np.ones(h, np.float32)
    sd["lm_head.weight"] = normal(vocab_size, h)
    return sd


def _write(spec: EmbeddedSpec, dest: pathlib.Path) -> None:
    from safetensors.numpy import save_file

    train_file, _ = synthetic.write_synthetic(
        dest / "data", n_train_per_task=spec.n_train_per_task, n_test_per_task=spec.n_test_per_task, seed=spec.seed
    )
    records = json.loads(train_file.read_text())
    for task in synthetic.TASKS:
        records += json.loads((dest / "data" / task / "test.json").read_text())
    tokenizer = build_tokenizer(synthetic.corpus(records))
    vocab = -(-len(tokenizer) // 8) * 8  # round up to a multiple of 8
    mdir = dest / "model"
    mdir.mkdir(parents=True)
    tokenizer.save_pretrained(mdir)
    (mdir / "config.json").write_text(json.dumps(_hf_config(spec, vocab, tokenizer), indent=2))
    save_file(random_state_dict(spec, vocab), str(mdir / "model.safetensors"), metadata={"format": "pt"})


def ensure_embedded(spec: EmbeddedSpec = EmbeddedSpec(), cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The directory holding ``model/`` and ``data/`` for ``spec``; written on first use.

    Written into a temporary sibling and renamed, so concurrent runs never see half a cache.
    """
    root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dest = root / f"embedded-{spec.fingerprint()}"
    if (dest / "model" / "model.safetensors").exists():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=root, prefix=".tmp-embedded-"))
    try:
        _write(spec, tmp)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process won the race
            if not (dest / "model" / "model.safetensors").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
