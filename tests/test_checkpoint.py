"""Checkpoint round trip, strict refusal, corrupt dirs, keep-N, and exact resume after SIGKILL."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from gralora_jax import tree as tree_lib
from gralora_jax.checkpoint import Checkpointer
from gralora_jax.optim import OptimConfig, make_optimizer
from gralora_jax.sharding import make_mesh, named_shardings, param_partition_specs
from gralora_jax.train import init_train_state, train_state_specs

from _train_worker import toy_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_train_worker.py")
META = {"adapter_config": {"peft_type": "GRALORA", "r": 8, "gralora_k": 2}, "base_model": "toy"}


def _state(params, mesh, seed=0):
    mask = tree_lib.trainable_mask(params)
    opt = make_optimizer(OptimConfig(optimizer="adamw", total_steps=10), params, mask)
    specs = param_partition_specs(params, "llama", mesh)
    state, frozen = init_train_state(params, mask, opt, mesh, specs, seed=seed)
    sspecs, _ = train_state_specs(opt, params, mask, specs)
    return state, named_shardings(mesh, sspecs)


@pytest.fixture(scope="module")
def params():
    return toy_params(0, n_layers=1)


def _perturbed(state, k=1.0):
    """A state whose every leaf differs from a fresh one (so a restore is observable)."""
    return jax.tree.map(lambda x: x + np.asarray(k, x.dtype), state)


def test_round_trip_across_meshes(params, tmp_path):
    mesh = make_mesh("4x2")
    state, _ = _state(params, mesh)
    state = _perturbed(state, 3)
    ck = Checkpointer(tmp_path, keep=2, base_params=params, mesh=mesh, **META, user={"note": "hi"})
    ck.save(state, data_state={"index": 7})
    ck.wait_until_finished()
    # restore into a template on another mesh, with that mesh's shardings
    template, shardings = _state(params, make_mesh("2x4"), seed=1)
    ck2 = Checkpointer(tmp_path, keep=2, base_params=params, **META)
    restored, data_state = ck2.restore_latest(template, shardings)
    assert data_state == {"index": 7}
    for (kp, a), b, s in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(restored),
                             jax.tree.leaves(shardings)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(kp))
        assert b.sharding == s
    meta = ck2.read_metadata(3)
    assert meta["user"] == {"note": "hi"} and meta["mesh"] == {"data": 4, "model": 2}
    assert meta["adapter_config"] == META["adapter_config"]


def test_keep_last_n(params, tmp_path):
    state, _ = _state(params, make_mesh("1x1", devices=jax.devices()[:1]))
    ck = Checkpointer(tmp_path, keep=2, **META)
    for step in (1, 2, 3, 4):
        ck.save(state, step=step)
    ck.wait_until_finished()
    assert ck.all_steps() == [3, 4]
    assert Checkpointer(tmp_path, keep=2, **META).latest_step() == 4


def test_refuses_mismatched_config_and_shapes(params, tmp_path):
    mesh = make_mesh("1x1", devices=jax.devices()[:1])
    state, _ = _state(params, mesh)
    ck = Checkpointer(tmp_path, base_params=params, **META)
    ck.save(_perturbed(state), step=5)
    ck.wait_until_finished()

    other_cfg = dict(META, adapter_config={"peft_type": "GRALORA", "r": 16, "gralora_k": 2})
    with pytest.raises(ValueError, match="adapter config differs"):
        Checkpointer(tmp_path, base_params=params, **other_cfg).restore_latest(state)

    # a template whose adapters have another rank: refused, naming the leaf
    flat = tree_lib.flatten(params)
    q = "model/layers/0/self_attn/q_proj/"
    flat[q + "gralora_A"] = np.zeros((2, 16, 4), np.float32)
    flat[q + "gralora_B"] = np.zeros((2, 4, 16), np.float32)
    params_r4 = tree_lib.unflatten(flat)
    template, _ = _state(params_r4, mesh)
    before = [np.asarray(x).copy() for x in jax.tree.leaves(template)]
    with pytest.raises(ValueError, match=r"gralora_A.*shape/dtype"):
        Checkpointer(tmp_path, **META).restore_latest(template)
    # nothing partially loaded: the template is untouched
    for a, b in zip(before, jax.tree.leaves(template)):
        np.testing.assert_array_equal(a, np.asarray(b))

    # another base (different shapes hash) is refused
    with pytest.raises(ValueError, match="param_shapes_hash"):
        Checkpointer(tmp_path, base_params=params_r4, **META).restore_latest(state)
    # a dtype change is refused
    bf16 = jax.tree.map(lambda x: x.astype("bfloat16") if x.dtype == np.float32 else x, state)
    with pytest.raises(ValueError, match="bfloat16"):
        Checkpointer(tmp_path, **META).restore_latest(bf16)


def test_missing_and_corrupt(params, tmp_path):
    state, _ = _state(params, make_mesh("1x1", devices=jax.devices()[:1]))
    empty = Checkpointer(tmp_path / "none", **META)
    assert empty.restore_latest(state) is None
    with pytest.raises(ValueError, match="no checkpoint for step 3"):
        empty.restore(3, state)
    ck = Checkpointer(tmp_path / "c", **META)
    ck.save(state, step=1)
    ck.save(state, step=2)
    ck.wait_until_finished()
    shutil.rmtree(tmp_path / "c" / "1" / "meta")
    with pytest.raises(ValueError, match="corrupt or incomplete"):
        Checkpointer(tmp_path / "c", **META).restore(1, state)
    shutil.rmtree(tmp_path / "c" / "2" / "state")
    with pytest.raises(ValueError, match="could not be read"):
        Checkpointer(tmp_path / "c", **META).restore(2, state)


def _worker(out, *args, cache):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return subprocess.Popen([sys.executable, WORKER, str(out), "--mesh", "2x2", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _load(path):
    z = np.load(path)
    return [z[f"arr_{i}"] for i in range(len(z.files))]


@pytest.mark.slow  # a subprocess end to end
def test_exact_resume_after_sigkill(tmp_path):
    cache = tmp_path / "jax_cache"  # shared compilation cache: the 2nd/3rd runs skip compiling
    straight = _worker(tmp_path / "straight", "--steps", "6", "--ckpt-every", "3", cache=cache)
    out, _ = straight.communicate(timeout=400)
    assert straight.returncode == 0 and "DONE done AT 6" in out, out[-3000:]

    run = tmp_path / "killed"
    victim = _worker(run, "--steps", "6", "--ckpt-every", "3", "--pause-after", "3", cache=cache)
    deadline = time.time() + 400
    lines = []
    for line in victim.stdout:
        lines.append(line)
        if line.startswith("COMMITTED"):
            break
        assert time.time() < deadline, "".join(lines)
    assert lines and lines[-1].strip() == "COMMITTED 3", "".join(lines)[-3000:]
    os.kill(victim.pid, signal.SIGKILL)  # hard kill: no handler, no cleanup
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not (run / "params_step6.npz").exists()

    resumed = _worker(run, "--steps", "6", "--ckpt-every", "3", cache=cache)
    out2, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, out2[-3000:]
    assert "RESUMED 1 AT 3" in out2 and "DONE done AT 6" in out2, out2[-3000:]

    a, b = _load(tmp_path / "straight" / "params_step6.npz"), _load(run / "params_step6.npz")
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)  # bit-identical
    # the straight run saved step 3 asynchronously and then donated that state to step 4; its
    # step-3 checkpoint must still equal the one the paused (never donated) run committed
    params = toy_params(0)
    template, shardings = _state(params, make_mesh("1x1", devices=jax.devices()[:1]))
    meta = {"adapter_config": {"r": 8, "gralora_k": 2}, "base_model": "toy"}  # as in the worker
    s1, d1 = Checkpointer(tmp_path / "straight" / "checkpoints", **meta).restore(3, template, shardings)
    s2, d2 = Checkpointer(run / "checkpoints", **meta).restore(3, template, shardings)
    assert d1 == d2 == {"index": 3}
    for x, y in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # and training did move the adapters away from the initial ones
    init = jax.tree.leaves(tree_lib.split_trainable(toy_params(0), tree_lib.trainable_mask(toy_params(0)))[0])
    assert any(not np.allclose(np.asarray(i), x) for i, x in zip(init, a))
