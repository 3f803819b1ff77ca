"""Every ``python -m experiments.commonsense`` example in ``--help`` (the cli docstring), the README's commonsense
section and scripts/demo.sh parses with the real parser; those that need no network run briefly in-process
(one step, a few questions), and each method's outputs are checked (PEFT adapter, merged or full HF model).

Examples naming local files that a reader must supply (``./my-llama``, ``commonsense_170k.json``) must fail
only with a one-line error naming such a file, not with a usage error.
"""

import json
import pathlib
import re
import shlex

import pytest

from experiments.commonsense import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROG = "python -m experiments.commonsense"
BRIEF = ["--max-steps", "1", "--tasks", "boolq,piqa", "--eval-limit", "2", "--eval-mode", "loglik",
         "--no-eval-before", "--no-progress", "--batch-size", "16", "--export-merged"]


def _commands(text: str) -> list[str]:
    """Commands starting with PROG, continuation lines (trailing backslash) joined."""
    text = text.replace("\\\\\n", " ").replace("\\\n", " ")
    return [m.group(1).strip() for m in re.finditer(r"(?m)^\s*(?:exec \S+/)?(" + re.escape(PROG) + r".*)$", text)]


def _readme_section() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## The commonsense experiment")
    return readme[start:readme.index("\n## ", start + 5)]


def _examples() -> list[tuple[str, str]]:
    out = [("help", c) for c in _commands(cli.__doc__)]
    out += [("readme", c) for c in _commands(_readme_section())]
    out += [("demo.sh", c.replace(' "$@"', "")) for c in _commands((ROOT / "scripts" / "demo.sh").read_text())]
    return out


EXAMPLES = _examples()
# one run per distinct command line (the README repeats --help's)
DISTINCT: dict[str, list[str]] = {}
for _where, _cmd in EXAMPLES:
    DISTINCT.setdefault(" ".join(shlex.split(_cmd)), []).append(_where)


def test_examples_found():
    where = {w for w, _ in EXAMPLES}
    assert where == {"help", "readme", "demo.sh"} and len(EXAMPLES) >= 8 and len(DISTINCT) >= 6


def _argv(cmd: str) -> list[str]:
    words = shlex.split(cmd)
    assert words[:3] == PROG.split()
    return words[3:]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from experiments.commonsense import embedded

    root = tmp_path_factory.mktemp("cs_cache")
    embedded.ensure_embedded(embedded.EmbeddedSpec(seed=0), root)
    return root


def _is_hub_id(s: str) -> bool:
    return not s.startswith((".", "/", "~")) and s.count("/") == 1 and not s.endswith((".json", ".jsonl", ".gguf"))


@pytest.mark.parametrize("cmd", list(DISTINCT), ids=[f"{'+'.join(w)}-{i}" for i, w in enumerate(DISTINCT.values())])
def test_example(cmd, cache, tmp_path, monkeypatch, capsys):
    argv = _argv(cmd)
    cfg = cli.parse(argv)  # the real parser, presets and validation
    monkeypatch.chdir(tmp_path)  # relative paths of the example resolve (and outputs land) here
    if cfg.model is not None and _is_hub_id(cfg.model):
        return  # needs the network: parsing is what can be checked here
    out = tmp_path / "out"
    code = cli.main(argv + BRIEF + ["--cache-dir", str(cache), "--output-dir", str(out)])
    stdout, err = capsys.readouterr()
    if cfg.model is not None:  # a local checkpoint the reader supplies
        assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, (stdout, err)
        assert any(p in err for p in (cfg.model, cfg.train_data, cfg.eval_dir)), err
        return
    assert code == 0, (stdout, err)
    res = json.loads((out / "results.json").read_text())
    assert set(res["after"]["tasks"]) == {"boolq", "piqa"} and res["train"]["steps"] == 1
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert max(r.get("step", 0) for r in rows) == 1
    if cfg.method == "full":
        assert not (out / "adapter").exists() and (out / "model" / "config.json").exists()
        return
    acfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert acfg["peft_type"] == cfg.method.upper() and acfg["r"] == cfg.r
    from safetensors.numpy import load_file

    keys = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    suffix = ("lora_A.weight", "lora_B.weight") if cfg.method == "lora" else ("gralora_A", "gralora_B")
    assert keys and all(any(s in k for s in suffix) for k in keys)
    assert (out / "merged" / "config.json").exists() and (out / "merged" / "model.safetensors").exists()
