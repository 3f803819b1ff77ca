"""Train-step and loop tests on 8 CPU host devices with a tiny GraLoRA model.

References are independent: a single-device run (for the meshes and gradient accumulation),
a NumPy cross-entropy (for the loss), and a separately jitted loss (for the Llama run).
"""

import json
import os
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gralora_jax import tree as tree_lib
from gralora_jax.losses import causal_lm_loss
from gralora_jax.optim import make_optimizer
from gralora_jax.sharding import make_mesh, param_partition_specs
from gralora_jax.train import TrainConfig, Trainer, init_train_state, make_causal_lm_loss_fn, make_train_step

from _train_worker import toy_optim, ToyData, toy_logits, toy_loss_fn, toy_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEPS = 3
OPTIM = toy_optim()  # the two-process test's worker uses the same settings


def _run(mesh, params, accum=1, steps=STEPS):
    mask = tree_lib.trainable_mask(params)
    opt = make_optimizer(OPTIM, params, mask)
    specs = param_partition_specs(params, "llama", mesh)
    step = make_train_step(toy_loss_fn, opt, mask, mesh, specs, params, grad_accum=accum)
    state, frozen = init_train_state(params, mask, opt, mesh, specs)
    data, losses = ToyData(), []
    for _ in range(steps):
        state, m = step(state, frozen, jax.device_put(next(data), step.batch_sharding))
        losses.append(float(m["loss"]))
    return {"losses": np.array(losses), "params": jax.device_get(state.params), "frozen": frozen,
            "state": state, "step": step, "opt_state": state.opt_state}


@pytest.fixture(scope="module")
def params():
    return toy_params(0, n_layers=1)


@pytest.fixture(scope="module")
def reference(params):
    return _run(make_mesh("1x1", devices=jax.devices()[:1]), params)


def _assert_same(ref, out, tol=1e-5):
    np.testing.assert_allclose(out["losses"], ref["losses"], rtol=tol, atol=tol)
    a, b = tree_lib.flatten(ref["params"]), tree_lib.flatten(out["params"])
    assert a.keys() == b.keys()
    for p in a:
        np.testing.assert_allclose(b[p], a[p], rtol=tol, atol=tol, err_msg=p)


@pytest.mark.parametrize("spec", ["8x1", "4x2", "2x4", "1x8", "2x2x2"])
def test_meshes_match_single_device(spec, params, reference):
    out = _run(make_mesh(spec), params)
    _assert_same(reference, out)
    # compiled exactly once for 3 steps (shardings fixed, state donated and re-fed)
    assert out["step"].trace_count == 1
    assert out["step"].jitted._cache_size() == 1
    # the state's params keep their declared shardings
    specs = tree_lib.flatten(param_partition_specs(params, "llama", make_mesh(spec)))
    for p, leaf in tree_lib.flatten(out["state"].params).items():
        assert leaf.sharding.spec == specs[p], p


def test_frozen_untouched_adapters_trained(params, reference):
    init = tree_lib.flatten(params)
    frozen = tree_lib.flatten(jax.device_get(reference["frozen"]))
    assert frozen and all(not tree_lib.is_adapter_path(p) for p in frozen)
    for p, v in frozen.items():
        np.testing.assert_array_equal(v, init[p])
    trained = tree_lib.flatten(reference["params"])
    assert set(trained) == {p for p in init if tree_lib.is_adapter_path(p)}
    for p, v in trained.items():
        assert not np.allclose(v, init[p]), p
    # optimizer state carries no frozen leaf
    for k, _ in jax.tree_util.tree_leaves_with_path(reference["opt_state"]):
        ks = jax.tree_util.keystr(k)
        assert "kernel" not in ks and "embedding" not in ks and "norm" not in ks, ks


def test_grad_accumulation_equals_full_batch(params, reference):
    out = _run(make_mesh("4x2"), params, accum=2)
    _assert_same(reference, out)


