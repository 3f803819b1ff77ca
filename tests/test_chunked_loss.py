"""make_causal_lm_loss_fn: the chunked loss (hidden state + lm_head, no [B, T, vocab] logits)
against the full-logits path (logits_fn + causal_lm_loss), and the "auto" choice between them.

The reference for every comparison is the full path, which shares no loss code with the chunked
one (different shift, different cross-entropy implementation); the models are tiny float32
gralora_jax.models with GraLoRA adapters whose B is random, so the adapters change the loss.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from gralora_jax import tree as tree_lib  # noqa: E402
from gralora_jax.config import GraLoRAConfig  # noqa: E402
from gralora_jax.losses import causal_lm_loss, chunked_causal_lm_loss, next_token_targets  # noqa: E402
from gralora_jax.models import Gemma2ForCausalLM, LlamaForCausalLM  # noqa: E402
from gralora_jax.sharding import batch_sharding, make_mesh, param_partition_specs, shard_params  # noqa: E402
from gralora_jax.surgery import get_gralora_model  # noqa: E402
from gralora_jax.train import make_causal_lm_loss_fn, select_causal_lm_loss  # noqa: E402

VOCAB, B, T = 64, 4, 7
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32)
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _gmodel(model, targets=TARGETS, dropout=0.0):
    params = model.init_params(jax.random.PRNGKey(0))
    cfg = GraLoRAConfig(r=4, alpha=8, gralora_k=2, target_modules=targets, init_weights=False,
                        gralora_dropout=dropout)
    return get_gralora_model(model, cfg, params=params, rng=jax.random.PRNGKey(1))


def _batch():
    g = np.random.default_rng(0)
    attn = np.ones((B, T), np.int32)
    attn[1, 5:] = 0  # right padding in one row
    lmask = attn.copy()
    lmask[0, :3] = 0  # a prompt that does not count
    lmask[2, 4] = 0  # a hole in the middle
    lmask[3, 1:3] = 0
    return {"input_ids": jnp.asarray(g.integers(0, VOCAB, (B, T)), jnp.int32),
            "attention_mask": jnp.asarray(attn), "loss_mask": jnp.asarray(lmask)}


def _value_and_grads(gm, loss, params=None, rng=None, train=False, mask=None, mesh=None, **kw):
    """Loss, num_tokens and gradients w.r.t. the leaves selected by ``mask`` (default: trainable);
    with ``mesh``, params are sharded by the llama rules and the batch over ``data`` first."""
    params = gm.params if params is None else params
    fn = make_causal_lm_loss_fn(gm, loss=loss, **kw)
    mask = gm.trainable_mask(params=params) if mask is None else mask
    batch = _batch()
    if mesh is not None:
        params = shard_params(params, mesh, param_partition_specs(params, "llama", mesh))
        batch = jax.device_put(batch, batch_sharding(mesh))
    trainable, frozen = tree_lib.split_trainable(params, mask)

    def f(t, frozen, batch):
        value, metrics = fn(tree_lib.combine(t, frozen), batch, rng, train)
        return value, metrics["num_tokens"]

    (value, n), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(trainable, frozen, batch)
    return float(value), float(n), tree_lib.flatten(grads), fn.loss


def _loss(fn, params, batch=None):
    """``fn``'s eval-mode loss value, jitted (faster than eager for these models)."""
    return float(jax.jit(lambda p, b: fn(p, b, None, False)[0])(params, _batch() if batch is None else batch))


def _assert_same(gm, chunk_size, **kw):
    full = _value_and_grads(gm, "full", **kw)
    chunked = _value_and_grads(gm, "chunked", chunk_size=chunk_size, **kw)
    assert (full[3], chunked[3]) == ("full", "chunked")
    assert chunked[1] == full[1] == float((_batch()["loss_mask"][:, 1:]).sum())
    assert chunked[0] == pytest.approx(full[0], rel=1e-5)
    assert full[2].keys() == chunked[2].keys() and full[2]
    for p, g in full[2].items():
        assert np.abs(np.asarray(g)).max() > 0, p  # every compared leaf matters
        np.testing.assert_allclose(np.asarray(chunked[2][p]), np.asarray(g), atol=1e-5, rtol=1e-5, err_msg=p)
    return full


