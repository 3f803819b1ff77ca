"""Real round trips through PEFT on PyTorch (peft 0.21.2, torch CPU).

A tiny random torch model is saved with ``save_pretrained`` and loaded here. Then:

* here -> PEFT: an adapter made here (trained a few SGD steps, or ``init_weights=False``) is
  saved with ``GraLoRAModel.save_pretrained`` and loaded by ``peft.PeftModel.from_pretrained``;
* PEFT -> here: an adapter made by ``peft.get_peft_model(..., init_weights=False)`` is saved by
  PEFT and loaded with ``GraLoRAModel.from_pretrained``;

and in both directions the logits must agree (1e-4). Cases: GraLoRA, hybrid GraLoRA, LoRA,
GPT-2 (Conv1D, fan_in_fan_out), trainable biases (``bias="all"``).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from gralora_jax import GraLoRAConfig, LoRAConfig  # noqa: E402
from gralora_jax import tree as tree_lib  # noqa: E402
from gralora_jax.loading import load_pretrained  # noqa: E402
from gralora_jax.surgery import GraLoRAModel, get_gralora_model  # noqa: E402

MATMUL_PRECISION = "highest"  # set around this module by conftest.matmul_precision
ATOL = 1e-4
IDS = np.array([[1, 5, 9, 13, 17, 21, 25, 29], [2, 4, 6, 8, 10, 12, 14, 16]], dtype=np.int64)


def _llama_config(**kw):
    return transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager", **kw
    )


def _gpt2_config():
    return transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                   attn_implementation="eager")


BASES = {
    "llama": (transformers.LlamaForCausalLM, _llama_config),
    "llama_bias": (transformers.LlamaForCausalLM, lambda: _llama_config(attention_bias=True)),
    "gpt2": (transformers.GPT2LMHeadModel, _gpt2_config),
    "qwen3": (transformers.Qwen3ForCausalLM, lambda: transformers.Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, attn_implementation="eager")),
    "gemma3_text": (transformers.Gemma3ForCausalLM, lambda: transformers.Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=4, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention"], attn_implementation="eager")),
}


# Families with no transformers Flax class: loaded into our models.
_OURS_ONLY = ("qwen3", "gemma3_text")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """name -> (torch base dir, flax model, flax params); built lazily."""
    cache = {}

    def get(name):
        if name not in cache:
            cls, cfg = BASES[name]
            torch.manual_seed(0)
            m = cls(cfg()).eval()
            if name == "llama_bias":  # non-zero biases so a bias mix-up shows
                with torch.no_grad():
                    for n, p in m.named_parameters():
                        if n.endswith(".bias"):
                            p.normal_(0, 0.1)
            d = tmp_path_factory.mktemp(name)
            m.save_pretrained(d)
            model, params = load_pretrained(str(d), use_ours=name in _OURS_ONLY)
            cache[name] = (d, model, params)
        return cache[name]

    return get


def _torch_base(d, cls_name):
    return BASES[cls_name][0].from_pretrained(str(d), attn_implementation="eager").eval()


def _torch_logits(m):
    with torch.no_grad():
        return m(input_ids=torch.tensor(IDS)).logits.numpy()


def _ours(gm, params=None):
    return np.asarray(gm.logits_fn(gm.params if params is None else params, jnp.asarray(IDS)))  # eager: faster than compiling tiny models


def _sgd_steps(gm, n=3, lr=0.5):
    """A few SGD steps on a next-token loss: B moves away from 0 by training, not by init."""
    train, frozen = gm.split_params()

    def loss(t):
        logits = gm.logits_fn(tree_lib.combine(t, frozen), jnp.asarray(IDS))
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], jnp.asarray(IDS)[:, 1:]).mean()

    opt = optax.sgd(lr)
    state = opt.init(train)
    step = jax.grad(loss)
    for _ in range(n):
        upd, state = opt.update(step(train), state)
        train = optax.apply_updates(train, upd)
    return tree_lib.combine(train, frozen)


HERE_TO_PEFT = {
    "gralora_trained": ("llama", GraLoRAConfig(r=4, alpha=8, gralora_k=2, target_modules=["q_proj", "v_proj", "down_proj"]), True),
    "gralora_hybrid": ("llama", GraLoRAConfig(r=4, alpha=8, gralora_k=2, hybrid_r=2, init_weights=False,
                                              target_modules=["q_proj", "k_proj", "o_proj", "up_proj"]), False),
    "gralora_k4": ("llama", GraLoRAConfig(r=8, alpha=4, gralora_k=4, init_weights=False, target_modules="all-linear"), False),
    "lora": ("llama", LoRAConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"]), False),
    "gpt2_gralora_hybrid": ("gpt2", GraLoRAConfig(r=4, alpha=8, gralora_k=2, hybrid_r=2, init_weights=False,
                                                  target_modules=["c_attn", "c_proj", "c_fc"]), False),
    "bias_all": ("llama_bias", GraLoRAConfig(r=4, alpha=8, gralora_k=2, bias="all", target_modules=["q_proj", "up_proj", "o_proj"]), True),
    "qwen3_gralora_hybrid": ("qwen3", GraLoRAConfig(r=4, alpha=8, gralora_k=2, hybrid_r=2, init_weights=False,
                                                    target_modules=["q_proj", "k_proj", "down_proj"]), False),
}


@pytest.mark.parametrize("case", list(HERE_TO_PEFT))
def test_here_to_peft(case, bases, tmp_path):
    base_name, config, train = HERE_TO_PEFT[case]
    d, model, params = bases(base_name)
    gm = get_gralora_model(model, config, params=params, rng=jax.random.PRNGKey(1))
    if train:
        gm.params = _sgd_steps(gm)
    ours = _ours(gm)
    assert np.abs(ours - _ours(gm, params)).max() > 10 * ATOL  # the adapter matters
    gm.save_pretrained(tmp_path)
    pm = peft.PeftModel.from_pretrained(_torch_base(d, base_name), str(tmp_path)).eval()
    np.testing.assert_allclose(_torch_logits(pm), ours, atol=ATOL, rtol=ATOL)


PEFT_TO_HERE = {
    "gralora": ("llama", lambda: peft.GraloraConfig(r=4, alpha=8, gralora_k=2, init_weights=False,
                                                    target_modules=["q_proj", "v_proj", "gate_proj"])),
    "gralora_hybrid": ("llama", lambda: peft.GraloraConfig(r=4, alpha=6, gralora_k=2, hybrid_r=2, init_weights=False,
                                                           target_modules=["k_proj", "o_proj", "down_proj"])),
    "lora": ("llama", lambda: peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                              target_modules=["q_proj", "up_proj"])),
    "gpt2_gralora": ("gpt2", lambda: peft.GraloraConfig(r=4, alpha=8, gralora_k=2, hybrid_r=2, init_weights=False,
                                                        target_modules=["c_attn", "c_proj", "c_fc"])),
    "bias_all": ("llama_bias", lambda: peft.GraloraConfig(r=4, alpha=8, gralora_k=2, bias="all", init_weights=False,
                                                          target_modules=["q_proj", "v_proj"])),
    "gemma3_gralora_hybrid": ("gemma3_text", lambda: peft.GraloraConfig(
        r=4, alpha=8, gralora_k=2, hybrid_r=2, init_weights=False, target_modules=["q_proj", "v_proj", "down_proj"])),
    "qwen3_gralora": ("qwen3", lambda: peft.GraloraConfig(r=4, alpha=8, gralora_k=2, init_weights=False,
                                                          target_modules=["k_proj", "o_proj", "up_proj"])),
    "bias_gralora_only": ("llama_bias", lambda: peft.GraloraConfig(r=4, alpha=8, gralora_k=2, bias="gralora_only",
                                                                   init_weights=False, target_modules=["q_proj"])),
}


@pytest.mark.parametrize("case", list(PEFT_TO_HERE))
def test_peft_to_here(case, bases, tmp_path):
    base_name, make_cfg = PEFT_TO_HERE[case]
    d, model, params = bases(base_name)
    torch.manual_seed(1)
    pm = peft.get_peft_model(_torch_base(d, base_name), make_cfg()).eval()
    bias = make_cfg().bias
    if bias != "none":  # trained biases travel in the adapter file (all, or only the adapted modules')
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if n.endswith(".base_layer.bias") or (bias == "all" and n.endswith(".bias")):
                    p.add_(0.2)
    ref = _torch_logits(pm)
    pm.save_pretrained(tmp_path)
    gm = GraLoRAModel.from_pretrained(model, str(tmp_path), params=params)
    np.testing.assert_allclose(_ours(gm), ref, atol=ATOL, rtol=ATOL)
    # and merging here gives the same function
    np.testing.assert_allclose(_ours(gm, gm.merge_and_unload()), ref, atol=ATOL, rtol=ATOL)
    assert np.abs(ref - _ours(gm, params)).max() > 10 * ATOL
