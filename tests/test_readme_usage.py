"""The README's "Using GraLoRA with a Hugging Face Flax model" code block runs as written.

Taken from README.md when that section there has a ```python block, else from docs/usage.md
(the draft the README section is pasted from).
"""

import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEADING = "Using GraLoRA with a Hugging Face Flax model"


def usage_code() -> tuple[str, pathlib.Path]:
    for path in (ROOT / "README.md", ROOT / "docs" / "usage.md"):
        if path.exists():
            text = path.read_text()
            i = text.find(HEADING)
            if i < 0:
                continue
            section = text[i:].split("\n## ", 1)[0]  # up to the next heading of the same level
            m = re.search(r"```python\n(.*?)```", section, re.S)
            if m is not None:
                return m.group(1), path
            # the README holds a placeholder until the section is pasted: use the draft
    raise AssertionError(f"neither README.md nor docs/usage.md has a section {HEADING!r}")


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
