"""``gs://`` output directories keep their double slash end to end (no bucket needed).

etils' ``mock_epath`` routes every epath file operation through functions given here, which map
``gs://BUCKET/...`` onto a local directory and record the path strings they were handed. The
commonsense pipeline's outputs (results.json, predictions, the plot) and fileio's writes must
arrive there as ``gs://bucket/run/...``: never ``gs:/bucket`` (what ``pathlib.Path`` makes of it).
"""

import json
import os
import types

import pytest
from etils.epath import testing as epath_testing

from gralora_jax import fileio

OUT = "gs://bucket/run"


@pytest.fixture
def fake_gcs(tmp_path):
    seen: list[str] = []
    root = tmp_path / "gcs"

    def local(path) -> str:
        path = os.fspath(path)
        seen.append(path)
        if path.startswith("gs://"):
            return str(root / path[len("gs://"):])
        return path

    def one(orig, path, *args, **kwargs):
        return orig(local(path), *args, **kwargs)

    def two(orig, path, dst, *args, **kwargs):
        return orig(local(path), local(dst), *args, **kwargs)

    fns = {name: one for name in ("open", "exists", "isdir", "listdir", "makedirs", "mkdir", "remove", "rmtree",
                                  "stat", "glob")}
    fns.update(rename=two, replace=two, copy=two)
    with epath_testing.mock_epath(**fns):
        yield root, seen


def _remote_paths(seen):
    return [p for p in seen if "gs:" in p]


def test_fileio_writes_keep_the_scheme(fake_gcs):
    root, seen = fake_gcs
    fileio.atomic_write_text(fileio.join(OUT, "sub", "a.json"), '{"x": 1}')
    assert fileio.read_text(OUT + "/sub/a.json") == '{"x": 1}'
    assert (root / "bucket" / "run" / "sub" / "a.json").read_text() == '{"x": 1}'
    remote = _remote_paths(seen)
    assert remote and all(p.startswith("gs://bucket/") for p in remote), remote


def test_commonsense_report_writes_to_gs(fake_gcs):
    from experiments.commonsense import run as run_lib
    from experiments.commonsense.evaluate import TaskResult

    root, seen = fake_gcs
    recs = [{"instruction": "Q?\n\nAnswer format: true/false", "answer": "true"}]
    task_results = {"boolq": TaskResult("boolq", 1, 1, [{"answer": "true", "pred": "true", "flag": True}])}
    results = {"after": {"tasks": {"boolq": 1.0}, "average": 1.0, "counts": {"boolq": [1, 1]}}}
    inputs = types.SimpleNamespace(out=OUT, eval_sets={"boolq": recs},
                                   cfg=types.SimpleNamespace(method="gralora", model=None))
    run_lib.report(inputs, results, task_results)
    run_dir = root / "bucket" / "run"
    assert json.loads((run_dir / "results.json").read_text())["after"]["average"] == 1.0
    assert json.loads((run_dir / "predictions" / "boolq.json").read_text())[0]["pred"] == "true"
    assert (run_dir / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    remote = _remote_paths(seen)
    assert remote and all(p.startswith("gs://bucket/run") for p in remote), [p for p in remote if "gs://" not in p]
    assert not (root.parent / "gs:").exists() and not os.path.exists("gs:")  # nothing went to a local "gs:" dir
