"""Out-of-range token ids: refused on the host (check_token_ids, the model call, generate, the
CLI's tokenised data); inside jit the documented behaviour (NaN past the end, negative ids count
from the end) is what happens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import LlamaConfig

from gralora_jax import GraLoRAConfig, check_token_ids, get_gralora_model
from gralora_jax.models import LlamaForCausalLM, generate

VOCAB = 32


@pytest.fixture(scope="module")
def tiny():
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg)
    params = model.init_params(jax.random.PRNGKey(0))
    return model, params


@pytest.mark.parametrize("bad,index", [(VOCAB, (1, 2)), (VOCAB + 100, (1, 2)), (-1, (1, 2)), (-VOCAB, (1, 2))])
@pytest.mark.parametrize("kind", ["numpy", "list", "jax"])
def test_out_of_range_ids_raise(bad, index, kind):
    ids = np.arange(6).reshape(2, 3)
    ids[index] = bad
    given = {"numpy": ids, "list": ids.tolist(), "jax": jnp.asarray(ids)}[kind]
    with pytest.raises(ValueError, match=rf"token id {bad} at index \(1, 2\) is outside the vocabulary \[0, {VOCAB}\)") as e:
        check_token_ids(given, VOCAB)
    assert "\n" not in str(e.value)


def test_in_range_ids_pass_unchanged():
    for ids in (np.array([[0, VOCAB - 1]]), [[0, 5, VOCAB - 1]], jnp.arange(VOCAB), np.zeros((0, 4), np.int32)):
        assert check_token_ids(ids, VOCAB) is ids


def test_non_integer_ids_and_bad_vocab_refused():
    with pytest.raises(ValueError, match="must be integers"):
        check_token_ids(np.array([1.5]), VOCAB)
    with pytest.raises(ValueError, match="vocab_size must be positive"):
        check_token_ids([1], 0)


def test_model_call_and_generate_refuse_host_ids(tiny):
    model, params = tiny
    good = np.array([[1, 2, 3]])
    assert np.isfinite(np.asarray(model(good, params=params).logits)).all()
    with pytest.raises(ValueError, match=rf"token id {VOCAB} at index \(0, 1\)"):
        model(np.array([[1, VOCAB, 3]]), params=params)
    with pytest.raises(ValueError, match="token id -2"):
        generate(model, params, np.array([[1, -2, 3]]), max_new_tokens=2)
    gm = get_gralora_model(model, GraLoRAConfig(r=2, alpha=4, gralora_k=2, target_modules=["q_proj"]), params=params)
    with pytest.raises(ValueError, match=rf"token id {VOCAB + 5}"):
        gm(np.array([[VOCAB + 5]]))


def test_inside_jit_behaviour_is_as_documented(tiny):
    """Traced ids cannot be checked: past-the-end ids give NaN logits, negative ids count from the end."""
    model, params = tiny
    fn = jax.jit(lambda p, ids: model.apply(p, ids).logits)
    logits = np.asarray(fn(params, jnp.array([[1, VOCAB, 3]])))
    assert np.isnan(logits[0, 1]).all()
    wrapped = np.asarray(fn(params, jnp.array([[1, -1, 3]])))
    last = np.asarray(fn(params, jnp.array([[1, VOCAB - 1, 3]])))
    np.testing.assert_array_equal(wrapped, last)
    # and check_token_ids passes tracers through without raising
    assert jax.jit(lambda ids: check_token_ids(ids, VOCAB) + 0)(jnp.array([VOCAB])).tolist() == [VOCAB]