@pytest.fixture(scope="module")
def llama():
    """Untied Llama; adapter dropout on, so train=True also checks both paths draw the same masks."""
    return _gmodel(LlamaForCausalLM(transformers.LlamaConfig(**SMALL)), dropout=0.3)


@pytest.fixture(scope="module")
def headed():
    """Llama with an adapter on lm_head too."""
    return _gmodel(LlamaForCausalLM(transformers.LlamaConfig(**SMALL)), targets=["q_proj", "lm_head"])


def test_chunked_equals_full_llama_with_dropout_on_mesh(llama):
    # chunk of 5 tokens over 4 rows: 2 positions per row, which does not divide T = 7; both paths
    # run sharded on a 4x2 (data x model) mesh, the lm_head split over "model"
    full = _assert_same(llama, 5, rng=jax.random.PRNGKey(7), train=True, mesh=make_mesh("4x2"))
    # the dropout really acted (same rng -> same masks in both paths; eval differs)
    assert full[0] != pytest.approx(_loss(make_causal_lm_loss_fn(llama), llama.params), rel=1e-4)


def test_gemma2_tied_embeddings_and_final_softcap():
    cfg = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    max_position_embeddings=32, final_logit_softcapping=0.5,
                                    attn_logit_softcapping=50.0, sliding_window=4, tie_word_embeddings=True)
    gm = _gmodel(Gemma2ForCausalLM(cfg))
    assert "lm_head" not in gm.params  # tied: the lm_head is the embedding, transposed
    assert gm.lm_head(gm.params)[1] == 0.5
    assert make_causal_lm_loss_fn(gm).loss == "chunked"
    mask = tree_lib.flatten(gm.trainable_mask())
    mask["model/embed_tokens/embedding"] = True  # the tied matrix feeds both ends: compare its gradient too
    full = _assert_same(gm, 1024, mask=tree_lib.unflatten(mask))
    # a cap of 0.5 keeps every logit in [-0.5, 0.5], so the loss is within 1 of log(V)
    assert abs(full[0] - np.log(VOCAB)) <= 1.0


