"""Multi-host start-up and turning per-process host batches into global arrays.

On a TPU pod slice, a SLURM allocation or any launcher that sets
``JAX_COORDINATOR_ADDRESS``, every process runs the same script; it must call
:func:`maybe_initialize_distributed` before touching devices. Each process then reads its
own share of every global batch (:func:`process_batch_slice`) and
:func:`global_batch_from_local` stitches the shares into one global ``jax.Array`` sharded
over the mesh's data axes. In a single process both are no-ops in effect, so the same code
path runs on a laptop, CI and a pod.

Entry points call :func:`initialize` right after parsing their flags (it must run before
anything uses a jax backend); :class:`DistributedConfig` and :func:`add_arguments` give the
``--coordinator-address / --num-processes / --process-id`` flags as data. Afterwards:

* host data that is the same on every process goes onto the mesh with :func:`put_global`
  (each device takes its slice through ``jax.make_array_from_callback``; unlike
  ``jax.device_put`` it does not all-gather every leaf to check that the processes agree);
* what is small comes back to every host with :func:`gather_to_host` (adapter leaves for
  export, eval outputs), a single jitted copy to a replicated sharding;
* files are written by process 0 only (:func:`is_main_process`, :func:`on_main_process`).

>>> process_batch_slice(8)   # one process: everything
slice(0, 8, None)
>>> DistributedConfig(coordinator_address="10.0.0.2:1234", num_processes=2, process_id=1).explicit
True
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

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


def check_initialized(what: str = "training") -> None:
    """Raise one line when the environment shows a multi-host launch that jax.distributed has
    not joined (``jax.process_count() == 1``): every host would otherwise train alone on its
    own devices, write the same files and never stop together. Library code that builds a
    :class:`gralora_jax.train.Trainer` calls this; entry points call :func:`initialize` first
    (it must run before any jax computation, so by the time a Trainer exists it is too late to
    do it here)."""
    source = _launched_multi_host()
    if source is None or jax.process_count() > 1:
        return
    raise RuntimeError(
        f"{what}: this process was launched as one of several ({source} is set) but jax.distributed was not "
        "initialised; call gralora_jax.distributed.initialize() at the start of the program, before any jax "
        "computation (or unset it for a single-process run)")


def is_main_process() -> bool:
    """True on process 0, the one that writes metrics, adapters, results and plots."""
    return jax.process_index() == 0


def on_main_process(fn: Callable, *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` on process 0 (its return value), ``None`` on the others.

    For output files only: never for anything that runs a collective (every process must
    take part in those)."""
    return fn(*args, **kwargs) if is_main_process() else None


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


# ----------------------------------------------------------------------------- start-up


def _cpu_requested() -> bool:
    return os.environ.get("JAX_PLATFORMS", "").lower().startswith("cpu")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-process run (all None: detect it from the environment)."""

    coordinator_address: Optional[str] = None  # HOST:PORT of process 0's coordinator service (all processes give the same)
    num_processes: Optional[int] = None  # processes in the run (with coordinator_address)
    process_id: Optional[int] = None  # this process's index, 0 .. num_processes-1 (with coordinator_address)

    def __post_init__(self):
        given = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]
        if given and len(given) != 3:
            missing = sorted({f.name for f in dataclasses.fields(self)} - set(given))
            raise ValueError("--coordinator-address, --num-processes and --process-id go together: missing "
                             + ", ".join("--" + m.replace("_", "-") for m in missing))
        if not given:
            return
        host, _, port = self.coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--coordinator-address must be HOST:PORT, got {self.coordinator_address!r}")
        if self.num_processes < 1:
            raise ValueError(f"--num-processes must be >= 1, got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"--process-id must be in 0..{self.num_processes - 1}, got {self.process_id}")

    @property
    def explicit(self) -> bool:
        """True when the flags name the run (else the environment decides)."""
        return self.coordinator_address is not None

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "DistributedConfig":
        """The config from a namespace that :func:`add_arguments` filled."""
        return cls(**{f.name: getattr(ns, f.name, None) for f in dataclasses.fields(cls)})


# Flag name -> (type, help), one row per DistributedConfig field.
CLI_FLAGS: dict[str, tuple[type, str]] = {
    "coordinator_address": (str, "HOST:PORT of process 0 for a multi-process run without a launcher that "
                                 "sets it (TPU pod slices and GRALORA_DISTRIBUTED=1 need none of these flags); "
                                 "also works on CPU: each process then creates its share of the mesh's devices"),
    "num_processes": (int, "number of processes (with --coordinator-address)"),
    "process_id": (int, "this process's index 0..N-1 (with --coordinator-address)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--coordinator-address``, ``--num-processes`` and ``--process-id`` to ``parser``.

    >>> p = argparse.ArgumentParser(); add_arguments(p)
    >>> DistributedConfig.from_args(p.parse_args([])).explicit
    False
    """
    for name, (typ, help_) in CLI_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=help_)


