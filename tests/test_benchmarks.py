"""CPU smoke test of benchmarks/: the throughput command on the tiny shape, plus the
arithmetic it reports (parameter counts against the published model sizes, FLOP formula
by hand, the trace summariser and attribution, the ratios)."""

import gzip
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import shapes, trace_summary, train_throughput
from gralora_jax import layers


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny"
    report = train_throughput.main([
        "--shape", "tiny", "--batch", "2", "--seq", "16", "--steps", "2", "--warmup", "1",
        "--methods", "frozen,lora,gralora2", "--no-peft", "--inprocess", "--out", str(out),
    ])
    return out, report


def test_layout_by_name_runs_the_same_step(tiny_report, tmp_path):
    """``--layout vjp`` (the custom-VJP contraction) trains the same model to the same loss as
    the default layout of the fixture's run (same seed, same weights)."""
    _, default = tiny_report
    report = train_throughput.main([
        "--shape", "tiny", "--batch", "2", "--seq", "16", "--steps", "2", "--warmup", "1",
        "--methods", "gralora2", "--layout", "vjp", "--no-peft", "--inprocess", "--out", str(tmp_path / "vjp"),
    ])
    assert report["meta"]["layout"] == "vjp" and default["meta"]["layout"] == layers.DEFAULT_BLOCK_LAYOUT
    assert "layout vjp" in (tmp_path / "vjp.md").read_text()
    want = next(r for r in default["results"] if r["method"] == "gralora2")
    assert report["results"][0]["loss"] == pytest.approx(want["loss"], rel=2e-3)
    argv = train_throughput._child_argv(train_throughput._parser().parse_args(["--layout", "concat"]), "gralora4")
    assert argv[argv.index("--layout") + 1] == "concat"


def test_tiny_run_writes_json_and_markdown(tiny_report):
    out, report = tiny_report
    on_disk = json.loads(out.with_suffix(".json").read_text())
    assert [r["method"] for r in on_disk["results"]] == ["frozen", "lora", "gralora2"]
    for r in on_disk["results"]:
        for key in ("step_s", "tokens_per_s", "model_tflops_per_s", "mfu", "compile_s"):
            assert r[key] > 0, (r["method"], key)
        assert np.isfinite(r["loss"]) and r["loss"] > 0
        # trainable count from the live tree == the count from the shape arithmetic
        assert r["trainable_params"] == r["expected_trainable_params"]
    g = on_disk["results"][2]
    assert g["step_vs_lora"] > 0
    md = out.with_suffix(".md").read_text()
    assert "| gralora2 | ours (jax) |" in md and "tokens/s" in md and "MFU" in md
    assert on_disk["meta"]["shape"] == "tiny" and on_disk["meta"]["batch"] == 2


def test_parameter_counts_match_published_sizes():
    # published totals of the reference checkpoints
    assert shapes.SHAPES["1b"].n_params == 1_235_814_400  # Llama-3.2-1B
    assert shapes.SHAPES["8b"].n_params == 8_030_261_248  # Llama-3.1-8B
    assert shapes.SHAPES["135m"].n_params == 134_515_008  # SmolLM2-135M
    # LoRA r=64 on all seven projections of the 1b shape: PEFT counted 45,088,768 on the H200 run
    lora = shapes.parse_method("lora", rank=64, alpha=128)
    assert shapes.trainable_params(shapes.SHAPES["1b"], lora) == 45_088_768
    assert shapes.trainable_params(shapes.SHAPES["1b"], shapes.parse_method("gralora4h16")) == 45_088_768


def test_flop_formula_by_hand():
    s, T = shapes.SHAPES["tiny"], 16  # hidden 64, 2 layers, 4 heads (dim 16) / 2 kv, ffn 128, vocab 256
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128
    fwd = 2 * (2 * per_layer + 64 * 256) + 4 * 2 * T * 64
    assert shapes.forward_flops_per_token(s, T) == fwd
    assert shapes.train_flops_per_token(s, T, shapes.parse_method("full")) == 3 * fwd
    assert shapes.train_flops_per_token(s, T, shapes.parse_method("frozen")) == fwd
    ad = 2 * 8 * (2 * 64 + 2 * (64 + 32) + 3 * (64 + 128) + (64 + 64))  # r=8, (in+out) per projection
    m = shapes.parse_method("gralora2", rank=8, alpha=16)
    assert shapes.train_flops_per_token(s, T, m) == 2 * fwd + 6 * ad


@pytest.mark.parametrize("bad", ["gralora3", "gralora4h64", "peft_full", "dora"])
def test_bad_method_names(bad):
    with pytest.raises(ValueError):
        shapes.parse_method(bad, rank=64, alpha=128)


