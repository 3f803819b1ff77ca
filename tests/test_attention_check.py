"""benchmarks.attention_check on CPU: the XLA bf16 path is close to the f32 reference and a
missing cuDNN is reported as a failed case (exit status 1), never a crash."""

from benchmarks import attention_check


def test_attention_check_on_cpu_reports_without_cudnn(tmp_path):
    report = attention_check.run(batch=2, seq=32, heads=4, kv_heads=2, head_dim=16)
    assert report["default_choice"] == "xla"
    for name, row in report["cases"].items():
        errs = row["xla"]["rel_err_out_dq_dk_dv"]
        assert len(errs) == 4 and max(errs) < 2e-2, (name, errs)  # bf16 rounding, not a wrong mask
        assert "error" in row["cudnn"] and row["pass"] is False
    out = tmp_path / "r.json"
    assert attention_check.main(["--batch", "1", "--seq", "16", "--heads", "2", "--kv-heads", "1",
                                 "--head-dim", "8", "--json", str(out)]) == 1
    assert out.exists()
