"""GGUF Gemma 3 (llama.cpp architecture ``gemma3``) -> our Flax Gemma3 and transformers' config.

The tiny files are written the way llama.cpp's ``convert_hf_to_gguf.py`` (``Gemma3Model``) writes
them: tensor names from gguf-py's own name table (not ours), ``+1`` on every ``*norm.weight``, q/k
rows as in HF (no rotary permutation), no ``output.weight`` (tied), the global rotary base in
``gemma3.rope.freq_base`` and no local base, sliding-window pattern or attention scale in the file
(llama.cpp hard-codes 10000, every 6th layer global, ``1/sqrt(head_dim)``). Logits are compared
with the transformers PyTorch model that the file was written from.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
import transformers  # noqa: E402

from gralora_jax.loading import load_gguf, load_gguf_config, load_pretrained  # noqa: E402

MATMUL_PRECISION = "highest"


def _tiny(seed=0, n_layers=7, window=3, **kw):
    """A random Gemma3 whose layer pattern is llama.cpp's (every 6th global), norms perturbed off zero."""
    cfg = transformers.Gemma3TextConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=64,
        rope_theta=1000000.0, rope_local_base_freq=10000.0, sliding_window=window,
        layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n_layers)], **kw)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF stores Gemma norms as w (scale 1 + w, zeros at init): make the shift matter
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _write(model, path, qtype="F32", *, drop=(), swa=True, kv_heads=None, extra_tensors=None):
    """``model`` as llama.cpp's converter writes a Gemma3 (see the module docstring); ``drop``,
    ``kv_heads`` and ``extra_tensors`` spoil it for the error tests."""
    c = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, c.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(kv_heads or c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    if swa:
        w.add_sliding_window(c.sliding_window)
    if c.rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(c.rope_scaling["factor"])
    if c.final_logit_softcapping:
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":  # tied: the converter writes token_embd only
            continue
        name = names.get_name(k.removesuffix(".weight")) + ".weight"
        if name in drop:
            continue
        v = v.numpy().astype(np.float32)
        if k.endswith("norm.weight"):
            v = v + 1
        if v.ndim == 2 and qtype != "F32":
            t = getattr(gguf.GGMLQuantizationType, qtype)
            w.add_tensor(name, gguf.quants.quantize(v, t), raw_dtype=t)
        else:
            w.add_tensor(name, v)
    for name, v in (extra_tensors or {}).items():
        w.add_tensor(name, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.fixture(scope="module")
def ids():
    return np.random.RandomState(3).randint(0, 96, (2, 9))  # 9 > window 3: the sliding layers slide


@pytest.mark.parametrize("extra", [{}, dict(rope_scaling={"rope_type": "linear", "factor": 2.0},
                                           final_logit_softcapping=3.0)], ids=["plain", "scaled_softcapped"])
def test_gemma3_gguf_matches_the_torch_model(tmp_path, ids, extra):
    tm = _tiny(seed=1, **extra)
    path = _write(tm, tmp_path / "tiny-gemma3.gguf")
    config, sd, tok = load_gguf(path, with_tokenizer=False)
    c = tm.config
    assert type(config).__name__ == "Gemma3TextConfig" and config.architectures == ["Gemma3ForCausalLM"]
    assert config.tie_word_embeddings and tok is None
    for field in ("head_dim", "num_key_value_heads", "sliding_window", "layer_types", "rope_theta",
                  "rope_local_base_freq", "query_pre_attn_scalar", "final_logit_softcapping", "hidden_activation"):
        assert getattr(config, field) == getattr(c, field), field
    assert (config.rope_scaling or {}).get("factor") == (c.rope_scaling or {}).get("factor")
    ref = {k: v.numpy() for k, v in tm.state_dict().items() if k != "lm_head.weight"}
    assert set(sd) == set(ref)
    for k in ref:  # norms come back as (w + 1) - 1 in float32
        np.testing.assert_allclose(sd[k], ref[k], rtol=0, atol=1e-6, err_msg=k)
    model, params = load_pretrained(path)
    assert type(model).__name__ == "Gemma3ForCausalLM" and "lm_head" not in params
    np.testing.assert_allclose(np.asarray(model(ids, params=params).logits), _torch_logits(tm, ids), atol=1e-4)


def test_gemma3_gguf_quantised(tmp_path, ids):
    """Q8_0 matrices (norms stay float32, as llama.cpp keeps 1-D tensors): close to the original."""
    tm = _tiny(seed=2)
    model, params = load_pretrained(_write(tm, tmp_path / "q8.gguf", "Q8_0"))
    np.testing.assert_allclose(np.asarray(model(ids, params=params).logits), _torch_logits(tm, ids), atol=0.05)


def test_gemma3_gguf_without_sliding_window_is_all_global(tmp_path):
    """llama.cpp: no (or zero) ``gemma3.attention.sliding_window`` means no sliding layers."""
    config = load_gguf_config(_write(_tiny(n_layers=2), tmp_path / "noswa.gguf", swa=False))
    assert config.layer_types == ["full_attention"] * 2 and config.sliding_window is None


def test_gemma3_gguf_27b_attention_scale(tmp_path):
    """llama.cpp scales queries by 1/sqrt(hidden/heads) for the 62-layer 27B, 1/sqrt(head_dim) otherwise."""
    w = gguf.GGUFWriter(str(tmp_path / "deep.gguf"), "gemma3")
    for add, value in (("add_block_count", 62), ("add_embedding_length", 64), ("add_feed_forward_length", 8),
                       ("add_head_count", 2), ("add_head_count_kv", 1), ("add_key_length", 16),
                       ("add_value_length", 16), ("add_sliding_window", 4)):
        getattr(w, add)(value)
    w.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    config = load_gguf_config(tmp_path / "deep.gguf")
    assert config.query_pre_attn_scalar == 32 and config.head_dim == 16
    assert config.layer_types[4:6] == ["sliding_attention", "full_attention"] and config.layer_types[-1] == "sliding_attention"


@pytest.fixture(scope="module")
def small():
    return _tiny(seed=4, n_layers=2)


def test_missing_tensor_names_file_and_tensor(tmp_path, small):
    path = _write(small, tmp_path / "cut.gguf", drop=("blk.1.attn_k_norm.weight",))
    with pytest.raises(ValueError) as e:
        load_gguf(path, with_tokenizer=False)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "'blk.1.attn_k_norm.weight' is missing" in msg


def test_shape_mismatch_names_file_and_tensor(tmp_path, small):
    """Metadata that disagrees with the tensors (one kv head claimed, two stored)."""
    path = _write(small, tmp_path / "kv.gguf", kv_heads=1)
    with pytest.raises(ValueError, match=r"kv\.gguf: GGUF tensor 'blk\.0\.attn_k\.weight' has shape \(32, 32\), "
                                         r"but the metadata implies \(16, 32\)"):
        load_gguf(path, with_tokenizer=False)


def test_unknown_tensor_names_the_file(tmp_path, small):
    path = _write(small, tmp_path / "extra.gguf", extra_tensors={"blk.0.attn_sinks.weight": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match=r"extra\.gguf: GGUF tensors with no Gemma3TextConfig equivalent: "
                                         r"\['blk\.0\.attn_sinks\.weight'\]"):
        load_gguf(path, with_tokenizer=False)