def test_trace_summary_on_synthetic_trace(tmp_path):
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "name": "nvjet_sm90_gemm", "dur": 3000.0},
        {"ph": "X", "pid": 1, "name": "loop_add_fusion", "dur": 1000.0},
        {"ph": "X", "pid": 1, "name": "wrapped_transpose_3", "dur": 500.0},
        {"ph": "X", "pid": 2, "name": "host_thing", "dur": 99999.0},
    ]
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = trace_summary.summarize(str(tmp_path), steps=2)
    assert s["busy_ms_per_step"] == pytest.approx(2.25)
    assert s["categories_ms_per_step"] == {"matmul": 1.5, "fusion": 0.5, "copy": 0.25}
    assert "nvjet" in trace_summary.format_summary(s)


def test_ratios():
    rs = [
        {"method": "lora", "backend": "jax", "step_s": 0.1, "peak_bytes": 100},
        {"method": "gralora4", "backend": "jax", "step_s": 0.11, "peak_bytes": 104},
        {"method": "peft_gralora4", "backend": "peft", "step_s": 0.22, "peak_bytes": 80},
    ]
    train_throughput.add_ratios(rs)
    assert rs[1]["step_vs_lora"] == pytest.approx(1.1)
    assert rs[1]["peak_vs_lora"] == pytest.approx(1.04)
    assert rs[1]["speedup_vs_peft"] == pytest.approx(2.0)
    assert "speedup_vs_peft" not in rs[0]


# ------------------------------------------------------------------ hf_: transformers' FlaxLlama


def test_parse_hf_methods_and_flops():
    s, T = shapes.SHAPES["tiny"], 16
    for name, kind in [("hf_frozen", "frozen"), ("hf_full", "full"), ("hf_lora", "lora"),
                       ("hf_gralora2", "gralora"), ("hf_gralora4h16", "gralora")]:
        m = shapes.parse_method(name, rank=64, alpha=128)
        ours = shapes.parse_method(name[len("hf_"):], rank=64, alpha=128)
        assert (m.backend, m.kind, m.name) == ("hf", kind, name)
        assert (m.r, m.k, m.hybrid_r, m.alpha) == (ours.r, ours.k, ours.hybrid_r, ours.alpha)
        assert shapes.train_flops_per_token(s, T, m) == shapes.train_flops_per_token(s, T, ours)
    assert shapes.parse_method("hf_gralora4h16").r == 48
    for bad in ("hf_peft_lora", "hf_gralora3", "hf_", "peft_hf_lora"):
        with pytest.raises(ValueError):
            shapes.parse_method(bad, rank=64, alpha=128)
    assert train_throughput.expand_methods(["lora", "gralora2"], peft=True, hf=True) == [
        "lora", "hf_lora", "gralora2", "hf_gralora2", "peft_lora", "peft_gralora2"]
    assert train_throughput.expand_methods(["lora"], peft=False) == ["lora"]


