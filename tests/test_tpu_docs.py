"""docs/tpu.md's v5p-16 walk-through shows what tpu_setup really prints.

Every ``python -m tpu_setup ...`` command of the walk-through is run with ``--dry-run`` (and the
``mesh`` block too); each ``# ...`` line printed under it in the docs must be one of the lines
the tool prints, where ``...`` stands for any text.
"""

import io
import pathlib
import re
import shlex

import pytest

from tpu_setup.cli import main

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "tpu.md"


def _walkthrough() -> tuple[dict, list[tuple[list[str], list[str]]]]:
    text = DOC.read_text()
    section = text.split("### Walk-through: a v5p-16", 1)[1].split("\n### ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    env, steps = {}, []
    lines = iter(block.splitlines())
    for line in lines:
        if line.startswith("export "):
            env.update(kv.split("=", 1) for kv in line.split()[1:])
        elif line.startswith("python -m tpu_setup"):
            cmd = line
            while cmd.endswith("\\"):
                cmd = cmd[:-1] + next(lines).strip()
            steps.append((shlex.split(cmd, comments=True)[3:], []))
        elif line.startswith("# ") and steps:
            steps[-1][1].append(line[2:])
    return env, steps


def _shown_lines_are_printed(shown: list[str], printed: list[str]) -> None:
    for want in shown:
        if not re.match(r"^(gcloud|git) ", want):
            continue  # a comment in words, not a command
        rx = re.compile(".*".join(re.escape(part) for part in want.split("...")) + "$")
        assert any(rx.match(p) for p in printed), f"docs show {want!r}; tpu_setup prints {printed}"


def test_walkthrough_commands_are_what_tpu_setup_prints(monkeypatch):
    env, steps = _walkthrough()
    assert env["TPU_NAME"] == "gralora-v5p"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("TPU_ACCELERATOR_TYPE", raising=False)
    actions = [argv[0] for argv, _ in steps]
    assert actions[:2] == ["create", "sync"] and "launch" in actions and actions[-1] == "delete"
    checked = 0
    for argv, shown in steps:
        out, err = io.StringIO(), io.StringIO()
        assert main(["--dry-run", *argv], out=out, err=err) == 0, (argv, err.getvalue())
        printed = out.getvalue().splitlines()
        _shown_lines_are_printed(shown, printed)
        checked += sum(bool(re.match(r"^(gcloud|git) ", s)) for s in shown)
    assert checked >= 8


def test_mesh_output_in_docs_is_current():
    text = DOC.read_text()
    block = text.split("$ python -m tpu_setup mesh v5p-16\n", 1)[1].split("```", 1)[0]
    out = io.StringIO()
    assert main(["mesh", "v5p-16"], out=out) == 0
    assert out.getvalue().strip() == block.strip()
