"""The training loop around the step: host syncs only at log/eval/checkpoint steps, the
non-finite guard, resume rules (guard, batch size, metrics rows, wall time), progress bar,
stop-reason exit codes and scheme-preserving output paths.

References are independent of the loop: a hand-written loop over ``make_train_step`` for the
metrics, restored checkpoints for "the state of step k-1", and NumPy for finiteness.
"""

import io
import json
import shutil
import sys

import jax
import numpy as np
import pytest

from gralora_jax import fileio
from gralora_jax import tree as tree_lib
from gralora_jax.checkpoint import Checkpointer, CorruptCheckpointError, compare_resume_guard
from gralora_jax.optim import make_optimizer
from gralora_jax.sharding import make_mesh, param_partition_specs
from gralora_jax.train import (EXIT_CODES, TrainConfig, Trainer, TrainingDiverged, exit_code, init_train_state,
                               make_train_step)

from _train_worker import ToyData, toy_loss_fn, toy_optim, toy_params

OPTIM = toy_optim()
META = {"adapter_config": {"r": 8}, "base_model": "toy"}


@pytest.fixture(scope="module")
def params():
    return toy_params(0, n_layers=1)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh("2x1", devices=jax.devices()[:2])


@pytest.fixture(scope="module")
def reference(params, mesh):
    """Per-step losses / grad norms and params after each step, from a plain loop over the step."""
    mask = tree_lib.trainable_mask(params)
    opt = make_optimizer(OPTIM, params, mask)
    specs = param_partition_specs(params, "llama", mesh)
    step = make_train_step(toy_loss_fn, opt, mask, mesh, specs, params)
    state, frozen = init_train_state(params, mask, opt, mesh, specs)
    data, out = ToyData(), {"loss": [], "grad_norm": [], "params": [jax.device_get(state.params)]}
    for _ in range(6):
        state, m = step(state, frozen, jax.device_put(next(data), step.batch_sharding))
        out["loss"].append(float(m["loss"]))
        out["grad_norm"].append(float(m["grad_norm"]))
        out["params"].append(jax.device_get(state.params))
    return out


class _Data(ToyData):
    """ToyData with a per-row ``poison`` column: 1 for steps in ``nan_loss`` / ``nan_grad``."""

    def __init__(self, nan_loss=(), nan_grad=(), on_next=None, **kw):
        super().__init__(**kw)
        self.nan_loss, self.nan_grad, self.on_next = set(nan_loss), set(nan_grad), on_next

    def __next__(self):
        if self.on_next is not None:
            self.on_next(self.index + 1)
        b = super().__next__()
        step = self.index  # 1-based step this batch feeds
        b["nan_loss"] = np.full((self.batch,), float(step in self.nan_loss), np.float32)
        b["nan_grad"] = np.full((self.batch,), float(step in self.nan_grad), np.float32)
        return b


def _loss(p, batch, rng, train):
    loss, m = toy_loss_fn(p, batch, rng, train)
    if "nan_loss" not in batch:  # plain ToyData
        return loss, m
    loss = loss + jax.numpy.where(batch["nan_loss"].max() > 0, jax.numpy.nan, 0.0)
    # finite value, NaN gradient: d sqrt(u)/du is inf at u = 0, times du/dA = 0
    a = p["model"]["layers"]["0"]["self_attn"]["q_proj"]["gralora_A"]
    u = (1.0 - batch["nan_grad"].max()) * (a * a).sum()
    return loss + 0.0 * jax.numpy.sqrt(u), m


def _trainer(params, mesh, out_dir=None, *, steps=6, loss_fn=_loss, meta=META, **cfg):
    cfg = {"log_every": 1, "progress": False, "tensorboard": False, "keep_checkpoints": 10, **cfg}
    tc = TrainConfig(steps=steps, output_dir=None if out_dir is None else str(out_dir), **cfg)
    return Trainer(loss_fn=loss_fn, params=params, mask=tree_lib.trainable_mask(params), optim=OPTIM, config=tc,
                   mesh=mesh, param_specs=param_partition_specs(params, "llama", mesh), checkpoint_meta=meta)


