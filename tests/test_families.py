"""Every supported model family, through transformers' own Flax classes (tiny random configs).

Per family: zero-initialised adapters leave the logits bit-for-bit unchanged, non-zero ones
change them, merged equals unmerged (1e-4), the kernel layout is right (GPT-2's FlaxConv1D
stores ``[out, in]``), and the PEFT key names we write equal the ones PEFT writes for the
equivalent PyTorch model. Also the T5 quirk (jax 0.10 removed ``jnp.clip(a_max=...)``).
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import transformers as tf

from gralora_jax import GraLoRAConfig, quirks
from gralora_jax import tree as tree_lib
from gralora_jax.loading import read_safetensors_file
from gralora_jax.surgery import IN_OUT, OUT_IN, get_gralora_model

MATMUL_PRECISION = "highest"  # set around this module by conftest.matmul_precision
ATOL = 1e-4
IDS = np.array([[3, 5, 7, 9, 11, 13, 2, 4]], dtype=np.int32)

_small = dict(vocab_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
FAMILIES = {
    # name: (config, flax class, torch class name, target modules, an adapted module path, its layout)
    "llama": (lambda: tf.LlamaConfig(hidden_size=32, num_key_value_heads=2, max_position_embeddings=64, **_small),
              "FlaxLlamaForCausalLM", "LlamaForCausalLM", ["q_proj", "v_proj", "down_proj"],
              "model/layers/1/mlp/down_proj", IN_OUT),
    "mistral": (lambda: tf.MistralConfig(hidden_size=32, num_key_value_heads=2, max_position_embeddings=64,
                                         sliding_window=None, **_small),
                "FlaxMistralForCausalLM", "MistralForCausalLM", ["q_proj", "o_proj", "up_proj"],
                "model/layers/0/self_attn/o_proj", IN_OUT),
    "gemma": (lambda: tf.GemmaConfig(hidden_size=32, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                                     hidden_activation="gelu_pytorch_tanh", **_small),
              "FlaxGemmaForCausalLM", "GemmaForCausalLM", ["k_proj", "gate_proj"],
              "model/layers/0/mlp/gate_proj", IN_OUT),
    "gpt2": (lambda: tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32),
             "FlaxGPT2LMHeadModel", "GPT2LMHeadModel", ["c_attn", "c_proj", "c_fc"],
             "transformer/h/0/attn/c_attn", OUT_IN),
    "bert": (lambda: tf.BertConfig(hidden_size=32, max_position_embeddings=32, initializer_range=0.3, **_small),
             "FlaxBertForSequenceClassification", "BertForSequenceClassification", ["query", "value", "output.dense"],
             "bert/encoder/layer/1/attention/self/query", IN_OUT),
    "roberta": (lambda: tf.RobertaConfig(hidden_size=32, max_position_embeddings=40, initializer_range=0.3, **_small),
                "FlaxRobertaForSequenceClassification", "RobertaForSequenceClassification", ["query", "key", "value"],
                "roberta/encoder/layer/0/attention/self/key", IN_OUT),
    "t5": (lambda: tf.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
           "FlaxT5ForConditionalGeneration", "T5ForConditionalGeneration", ["q", "v", "wo"],
           "decoder/block/1/layer/1/EncDecAttention/q", IN_OUT),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    name = request.param
    make_cfg, cls, _, targets, _, _ = FAMILIES[name]
    if name == "t5":
        quirks.patch_t5_clip()  # building a Flax T5 traces the relative-position buckets
    model = getattr(tf, cls)(make_cfg(), seed=0)
    kw = {"decoder_input_ids": jnp.asarray(IDS)} if name == "t5" else {}
    base = np.asarray(model(jnp.asarray(IDS), **kw).logits)
    return name, model, targets, kw, base


def test_family(family, tmp_path):
    name, model, targets, kw, base = family
    *_, probe, layout = FAMILIES[name]

    zero = get_gralora_model(model, GraLoRAConfig(r=4, alpha=8, gralora_k=2, target_modules=targets))
    assert probe in zero.adapted_modules
    assert zero.layouts[probe] == layout
    np.testing.assert_array_equal(np.asarray(zero(jnp.asarray(IDS), **kw).logits), base)

    gm = get_gralora_model(model, GraLoRAConfig(r=4, alpha=8, gralora_k=2, hybrid_r=2, init_weights=False,
                                                target_modules=targets), rng=jax.random.PRNGKey(3))
    kernel = tree_lib.flatten(gm.params)[probe + "/kernel"]
    a = tree_lib.flatten(gm.params)[probe + "/gralora_A_general"]
    b = tree_lib.flatten(gm.params)[probe + "/gralora_B_general"]
    assert (a.shape[0], b.shape[1]) == (kernel.shape if layout == IN_OUT else kernel.shape[::-1])
    adapted = np.asarray(gm(jnp.asarray(IDS), **kw).logits)
    assert np.abs(adapted - base).max() > 1e-3
    merged = np.asarray(model(jnp.asarray(IDS), params=gm.merge_and_unload(), **kw).logits)
    np.testing.assert_allclose(merged, adapted, atol=ATOL, rtol=ATOL)

    gm.save_pretrained(tmp_path)
    import json

    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is (layout == OUT_IN)
    peft_keys = _peft_keys(name, targets, tmp_path / "peft")
    assert set(read_safetensors_file(tmp_path / "adapter_model.safetensors")) == peft_keys


def _peft_keys(name, targets, out_dir):
    """The keys PEFT on PyTorch saves for the same family, targets and hybrid rank."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    make_cfg, _, torch_cls, *_ = FAMILIES[name]
    torch.manual_seed(0)
    m = getattr(tf, torch_cls)(make_cfg())
    pm = peft.get_peft_model(m, peft.GraloraConfig(r=4, alpha=8, gralora_k=2, hybrid_r=2, target_modules=targets))
    pm.save_pretrained(out_dir)
    return set(read_safetensors_file(out_dir / "adapter_model.safetensors"))