def test_hf_pythonpath_reaches_hf_children_only(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/already")
    monkeypatch.setenv("BENCH_HF_PYTHONPATH", "/from/env")
    args = train_throughput._parser().parse_args([])
    assert train_throughput.hf_pythonpath(args) == "/from/env"
    args = train_throughput._parser().parse_args(["--hf-pythonpath", "/hf/site"])
    assert train_throughput.hf_pythonpath(args) == "/hf/site"
    assert train_throughput._child_env("hf_lora", "/hf/site")["PYTHONPATH"] == "/hf/site:/already"
    for ours in ("lora", "peft_lora", "frozen", "_matmul"):
        assert train_throughput._child_env(ours, "/hf/site")["PYTHONPATH"] == "/already"
    monkeypatch.delenv("PYTHONPATH")
    assert train_throughput._child_env("hf_frozen", "/hf/site")["PYTHONPATH"] == "/hf/site"
    assert "PYTHONPATH" not in train_throughput._child_env("hf_frozen", None)


def test_hf_refusals_and_budget_start_no_child(tmp_path):
    # remat is refused for hf_ (FlaxLlama has no gradient checkpointing); --budget 0 skips the rest
    report = train_throughput.main([
        "--shape", "tiny", "--batch", "2", "--seq", "16", "--methods", "lora", "--hf", "--no-peft",
        "--remat", "full", "--budget", "0", "--out", str(tmp_path / "r"),
    ])
    by = {r["method"]: r for r in report["results"]}
    assert list(by) == ["lora", "hf_lora"]
    assert "gradient checkpointing" in by["hf_lora"]["error"]
    assert by["lora"]["error"].startswith("skipped")
    md = (tmp_path / "r.md").read_text()
    assert "| hf_lora | | |" in md and "ours vs HF Flax" in md


def test_hf_flax_llama_computes_our_model():
    # independent implementations at identical (non-trivial, std 0.5) weights: same logits
    from benchmarks import hf_flax_step, jax_step
    from gralora_jax.models import CausalLM
    import types

    s = shapes.SHAPES["tiny"]  # untied, rope_theta 10000 (FlaxLlama's hard-coded base)
    hf = hf_flax_step.build_hf_model(s, 16, dtype=jnp.float32)
    ours = CausalLM(types.SimpleNamespace(model_type="llama", rope_scaling=None, initializer_range=0.02,
                                          **s.hf_config_kwargs()), dtype=jnp.float32, param_dtype=jnp.float32)
    p_ours = jax_step.random_params(ours, jax.random.PRNGKey(3), std=0.5)
    p_hf = jax_step.random_params(hf_flax_step.bf16_shape_tree(hf), jax.random.PRNGKey(3), std=0.5)
    # the hf tree has our paths and shapes, so the benchmark draws the same weights for both
    assert jax.tree.structure(p_hf) == jax.tree.structure(p_ours)
    for a, b in zip(jax.tree.leaves(p_hf), jax.tree.leaves(p_ours)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b.astype(jnp.bfloat16), np.float32))
    ids = jax.random.randint(jax.random.PRNGKey(4), (2, 16), 0, s.vocab)
    got = np.asarray(jax.jit(lambda p, x: hf(x, params=p).logits)(p_ours, ids))
    want = np.asarray(jax.jit(lambda p, x: ours(x, params=p).logits)(p_ours, ids))
    assert np.abs(want).max() > 1.0  # far from the near-zero logits of std-0.02 weights
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def hf_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_hf") / "tiny_hf"
    report = train_throughput.main([
        "--shape", "tiny", "--batch", "2", "--seq", "16", "--steps", "2", "--warmup", "1",
        "--methods", "frozen,hf_lora", "--hf", "--no-peft", "--inprocess", "--out", str(out),
    ])
    return out, report


def test_hf_tiny_run_beside_ours(hf_report):
    out, report = hf_report
    by = {r["method"]: r for r in report["results"]}
    assert list(by) == ["frozen", "hf_frozen", "hf_lora"]
    ours_keys = set(by["frozen"]) - {"ours_vs_hf"}
    for name in ("hf_frozen", "hf_lora"):
        r = by[name]
        assert r["backend"] == "hf" and ours_keys <= set(r), ours_keys - set(r)
        assert r["step_s"] > 0 and r["compile_s"] > 0 and r["tokens_per_s"] > 0 and np.isfinite(r["loss"])
        assert r["trainable_params"] == r["expected_trainable_params"]
        assert r["versions"]["transformers"].startswith("4.")
    # LoRA r=64 on q, o (64 -> 64), k, v (64 -> 32), gate, up, down (64 <-> 128), 2 layers, by hand
    assert by["hf_lora"]["trainable_params"] == 2 * 64 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
    assert by["hf_frozen"]["model_flops_per_step"] == by["frozen"]["model_flops_per_step"]
    # same weights, same function: the two forward passes agree (loss ~ ln(256) + a weight-specific part)
    assert abs(by["hf_frozen"]["loss"] - by["frozen"]["loss"]) < 1e-4
    assert abs(by["frozen"]["loss"] - np.log(256)) > 1e-3
    v = by["frozen"]["ours_vs_hf"]
    assert v["tokens_per_s"] == pytest.approx(by["frozen"]["tokens_per_s"] / by["hf_frozen"]["tokens_per_s"])
    assert v["compile_s"] == pytest.approx(by["frozen"]["compile_s"] / by["hf_frozen"]["compile_s"])
    assert "ours_vs_hf" not in by["hf_frozen"]
    md = out.with_suffix(".md").read_text()
    assert "| hf_lora | transformers FlaxLlama (jax) |" in md and "ours vs HF Flax" in md
    assert f"{v['tokens_per_s']:.2f}x / " in md.split("| frozen | ours (jax) |")[1].splitlines()[0]