def test_causal_lm_loss_vs_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    ids = rng.integers(0, 7, (2, 5))
    mask = np.array([[0, 1, 1, 0, 1], [1, 1, 0, 1, 1]], np.float32)
    loss, n = causal_lm_loss(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), jnp.asarray(ids), jnp.asarray(mask))
    lg = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), np.float64)[:, :-1]
    lp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    nll = -np.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0]
    w = mask[:, 1:]
    assert float(n) == w.sum() == 6
    assert float(loss) == pytest.approx((nll * w).sum() / w.sum(), rel=1e-5)
    assert causal_lm_loss(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(ids))[0].dtype == jnp.float32
    with pytest.raises(ValueError, match="logits"):
        causal_lm_loss(jnp.zeros((2, 5)), jnp.zeros((2, 5), jnp.int32))


def test_make_causal_lm_loss_fn(params):
    class Fake:
        def logits_fn(self, p, input_ids, attention_mask=None, *, dropout_rng=None, train=False):
            return toy_logits(p, input_ids)

    batch = {k: jnp.asarray(v) for k, v in ToyData().get(0).items()}
    batch["attention_mask"] = jnp.ones_like(batch["input_ids"])
    loss, metrics = make_causal_lm_loss_fn(Fake())(params, batch, jax.random.PRNGKey(0), True)
    ref, ref_metrics = toy_loss_fn(params, batch, None, True)
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)
    assert float(metrics["num_tokens"]) == float(ref_metrics["num_tokens"]) == float(batch["loss_mask"][:, 1:].sum())


class _ScaledData(ToyData):
    """Adds a per-row ``scale`` (NaN for the batch of step ``nan_step``) and can SIGTERM itself."""

    def __init__(self, nan_step=None, sigterm_step=None):
        super().__init__()
        self.nan_step, self.sigterm_step = nan_step, sigterm_step

    def __next__(self):
        b = super().__next__()
        step = self.index  # 1-based step this batch feeds
        b["scale"] = np.full((self.batch,), np.nan if step == self.nan_step else 1.0, np.float32)
        if step == self.sigterm_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return b


def _scaled_loss(p, batch, rng, train):
    loss, m = toy_loss_fn(p, batch, rng, train)
    return loss * batch["scale"].mean(), m


def _trainer(params, out_dir, steps=5, eval_fn=None):
    mesh = make_mesh("2x1", devices=jax.devices()[:2])
    cfg = TrainConfig(steps=steps, checkpoint_every=1, output_dir=str(out_dir), log_every=1, progress=False,
                      keep_checkpoints=10, eval_every=2)
    return Trainer(loss_fn=_scaled_loss, params=params, mask=tree_lib.trainable_mask(params), optim=OPTIM, config=cfg,
                   mesh=mesh, param_specs=param_partition_specs(params, "llama", mesh), eval_fn=eval_fn,
                   checkpoint_meta={"adapter_config": {"r": 8}, "base_model": "toy"})


def test_nan_guard_stops_and_does_not_checkpoint(params, tmp_path):
    tr = _trainer(params, tmp_path)
    with pytest.raises(FloatingPointError, match="step 2"):
        tr.fit(_ScaledData(nan_step=2))
    assert tr.checkpointer.all_steps() == [1]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1]


def test_sigterm_saves_final_checkpoint_and_stops(params, tmp_path):
    old = signal.getsignal(signal.SIGTERM)
    seen = []

    def eval_fn(full_params, step):  # gets the full tree (frozen + current adapters)
        seen.append(step)
        assert set(tree_lib.flatten(full_params)) == set(tree_lib.flatten(params))
        return {"score": float(step) * 10}

    tr = _trainer(params, tmp_path, steps=5, eval_fn=eval_fn)
    data = _ScaledData(sigterm_step=3)
    tr.fit(data)
    assert tr.stop_reason == "sigterm" and tr.step == 3
    assert signal.getsignal(signal.SIGTERM) is old  # handler restored
    assert tr.checkpointer.latest_step() == 3
    # the checkpoint records the data position after 3 batches and restores exactly
    tr2 = _trainer(params, tmp_path, steps=5)
    data2 = _ScaledData()
    assert tr2.restore(data2) and tr2.step == 3 and data2.index == 3
    for a, b in zip(jax.tree.leaves(tr.state), jax.tree.leaves(tr2.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "time"} <= set(rows[0])
    assert seen == [2] and [r for r in rows if "eval_score" in r] == [{"step": 2, "eval_score": 20.0}]


def test_bad_train_config():
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="checkpoint_every"):
        TrainConfig(checkpoint_every=-1)


