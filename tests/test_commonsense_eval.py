"""experiments/commonsense evaluation numerics, against PyTorch transformers and the library decoder.

* The embedded checkpoint is a valid HF checkpoint: transformers' PyTorch Llama loads the
  directory and gives the logits our ``load_pretrained`` model gives.
* ``score_options`` (loglik mode) equals log-probabilities computed with PyTorch.
* The cache-less fallback decoder gives the same greedy continuations as
  ``gralora_jax.models.generate`` (KV cache), with a non-zero GraLoRA adapter routed in.
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


def test_fallback_decoder_matches_library_generate(setup):
    import jax

    from gralora_jax.config import GraLoRAConfig
    from gralora_jax.models import generate
    from gralora_jax.surgery import get_gralora_model

    root, model, params, tok, recs = setup
    cfg = GraLoRAConfig(r=8, alpha=16, gralora_k=2, target_modules=("q_proj", "v_proj", "down_proj"), init_weights=False)
    gm = get_gralora_model(model, cfg, params=params, rng=jax.random.PRNGKey(1))

    def wrapper():
        return gm.intercept(False)

    lib = lambda p, i, a: generate(model, p, i, a, 6, eos_token_id=tok.eos_token_id,  # noqa: E731
                                   pad_token_id=tok.pad_token_id, apply_wrapper=wrapper)
    ours = E.generate_answers(gm.logits_fn, gm.params, tok, recs, max_new_tokens=6, batch_size=8, max_prompt_len=128)
    theirs = E.generate_answers(gm.logits_fn, gm.params, tok, recs, max_new_tokens=6, batch_size=8,
                                max_prompt_len=128, generate_fn=lib)
    assert ours == theirs
    assert any(t.strip() for t in ours)  # something was generated