def _rows(out_dir):
    return [json.loads(x) for x in open(out_dir / "metrics.jsonl")]


def _assert_tree_equal(a, b):
    fa, fb = tree_lib.flatten(jax.device_get(a)), tree_lib.flatten(jax.device_get(b))
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def _all_finite(tree):
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(jax.device_get(tree)))


# ----------------------------------------------------------------------------- host syncs


def test_fetches_only_at_log_and_checkpoint_steps(params, mesh, reference, tmp_path, monkeypatch):
    """Counting jax.device_get calls per step: none on steps that neither log nor checkpoint,
    so dispatch runs ahead; each logged row averages the steps since the previous one."""
    calls = {"n": 0}
    real = jax.device_get

    def counting(x):
        calls["n"] += 1
        return real(x)

    per_step = {}
    tr = _trainer(params, mesh, tmp_path, log_every=3, checkpoint_every=4)
    data = _Data(on_next=lambda step: per_step.__setitem__(step - 1, calls["n"]))
    monkeypatch.setattr(jax, "device_get", counting)
    tr.fit(data)
    monkeypatch.setattr(jax, "device_get", real)
    fetched_after = {s for s in range(1, 6) if per_step[s] > per_step[s - 1]}  # during step s
    assert fetched_after == {3, 4}, per_step  # 6 is the last step (log + checkpoint), after the last next()
    assert tr.sync_steps == [3, 4, 6]
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [3, 6]
    for r, lo in zip(rows, (0, 3)):  # mean over the interval, lr of its last step
        assert r["loss"] == pytest.approx(np.mean(reference["loss"][lo:lo + 3]), rel=1e-5)
        assert r["grad_norm"] == pytest.approx(np.mean(reference["grad_norm"][lo:lo + 3]), rel=1e-5)
        assert r["tokens_per_s"] > 0 and r["step_time"] > 0
    _assert_tree_equal(tr.state.params, reference["params"][6])


def test_timed_checkpoints_every_n_minutes(params, mesh, tmp_path, monkeypatch):
    """checkpoint_minutes=1 on a fake clock that moves 25 s per step: saves at steps 3 and 6
    (75 s after the start, 75 s after the save at 3), and at the end; 0 saves only at the end."""
    import types

    train_mod = sys.modules["gralora_jax.train"]  # the package exports a function of the same name

    clock = {"t": 0.0}
    monkeypatch.setattr(train_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock["t"], time=lambda: 0.0))
    on_next = lambda step: clock.__setitem__("t", 25.0 * step)  # noqa: E731
    tr = _trainer(params, mesh, tmp_path / "timed", steps=8, checkpoint_minutes=1, log_every=8)
    tr.fit(_Data(on_next=on_next))
    assert tr.checkpointer.all_steps() == [3, 6, 8]
    assert tr.sync_steps == [3, 6, 8]
    clock["t"] = 0.0
    tr = _trainer(params, mesh, tmp_path / "untimed", steps=8, log_every=8)
    tr.fit(_Data(on_next=on_next))
    assert tr.checkpointer.all_steps() == [8]
    with pytest.raises(ValueError, match="checkpoint_minutes"):
        TrainConfig(checkpoint_minutes=float("nan"))


def test_processes_agree_on_stop_and_timed_save(monkeypatch):
    """Several processes: flags are exchanged only every stop_check_every steps and any
    process's stop or due save counts for all (the max over processes)."""
    from jax.experimental import multihost_utils

    from gralora_jax.train import _agreed_stop

    others = {"flags": np.array([0, 0], np.int32)}
    gathered = []

    def allgather(mine):
        gathered.append(mine)
        return np.stack([mine, others["flags"]])

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    assert _agreed_stop("sigterm", 7, 10, True) == (None, False) and not gathered  # not a check step
    assert _agreed_stop(None, 10, 10, False) == (None, False)
    others["flags"] = np.array([0, 1], np.int32)  # another process's clock says a save is due
    assert _agreed_stop(None, 20, 10, False) == (None, True)
    others["flags"] = np.array([1, 0], np.int32)  # another process got SIGTERM
    assert _agreed_stop("sigint", 30, 10, False) == ("sigint", False)  # sigint outranks sigterm
    assert _agreed_stop(None, 40, 10, False) == ("sigterm", False)
    assert len(gathered) == 4


