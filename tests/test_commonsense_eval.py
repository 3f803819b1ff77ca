"""experiments/commonsense evaluation numerics, against PyTorch transformers and the library decoder.

* The embedded checkpoint is a valid HF checkpoint: transformers' PyTorch Llama loads the
  directory and gives the logits our ``load_pretrained`` model gives.
* ``score_options`` (loglik mode) equals log-probabilities computed with PyTorch.
* Generation is one decoder for every model class: with ``--num-beams 4`` and a non-zero
  GraLoRA adapter routed in, our Llama and transformers' Flax Llama holding the same weights
  give the same answers (``test_models_generation`` checks both against PyTorch ``generate``).
"""

import json

import numpy as np
import pytest

from experiments.commonsense import embedded
from experiments.commonsense import evaluate as E
from experiments.commonsense.prompt import build_prompt
from experiments.commonsense.tasks import ANSWER_PREFIX


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from gralora_jax.loading.pretrained import load_pretrained, load_tokenizer

    root = embedded.ensure_embedded(embedded.EmbeddedSpec(), tmp_path_factory.mktemp("emb"))
    model, params = load_pretrained(root / "model")
    tok = load_tokenizer(root / "model")
    recs = json.loads((root / "data" / "piqa" / "test.json").read_text())[:6]
    return root, model, params, tok, recs


def test_embedded_checkpoint_matches_torch(setup):
    torch = pytest.importorskip("torch")
    from transformers import LlamaForCausalLM

    root, model, params, tok, recs = setup
    ids = tok([build_prompt(r["instruction"]) for r in recs[:2]], padding=True, return_tensors="np")
    ours = np.asarray(model(ids["input_ids"], attention_mask=ids["attention_mask"], params=params).logits)
    tm = LlamaForCausalLM.from_pretrained(root / "model").eval()
    with torch.no_grad():
        ref = tm(torch.tensor(ids["input_ids"]), attention_mask=torch.tensor(ids["attention_mask"])).logits.numpy()
    m = ids["attention_mask"].astype(bool)
    np.testing.assert_allclose(ours[m], ref[m], rtol=2e-4, atol=2e-4)


def test_loglik_scores_match_torch(setup):
    torch = pytest.importorskip("torch")
    from transformers import LlamaForCausalLM

    root, model, params, tok, recs = setup
    logits_fn = lambda p, i, a: model(i, attention_mask=a, params=p).logits  # noqa: E731
    scores = E.score_options(logits_fn, params, tok, "piqa", recs[:3], batch_size=4, cutoff_len=128)
    tm = LlamaForCausalLM.from_pretrained(root / "model").eval()
    for r, sc in zip(recs[:3], scores):
        assert set(sc) == {"solution1", "solution2"}
        for lab, val in sc.items():
            prompt = tok(build_prompt(r["instruction"]))["input_ids"]
            full = tok(build_prompt(r["instruction"], "", ANSWER_PREFIX + lab))["input_ids"] + [tok.eos_token_id]
            with torch.no_grad():
                lp = torch.log_softmax(tm(torch.tensor([full])).logits[0].double(), -1).numpy()
            want = sum(lp[t - 1, full[t]] for t in range(len(prompt), len(full)))
            assert val == pytest.approx(want, rel=1e-4, abs=1e-3)


def test_beam_answers_equal_for_our_model_transformers_flax_and_torch(setup):
    import jax

    from experiments.commonsense.config import make_config
    from experiments.commonsense.run import make_decoder
    from gralora_jax.config import GraLoRAConfig
    from gralora_jax.loading.pretrained import load_pretrained
    from gralora_jax.surgery import get_gralora_model

    root, model, params, tok, recs = setup
    hf_model, hf_params = load_pretrained(root / "model", use_ours=False)
    assert type(hf_model).__name__ == "FlaxLlamaForCausalLM"
    cfg = make_config(num_beams=4, max_new_tokens=6)
    adapter = GraLoRAConfig(r=8, alpha=16, gralora_k=2, target_modules=("q_proj", "v_proj", "down_proj"),
                            init_weights=False)
    answers = []
    for m, p in ((model, params), (hf_model, hf_params)):
        gm = get_gralora_model(m, adapter, params=p, rng=jax.random.PRNGKey(1))
        answers.append(E.generate_answers(make_decoder(gm, tok, cfg), gm.params, tok, recs, batch_size=8,
                                          max_prompt_len=128))
    assert answers[0] == answers[1]
    assert any(t.strip() for t in answers[0])  # something was generated

