"""Our flax decoders vs transformers' PyTorch models: same weights, same logits (float32, 1e-4).

Each case builds a tiny random PyTorch model (hidden 64, 2 layers, 4 heads / 2 kv heads,
vocab 128), perturbs every parameter (norm weights and biases included, so a missing
bias or a wrong norm offset shows), converts its state dict onto our parameter tree and
compares logits at the real tokens of a batch with right padding (row 0) and left
padding (row 1).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gralora_jax.loading import torch_to_flax_params  # noqa: E402
from gralora_jax.models import (  # noqa: E402
    auto_model, from_pretrained, stack_layer_params, unstack_layer_params)

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
SEQ = 12

CASES = {
    "llama_default": ("LlamaConfig", dict(rope_theta=10000.0)),
    "llama3_scaling_tied": ("LlamaConfig", dict(
        rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32))),
    "llama_linear": ("LlamaConfig", dict(rope_scaling=dict(type="linear", factor=2.0))),
    "llama_dynamic": ("LlamaConfig", dict(max_position_embeddings=8, rope_scaling=dict(type="dynamic", factor=2.0))),
    "llama_bias_partial": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True, head_dim=24)),
    "qwen2": ("Qwen2Config", dict(rope_theta=1000000.0, tie_word_embeddings=True)),
    "qwen3_headdim_tied": ("Qwen3Config", dict(head_dim=24, rope_theta=1000000.0, tie_word_embeddings=True)),
    "mistral_window": ("MistralConfig", dict(sliding_window=4)),
    "gemma": ("GemmaConfig", dict(head_dim=16, hidden_activation="gelu_pytorch_tanh")),
    "gemma3_text": ("Gemma3TextConfig", dict(
        head_dim=16, sliding_window=4, query_pre_attn_scalar=24, rope_theta=1000000.0, rope_local_base_freq=10000.0,
        rope_scaling=dict(rope_type="linear", factor=2.0), layer_types=["sliding_attention", "full_attention"])),
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
}


def make_torch_model(cls_name, extra, seed=0):
    cfg = getattr(transformers, cls_name)(**{**SMALL, **extra})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model_cls = getattr(transformers, cls_name.replace("TextConfig", "Config").replace("Config", "ForCausalLM"))
    tm = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if "norm" in name:
                p.copy_(p + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(p + 0.05 * torch.randn_like(p))
    return cfg, tm


def to_flax(tm, model):
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    tie = bool(getattr(model.config, "tie_word_embeddings", False))
    params = torch_to_flax_params(sd, model.params_shape_tree, tie_word_embeddings=tie)
    return jax.tree_util.tree_map(jnp.asarray, params)


def batch(vocab=128, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(2, SEQ))
    mask = np.ones((2, SEQ), np.int64)
    mask[0, -2:] = 0  # right padding
    mask[1, :3] = 0  # left padding
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    return ids, mask, pos


def torch_logits(tm, ids, mask, pos):
    with torch.no_grad():
        out = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    return out.logits.float().numpy()


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    cls_name, extra = CASES[request.param]
    cfg, tm = make_torch_model(cls_name, extra)
    model = auto_model(cfg)
    params = to_flax(tm, model)
    ids, mask, pos = batch()
    return request.param, cfg, tm, model, params, ids, mask, pos


def test_logits_match_torch(case):
    name, cfg, tm, model, params, ids, mask, pos = case
    want = torch_logits(tm, ids, mask, pos)
    got = np.asarray(jax.jit(model.apply)(params, ids, mask).logits)
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=1e-4, err_msg=name)


def test_tree_names_follow_hf_flax(case):
    name, cfg, tm, model, params, *_ = case
    layer = params["model"]["layers"]["0"]
    qk_norm = {"q_norm", "k_norm"} if name.startswith(("qwen3", "gemma3")) else set()
    assert set(layer["self_attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"} | qk_norm
    if qk_norm:  # per-head norms: weight [head_dim]
        assert layer["self_attn"]["k_norm"]["weight"].shape == (cfg.head_dim,)
    assert set(layer["mlp"]) == {"gate_proj", "up_proj", "down_proj"}
    assert "embedding" in params["model"]["embed_tokens"] and "weight" in params["model"]["norm"]
    assert ("lm_head" in params) == (not cfg.tie_word_embeddings)
    if name == "qwen2":
        assert {"kernel", "bias"} == set(layer["self_attn"]["q_proj"])
        assert {"kernel"} == set(layer["self_attn"]["o_proj"])


@pytest.mark.skipif(not hasattr(transformers, "FlaxLlamaForCausalLM"), reason="transformers without Flax models")
def test_transformers_flax_llama_ignores_rope_theta():
    """Why this package exists: transformers' Flax Llama ignores rope_theta (if this fails, the quirk is fixed)."""
    cfg = transformers.LlamaConfig(**{**SMALL, "rope_theta": 500000.0})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    tm = transformers.LlamaForCausalLM(cfg).eval()
    fm = transformers.FlaxLlamaForCausalLM(cfg, _do_init=False)
    ours = auto_model(cfg)
    params = to_flax(tm, ours)
    ids = np.random.default_rng(0).integers(0, 128, size=(1, SEQ))
    want = torch_logits(tm, ids, np.ones_like(ids), np.arange(SEQ)[None])
    theirs = np.asarray(jax.jit(lambda p: fm(ids, params=p).logits)(params))
    np.testing.assert_allclose(np.asarray(jax.jit(ours.apply)(params, ids).logits), want, atol=1e-4, rtol=1e-4)
    assert np.abs(theirs - want).max() > 1e-3