# ----------------------------------------------------------------------------- non-finite guard


@pytest.mark.parametrize("kind", ["nan_loss", "nan_grad"])
def test_nonfinite_step_is_not_applied_nor_saved(params, mesh, reference, tmp_path, kind):
    """A NaN loss (or a finite loss with a NaN gradient) at step 3: found at the next sync
    (step 4's checkpoint), every checkpoint finite, the state is step 2's exactly."""
    tr = _trainer(params, mesh, tmp_path, log_every=5, checkpoint_every=2)
    with pytest.raises(FloatingPointError, match="at step 3: .*state of step 2"):
        tr.fit(_Data(**{kind: [3]}))
    assert tr.stop_reason == "nonfinite" and exit_code(tr.stop_reason) == 1
    assert tr.step == 2
    _assert_tree_equal(tr.state.params, reference["params"][2])
    assert tr.checkpointer.all_steps() == [2]
    restored, _ = Checkpointer(tmp_path / "checkpoints", **META).restore(2, tr.state)
    assert _all_finite(restored)
    _assert_tree_equal(restored.params, reference["params"][2])
    assert int(restored.bad_step) == 0
    with pytest.raises(FloatingPointError, match="step 3"):  # and it cannot be saved afterwards
        tr.save()
    assert not (tmp_path / "metrics.jsonl").exists() or all(r["step"] < 3 for r in _rows(tmp_path))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_grouped_finiteness_check_finds_one_bad_element(params, mesh, bad):
    """The step's guard groups leaves by shape and spec (one fused reduction per group): a single
    bad element in any leaf of the real params + AdamW state is still found, and the groups are
    fewer than the leaves."""
    from gralora_jax.train import _all_finite as all_finite, train_state_specs

    mask = tree_lib.trainable_mask(params)
    opt = make_optimizer(OPTIM, params, mask)
    specs = param_partition_specs(params, "llama", mesh)
    state, _ = init_train_state(params, mask, opt, mesh, specs)
    state_specs, _ = train_state_specs(opt, params, mask, specs)
    tree, tree_specs = (state.params, state.opt_state), (state_specs.params, state_specs.opt_state)
    check = jax.jit(lambda t: all_finite(t, tree_specs))
    assert bool(check(tree))
    leaves, treedef = jax.tree.flatten(tree)
    floats = [i for i, x in enumerate(leaves) if np.issubdtype(x.dtype, np.floating) and x.size > 1]
    assert len(floats) > 4
    for i in floats:
        x = np.array(leaves[i])
        x.flat[x.size // 2] = bad
        poisoned = jax.tree.unflatten(treedef, [x if j == i else y for j, y in enumerate(leaves)])
        assert not bool(check(poisoned)), i
    text = str(jax.make_jaxpr(lambda t: all_finite(t, tree_specs))(tree))
    assert 0 < text.count("reduce_sum") < len(floats)


def test_host_runs_at_most_two_steps_ahead(params, mesh, reference, monkeypatch):
    """Between log steps the loop waits for step n-2 before going on from step n, so a signal
    (handled only while Python runs, not while it waits on the device) is acted on within about
    two steps instead of after every step queued since the last log."""
    import importlib

    assert importlib.import_module("gralora_jax.train")._STEPS_AHEAD == 2
    waited = []
    real = jax.block_until_ready

    def spy(x):
        waited.append(float(jax.device_get(x["loss"])))
        return real(x)

    monkeypatch.setattr(jax, "block_until_ready", spy)
    _trainer(params, mesh, steps=6, loss_fn=toy_loss_fn, log_every=100).fit(ToyData())
    monkeypatch.undo()
    # after dispatching steps 3..6 the loop waited for steps 1..4 (their losses, from the plain loop)
    np.testing.assert_allclose(waited, reference["loss"][:4], rtol=1e-6)


def test_signal_during_the_last_checkpoint_still_stops(params, mesh, tmp_path):
    """Ctrl-C that lands while the last step is being checkpointed: the checkpoint is written and
    the run reports the signal (so the CLI exits 130 before export and evaluation), not "done"."""
    import os
    import signal

    tr = _trainer(params, mesh, tmp_path, steps=3, loss_fn=toy_loss_fn, checkpoint_every=0)
    real_save = tr.save

    def save_with_ctrl_c(data_iter):
        if tr.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        real_save(data_iter)

    tr.save = save_with_ctrl_c
    tr.fit(ToyData())
    assert tr.stop_reason == "sigint" and exit_code(tr.stop_reason) == 130
    assert tr.checkpointer.all_steps() == [3]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored after fit


def test_lr_too_high_nan_never_exported(params, mesh):
    """lr=1e4 with no clipping: the first non-finite update stops training, params stay finite."""
    import dataclasses

    from gralora_jax.optim import OptimConfig

    tc = TrainConfig(steps=6, log_every=6, progress=False, tensorboard=False)
    optim = dataclasses.replace(OPTIM, learning_rate=1e4, max_grad_norm=0.0)
    tr = Trainer(loss_fn=toy_loss_fn, params=params, mask=tree_lib.trainable_mask(params), optim=optim, config=tc,
                 mesh=mesh, param_specs=param_partition_specs(params, "llama", mesh))
    try:
        tr.fit(ToyData())
    except (FloatingPointError, TrainingDiverged):
        pass
    assert _all_finite(tr.state)
    for bad in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(ValueError, match="OptimConfig.learning_rate"):
            OptimConfig(learning_rate=bad)


def test_stall_stops_as_diverged(params, mesh):
    """Zero gradient and a flat loss (no token carries a loss) for 2 log intervals: stop."""

    def no_tokens(p, batch, rng, train):
        return toy_loss_fn(p, {**batch, "loss_mask": batch["loss_mask"] * 0}, rng, train)

    tr = _trainer(params, mesh, steps=6, loss_fn=no_tokens, stall_intervals=2, log_every=2)
    with pytest.raises(TrainingDiverged, match="stalled at step 4: gradient norm 0 and loss flat"):
        tr.fit(ToyData())
    assert tr.stop_reason == "diverged" and exit_code("diverged") != 0


def test_checkpointer_never_writes_or_restores_nonfinite(params, mesh, tmp_path):
    tr = _trainer(params, mesh, tmp_path)
    ck = tr.checkpointer
    good = tr.state
    ck.save(good, step=1)
    ck.wait_until_finished()
    nan_state = good.replace(params=jax.tree.map(lambda x: x * np.nan, good.params))
    with pytest.raises(FloatingPointError, match="non-finite"):
        ck.save(nan_state, step=2)
    # a NaN checkpoint written by an older version (bypassing the check): restore falls back
    ck._manager.save(2, args=_raw_args(ck, nan_state, 2), force=True)
    ck._manager.wait_until_finished()
    tr2 = _trainer(params, mesh, tmp_path)
    with pytest.warns(RuntimeWarning, match="step 2 .*NaN/Inf"):
        assert tr2.restore()
    assert tr2.step == 0 and _all_finite(tr2.state) and tr2.checkpointer.all_steps() == [1]


def _raw_args(ck, state, step):
    import orbax.checkpoint as ocp

    items = {f"leaf_{i:05d}": v for i, v in enumerate(jax.tree_util.tree_leaves(state))}
    return ocp.args.Composite(state=ocp.args.StandardSave(items),
                              meta=ocp.args.JsonSave(ck.metadata(state, step)))


# ----------------------------------------------------------------------------- resume rules


def test_corrupt_latest_falls_back_to_previous(params, mesh, reference, tmp_path):
    tr = _trainer(params, mesh, tmp_path, steps=4, checkpoint_every=2)
    tr.fit(ToyData())
    shutil.rmtree(tmp_path / "checkpoints" / "4" / "state")
    data = ToyData()
    tr2 = _trainer(params, mesh, tmp_path, steps=4, checkpoint_every=2)
    with pytest.warns(RuntimeWarning, match="step 4 .*could not be read"):
        assert tr2.restore(data)
    assert tr2.step == 2 and data.index == 2
    _assert_tree_equal(tr2.state.params, reference["params"][2])
    tr2.fit(data)  # redoes steps 3-4 and saves step 4 again
    assert tr2.checkpointer.all_steps() == [2, 4]
    _assert_tree_equal(tr2.state.params, reference["params"][4])
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4]  # one row per step, redone rows replaced
    # all corrupt: an error, never a silent fresh start
    shutil.rmtree(tmp_path / "checkpoints" / "4" / "state")
    shutil.rmtree(tmp_path / "checkpoints" / "2" / "state")
    with pytest.warns(RuntimeWarning), pytest.raises(CorruptCheckpointError, match="step 4"):
        _trainer(params, mesh, tmp_path, steps=4).restore()