def test_llama_gralora_trains_on_4x2_mesh():
    transformers = pytest.importorskip("transformers")
    from gralora_jax.config import GraLoRAConfig
    from gralora_jax.surgery import get_gralora_model

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.FlaxLlamaForCausalLM(cfg, seed=0)
    gm = get_gralora_model(model, GraLoRAConfig(r=8, alpha=16, gralora_k=2, target_modules=["q_proj", "v_proj", "down_proj"]),
                           rng=jax.random.PRNGKey(1))
    params = gm.params
    # B starts at zero; make it non-zero so the adapters matter from step 1
    flat = tree_lib.flatten(params)
    for p in flat:
        if p.endswith("gralora_B"):
            flat[p] = 0.05 * jax.random.normal(jax.random.PRNGKey(len(p)), flat[p].shape)
    params = tree_lib.unflatten(flat)
    loss_fn = make_causal_lm_loss_fn(gm)
    mesh = make_mesh("4x2")
    tc = TrainConfig(steps=3, progress=False)
    tr = Trainer(loss_fn=loss_fn, params=params, mask=gm.trainable_mask(params=params), optim=OPTIM, config=tc,
                 mesh=mesh, param_specs=param_partition_specs(params, "llama", mesh))
    q = "model/layers/0/self_attn/q_proj/"
    specs = tree_lib.flatten(tr.step_fn.state_shardings.params)
    assert specs[q + "gralora_B"].spec == jax.sharding.PartitionSpec("model", None, None)
    g = np.random.default_rng(0)
    batch = {"input_ids": g.integers(0, 64, (8, 16)).astype(np.int32), "attention_mask": np.ones((8, 16), np.int32)}
    expected = float(jax.jit(lambda p, b: loss_fn(p, b, None, False)[0])(params, batch))
    state, m = tr.step_fn(tr.state, tr.frozen, tr._batch(batch))
    tr.state = state
    assert float(m["loss"]) == pytest.approx(expected, rel=1e-5)
    state, m2 = tr.step_fn(tr.state, tr.frozen, tr._batch(batch))
    assert float(m2["loss"]) < float(m["loss"])  # same batch again: the update helped
    assert tr.step_fn.trace_count == 1
    base = tree_lib.flatten(jax.device_get(tr.frozen))
    for p, v in base.items():
        np.testing.assert_array_equal(v, tree_lib.flatten(params)[p])


@pytest.mark.slow  # a subprocess end to end
def test_two_processes_match_single_device(reference):
    """Two CPU processes x 4 devices (jax.distributed + gloo) on one 4x2 mesh, each feeding its
    half of the batch through global_batch_from_local: same losses as one device."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    worker = os.path.join(ROOT, "tests", "_train_worker.py")
    procs = [subprocess.Popen([sys.executable, worker, "--dist", str(i), str(port)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
        assert "PROCS 2 DEVICES 8 LOCAL 4" in out, out[-3000:]
        losses = [float(line.split()[1]) for line in out.splitlines() if line.startswith("LOSS ")]
        np.testing.assert_allclose(losses, reference["losses"], rtol=1e-5, atol=1e-5)


def test_tpu_launch_flag_requests_distributed_start(monkeypatch):
    """`python -m tpu_setup launch` sets GRALORA_DISTRIBUTED=1; Cloud TPU VMs have no other env hint."""
    from gralora_jax import distributed

    for k in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
              "CLOUD_TPU_TASK_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv("GRALORA_DISTRIBUTED", raising=False)
    assert distributed._launched_multi_host() is None
    monkeypatch.setenv("GRALORA_DISTRIBUTED", "1")
    assert distributed._launched_multi_host() == "GRALORA_DISTRIBUTED"