def test_hf_ratios_by_hand():
    rs = [
        {"method": "lora", "backend": "jax", "step_s": 0.1, "compile_s": 30.0, "peak_bytes": 100},
        {"method": "hf_lora", "backend": "hf", "step_s": 0.2, "compile_s": 20.0, "peak_bytes": 200},
        {"method": "hf_gralora4", "backend": "hf", "step_s": 0.25, "compile_s": 20.0, "peak_bytes": 220},
    ]
    train_throughput.add_ratios(rs)
    assert rs[0]["ours_vs_hf"] == pytest.approx({"tokens_per_s": 2.0, "compile_s": 1.5, "peak_bytes": 0.5})
    assert rs[2]["step_vs_lora"] == pytest.approx(1.25)  # hf GraLoRA against hf LoRA
    assert "ours_vs_hf" not in rs[1] and "step_vs_lora" not in rs[0]


def test_hf_on_a_data_mesh_matches_one_device(hf_report):
    from benchmarks.hf_flax_step import run_hf

    _, report = hf_report
    one = next(r for r in report["results"] if r["method"] == "hf_frozen")
    r = run_hf(shapes.SHAPES["tiny"], shapes.parse_method("hf_frozen"), batch=2, seq=16, steps=1, warmup=1,
               mesh="2x1")
    assert r["devices"] == 2
    assert r["loss"] == pytest.approx(one["loss"], abs=1e-4)


def test_benchmark_losses_agree_with_the_full_logit_loss():
    """``chunked`` (flattened batch) and ``rows`` (the library's per-row chunking) compute the
    same mean next-token cross-entropy as the full-logit loss, for a toy hidden/head pair."""
    from benchmarks.jax_step import LOSSES, make_loss_fn

    emb = jax.random.normal(jax.random.PRNGKey(0), (50, 8))
    head = jax.random.normal(jax.random.PRNGKey(1), (8, 50))
    hidden = lambda p, ids: jnp.tanh(p["emb"][ids])
    logits = lambda p, ids: hidden(p, ids) @ p["head"]
    ids = jax.random.randint(jax.random.PRNGKey(2), (3, 700), 0, 50)  # 2100 tokens: chunks do not divide
    p = {"emb": emb, "head": head}
    lg = np.asarray(logits(p, ids), np.float64)[:, :-1]
    lp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
    ref = -np.take_along_axis(lp, np.asarray(ids)[:, 1:, None], -1).mean()
    for name in LOSSES:
        value, _ = make_loss_fn(name, logits, hidden, lambda p: p["head"])(p, {"input_ids": ids}, None, True)
        assert float(value) == pytest.approx(ref, rel=1e-5), name
    with pytest.raises(ValueError, match="loss must be one of"):
        make_loss_fn("fused", logits, hidden, lambda p: p["head"])


def test_trace_attribution_joins_kernels_to_op_names():
    from benchmarks import trace_attribution as ta

    hlo = "\n".join([
        "%fused_computation.1 (p: f32[4]) -> f32[4] {",
        '  %m = f32[4] multiply(p, p), metadata={op_name="jit(step)/jvp(M)/model/layers/0/mlp/mul"}',
        "}",
        "ENTRY %main (a: bf16[4,4]) -> f32[4] {",
        '  %custom-call.3 = bf16[4,4] custom-call(a), metadata={op_name="jit(step)/transpose(jvp(M))/model/layers/1/mlp/up_proj/dot_general"}',
        "  %loop_multiply_fusion = f32[4] fusion(x), kind=kLoop, calls=%fused_computation.1",
        '  %reduce.9 = pred[] reduce(y), metadata={op_name="jit(step)/reduce_and"}',
        '  %fusion.2 = f32[8] fusion(z), metadata={op_name="jit(step)/jvp()/while/body/dot_general"}',
        "}",
    ])
    names = ta.hlo_op_names(hlo)
    assert names["loop_multiply_fusion"].endswith("mlp/mul")  # from the computation it calls
    events = [
        {"name": "nvjet_sm90_tst_256x128", "dur": 4000.0, "args": {"hlo_op": "custom-call.3"}},
        {"name": "loop_multiply_fusion", "dur": 1000.0, "args": {"hlo_op": "loop_multiply_fusion"}},
        {"name": "input_reduce_fusion", "dur": 500.0, "args": {"hlo_op": "reduce.9"}},
        {"name": "gemm_fusion_dot_7", "dur": 300.0, "args": {"hlo_op": "fusion.2"}},
        {"name": "mystery", "dur": 200.0, "args": {}},
    ]
    r = ta.attribute(events, names, steps=2)
    assert r["busy_ms_per_step"] == pytest.approx(3.0)
    assert r["by_part"] == {"bwd up_proj": 2.0, "fwd mlp activation": 0.5, "step optimizer/guard": 0.25,
                            "fwd loss": 0.15, "? unattributed": 0.1}
    assert r["by_kind"]["cublas-bf16"] == 2.0 and r["by_kind"]["triton-gemm"] == 0.15