def _process_count_hint(config: DistributedConfig) -> int:
    """Processes in the run when knowable before start-up (flags or JAX_NUM_PROCESSES), else 1."""
    if config.explicit:
        return config.num_processes
    n = os.environ.get("JAX_NUM_PROCESSES", "")
    return int(n) if n.isdigit() and _launched_multi_host() else 1


def initialize(config: DistributedConfig | None = None, *, devices: int | None = None) -> bool:
    """Start-up for entry points, before anything uses a jax backend. True when multi-process.

    Joins a multi-process run when ``config`` names one or the environment shows a
    multi-host launch (see :func:`maybe_initialize_distributed`); ``devices`` is the size of
    the mesh the run will use: on CPU each of the N processes creates ``devices / N`` host
    devices (``devices`` itself in a single process), so ``--mesh 4x2`` works as 1, 2, 4 or 8
    processes. Safe to call more than once.
    """
    config = config or DistributedConfig()
    procs = _process_count_hint(config)
    if devices is not None:
        from gralora_jax.hostdevices import ensure_host_devices

        if devices % procs:
            raise ValueError(f"--mesh has {devices} devices, which {procs} processes cannot share evenly")
        ensure_host_devices(devices // procs, exact=procs > 1 and _cpu_requested())
    if config.explicit:
        return maybe_initialize_distributed(config.coordinator_address, config.num_processes, config.process_id)
    return maybe_initialize_distributed()


# ----------------------------------------------------------------------------- placing and gathering


def _is_global(x) -> bool:
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def _put_leaf(x, sharding):
    if isinstance(x, jax.Array) and (jax.process_count() == 1 or _is_global(x)):
        return jax.device_put(x, sharding)  # a device-side copy or reshard
    host = np.asarray(x)  # host data, identical on every process (the caller's promise)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def put_global(tree: Any, shardings: Any) -> Any:
    """Place host data that every process holds identically onto global shardings.

    ``shardings`` is one ``Sharding`` for every leaf or a matching tree. Host leaves (numpy,
    scalars, and in a multi-process run also jax arrays on this host's devices) are built
    with ``jax.make_array_from_callback``, each device copying just its slice; arrays already
    spanning the mesh are resharded on device. No cross-process check or gather happens
    (``jax.device_put`` of host data all-gathers every leaf in a multi-process run to
    compare the processes' copies).

    >>> import jax, numpy as np
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> put_global({"w": np.ones((2, 3))}, NamedSharding(mesh, P()))["w"].shape
    (2, 3)
    """
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: _put_leaf(x, shardings), tree)
    return jax.tree.map(_put_leaf, tree, shardings)


@functools.lru_cache(maxsize=None)
def _replicator(mesh):
    return jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))


def gather_to_host(tree: Any) -> Any:
    """Every leaf as a host numpy array holding the whole value, on every process.

    Leaves that span several hosts are copied to a replicated sharding by one jitted
    identity per mesh (one all-gather per leaf inside one program), then read from this
    host's first copy; local arrays and host data are just converted. Every process must
    call it with the same tree (it runs a collective). For what is small: adapter leaves,
    evaluation outputs, a merged model written once.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    out: list[Any] = list(leaves)
    by_mesh: dict[Any, list[int]] = {}
    for i, x in enumerate(leaves):
        if _is_global(x):
            mesh = getattr(x.sharding, "mesh", None)
            if mesh is None:
                raise TypeError(f"gather_to_host: a multi-host array with {type(x.sharding).__name__} "
                                "(only NamedSharding is supported)")
            by_mesh.setdefault(mesh, []).append(i)
        else:
            out[i] = np.asarray(x)
    for mesh, idx in by_mesh.items():
        replicated = _replicator(mesh)([leaves[i] for i in idx])
        for i, r in zip(idx, replicated):
            out[i] = np.asarray(r.addressable_data(0))
    return jax.tree_util.tree_unflatten(treedef, out)