def test_resume_guard_batch_size_rows_and_wall_time(params, mesh, tmp_path):
    guard = {"max_steps": 6, "lr": 1e-2, "batch_size": 8, "cutoff_len": 128}
    meta = {**META, "resume_guard": guard}
    assert Trainer.check_resume_guard(str(tmp_path), guard) is None  # nothing to resume
    tr = _trainer(params, mesh, tmp_path, meta=meta, checkpoint_every=2)
    stop_at = {"step": 3}

    def interrupt(step):
        if step == stop_at["step"]:
            import signal

            signal.raise_signal(signal.SIGTERM)

    tr.fit(_Data(on_next=interrupt))
    assert tr.stop_reason == "sigterm" and tr.step == 3 and exit_code(tr.stop_reason) == 143
    assert tr.checkpointer.all_steps() == [2, 3]
    seconds = Checkpointer(tmp_path / "checkpoints", **meta).read_metadata(3)["progress"]["train_seconds"]
    assert 0 < seconds <= tr.train_seconds

    # the guard: checked from metadata alone, one line naming each changed key with both values
    assert Trainer.check_resume_guard(str(tmp_path), guard) == 3
    changed = {**guard, "max_steps": 12, "lr": 2e-2, "warmup_ratio": 0.1}
    with pytest.raises(ValueError) as e:
        compare_resume_guard(tmp_path / "checkpoints", changed)
    msg = str(e.value).split("since that checkpoint:")[1]
    assert "\n" not in str(e.value) and "(step 3)" in str(e.value)
    assert "lr 0.01 -> 0.02" in msg and "max_steps 6 -> 12" in msg and "warmup_ratio '<unset>' -> 0.1" in msg
    assert "batch_size" not in msg and "cutoff_len" not in msg
    with pytest.raises(ValueError, match="max_steps 6 -> 12"):  # and the Trainer's own restore refuses it too
        _trainer(params, mesh, tmp_path, meta={**META, "resume_guard": changed}).restore()

    # another batch size: refused at the first batch, before any step runs
    tr_b = _trainer(params, mesh, tmp_path, meta=meta)
    assert tr_b.restore(ToyData(batch=16))
    with pytest.raises(ValueError, match="global batch of 16 rows .*trained with 8"):
        tr_b.fit(ToyData(batch=16))
    assert tr_b.step == 3

    # a resume: rows after the restored step are dropped (none here), examples and wall time carry on
    with open(tmp_path / "metrics.jsonl", "a") as f:  # e.g. rows an interrupted run logged past its checkpoint
        f.write(json.dumps({"step": 4, "loss": 1.0}) + "\n" + '{"step": 5, "lo')
    tr2 = _trainer(params, mesh, tmp_path, meta=meta)
    data = ToyData()
    assert tr2.restore(data) and tr2.examples_seen == 24 and tr2.train_seconds == pytest.approx(seconds, abs=1e-3)
    tr2.fit(data)
    assert tr2.stop_reason == "done" and tr2.examples_seen == 48 and tr2.train_seconds > seconds
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert Checkpointer(tmp_path / "checkpoints", **meta).read_metadata(6)["progress"]["train_seconds"] > seconds


