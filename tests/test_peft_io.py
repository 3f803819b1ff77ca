"""PEFT adapter files: golden model parity, exact save/load, key names, refusals, authors' convention.

The golden case (tests/data/model_tiny_llama_r8_k2_h0, made by PEFT 0.21.2 on PyTorch) is the
reference: base, adapted and merged logits must match its npz. The authors'-convention import
is checked against PEFT on PyTorch loading the equivalent PEFT-convention file.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from gralora_jax import peft_io
from gralora_jax import tree as tree_lib
from gralora_jax.loading import load_pretrained, read_safetensors_file
from gralora_jax.surgery import GraLoRAModel

MATMUL_PRECISION = "highest"  # set around this module by conftest.matmul_precision

CASE = "model_tiny_llama_r8_k2_h0"
ATOL = 1e-4


@pytest.fixture(scope="module")
def golden(data_dir):
    d = data_dir / CASE
    model, params = load_pretrained(str(d / "base"), use_ours=False)
    npz = dict(np.load(data_dir / f"{CASE}.npz"))
    gm = GraLoRAModel.from_pretrained(model, str(d / "adapter"), params=params)
    fn = jax.jit(gm.logits_fn)
    return dict(dir=d, model=model, params=params, npz=npz, gm=gm, fn=fn)


def _logits(g, params):
    return np.asarray(g["fn"](params, g["npz"]["input_ids"], g["npz"]["attention_mask"]))


def test_golden_base_adapted_merged(golden):
    g = golden
    np.testing.assert_allclose(_logits(g, g["params"]), g["npz"]["logits_base"], atol=ATOL, rtol=ATOL)
    np.testing.assert_allclose(_logits(g, g["gm"].params), g["npz"]["logits_adapted"], atol=ATOL, rtol=ATOL)
    merged = g["gm"].merge_and_unload()
    assert not any(tree_lib.is_adapter_path(p) for p in tree_lib.flatten(merged))
    np.testing.assert_allclose(_logits(g, merged), g["npz"]["logits_merged"], atol=ATOL, rtol=ATOL)
    # the adapter really does something at this tolerance
    assert np.abs(g["npz"]["logits_adapted"] - g["npz"]["logits_base"]).max() > 10 * ATOL


def test_save_then_load_is_exact(golden, tmp_path):
    g = golden
    g["gm"].save_pretrained(tmp_path)
    again = GraLoRAModel.from_pretrained(g["model"], str(tmp_path), params=g["params"])
    a, b = tree_lib.flatten(g["gm"].adapter_params()), tree_lib.flatten(again.adapter_params())
    assert set(a) == set(b)
    for k in a:
        assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype
        assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k
    np.testing.assert_array_equal(_logits(g, again.params), _logits(g, g["gm"].params))


def test_saved_files_match_peft(golden, tmp_path):
    g = golden
    g["gm"].save_pretrained(tmp_path)
    ours = read_safetensors_file(tmp_path / peft_io.WEIGHTS_NAME)
    theirs = read_safetensors_file(g["dir"] / "adapter" / peft_io.WEIGHTS_NAME)
    assert set(ours) == set(theirs)
    for k in theirs:
        assert ours[k].shape == theirs[k].shape, k
        np.testing.assert_array_equal(ours[k], theirs[k])
    cfg = json.loads((tmp_path / peft_io.CONFIG_NAME).read_text())
    ref = json.loads((g["dir"] / "adapter" / peft_io.CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "GRALORA"
    for field in ("r", "hybrid_r", "alpha", "gralora_k", "gralora_dropout", "fan_in_fan_out", "bias",
                  "init_weights", "layers_to_transform", "layers_pattern", "modules_to_save", "task_type"):
        assert cfg[field] == ref[field], field
    assert sorted(cfg["target_modules"]) == sorted(ref["target_modules"])
    assert "base_model_name_or_path" in cfg


def test_key_mapping_both_ways():
    cases = {
        "model/layers/0/self_attn/q_proj/gralora_A": "base_model.model.model.layers.0.self_attn.q_proj.gralora_A",
        "transformer/h/1/attn/c_attn/gralora_B_general": "base_model.model.transformer.h.1.attn.c_attn.gralora_B_general.weight",
        "bert/encoder/layer/0/attention/self/query/lora_A": "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight",
    }
    for path, key in cases.items():
        assert peft_io.adapter_key(path) == key
        assert peft_io.adapter_path(key) == path
    # the bias of an adapted module sits under PEFT's wrapper
    sd = peft_io.to_peft_state_dict({"m": {"q": {"gralora_A": np.zeros((2, 2, 2)), "gralora_B": np.zeros((2, 2, 2)),
                                                  "bias": np.ones(4)}, "k": {"bias": np.ones(4)}}})
    assert set(sd) == {"base_model.model.m.q.gralora_A", "base_model.model.m.q.gralora_B",
                       "base_model.model.m.q.base_layer.bias", "base_model.model.m.k.bias"}
    back = tree_lib.flatten(peft_io.from_peft_state_dict(sd))
    assert set(back) == {"m/q/gralora_A", "m/q/gralora_B", "m/q/bias", "m/k/bias"}
    # layouts: *_general and lora_* are nn.Linear weights in PEFT (transposed)
    a = np.arange(6.0).reshape(2, 3)
    sd = peft_io.to_peft_state_dict({"m": {"lora_A": a}})
    np.testing.assert_array_equal(sd["base_model.model.m.lora_A.weight"], a.T)
    with pytest.raises(ValueError, match="does not start with"):
        peft_io.adapter_path("model.layers.0.q_proj.gralora_A")
    with pytest.raises(ValueError, match="unrecognised"):
        peft_io.adapter_path("base_model.model.model.layers.0.q_proj.weight")


# ----------------------------------------------------------------------------- refusals


def _copy_adapter(g, tmp_path, edit_config=None):
    dst = tmp_path / "adapter"
    shutil.copytree(g["dir"] / "adapter", dst)
    if edit_config:
        p = dst / peft_io.CONFIG_NAME
        d = json.loads(p.read_text())
        edit_config(d)
        p.write_text(json.dumps(d))
    return dst


def test_refuses_shape_mismatch(golden, tmp_path):
    d = _copy_adapter(golden, tmp_path, lambda c: c.update(r=16, alpha=32))
    with pytest.raises(ValueError, match=r"does not fit the model.*gralora_A"):
        GraLoRAModel.from_pretrained(golden["model"], str(d), params=golden["params"])


def test_refuses_targets_not_in_model(golden, tmp_path):
    d = _copy_adapter(golden, tmp_path, lambda c: c.update(target_modules=["query", "value"]))
    with pytest.raises(ValueError, match=r"matched no linear module.*q_proj"):
        GraLoRAModel.from_pretrained(golden["model"], str(d), params=golden["params"])


def test_refuses_fewer_targets_than_file(golden, tmp_path):
    d = _copy_adapter(golden, tmp_path, lambda c: c.update(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \[.*layers\.0\.self_attn\.k_proj\.gralora_A"):
        GraLoRAModel.from_pretrained(golden["model"], str(d), params=golden["params"])


def test_refuses_missing_files(golden, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        GraLoRAModel.from_pretrained(golden["model"], str(tmp_path / "nowhere"), params=golden["params"])
    d = _copy_adapter(golden, tmp_path)
    os.remove(d / peft_io.WEIGHTS_NAME)
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        GraLoRAModel.from_pretrained(golden["model"], str(d), params=golden["params"])


def test_refuses_corrupt_json(golden, tmp_path):
    d = _copy_adapter(golden, tmp_path)
    (d / peft_io.CONFIG_NAME).write_text('{"peft_type": "GRALORA", "r": 8,')
    with pytest.raises(ValueError, match="not valid JSON"):
        GraLoRAModel.from_pretrained(golden["model"], str(d), params=golden["params"])


def test_refuses_other_peft_types(golden, tmp_path):
    d = _copy_adapter(golden, tmp_path, lambda c: c.update(peft_type="IA3"))
    with pytest.raises(ValueError, match="unsupported peft_type 'IA3'"):
        GraLoRAModel.from_pretrained(golden["model"], str(d), params=golden["params"])


# ----------------------------------------------------------------------------- authors' convention


def test_authors_convention_against_peft(golden, tmp_path):
    """An adapter written with the authors' r (= r_gralora + hybrid_r) loads with authors_convention=True.

    File: r=12, hybrid_r=4, alpha=24 -> GraLoRA rank 8, scale 24/12 = 2. Reference: PEFT on
    PyTorch loading the same tensors with the PEFT-convention config (r=8, hybrid_r=4).
    """
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    g = golden
    rng = np.random.default_rng(0)
    sd = {}
    for k, v in read_safetensors_file(g["dir"] / "adapter" / peft_io.WEIGHTS_NAME).items():
        sd[k] = rng.normal(0, 0.1, v.shape).astype(np.float32)  # B != 0
        if k.endswith(".gralora_A"):
            kk, i, _ = v.shape
            stem = k[: -len("gralora_A")]
            sd[stem + "gralora_A_general.weight"] = rng.normal(0, 0.1, (4, kk * i)).astype(np.float32)
        if k.endswith(".gralora_B"):
            kk, _, o = v.shape
            stem = k[: -len("gralora_B")]
            sd[stem + "gralora_B_general.weight"] = rng.normal(0, 0.1, (kk * o, 4)).astype(np.float32)
    base_cfg = json.loads((g["dir"] / "adapter" / peft_io.CONFIG_NAME).read_text())
    from gralora_jax.loading import write_safetensors

    authors, pefts = tmp_path / "authors", tmp_path / "peft"
    for d, r in ((authors, 12), (pefts, 8)):
        d.mkdir()
        (d / peft_io.CONFIG_NAME).write_text(json.dumps({**base_cfg, "r": r, "hybrid_r": 4, "alpha": 24}))
        write_safetensors(sd, str(d / peft_io.WEIGHTS_NAME), metadata={"format": "pt"})

    gm = GraLoRAModel.from_pretrained(g["model"], str(authors), params=g["params"], authors_convention=True)
    assert (gm.config.r, gm.config.hybrid_r, gm.scaling) == (8, 4, 2.0)
    ours = _logits(g, gm.params)
    with pytest.raises(ValueError, match="does not fit the model"):  # read as PEFT's convention: r=12 is wrong
        GraLoRAModel.from_pretrained(g["model"], str(authors), params=g["params"])

    base = transformers.LlamaForCausalLM.from_pretrained(str(g["dir"] / "base"), attn_implementation="eager").eval()
    pm = peft.PeftModel.from_pretrained(base, str(pefts)).eval()
    with torch.no_grad():
        ref = pm(input_ids=torch.tensor(g["npz"]["input_ids"]),
                 attention_mask=torch.tensor(g["npz"]["attention_mask"])).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=ATOL)
    assert np.abs(ref - g["npz"]["logits_base"]).max() > 10 * ATOL


# ----------------------------------------------------------------------------- adapter files: validate, then write atomically


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _one_line(excinfo):
    return "\n" not in str(excinfo.value)


def test_save_with_nothing_to_save_writes_nothing(golden, tmp_path):
    """The base params (no adapter leaves): refused before the directory is touched, so an old
    adapter there stays whole (config and weights of the same save)."""
    g = golden
    g["gm"].save_pretrained(tmp_path)
    before = _files(tmp_path)
    other = GraLoRAModel(g["model"], g["gm"].config.__class__(r=16, alpha=3, gralora_k=2), g["params"], g["gm"].layouts)
    with pytest.raises(ValueError, match="no adapter tensors") as e:
        other.save_pretrained(tmp_path, params=g["params"])
    assert _one_line(e)
    assert _files(tmp_path) == before
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match="no adapter tensors"):
        other.save_pretrained(fresh, params=g["params"])
    assert not fresh.exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_save_refuses_non_finite_tensors(golden, tmp_path, bad):
    g = golden
    g["gm"].save_pretrained(tmp_path)
    before = _files(tmp_path)
    flat = tree_lib.flatten(g["gm"].params)
    path = next(p for p in flat if p.endswith("gralora_B"))
    flat[path] = np.asarray(flat[path]).copy()
    flat[path].flat[3] = bad
    with pytest.raises(ValueError, match=rf"refusing to save.*{peft_io.adapter_key(path)}.*1 non-finite") as e:
        g["gm"].save_pretrained(tmp_path, params=tree_lib.unflatten(flat))
    assert _one_line(e)
    assert _files(tmp_path) == before


def test_save_writes_tensors_then_config_each_atomically(golden, tmp_path, monkeypatch):
    """Every file goes through a temporary name renamed over the target, weights first; an
    interruption at the last step (the config's rename) leaves the old config and no temp files."""
    from gralora_jax import fileio

    g = golden
    g["gm"].save_pretrained(tmp_path)
    old_config = (tmp_path / peft_io.CONFIG_NAME).read_bytes()
    renamed = []
    real_replace = os.replace

    def replace(src, dst):
        renamed.append(os.path.basename(dst))
        assert os.path.basename(src).startswith(".tmp-") and os.path.dirname(src) == os.path.dirname(dst)
        if os.path.basename(dst) == peft_io.CONFIG_NAME:
            raise KeyboardInterrupt  # killed just before the config is committed
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    cfg2 = g["gm"].config.__class__(**{**g["gm"].config.__dict__, "alpha": 1})
    with pytest.raises(KeyboardInterrupt):
        GraLoRAModel(g["model"], cfg2, g["gm"].params, g["gm"].layouts).save_pretrained(tmp_path)
    assert renamed == [peft_io.WEIGHTS_NAME, peft_io.CONFIG_NAME]
    assert (tmp_path / peft_io.CONFIG_NAME).read_bytes() == old_config
    assert sorted(os.listdir(tmp_path)) == sorted([peft_io.CONFIG_NAME, peft_io.WEIGHTS_NAME])


def test_interrupted_weights_write_keeps_old_file(golden, tmp_path, monkeypatch):
    """A crash while the tensor bytes are written (the issue saw a 0-byte file after kill -9)."""
    from gralora_jax import fileio

    g = golden
    g["gm"].save_pretrained(tmp_path)
    before = _files(tmp_path)

    def fail(fd):
        raise OSError("No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", fail)
    with pytest.raises(OSError, match="No space"):
        g["gm"].save_pretrained(tmp_path)
    assert _files(tmp_path) == before


def _write_adapter_variant(g, tmp_path, edit):
    d = _copy_adapter(g, tmp_path)
    w = d / peft_io.WEIGHTS_NAME
    sd = {k: np.array(v) for k, v in read_safetensors_file(w).items()}
    key = sorted(k for k in sd if k.endswith("gralora_A"))[0]
    edit(sd, key)
    from gralora_jax.loading import write_safetensors

    write_safetensors(sd, str(w))
    return d, w, key


def _set(sd, key, value):
    sd[key] = sd[key].copy()
    sd[key].flat[0] = value


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda sd, k: sd.__setitem__(k, sd[k].astype(np.int32)), "dtype int32.*floating point"),
        (lambda sd, k: sd.__setitem__(k, sd[k] > 0), "dtype bool.*floating point"),
        (lambda sd, k: _set(sd, k, np.nan), "1 non-finite"),
        (lambda sd, k: _set(sd, k, np.inf), "1 non-finite"),
        (lambda sd, k: sd.__setitem__(k + ".default", sd[k] * 2), "both name the adapter leaf"),
    ],
    ids=["int", "bool", "nan", "inf", "alias"],
)
def test_loader_refuses_bad_tensors(golden, tmp_path, edit, needle):
    d, w, key = _write_adapter_variant(golden, tmp_path, edit)
    with pytest.raises(ValueError, match=needle) as e:
        GraLoRAModel.from_pretrained(golden["model"], str(d), params=golden["params"])
    assert str(e.value).startswith(str(w)) and repr(key) in str(e.value) and _one_line(e)


@pytest.mark.parametrize("field,default", [("alpha", 64), ("hybrid_r", 0), ("gralora_k", 2)])
def test_loader_warns_when_an_output_field_is_missing(golden, tmp_path, field, default):
    d = _copy_adapter(golden, tmp_path, lambda c: c.pop(field))
    with pytest.warns(UserWarning, match=rf"{peft_io.CONFIG_NAME} has no '{field}'; assuming PEFT's default {default}"):
        gm = GraLoRAModel.from_pretrained(golden["model"], str(d), params=golden["params"])
    assert getattr(gm.config, field) == default