@pytest.fixture(scope="module")
def llama():
    cfg, tm = make_torch_model("LlamaConfig", dict(rope_theta=500000.0))
    model = auto_model(cfg)
    return cfg, tm, model, to_flax(tm, model)


def _loss_grad(model, params, ids, mask):
    return jax.jit(jax.value_and_grad(lambda p: jnp.mean(model.apply(p, ids, mask).logits ** 2)))(params)


@pytest.fixture(scope="module")
def llama_ref_grad(llama):
    cfg, tm, model, params = llama
    ids, mask, _ = batch()
    return _loss_grad(model, params, ids, mask)


@pytest.mark.parametrize("scan,remat_policy", [(True, "dots_saveable"), (False, "full")])
def test_scan_and_remat_match_unrolled(llama, llama_ref_grad, scan, remat_policy):
    cfg, tm, model, params = llama
    ids, mask, _ = batch()
    other = auto_model(cfg, scan_layers=scan, remat_policy=remat_policy)
    oparams = stack_layer_params(params) if scan else params
    assert jax.tree_util.tree_structure(oparams) == jax.tree_util.tree_structure(other.params_shape_tree)
    loss, grads = _loss_grad(other, oparams, ids, mask)
    ref_loss, ref_grads = llama_ref_grad
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    if scan:
        assert oparams["model"]["layers"]["scan"]["self_attn"]["q_proj"]["kernel"].shape == (2, 64, 64)
        grads = unstack_layer_params(grads)
    for path in [("model", "layers", "1", "mlp", "down_proj", "kernel"),
                 ("model", "layers", "0", "self_attn", "q_proj", "kernel")]:
        g, r = grads, ref_grads
        for k in path:
            g, r = g[k], r[k]
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-6, err_msg=str(path))


def test_lengths_mode_right_padding(llama):
    cfg, tm, model, params = llama
    ids, mask, pos = batch()
    mask[1] = 1
    mask[1, -5:] = 0  # both rows right padded
    lengths_model = auto_model(cfg, attention_mask_mode="lengths")
    got = np.asarray(jax.jit(lengths_model.apply)(params, ids, mask).logits)
    want = torch_logits(tm, ids, mask, np.maximum(np.cumsum(mask, -1) - 1, 0))
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=1e-4)


def test_hidden_states_and_no_logits(llama):
    cfg, tm, model, params = llama
    ids, mask, pos = batch()
    out = jax.jit(lambda p: model.apply(p, ids, mask, output_hidden_states=True))(params)
    with torch.no_grad():
        t = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
               output_hidden_states=True)
    assert len(out.hidden_states) == len(t.hidden_states) == 3
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out.hidden_states[1])[valid], t.hidden_states[1].numpy()[valid], atol=1e-4)
    # final normed hidden @ lm_head == logits
    h = jax.jit(lambda p: model.apply(p, ids, mask, compute_logits=False))(params)
    assert h.logits is None
    np.testing.assert_allclose(np.asarray(h.last_hidden_state @ model.lm_head_kernel(params)), np.asarray(out.logits),
                               atol=1e-4)


def test_golden_tiny_llama_from_pretrained(data_dir):
    model, params = from_pretrained(data_dir / "model_tiny_llama_r8_k2_h0" / "base")
    gold = np.load(data_dir / "model_tiny_llama_r8_k2_h0.npz")
    logits = jax.jit(model.apply)(params, gold["input_ids"], gold["attention_mask"]).logits
    np.testing.assert_allclose(np.asarray(logits), gold["logits_base"], atol=1e-4, rtol=1e-4)


def test_auto_model_rejects_unknown_type():
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        auto_model(transformers.GPT2Config())


def test_bf16_compute_close_to_float32(llama):
    cfg, tm, model, params = llama
    ids, mask, _ = batch()
    bf = auto_model(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    bparams = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    assert bf.params_shape_tree["model"]["norm"]["weight"].dtype == jnp.bfloat16
    got = jax.jit(bf.apply)(bparams, ids, mask).logits
    assert got.dtype == jnp.float32
    ref = np.asarray(jax.jit(model.apply)(params, ids, mask).logits)
    valid = mask.astype(bool)
    err = np.abs(np.asarray(got)[valid] - ref[valid]).max() / np.abs(ref[valid]).max()
    assert err < 5e-2, err
