"""Multi-host start-up and turning per-process host batches into global arrays.

On a TPU pod slice, a SLURM allocation or any launcher that sets
``JAX_COORDINATOR_ADDRESS``, every process runs the same script; it must call
:func:`maybe_initialize_distributed` before touching devices. Each process then reads its
own share of every global batch (:func:`process_batch_slice`) and
:func:`global_batch_from_local` stitches the shares into one global ``jax.Array`` sharded
over the mesh's data axes. In a single process both are no-ops in effect, so the same code
path runs on a laptop, CI and a pod.

>>> process_batch_slice(8)   # one process: everything
slice(0, 8, None)
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np

_TPU_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "CLOUD_TPU_TASK_ID")
_initialized = False


def _launched_multi_host() -> str | None:
    """Which launcher asks for multi-host start-up, or None."""
    env = os.environ
    if env.get("GRALORA_DISTRIBUTED") == "1":  # set by `python -m tpu_setup launch` on every worker
        return "GRALORA_DISTRIBUTED"
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or any(env.get(k) for k in _TPU_ENV[1:]):
        return "TPU"
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_JOB_ID"):
        return "SLURM"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "OpenMPI"
    return None


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Any = None,
) -> bool:
    """Call ``jax.distributed.initialize`` when this is a multi-host launch.

    Explicit arguments always initialise; otherwise the environment is inspected
    (``JAX_COORDINATOR_ADDRESS`` [+ ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``], TPU worker
    variables, SLURM with >1 task, OpenMPI) and jax auto-detects the rest. Returns True when
    initialised (now or earlier), False for a plain single-process run. Idempotent.
    """
    global _initialized
    if _initialized:
        return True
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    source = "explicit" if explicit else _launched_multi_host()
    if source is None:
        return False
    kwargs: dict[str, Any] = {}
    if source == "JAX_COORDINATOR_ADDRESS" and not explicit:
        coordinator_address = os.environ["JAX_COORDINATOR_ADDRESS"]
        if os.environ.get("JAX_NUM_PROCESSES"):
            num_processes = int(os.environ["JAX_NUM_PROCESSES"])
        if os.environ.get("JAX_PROCESS_ID"):
            process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator_address is not None:
        kwargs["coordinator_address"] = coordinator_address
    if num_processes is not None:
        kwargs["num_processes"] = num_processes
    if process_id is not None:
        kwargs["process_id"] = process_id
    if local_device_ids is not None:
        kwargs["local_device_ids"] = local_device_ids
    if os.environ.get("JAX_PLATFORMS", "").lower().startswith("cpu"):
        # CPU-only multi-process runs (tests, CI) need a cross-process collectives backend.
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except Exception:  # pragma: no cover - option renamed/removed in a future jax
            pass
    jax.distributed.initialize(**kwargs)
    _initialized = True
    return True


def is_main_process() -> bool:
    return jax.process_index() == 0


def process_batch_slice(global_batch_size: int, process_index: int | None = None,
                        process_count: int | None = None) -> slice:
    """Rows of the global batch this process feeds (contiguous, equal shares)."""
    n = jax.process_count() if process_count is None else process_count
    i = jax.process_index() if process_index is None else process_index
    if global_batch_size % n:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the {n} processes")
    per = global_batch_size // n
    return slice(i * per, (i + 1) * per)


def global_batch_from_local(local_batch: Mapping[str, Any], mesh=None, sharding=None) -> dict:
    """Per-process host arrays (this process's rows) -> global ``jax.Array`` batch.

    ``sharding`` defaults to :func:`gralora_jax.sharding.batch_sharding` of ``mesh``. The
    global batch size is ``local rows * process_count``.
    """
    if sharding is None:
        if mesh is None:
            raise ValueError("global_batch_from_local needs a mesh or a sharding")
        from gralora_jax.sharding import batch_sharding

        sharding = batch_sharding(mesh)
    n = jax.process_count()

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * n, *x.shape[1:]))

    return {k: put(v) for k, v in local_batch.items()}
