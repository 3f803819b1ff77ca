"""Our models under the GraLoRA surgery: golden PEFT logits, scan layout, and generation with adapters."""

import numpy as np
import pytest

import jax

from gralora_jax.models import auto_model, from_pretrained, generate, stack_layer_params
from gralora_jax.surgery import GraLoRAModel

CASE = "model_tiny_llama_r8_k2_h0"


@pytest.fixture(scope="module")
def adapted(data_dir):
    model, params = from_pretrained(data_dir / CASE / "base")
    gm = GraLoRAModel.from_pretrained(model, data_dir / CASE / "adapter", params=params)
    return model, gm, np.load(data_dir / f"{CASE}.npz")


def test_adapted_logits_match_peft_golden(adapted):
    model, gm, gold = adapted
    logits = jax.jit(gm.logits_fn)(gm.params, gold["input_ids"], gold["attention_mask"])
    np.testing.assert_allclose(np.asarray(logits), gold["logits_adapted"], atol=1e-4, rtol=1e-4)


def test_adapted_logits_scan_layout(adapted):
    model, gm, gold = adapted
    scanned = auto_model(model.config, scan_layers=True, remat_policy="dots_saveable")
    sparams = stack_layer_params(gm.params)
    assert sparams["model"]["layers"]["scan"]["self_attn"]["q_proj"]["gralora_A"].shape[0] == 2
    gs = GraLoRAModel(scanned, gm.config, sparams, gm.layouts)
    logits = jax.jit(gs.logits_fn)(sparams, gold["input_ids"], gold["attention_mask"])
    np.testing.assert_allclose(np.asarray(logits), gold["logits_adapted"], atol=1e-4, rtol=1e-4)


def test_generate_with_adapters_matches_peft_torch(adapted, data_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model, gm, gold = adapted
    base = transformers.LlamaForCausalLM.from_pretrained(data_dir / CASE / "base", attn_implementation="eager")
    tm = peft.PeftModel.from_pretrained(base, data_dir / CASE / "adapter").eval()
    ids = gold["input_ids"][:, :6].copy()
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding
    with torch.no_grad():
        want = tm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=6,
                           do_sample=False, eos_token_id=None, pad_token_id=0).numpy()
    got = np.asarray(generate(model, gm.params, ids, mask, 6, apply_wrapper=gm.intercept))
    np.testing.assert_array_equal(got, want)
    plain = np.asarray(generate(model, model.params, ids, mask, 6))
    assert (plain[:, 6:] != got[:, 6:]).any()  # the adapter changes what is generated
