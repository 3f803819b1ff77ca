"""gralora_jax.distributed in one process: start-up flags, placing host data, gathering to the host.

The multi-process behaviour (jax.distributed over CPU processes) is exercised by
tests/test_multihost_cli.py and tests/test_train.py::test_two_processes_match_single_device.
"""

import argparse
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gralora_jax import distributed
from gralora_jax.sharding import make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def mesh():
    return make_mesh("4x2")


def test_flags_parse_into_config():
    p = argparse.ArgumentParser()
    distributed.add_arguments(p)
    ns = p.parse_args(["--coordinator-address", "127.0.0.1:9999", "--num-processes", "4", "--process-id", "3"])
    cfg = distributed.DistributedConfig.from_args(ns)
    assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id) == ("127.0.0.1:9999", 4, 3)
    assert cfg.explicit
    assert not distributed.DistributedConfig.from_args(p.parse_args([])).explicit
    # every field has a flag and every flag a field (one table)
    assert set(distributed.CLI_FLAGS) == {f for f in distributed.DistributedConfig.__dataclass_fields__}


@pytest.mark.parametrize("kw, match", [
    (dict(coordinator_address="h:1"), "go together: missing --num-processes, --process-id"),
    (dict(coordinator_address="h", num_processes=2, process_id=0), "HOST:PORT"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), r"--process-id must be in 0\.\.1"),
    (dict(coordinator_address="h:1", num_processes=0, process_id=0), "--num-processes must be >= 1"),
])
def test_config_errors_are_one_line(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        distributed.DistributedConfig(**kw)
    assert "\n" not in str(e.value)


def test_initialize_refuses_a_mesh_the_processes_cannot_share():
    cfg = distributed.DistributedConfig("127.0.0.1:1", 3, 0)
    with pytest.raises(ValueError, match="8 devices, which 3 processes"):
        distributed.initialize(cfg, devices=8)


def test_initialize_single_process_is_a_no_op(monkeypatch):
    for k in ("GRALORA_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
              "CLOUD_TPU_TASK_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.initialize(devices=8) is False  # 8 devices exist already: nothing to do


def test_trainer_refuses_a_multi_host_launch_without_jax_distributed(monkeypatch):
    """Launched as one of several processes (GRALORA_DISTRIBUTED=1, as tpu_setup launch sets)
    without jax.distributed: building a Trainer stops with one line saying what to call."""
    for k in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
              "CLOUD_TPU_TASK_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv("GRALORA_DISTRIBUTED", raising=False)
    distributed.check_initialized()  # a plain single-process run
    monkeypatch.setenv("GRALORA_DISTRIBUTED", "1")
    from gralora_jax.train import Trainer

    with pytest.raises(RuntimeError, match=r"^Trainer: .*GRALORA_DISTRIBUTED.*distributed\.initialize\(\)") as e:
        Trainer(loss_fn=None, params={}, mask={}, optim=None, config=None, mesh=None, param_specs={})
    assert "\n" not in str(e.value)
    monkeypatch.setattr(jax, "process_count", lambda: 2)  # joined: nothing to say
    distributed.check_initialized()


def test_initialize_creates_this_process_share_of_cpu_devices():
    """Before the backend starts, a 2-process run of a 4x2 mesh makes exactly 4 CPU devices here,
    even when XLA_FLAGS asks for 8 (jax.distributed itself is not started: no coordinator)."""
    code = (
        "import jax; from gralora_jax import distributed as d, hostdevices as h;"
        "cfg = d.DistributedConfig('127.0.0.1:1', 2, 0);"
        "h.ensure_host_devices(8 // d._process_count_hint(cfg), exact=True);"
        "print(jax.local_device_count())"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "4"


def test_put_global_places_host_leaves_by_their_shardings(mesh):
    g = np.random.default_rng(0)
    tree = {"w": g.normal(size=(8, 6)).astype(np.float32), "b": np.arange(6, dtype=np.int32),
            "s": np.float32(3.0), "j": jnp.ones((4, 2))}
    specs = {"w": P("data", "model"), "b": P("model"), "s": P(), "j": P(None, "model")}
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
    placed = distributed.put_global(tree, shardings)
    for k in tree:
        assert placed[k].sharding == shardings[k], k
        np.testing.assert_array_equal(np.asarray(placed[k]), np.asarray(tree[k]))
    # each device holds only its block of w (data 4 x model 2 -> [2, 3] blocks)
    shard = placed["w"].addressable_shards[0]
    assert shard.data.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(shard.data), tree["w"][shard.index])
    # one sharding for every leaf
    rep = distributed.put_global(tree, NamedSharding(mesh, P()))
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(rep))


def test_gather_to_host_returns_whole_numpy_values(mesh):
    x = np.arange(48, dtype=np.float32).reshape(8, 6)
    placed = jax.device_put(x, NamedSharding(mesh, P("data", "model")))
    got = distributed.gather_to_host({"a": placed, "b": [np.ones(3), 2.0]})
    assert isinstance(got["a"], np.ndarray)
    np.testing.assert_array_equal(got["a"], x)
    np.testing.assert_array_equal(got["b"][0], np.ones(3))


def test_on_main_process_runs_only_on_process_zero():
    assert distributed.on_main_process(lambda a, b=0: a + b, 1, b=2) == 3