def test_chunked_causal_lm_loss_vs_numpy():
    g = np.random.default_rng(3)
    hidden = g.normal(size=(2, 5, 4)).astype(np.float32)
    kernel = g.normal(size=(4, 9)).astype(np.float32)
    ids = g.integers(0, 9, (2, 5))
    mask = np.array([[1, 0, 1, 1, 0], [1, 1, 1, 0, 1]], np.float32)
    logits = 3.0 * np.tanh(hidden.astype(np.float64) @ kernel / 3.0)
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(lp[:, :-1], ids[:, 1:, None], -1)[..., 0]
    want = (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()
    for chunk in (1, 3, 10, 100):
        loss, n = chunked_causal_lm_loss(jnp.asarray(hidden), jnp.asarray(kernel), jnp.asarray(ids),
                                         jnp.asarray(mask), chunk_size=chunk, logit_softcap=3.0)
        assert float(n) == 5.0
        assert float(loss) == pytest.approx(want, rel=1e-5)
    targets, weights = next_token_targets(jnp.asarray(ids))
    np.testing.assert_array_equal(np.asarray(targets)[:, :-1], ids[:, 1:])
    np.testing.assert_array_equal(np.asarray(weights), [[1, 1, 1, 1, 0]] * 2)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_causal_lm_loss(jnp.asarray(hidden), jnp.asarray(kernel), jnp.asarray(ids), chunk_size=0)
    with pytest.raises(ValueError, match="hidden"):
        chunked_causal_lm_loss(jnp.asarray(hidden[0]), jnp.asarray(kernel), jnp.asarray(ids))
    with pytest.raises(ValueError, match="loss_mask"):
        next_token_targets(jnp.asarray(ids), jnp.ones((2, 4)))


def test_auto_picks_chunked_for_ours_full_for_transformers_flax(llama):
    assert make_causal_lm_loss_fn(llama).loss == "chunked"
    assert select_causal_lm_loss(llama, "full") == "full"
    hf = transformers.FlaxLlamaForCausalLM(transformers.LlamaConfig(**SMALL), seed=0)
    gm = get_gralora_model(hf, GraLoRAConfig(r=4, alpha=8, gralora_k=2, target_modules=TARGETS),
                           rng=jax.random.PRNGKey(1))
    assert not gm.supports_hidden_fn
    assert make_causal_lm_loss_fn(gm).loss == "full"  # it runs as before: test_train's FlaxLlama test
    with pytest.raises(ValueError, match="hidden states"):
        make_causal_lm_loss_fn(gm, loss="chunked")

    class LogitsOnly:  # the minimal interface still works, as full
        def logits_fn(self, *a, **k):
            raise AssertionError("not called")

    assert make_causal_lm_loss_fn(LogitsOnly()).loss == "full"
    with pytest.raises(ValueError, match="loss must be"):
        make_causal_lm_loss_fn(llama, loss="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        make_causal_lm_loss_fn(llama, chunk_size=0)


def test_adapted_lm_head_falls_back_to_full_and_trains_it(headed):
    gm = headed
    assert "lm_head" in gm.adapted_modules
    assert make_causal_lm_loss_fn(gm).loss == "full"
    with pytest.raises(ValueError, match="lm_head"):
        make_causal_lm_loss_fn(gm, loss="chunked")
    value, _, grads, kind = _value_and_grads(gm, "auto")
    assert kind == "full"
    for leaf in ("gralora_A", "gralora_B"):
        assert np.abs(np.asarray(grads["lm_head/" + leaf])).max() > 0
    # the lm_head adapter is part of the loss: without it the value changes
    stripped = tree_lib.flatten(gm.params)
    stripped["lm_head/gralora_B"] = jnp.zeros_like(stripped["lm_head/gralora_B"])
    assert value != pytest.approx(_loss(make_causal_lm_loss_fn(gm), tree_lib.unflatten(stripped)), rel=1e-4)


def test_auto_checks_the_params_it_is_called_with(llama, headed):
    """Built for params without an lm_head adapter, called with params that have one: full, not a silent drop."""
    auto = make_causal_lm_loss_fn(llama)
    assert auto.loss == "chunked"
    batch = _batch()
    want, _ = causal_lm_loss(jax.jit(headed.logits_fn)(headed.params, batch["input_ids"], batch["attention_mask"]),
                             batch["input_ids"], batch["loss_mask"])
    assert _loss(auto, headed.params) == pytest.approx(float(want), rel=1e-6)
    with pytest.raises(ValueError, match="lm_head"):
        strict = make_causal_lm_loss_fn(llama, loss="chunked")
        jax.eval_shape(lambda p: strict(p, batch, None, False), headed.params)


@pytest.mark.parametrize("loss", ["full", "chunked"])
def test_right_padded_drops_the_attention_mask_exactly(llama, loss):
    # _batch() pads row 1 on the right: under causal attention no real token sees that padding, so
    # running the model without the mask gives the masked model's loss and gradients.
    masked = _value_and_grads(llama, loss)
    unmasked = _value_and_grads(llama, loss, right_padded=True)
    assert unmasked[1] == masked[1]
    assert unmasked[0] == pytest.approx(masked[0], rel=1e-6)
    for p, g in masked[2].items():
        np.testing.assert_allclose(np.asarray(unmasked[2][p]), np.asarray(g), atol=1e-6, rtol=1e-6, err_msg=p)


def test_right_padded_is_wrong_for_left_padding(llama):
    # the control: with the padding on the left, real tokens do attend to it without the mask
    batch = _batch()
    attn = np.ones((B, T), np.int32)
    attn[1, :2] = 0
    batch = {**batch, "attention_mask": jnp.asarray(attn), "loss_mask": jnp.asarray(attn)}
    masked = _loss(make_causal_lm_loss_fn(llama), llama.params, batch)
    unmasked = _loss(make_causal_lm_loss_fn(llama, right_padded=True), llama.params, batch)
    assert abs(masked - unmasked) > 1e-4
