"""The real ``python -m experiments.commonsense`` pipeline as 2 and 4 CPU processes (jax.distributed).

Each process creates 2 CPU devices; the multi-process run on mesh DxM must equal a 1-process
run on the same mesh: the exported PEFT adapter within 1e-5, accuracies and every prediction
exactly; for the embedded default and for a user's checkpoint directory (the same model as two
safetensors shards with an index, read shard by shard onto the mesh). Also checked: one writer
(metrics.jsonl has one row per step, not one per process), the checkpoint every process took
part in, and log lines from process 0 only. The launcher is
tests/_multihost_launch.py (usable by hand: ``python tests/_multihost_launch.py 2 -- python -m
experiments.commonsense --mesh 2x2``).
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _multihost_launch import launch  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 2
ARGS = ["--max-steps", str(STEPS), "--eval-limit", "4", "--tasks", "boolq,piqa", "--no-eval-before",
        "--eval-batch-size", "4", "--cutoff-len", "64", "--batch-size", "8", "--micro-batch-size", "8",
        "--log-every", "1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("mh_cache")


def _cmd(mesh, out, cache, extra=()):
    return [sys.executable, "-m", "experiments.commonsense", "--mesh", mesh, "--output-dir", str(out),
            "--cache-dir", str(cache), *ARGS, *extra]


def _sharded_checkpoint(cache, dest):
    """The embedded model re-written as a user's checkpoint in two safetensors shards with an index
    (config and tokenizer files copied), and --model/--train-data/--eval-dir flags for it."""
    import shutil

    from safetensors.numpy import load_file, save_file

    [root] = list(pathlib.Path(cache).glob("embedded-*"))
    dest.mkdir()
    for f in (root / "model").iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dest / f.name)
    tensors = load_file(str(root / "model" / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(dest / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return ["--model", str(dest), "--train-data", str(root / "data" / "train.json"), "--eval-dir",
            str(root / "data"), "--dtype", "float32", "--max-new-tokens", "8", "--eval-mode", "generate"]


def _single(mesh, out, cache, extra=()):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(_cmd(mesh, out, cache, extra), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _adapter(out):
    from safetensors.numpy import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _compare(single, multi, n, logs):
    a, b = _adapter(single), _adapter(multi)
    assert sorted(a) == sorted(b) and len(a) > 0
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-5, rtol=0, err_msg=k)
    assert any(np.abs(v).max() > 0 for k, v in b.items() if "gralora_B" in k)  # it trained
    ra, rb = (json.loads((o / "results.json").read_text()) for o in (single, multi))
    assert rb["after"] == ra["after"]  # accuracies and counts, exactly
    for task in ra["after"]["tasks"]:
        pa, pb = (json.loads((o / "predictions" / f"{task}.json").read_text()) for o in (single, multi))
        assert pb == pa
    rows = [json.loads(l) for l in (multi / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # one writer
    assert (multi / "checkpoints" / str(STEPS)).is_dir()
    assert rb["train"]["steps"] == STEPS
    assert (multi / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert all("results ->" not in log for log in logs[1:]) and "results ->" in logs[0]


@pytest.mark.slow
# each process count and each source once (4 processes on the embedded default, 2 on a user's
# sharded checkpoint): every case is a full multi-process CLI run, the slowest tests of the suite
@pytest.mark.parametrize("procs, mesh, source", [(4, "4x2", "embedded"), (2, "2x2", "sharded checkpoint")])
def test_multi_process_cli_equals_one_process(procs, mesh, source, cache, tmp_path):
    extra = ()
    if source != "embedded":  # a user's checkpoint directory (paper preset, float32 base) read shard by shard
        from experiments.commonsense.embedded import ensure_embedded

        ensure_embedded(cache_dir=cache)  # what the embedded runs load (written once per cache)
        extra = _sharded_checkpoint(cache, tmp_path / "ckpt")
    _single(mesh, tmp_path / "single", cache, extra)  # the embedded runs: also writes the model/data into the cache
    code, logs = launch(procs, _cmd(mesh, tmp_path / "multi", cache, extra), cwd=str(ROOT), timeout=600)
    assert code == 0, "\n".join(f"--- process {i}\n{log[-3000:]}" for i, log in enumerate(logs))
    _compare(tmp_path / "single", tmp_path / "multi", procs, logs)
