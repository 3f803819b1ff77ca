"""experiments/commonsense: a run interrupted by SIGTERM resumes exactly (same adapter as an uninterrupted run).

In-process on the 8 host devices of conftest (mesh 4x2), tiny settings (boolq only, 8
eval records, loglik). The interruption is a real SIGTERM raised after the 3rd batch is
drawn; the training engine checkpoints at the step boundary (with the data iterator's
position) and ``run`` returns; a second ``run`` resumes and finishes. Its adapter must
equal the one of an uninterrupted run, which only holds if the data order resumed exactly.
"""

import signal

import numpy as np
import pytest

from experiments.commonsense import data as data_lib
from experiments.commonsense.cli import ExperimentConfig

STEPS = 6


def _cfg(out, cache):
    return ExperimentConfig(
        output_dir=str(out), cache_dir=str(cache), mesh="4x2", tasks=("boolq",), eval_limit=8, eval_mode="loglik",
        eval_before=False, max_steps=STEPS, r=8, alpha=16, k=2, dropout=0.1, lr=5e-3, batch_size=32,
        micro_batch_size=16, cutoff_len=128, mask_prompt=True, optimizer="adamw", seed=3,
    )


def _adapter(out):
    from safetensors.numpy import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_sigterm_then_resume_matches_uninterrupted(tmp_path, monkeypatch):
    from experiments.commonsense.run import run

    cache = tmp_path / "cache"
    straight = run(_cfg(tmp_path / "straight", cache))
    assert straight["train"]["steps"] == STEPS

    real_next = data_lib.BatchIterator.__next__
    calls = {"n": 0}

    def interrupting_next(self):
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGTERM)  # handled by the trainer: stop after this step
        return real_next(self)

    monkeypatch.setattr(data_lib.BatchIterator, "__next__", interrupting_next)
    first = run(_cfg(tmp_path / "resumed", cache))
    assert first["train"]["stop_reason"] == "sigterm" and first["train"]["steps"] == 3
    assert "after" not in first and not (tmp_path / "resumed" / "adapter").exists()
    monkeypatch.setattr(data_lib.BatchIterator, "__next__", real_next)

    second = run(_cfg(tmp_path / "resumed", cache))
    assert second["train"]["steps"] == STEPS and second["train"]["stop_reason"] == "done"
    # training time is summed over both runs (the resumed run alone trained only the last steps)
    assert second["train"]["seconds"] >= first["train"]["seconds"] > 0
    a, b = _adapter(tmp_path / "straight"), _adapter(tmp_path / "resumed")
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert second["after"]["tasks"]["boolq"] == pytest.approx(straight["after"]["tasks"]["boolq"])
