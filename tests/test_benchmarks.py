"""CPU smoke test of benchmarks/: the throughput command on the tiny shape, plus the
arithmetic it reports (parameter counts against the published model sizes, FLOP formula
by hand, the exact alternative contraction, the trace summariser, the ratios)."""

import gzip
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import contractions, shapes, trace_summary, train_throughput
from gralora_jax import layers


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny"
    report = train_throughput.main([
        "--shape", "tiny", "--batch", "2", "--seq", "16", "--steps", "2", "--warmup", "1",
        "--methods", "frozen,lora,gralora2", "--no-peft", "--inprocess", "--out", str(out),
    ])
    return out, report


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


def test_unrolled_contraction_is_exact():
    p = layers.init_gralora_adapter(jax.random.PRNGKey(0), 48, 32, r=8, k=4, init_weights=False)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 48))
    ref = np.einsum("...ni,nijs,jnso->...jo", np.asarray(x).reshape(2, 5, 4, 12),
                    np.asarray(p["gralora_A"]).reshape(4, 12, 4, 2),
                    np.asarray(p["gralora_B"]).reshape(4, 4, 2, 8)).reshape(2, 5, 32)
    got = contractions.gralora_blocks_unrolled(x, p["gralora_A"], p["gralora_B"], jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
    with contractions.use("unrolled"):
        assert layers.gralora_blocks is contractions.gralora_blocks_unrolled
    assert layers.gralora_blocks is not contractions.gralora_blocks_unrolled


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