# ----------------------------------------------------------------------------- progress, exit codes, paths


def test_progress_bar_only_on_a_terminal(params, mesh, monkeypatch):
    import dataclasses

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tr = _trainer(params, mesh, steps=4, log_every=2)
    fresh = jax.tree.map(jax.numpy.copy, tr.state)  # fit donates the state: start each run from a copy
    for stream, enabled, shown in ((Tty(), True, True), (io.StringIO(), True, False), (Tty(), False, False)):
        monkeypatch.setattr("sys.stderr", stream)
        tr.config = dataclasses.replace(tr.config, progress=enabled)
        tr.state = jax.tree.map(jax.numpy.copy, fresh)
        tr.fit(ToyData())
        text = stream.getvalue()
        assert (("4/4" in text) and ("loss=" in text) and ("tok/s=" in text)) == shown, text


def test_exit_code_table():
    assert EXIT_CODES["done"] == 0 and EXIT_CODES["sigint"] == 130 and EXIT_CODES["sigterm"] == 143
    assert exit_code("nonfinite") != 0 and exit_code(None) != 0
    with pytest.raises(ValueError, match="keep_checkpoints must be >= 2"):
        TrainConfig(keep_checkpoints=1)


def test_remote_output_dir_keeps_its_scheme(params, mesh, monkeypatch):
    """gs://x/y: every path the trainer builds (orbax directory, metrics.jsonl, the guard check)
    keeps the double slash; only process 0 writes metrics."""
    import gralora_jax.checkpoint as ckpt_mod

    files, dirs = {}, []

    class FakeManager:
        def __init__(self, directory, options=None, item_names=None):
            dirs.append(str(directory))
            self.saved = {}

        def save(self, step, args=None, force=False):
            self.saved[step] = args
            return True

        def all_steps(self):
            return sorted(self.saved)

        def latest_step(self):
            return max(self.saved) if self.saved else None

        def wait_until_finished(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(ckpt_mod.ocp, "CheckpointManager", FakeManager)
    monkeypatch.setattr(fileio, "exists", lambda p: str(p) in files or str(p).endswith("/checkpoints"))
    monkeypatch.setattr(fileio, "read_text", lambda p: files[str(p)])
    monkeypatch.setattr(fileio, "atomic_write_text", lambda p, t: files.__setitem__(str(p), t))
    tr = _trainer(params, mesh, "gs://x/y", steps=2, checkpoint_every=1)
    tr.fit(ToyData())
    assert dirs == ["gs://x/y/checkpoints"]
    assert list(files) == ["gs://x/y/metrics.jsonl"]
    assert [json.loads(x)["step"] for x in files["gs://x/y/metrics.jsonl"].splitlines()] == [1, 2]
    assert Trainer.check_resume_guard("gs://x/y", {}) is None and dirs[-1] == "gs://x/y/checkpoints"

    files.clear()
    monkeypatch.setattr(sys.modules["gralora_jax.train"], "is_main_process", lambda: False)
    _trainer(params, mesh, "gs://x/z", steps=1).fit(ToyData())
    assert files == {}


class _ClosedPipe:
    def write(self, _):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


def test_notices_survive_a_closed_terminal(monkeypatch):
    # `... | tee log` and Ctrl-C: tee dies with the same signal; the stop notice must not raise
    import importlib

    train_lib = importlib.import_module("gralora_jax.train")  # the module (the package exports a function train)
    monkeypatch.setattr(sys, "stderr", _ClosedPipe())
    train_lib._say("sigint: saving a checkpoint at the next step boundary")
    with pytest.raises(BrokenPipeError):
        sys.stderr.write("x")  # the control: the pipe really is closed
