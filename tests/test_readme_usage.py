"""The README's "Using GraLoRA with a Hugging Face Flax model" code block runs as written."""

import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEADING = "Using GraLoRA with a Hugging Face Flax model"


def usage_code() -> tuple[str, pathlib.Path]:
    path = ROOT / "README.md"
    text = path.read_text()
    i = text.find(HEADING)
    assert i >= 0, f"README.md has no section {HEADING!r}"
    section = text[i:].split("\n## ", 1)[0]  # up to the next heading of the same level
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m is not None, f"README.md's section {HEADING!r} has no python block"
    return m.group(1), path


def test_usage_block_runs(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    code, path = usage_code()
    assert "save_pretrained" in code and "PeftModel.from_pretrained" in code
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "__usage__"}
    exec(compile(code, str(path), "exec"), ns)  # noqa: S102 - our own documentation
    assert os.path.exists(tmp_path / "my-adapter" / "adapter_model.safetensors")
    assert float(ns["loss"]) > 0
    assert ns["logits"].shape == (1, 8, 128)
