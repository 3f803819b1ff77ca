"""KV-cache generation vs transformers PyTorch ``generate(do_sample=False)`` on tiny random models."""

import contextlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gralora_jax.loading import torch_to_flax_params  # noqa: E402
from gralora_jax.models import auto_model, generate, stack_layer_params  # noqa: E402

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
NEW = 8


def build(cls_name="LlamaConfig", seed=0, **extra):
    cfg = getattr(transformers, cls_name)(**{**SMALL, **extra})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    tm = getattr(transformers, cls_name.replace("TextConfig", "Config").replace("Config", "ForCausalLM"))(cfg).eval()
    with torch.no_grad():  # sharper distributions than the 0.02 init, so decoding is not a tie-fest
        for name, p in tm.named_parameters():
            if "norm" not in name:
                p.mul_(8.0)
    model = auto_model(cfg)
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    params = jax.tree_util.tree_map(jnp.asarray, torch_to_flax_params(
        sd, model.params_shape_tree, tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False))))
    return cfg, tm, model, params


def prompts(vocab=64, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(3, 7))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, :1] = 0
    ids[mask == 0] = 0
    return ids, mask


def torch_generate(tm, ids, mask, **kw):
    with torch.no_grad():
        out = tm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=NEW,
                          do_sample=False, **kw)
    return out.numpy()


def assert_same(got, want, pad):
    got = np.asarray(got)
    assert got.shape[1] >= want.shape[1]
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)
    assert (got[:, want.shape[1]:] == pad).all()


@pytest.fixture(scope="module")
def llama():
    return build(rope_theta=500000.0)


def test_greedy_matches_torch(llama):
    cfg, tm, model, params = llama
    ids, mask = prompts()
    want = torch_generate(tm, ids, mask, eos_token_id=None, pad_token_id=0)
    got = generate(model, params, ids, mask, NEW)
    assert_same(got, want, 0)


def test_greedy_eos_pads_after_stop(llama):
    cfg, tm, model, params = llama
    ids, mask = prompts()
    free = np.asarray(generate(model, params, ids, mask, NEW))
    eos = int(free[0, 7 + 2])  # the third token row 0 generates becomes "EOS"
    want = torch_generate(tm, ids, mask, eos_token_id=eos, pad_token_id=0)
    got = np.asarray(generate(model, params, ids, mask, NEW, eos_token_id=eos, pad_token_id=0))
    assert_same(got, want, 0)
    first = 7 + int(np.argmax(free[0, 7:] == eos))
    assert got[0, first] == eos and (got[0, first + 1:] == 0).all()
    np.testing.assert_array_equal(got[0, :first], free[0, :first])


def test_beam_search_matches_torch(llama):
    cfg, tm, model, params = llama
    ids, mask = prompts(seed=1)
    want = torch_generate(tm, ids, mask, num_beams=4, eos_token_id=None, pad_token_id=0)
    got = generate(model, params, ids, mask, NEW, num_beams=4)
    assert_same(got, want, 0)


def test_beam_search_with_eos_matches_torch(llama):
    cfg, tm, model, params = llama
    ids, mask = prompts(seed=1)
    greedy = np.asarray(generate(model, params, ids, mask, NEW))
    eos = int(greedy[1, 7 + 1])
    want = torch_generate(tm, ids, mask, num_beams=3, eos_token_id=eos, pad_token_id=0)
    got = generate(model, params, ids, mask, NEW, num_beams=3, eos_token_id=eos, pad_token_id=0)
    assert_same(got, want, 0)


@pytest.mark.parametrize("config_name,seeds,extra", [
    ("MistralConfig", (3, 2), {"sliding_window": 3}),  # a sliding window
    ("Qwen3Config", (4, 5), {"head_dim": 24}),  # q/k norms, head_dim != hidden / heads
])
def test_greedy_unrolled_and_scanned(config_name, seeds, extra):
    cfg, tm, model, params = build(config_name, seed=seeds[0], **extra)
    ids, mask = prompts(seed=seeds[1])
    want = torch_generate(tm, ids, mask, eos_token_id=None, pad_token_id=0)
    assert_same(generate(model, params, ids, mask, NEW), want, 0)
    scanned = auto_model(cfg, scan_layers=True)
    assert_same(generate(scanned, stack_layer_params(params), ids, mask, NEW), want, 0)


def test_gemma3_local_global_rope_greedy():
    cfg, tm, model, params = build("Gemma3TextConfig", seed=6, head_dim=16, sliding_window=3, query_pre_attn_scalar=24,
                                   rope_theta=1000000.0, rope_local_base_freq=10000.0,
                                   rope_scaling=dict(rope_type="linear", factor=2.0),
                                   layer_types=["sliding_attention", "full_attention"])
    ids, mask = prompts(seed=7)
    want = torch_generate(tm, ids, mask, eos_token_id=None, pad_token_id=0)
    assert_same(generate(model, params, ids, mask, NEW), want, 0)


def test_apply_wrapper_is_entered_inside_trace(llama):
    cfg, tm, model, params = llama
    ids, mask = prompts()
    entered = []

    @contextlib.contextmanager
    def wrapper():
        entered.append(1)
        yield

    out = generate(model, params, ids, mask, 4, apply_wrapper=wrapper)
    assert out.shape == (3, 7 + 4)
    assert len(entered) >= 2  # prefill + loop body, at trace time


def test_bad_arguments(llama):
    cfg, tm, model, params = llama
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, params, np.ones((1, 3), np.int32), None, 0)
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, params, np.ones((3,), np.int32), None, 2)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_transformers_flax_model_decodes_like_torch(num_beams):
    """The same decoder runs transformers' Flax causal LMs (their own cache layout and counters)."""
    cfg, tm, model, params = build(seed=2)  # rotary base 10000: transformers' Flax Llama ignores rope_theta
    hf = transformers.FlaxLlamaForCausalLM(cfg, _do_init=False)
    ids, mask = prompts(seed=1)
    greedy = np.asarray(generate(hf, params, ids, mask, NEW))
    eos = int(greedy[1, 7 + 1])
    want = torch_generate(tm, ids, mask, num_beams=num_beams, eos_token_id=eos, pad_token_id=0)
    got = generate(hf, params, ids, mask, NEW, num_beams=num_beams, eos_token_id=eos, pad_token_id=0)
    assert_same(got, want, 0)
    np.testing.assert_array_equal(got, generate(model, params, ids, mask, NEW, num_beams=num_beams,
                                                eos_token_id=eos, pad_token_id=0))
