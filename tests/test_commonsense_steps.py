"""experiments.commonsense as steps (prepare -> load -> adapt -> train -> export -> evaluate), as a notebook calls
them; the model options (--dtype, --scan-layers, --remat, --attn) reach the model.

In-process on the conftest host devices, embedded tiny Llama, one or two training steps.
Numerical claims are checked against an independent computation: the scanned model's logits
against the unrolled model's, the exported full model against transformers on PyTorch.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.commonsense import config as config_lib
from experiments.commonsense import run as R
from experiments.commonsense.config import UserError, make_config

BRIEF = dict(tasks=("boolq",), eval_limit=4, eval_mode="loglik", eval_before=False, progress=False, batch_size=8,
             max_steps=1, mesh="2x2", warmup_ratio=0.0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from experiments.commonsense import embedded

    root = tmp_path_factory.mktemp("cs_cache")
    embedded.ensure_embedded(embedded.EmbeddedSpec(seed=0), root)
    return root


def _leaves(tree, adapters: bool):
    from gralora_jax import tree as tree_lib

    flat = tree_lib.flatten(tree)
    return {k: v for k, v in flat.items() if tree_lib.is_adapter_path(k) == adapters}


def test_bf16_base_with_f32_adapters_steps_one_by_one(cache, tmp_path):
    cfg = make_config(cache_dir=str(cache), output_dir=str(tmp_path / "out"), dtype="bfloat16", **BRIEF)
    inputs = R.prepare(cfg)
    assert inputs.steps == 1 and inputs.resume_step is None and inputs.cfg.micro_batch_size == 8
    model, params = R.load(inputs)
    adapted = R.adapt(inputs, model, params)
    base, adapters = _leaves(adapted.params, False), _leaves(adapted.params, True)
    assert adapters and all(v.dtype == jnp.float32 for v in adapters.values())
    assert {v.dtype for k, v in base.items() if k.endswith("kernel")} == {jnp.dtype(jnp.bfloat16)}
    trained = R.train(inputs, adapted)
    assert trained.steps == 1 and trained.stop_reason == "done"
    moved = _leaves(trained.params, True)
    assert all(v.dtype == jnp.float32 and np.isfinite(np.asarray(v)).all() for v in moved.values())
    assert any(not np.array_equal(np.asarray(moved[k]), np.asarray(adapters[k])) for k in adapters)
    written = R.export(inputs, adapted, trained.params)
    assert set(written) == {"adapter"}
    res = R.evaluate(inputs, adapted, trained.params)
    assert set(res) == {"boolq"} and res["boolq"].total == 4
    R.report(inputs, {"after": R.summarize(res)}, res)
    assert json.loads((tmp_path / "out" / "results.json").read_text())["after"]["counts"]["boolq"][1] == 4


def test_scan_remat_attention_reach_the_model_full_finetuning(cache, tmp_path):
    import torch
    import transformers

    cfg = make_config(cache_dir=str(cache), output_dir=str(tmp_path / "out"), method="full", scan_layers=True,
                      remat="full", attn="xla", **BRIEF)
    inputs = R.prepare(cfg)
    model, params = R.load(inputs)
    assert (model.spec.scan_layers, model.spec.remat_policy, model.spec.attn_implementation) == (True, "full", "xla")
    assert "scan" in params["model"]["layers"]
    ref_model, ref_params = R.load(R.prepare(make_config(cache_dir=str(cache), method="full", **BRIEF)))
    assert not ref_model.spec.scan_layers and ref_model.spec.remat_policy == "none"
    ids = jnp.asarray(np.arange(1, 17, dtype=np.int32).reshape(2, 8))
    np.testing.assert_allclose(np.asarray(model(ids, params=params).logits),
                               np.asarray(ref_model(ids, params=ref_params).logits), atol=1e-5)
    adapted = R.adapt(inputs, model, params)
    trained = R.train(inputs, adapted)
    assert trained.steps == 1
    written = R.export(inputs, adapted, trained.params)
    # the exported full model (unstacked for HF) gives transformers' logits = ours with the trained params
    tm = transformers.AutoModelForCausalLM.from_pretrained(written["model"]).eval()
    with torch.no_grad():
        want = tm(torch.from_numpy(np.asarray(ids, np.int64))).logits.numpy()
    got = np.asarray(model(ids, params=jax.device_get(trained.params)).logits)
    np.testing.assert_allclose(got, want, atol=2e-4)


def test_adapter_method_with_remat_and_attention(cache, tmp_path):
    cfg = make_config(cache_dir=str(cache), output_dir=str(tmp_path / "out"), remat="dots_saveable", attn="xla",
                      scan_layers=False, **BRIEF)
    inputs = R.prepare(cfg)
    model, params = R.load(inputs)
    assert (model.spec.scan_layers, model.spec.remat_policy, model.spec.attn_implementation) == (
        False, "dots_saveable", "xla")
    trained = R.train(inputs, R.adapt(inputs, model, params))
    assert trained.steps == 1 and trained.stop_reason == "done"


def test_model_option_rule():
    small, big, huge = 10**8, 2 * 10**9, 8 * 10**9
    cfg = make_config()
    assert config_lib.model_options(cfg, small, True) == {"scan_layers": False, "remat_policy": "none",
                                                          "attn_implementation": None}
    # depth decides scan (Llama-3.2-1B: 16 layers, unrolled; 28-layer 3B: scanned), size decides remat
    assert not config_lib.model_options(cfg, big, True, num_layers=16)["scan_layers"]
    assert config_lib.model_options(cfg, big, True, num_layers=28)["scan_layers"] and \
        config_lib.model_options(cfg, big, True, num_layers=28)["remat_policy"] == "none"
    assert config_lib.model_options(cfg, huge, True)["remat_policy"] == "full"
    deep = config_lib.model_options(cfg, small, True, num_layers=config_lib.SCAN_FROM_LAYERS)
    assert deep["scan_layers"] and deep["remat_policy"] == "none"  # SmolLM2-135M: 30 layers, scanned
    assert not config_lib.model_options(cfg, small, True, num_layers=config_lib.SCAN_FROM_LAYERS - 1)["scan_layers"]
    explicit = make_config(scan_layers=False, remat="none", attn="cudnn")
    assert config_lib.model_options(explicit, huge, True) == {"scan_layers": False, "remat_policy": "none",
                                                              "attn_implementation": "cudnn"}
    assert config_lib.model_options(cfg, huge, False) == {}  # transformers' Flax models: nothing to set
    with pytest.raises(UserError, match="--scan-layers, --remat need a model type"):
        config_lib.model_options(make_config(scan_layers=True, remat="full"), small, False)
    # the paper preset: bf16 base; --dtype float32 remains
    paper = dict(model="m", train_data="t.json", eval_dir="e")
    assert make_config(**paper).dtype == "bfloat16" and make_config(**paper, dtype="float32").dtype == "float32"


def test_export_merged_from_a_gguf_source_loads_in_transformers(tmp_path):
    """--export-merged from a .gguf base writes config.json (from the loaded config): transformers loads the
    merged directory, and its logits equal our adapted model's."""
    import dataclasses

    import torch
    import transformers
    from test_loading import _write_gguf  # the llama.cpp-style GGUF writer of the loading tests

    from experiments.commonsense import embedded
    from gralora_jax import tree as tree_lib

    torch.manual_seed(3)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)).eval()
    gguf_path = tmp_path / "tiny.gguf"
    _write_gguf(hf, gguf_path, "F32")
    cfg = make_config(model=str(gguf_path), train_data="unused.json", eval_dir="unused", method="lora", r=8, alpha=16,
                      dtype="float32", export_merged=True, output_dir=str(tmp_path / "out"), mesh="1x1")
    cfg = dataclasses.replace(cfg, micro_batch_size=cfg.batch_size)
    tok = embedded.build_tokenizer(["a b c"])
    inputs = R.Inputs(cfg, str(gguf_path), "", "", tok, [], {}, 0, R._make_mesh(cfg), None)
    model, params = R.load(inputs)
    adapted = R.adapt(inputs, model, params)
    rng = np.random.default_rng(0)
    flat = {k: (jnp.asarray(rng.normal(0, 0.05, v.shape), v.dtype) if k.endswith("lora_B") else v)
            for k, v in tree_lib.flatten(jax.device_get(adapted.params)).items()}
    trained = tree_lib.unflatten(flat)
    poisoned = tree_lib.unflatten({k: v * jnp.nan if k.endswith("lora_B") else v for k, v in flat.items()})
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        R.export(inputs, adapted, poisoned)
    assert not (tmp_path / "out").exists()  # nothing non-finite is exported, not even in part
    written = R.export(inputs, adapted, trained)
    merged = tmp_path / "out" / "merged"
    assert written["merged"] == str(merged) and (merged / "config.json").exists()
    assert json.loads((merged / "config.json").read_text())["tie_word_embeddings"] is True
    tm = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    ids = np.arange(2, 26, dtype=np.int64).reshape(2, 12)
    with torch.no_grad():
        want = tm(torch.from_numpy(ids)).logits.numpy()
    got = np.asarray(adapted.gm.logits_fn(trained, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, want, atol=1e-4)
    # and it differs from the base: the adapter was merged
    with torch.no_grad():
        assert np.abs(hf(torch.from_numpy(ids)).logits.numpy() - want).max() > 1e-3


def test_automatic_scan_adapts_stacked_kernels(cache, tmp_path, monkeypatch):
    """When the automatic rule chooses scan, an adapter run adapts the stacked kernels: same logits as the
    unrolled model with the same adapters (B moved off zero so the adapters matter)."""
    from gralora_jax import tree as tree_lib
    from gralora_jax.models.layout import stack_layer_params

    monkeypatch.setattr(config_lib, "SCAN_FROM_LAYERS", 0)
    inputs = R.prepare(make_config(cache_dir=str(cache), output_dir=str(tmp_path / "out"), **BRIEF))
    scanned = R.adapt(inputs, *R.load(inputs))
    assert scanned.model.spec.scan_layers and "scan" in scanned.params["model"]["layers"]
    monkeypatch.setattr(config_lib, "SCAN_FROM_LAYERS", 10**6)
    ref = R.adapt(inputs, *R.load(inputs))
    assert not ref.model.spec.scan_layers
    rng = np.random.default_rng(1)
    flat = {k: (rng.normal(0, 0.1, v.shape).astype(np.float32) if k.endswith("gralora_B") else np.asarray(v))
            for k, v in tree_lib.flatten(jax.device_get(ref.params)).items()}
    unrolled = tree_lib.unflatten(flat)
    ids = jnp.asarray(np.arange(1, 17, dtype=np.int32).reshape(2, 8))
    np.testing.assert_allclose(np.asarray(scanned.gm.logits_fn(stack_layer_params(unrolled), ids)),
                               np.asarray(ref.gm.logits_fn(unrolled, ids)), atol=1e-5)


def test_model_types_without_sharding_rules_need_a_data_parallel_mesh(cache, tmp_path):
    import dataclasses
    import types

    inputs = R.prepare(make_config(cache_dir=str(cache), output_dir=str(tmp_path / "o"), **BRIEF))
    odd = types.SimpleNamespace(config=types.SimpleNamespace(model_type="no-such-family"))
    params = {"model": {"layers": {"0": {"mlp": {"up_proj": {"kernel": np.zeros((8, 16), np.float32)}}}}}}
    with pytest.raises(UserError, match="--mesh 2x2: no sharding rules for model type 'no-such-family'"):
        R._partition_specs(odd, params, inputs)
    flat = dataclasses.replace(inputs, cfg=dataclasses.replace(inputs.cfg, mesh="4x1"),
                               mesh=R._make_mesh(dataclasses.replace(inputs.cfg, mesh="4x1")))
    spec = R._partition_specs(odd, params, flat)["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]
    assert all(a is None for a in spec)  # replicated on a data-parallel mesh
    llama = types.SimpleNamespace(config=types.SimpleNamespace(model_type="llama"))
    spec = R._partition_specs(llama, params, inputs)["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]
    assert "model" in tuple(spec)  # the llama rules split the MLP's up projection over the model axis


def test_evaluation_progress_bar_only_when_asked(cache, capsys):
    """--progress draws a tqdm bar over the evaluation's questions; the default follows the terminal (off here)."""
    from experiments.commonsense import data as data_lib
    from experiments.commonsense import evaluate as eval_lib
    from experiments.commonsense.run import _load_tokenizer, show_progress

    root = next(cache.glob("embedded-*"))
    tok = _load_tokenizer(str(root / "model"))
    sets = data_lib.load_eval_sets(root / "data", ("boolq", "piqa"), limit=3)
    vocab = len(tok) + 8

    def logits_fn(params, ids, att):
        return jnp.zeros(ids.shape + (vocab,), jnp.float32)

    capsys.readouterr()
    assert not show_progress(make_config()) and show_progress(make_config(progress=True))
    res = eval_lib.evaluate_all(logits_fn, {}, tok, sets, mode="loglik", batch_size=4, progress=True)
    err = capsys.readouterr().err
    assert set(res) == {"boolq", "piqa"} and "eval" in err and "6/6" in err
    eval_lib.evaluate_all(logits_fn, {}, tok, sets, mode="loglik", batch_size=4, progress=False)
    assert "eval" not in capsys.readouterr().err


def test_tokenizer_ids_beyond_the_model_vocab_are_refused(cache, tmp_path):
    import dataclasses

    from experiments.commonsense import data as data_lib

    inputs = R.prepare(make_config(cache_dir=str(cache), output_dir=str(tmp_path / "o"), **BRIEF))
    big = data_lib.Example((1, 2, 10**6), (1, 1, 1))
    with pytest.raises(UserError, match="token id 1000000 at index .* is outside the vocabulary"):
        R.load(dataclasses.replace(inputs, examples=inputs.examples[:4] + [big]))


def test_one_placed_copy_of_the_base(cache, tmp_path):
    """load -> adapt -> train keep one copy of the base on the devices: after training, the live
    device arrays of each base kernel/embedding shape are exactly the loaded ones (a second placed
    copy, e.g. the trainer's own, would double every count)."""
    import collections
    import gc

    from gralora_jax import tree as tree_lib

    cfg = make_config(cache_dir=str(cache), output_dir=str(tmp_path / "out"), **BRIEF)
    inputs = R.prepare(cfg)
    model, params = R.load(inputs)
    base = collections.Counter((v.shape, v.dtype) for v in tree_lib.flatten(params).values() if v.ndim == 2)
    adapted = R.adapt(inputs, model, params)
    trained = R.train(inputs, adapted)
    assert trained.steps == 1 and len(base) >= 3
    gc.collect()
    live = collections.Counter((a.shape, a.dtype) for a in jax.live_arrays() if (a.shape, a.dtype) in base)
    assert live == base