# ----------------------------------------------------------------------------- the T5 quirk


def test_t5_quirk_still_needed():
    """Fails once jax accepts ``jnp.clip(a_max=...)`` again (or transformers stops using it):
    then ``gralora_jax.quirks.patch_t5_clip`` can be deleted."""
    quirks.patch_t5_clip()
    with pytest.raises(TypeError):
        jnp.clip(jnp.arange(3), a_max=1)  # jax.numpy itself is never patched
    assert not quirks.jnp_clip_accepts_a_max()
    import inspect

    src = inspect.getsource(__import__("transformers.models.t5.modeling_flax_t5", fromlist=["x"]))
    assert "a_max=" in src


def test_t5_quirk_patch_is_local_and_idempotent():
    from transformers.models.t5 import modeling_flax_t5 as t5

    quirks.patch_t5_clip()
    assert quirks.patch_t5_clip() == []  # second call: nothing to do
    x = jnp.arange(-3, 4)
    np.testing.assert_array_equal(np.asarray(t5.jnp.clip(x, a_max=0)), np.minimum(np.arange(-3, 4), 0))
    np.testing.assert_array_equal(np.asarray(t5.jnp.clip(x, a_min=-1, a_max=1)), np.clip(np.arange(-3, 4), -1, 1))
    assert t5.jnp.einsum is jnp.einsum  # everything else is plain jax.numpy
    assert jnp.clip is not t5.jnp.clip


def test_build_model_applies_t5_quirk(monkeypatch):
    """``loading.build_model`` patches transformers' Flax T5 where it builds one; surgery does not."""
    from transformers.models.t5 import modeling_flax_t5 as t5

    from gralora_jax.loading import build_model

    quirks.patch_t5_clip()
    model = tf.FlaxT5ForConditionalGeneration(FAMILIES["t5"][0](), seed=0)
    monkeypatch.setattr(t5, "jnp", jnp)  # as if never patched (restored after the test)
    gm = get_gralora_model(model, GraLoRAConfig(r=4, alpha=8, target_modules=["q"]))
    assert t5.jnp is jnp  # get_gralora_model leaves third-party modules alone

    built = build_model(FAMILIES["t5"][0](), model_family="seq2seq")
    assert isinstance(t5.jnp, quirks._JnpWithOldClip)
    assert type(built).__name__ == "FlaxT5ForConditionalGeneration"
    assert gm(jnp.asarray(IDS), decoder_input_ids=jnp.asarray(IDS)).logits.shape == (1, 8, 64)


def test_loading_builds_a_flax_t5_in_a_fresh_process():
    """The quirk is applied where the T5 model is built (``loading.build_model``), so a fresh
    process can build and run one without touching ``get_gralora_model``."""
    import subprocess
    import sys

    code = (
        "import jax, jax.numpy as jnp, transformers\n"
        "from gralora_jax.loading.pretrained import build_model\n"
        "cfg = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)\n"
        "model = build_model(cfg, model_family='seq2seq')\n"
        "params = model.init_weights(jax.random.PRNGKey(0), (1, 4))\n"
        "ids = jnp.ones((1, 4), jnp.int32)\n"
        "print(model(ids, decoder_input_ids=ids, params=params).logits.shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("(1, 4, 64)")
