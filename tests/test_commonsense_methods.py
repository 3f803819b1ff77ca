"""The LoRA baseline, full fine-tuning and merged export of experiments.commonsense run end to end.

Short runs (a few steps, two tasks) on a 2x2 CPU mesh: what is checked is the plumbing of each
method (what trains, what is exported), not learning (tests/test_commonsense_cli.py does that).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_method_runs_and_exports(method, tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "experiments.commonsense", "--mesh", "2x2", "--method", method,
           "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--max-steps", "3",
           "--tasks", "boolq,piqa", "--eval-limit", "4", "--no-eval-before", "--export-merged"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["after"]["tasks"]) == {"boolq", "piqa"}
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    assert max(l.get("step", 0) for l in lines) == 3
    if method == "lora":
        cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA"
        from safetensors.numpy import load_file

        keys = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        assert keys and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys)
        assert (out / "merged" / "config.json").exists()
    else:
        assert not (out / "adapter").exists()
        assert (out / "model" / "config.json").exists()
