"""The gcloud (and git) command lines for every ``tpu_setup`` action, as argv lists.

Pure functions: each takes a :class:`Target` (which TPU) plus the action's options and
returns ``list[list[str]]`` -- the commands to run in order. Nothing here runs anything,
reads the environment or touches the network, so every command can be checked in tests
and printed by ``--dry-run`` exactly as it would run.

>>> t = Target(name="my-tpu", zone="us-central2-b")
>>> create_commands(t, CreateOptions(accelerator_type="v4-8"))
[['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'my-tpu', '--zone=us-central2-b', '--accelerator-type=v4-8', '--version=tpu-ubuntu2204-base']]
>>> status_commands(t)
[['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe', 'my-tpu', '--zone=us-central2-b']]
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import tempfile
from typing import Mapping, Sequence

from tpu_setup import remote
from tpu_setup.accelerators import parse_accelerator

GCLOUD = "gcloud"
_TPU_VM = [GCLOUD, "compute", "tpus", "tpu-vm"]
_QUEUED = [GCLOUD, "compute", "tpus", "queued-resources"]
# TPU node names: lowercase letter first, then lowercase letters, digits, hyphens.
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
# zones ("us-central2-b") and project ids (also "example.com:my-project")
_ZONE_RE = re.compile(r"^[a-z0-9][-a-z0-9]*$")
_PROJECT_RE = re.compile(r"^[a-z0-9]([-a-z0-9.:]*[a-z0-9])?$")
# the code tarball's name on the workers (an scp path): plain characters only
_ARCHIVE_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")
# stands for the local --env file in printed (--dry-run) commands; the real one is made at run time
ENV_FILE_PLACEHOLDER = "<local --env file, mode 600>"

# Defaults for where things live on the workers (relative to the worker's home).
REMOTE_DIR = "gralora-jax"
REMOTE_VENV = "gralora-venv"
REMOTE_LOG_DIR = "gralora-logs"
RUN_NAME = "train"


@dataclasses.dataclass(frozen=True)
class Target:
    """Which TPU (VM or pod slice) a command is about."""

    name: str  # TPU node id; also the queued-resource id when queued
    zone: str  # e.g. "us-central2-b"; TPU types exist only in some zones
    project: str | None = None  # GCP project; None: gcloud's configured core/project
    queued: bool = False  # the TPU was created through a queued resource of the same name
    internal_ip: bool = False  # ssh/scp over the workers' internal IPs (from inside the VPC)

    def __post_init__(self):
        if not self.name:
            raise ValueError("a TPU name is required (--name, or the TPU_NAME environment variable)")
        if not _NAME_RE.match(self.name):
            raise ValueError(
                f"TPU name {self.name!r} must start with a lowercase letter and hold only "
                f"lowercase letters, digits and hyphens (at most 63 characters)"
            )
        if not self.zone:
            raise ValueError("a zone is required (--zone, or the TPU_ZONE environment variable)")
        if not _ZONE_RE.match(self.zone):
            raise ValueError(f"zone {self.zone!r} is not a zone name like us-central2-b")
        if self.project is not None and not _PROJECT_RE.match(self.project):
            raise ValueError(f"project {self.project!r} is not a GCP project id")

    def scope_flags(self) -> list[str]:
        """``--zone`` and (if set) ``--project``: every gcloud command takes them."""
        flags = [f"--zone={self.zone}"]
        if self.project:
            flags.append(f"--project={self.project}")
        return flags

    def connect_flags(self) -> list[str]:
        return ["--internal-ip"] if self.internal_ip else []


def _ssh(target: Target, worker: str, command: str | None = None) -> list[str]:
    cmd = [*_TPU_VM, "ssh", target.name, *target.scope_flags(), f"--worker={worker}", *target.connect_flags()]
    if command is not None:
        cmd += ["--command", command]
    return cmd


def _scp(target: Target, sources: Sequence[str], dest: str, worker: str, recurse: bool = False) -> list[str]:
    cmd = [*_TPU_VM, "scp", *sources, dest, *target.scope_flags(), f"--worker={worker}", *target.connect_flags()]
    if recurse:
        cmd.append("--recurse")
    return cmd


def _check_worker(worker: str) -> str:
    worker = str(worker)
    if worker != "all" and not re.match(r"^[0-9]+([-,][0-9]+)*$", worker):
        raise ValueError(f"--worker must be 'all', an index (0), a list (0,2) or a range (1-3), got {worker!r}")
    return worker


# ----------------------------------------------------------------------------- create


@dataclasses.dataclass(frozen=True)
class CreateOptions:
    """How to create a TPU VM or pod slice."""

    accelerator_type: str  # e.g. "v4-8" (one host) or "v4-32" (a 4-host pod slice)
    version: str | None = None  # runtime version; None: the default for the generation
    spot: bool = False  # Spot VMs: cheap, may be preempted at any time
    preemptible: bool = False  # legacy preemptible TPU (tpu-vm create only; prefer spot)
    queued: bool = False  # request through a queued resource (waits for capacity)
    network: str | None = None  # VPC network; None: gcloud's default ("default")
    subnetwork: str | None = None  # subnetwork of that network
    valid_until_duration: str | None = None  # queued only: give up if not granted in time, e.g. "6h"
    description: str | None = None  # free text shown by `describe`
    service_account: str | None = None  # the workers' identity (needs access to your gs:// bucket)
    scopes: str | None = None  # OAuth scopes for that account, e.g. "cloud-platform"
    internal_ips: bool = False  # workers get no external IP (reach them from inside the VPC, --internal-ip)

    def __post_init__(self):
        parse_accelerator(self.accelerator_type)  # fail early on a malformed type
        if self.spot and self.preemptible:
            raise ValueError("--spot and --preemptible exclude each other (Spot is the newer one; use --spot)")
        if self.queued and self.preemptible:
            raise ValueError("queued resources have no --preemptible; use --spot")
        if self.valid_until_duration and not self.queued:
            raise ValueError("--valid-until-duration only applies to --queued requests")


def create_commands(target: Target, opts: CreateOptions) -> list[list[str]]:
    """``tpu-vm create`` or, with ``queued``, ``queued-resources create`` (node id = name).

    >>> t = Target("pod", "us-central2-b", project="p")
    >>> create_commands(t, CreateOptions("v4-32", spot=True, queued=True))[0]  # doctest: +NORMALIZE_WHITESPACE
    ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'pod', '--zone=us-central2-b',
     '--project=p', '--node-id=pod', '--accelerator-type=v4-32',
     '--runtime-version=tpu-ubuntu2204-base', '--spot']
    """
    if opts.queued != target.queued:
        target = dataclasses.replace(target, queued=opts.queued)
    version = opts.version or parse_accelerator(opts.accelerator_type).default_version
    if opts.queued:
        cmd = [*_QUEUED, "create", target.name, *target.scope_flags(), f"--node-id={target.name}"]
        cmd += [f"--accelerator-type={opts.accelerator_type}", f"--runtime-version={version}"]
    else:
        cmd = [*_TPU_VM, "create", target.name, *target.scope_flags()]
        cmd += [f"--accelerator-type={opts.accelerator_type}", f"--version={version}"]
    cmd += [flag for flag, on in (("--spot", opts.spot), ("--preemptible", opts.preemptible),
                                  ("--internal-ips", opts.internal_ips)) if on]
    valued = (
        ("network", opts.network),
        ("subnetwork", opts.subnetwork),
        ("valid-until-duration", opts.valid_until_duration),
        ("description", opts.description),
        ("service-account", opts.service_account),
        ("scopes", opts.scopes),
    )
    cmd += [f"--{name}={value}" for name, value in valued if value]
    return [cmd]


# ----------------------------------------------------------------------------- setup


@dataclasses.dataclass(frozen=True)
class SetupOptions:
    """How to install the project and ``jax[tpu]`` on every worker."""

    git_url: str | None = None  # clone the code from here; None: use the code `sync` copied
    branch: str | None = None  # branch or tag to clone (with git_url)
    remote_dir: str = REMOTE_DIR  # where the code lives on each worker
    venv: str = REMOTE_VENV  # the virtualenv made on each worker
    python_version: str = "3.11"  # Python for the venv (uv downloads it if missing)
    jax_spec: str = "jax[tpu]"  # the jax requirement; the [tpu] extra brings libtpu
    use_constraints: bool = True  # pin with the repo's constraints.txt (the versions CI tests)
    extra_packages: tuple[str, ...] = ()  # more requirements, e.g. ("tensorboardX",)
    check_devices: bool = True  # finally, fail on a worker where jax sees no TPU (prints jax.devices())

    def __post_init__(self):
        if self.branch and not self.git_url:
            raise ValueError("--branch needs --git-url (without it, setup installs the code `sync` copied)")


def setup_commands(target: Target, opts: SetupOptions) -> list[list[str]]:
    """One ssh to all workers at once that runs :func:`remote.setup_script`."""
    script = remote.setup_script(**dataclasses.asdict(opts))  # same field names, one source of truth
    return [_ssh(target, "all", script)]


# ----------------------------------------------------------------------------- sync


@dataclasses.dataclass(frozen=True)
class SyncOptions:
    """How to copy the local repository to every worker."""

    repo: str = "."  # local git repository to archive
    ref: str = "HEAD"  # commit/branch to archive (`git archive` takes committed files only)
    remote_dir: str = REMOTE_DIR  # where to unpack it on each worker
    archive: str | None = None  # local tarball path; None: <tmpdir>/gralora-jax-<name>.tar.gz
    clean: bool = False  # delete remote_dir first (drops files removed from the repo)


def default_archive_path(name: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"gralora-jax-{name}.tar.gz")


def sync_commands(target: Target, opts: SyncOptions) -> list[list[str]]:
    """``git archive`` -> one ``scp --worker=all`` -> unpack on all workers."""
    archive = opts.archive or default_archive_path(target.name)
    remote_archive = os.path.basename(archive)
    if not _ARCHIVE_RE.match(remote_archive):
        raise ValueError(f"archive file name {remote_archive!r} may only hold letters, digits, '.', '_', '+' and '-'")
    return [
        ["git", "-C", opts.repo, "archive", "--format=tar.gz", f"--output={archive}", opts.ref],
        _scp(target, [archive], f"{target.name}:{remote_archive}", "all"),
        _ssh(target, "all", remote.unpack_script(remote_archive, opts.remote_dir, clean=opts.clean)),
    ]


# ----------------------------------------------------------------------------- launch / stop


def launch_env(extra: Mapping[str, str] | None = None, jax_platforms: str | None = "tpu,cpu") -> dict[str, str]:
    """The environment a launched run gets.

    - ``PYTHONUNBUFFERED=1``: log lines reach the per-worker log file as they are printed.
    - ``JAX_PLATFORMS=tpu,cpu``: a worker whose TPU fails to initialise raises instead of
      silently training on its CPU while the others wait for it.
    - ``GRALORA_DISTRIBUTED=1``: tells our training engine to call
      ``jax.distributed.initialize()`` with no arguments; on Cloud TPU that finds the
      coordinator, the process count and this worker's id by itself (TPU metadata server),
      and it is harmless on a single host.

    Nothing else: no coordinator address, process id or worker list (see
    :data:`remote.FORBIDDEN_ENV`).
    """
    env = {"PYTHONUNBUFFERED": "1", "GRALORA_DISTRIBUTED": "1"}
    if jax_platforms:
        env["JAX_PLATFORMS"] = jax_platforms
    env.update(extra or {})
    return env


@dataclasses.dataclass(frozen=True)
class LaunchOptions:
    """What to run on every worker, and where its output goes."""

    command: str  # shell command, the same on every worker
    env: tuple[tuple[str, str], ...] = ()  # extra environment (KEY, VALUE) pairs
    run_name: str = RUN_NAME  # names the log (RUN.log) and pid (RUN.pid) files
    remote_dir: str = REMOTE_DIR  # working directory (the synced / cloned code)
    venv: str | None = REMOTE_VENV  # activated first; None: use the system Python
    log_dir: str = REMOTE_LOG_DIR  # per-worker log directory on each worker
    jax_platforms: str | None = "tpu,cpu"  # JAX_PLATFORMS value; None: leave unset
    worker: str = "all"  # workers to start on; multi-host JAX needs all of them


def launch_commands(target: Target, opts: LaunchOptions, env_file: str = ENV_FILE_PLACEHOLDER) -> list[list[str]]:
    """One ssh to every worker at once that starts the same command in the background.

    ``opts.env`` (the user's ``--env``, possibly secrets) never reaches a command line: the
    caller writes it to ``env_file`` (a local file, mode 600, :func:`remote.env_file_text`),
    which is first copied to the workers, then read and deleted by the launch script.

    >>> cmd = launch_commands(Target("t", "z"), LaunchOptions("python -m experiments.commonsense --mesh 4x1"))[0]
    >>> cmd[5:8]
    ['t', '--zone=z', '--worker=all']
    """
    worker = _check_worker(opts.worker)
    user_env = dict(opts.env)
    remote._check_env(user_env)
    remote_env_file = remote.env_file_name(opts.run_name) if user_env else None
    script = remote.launch_script(
        command=opts.command,
        remote_dir=opts.remote_dir,
        venv=opts.venv,
        log_dir=opts.log_dir,
        run_name=opts.run_name,
        env=launch_env(None, opts.jax_platforms),
        env_file=remote_env_file,
    )
    copy = [_scp(target, [env_file], f"{target.name}:{remote_env_file}", worker)] if user_env else []
    return [*copy, _ssh(target, worker, script)]


def stop_commands(
    target: Target, run_name: str = RUN_NAME, log_dir: str = REMOTE_LOG_DIR, signal: str = "TERM"
) -> list[list[str]]:
    """Signal the launched run on every worker (SIGTERM: checkpoint, then exit)."""
    return [_ssh(target, "all", remote.stop_script(log_dir, run_name, signal))]


# ----------------------------------------------------------------------------- logs


def logs_command(
    target: Target, worker: str, local_dir: str, run_name: str = RUN_NAME, log_dir: str = REMOTE_LOG_DIR
) -> list[str]:
    """The ``scp --worker=WORKER`` of ``LOG_DIR/RUN.log`` -> ``local_dir/RUN-worker-WORKER.log``
    (``worker`` may be a template such as ``{i}`` for printing)."""
    src = f"{target.name}:{remote.scp_path(remote.check_log_dir(log_dir))}/{remote.check_run_name(run_name)}.log"
    return _scp(target, [src], os.path.join(local_dir, f"{run_name}-worker-{worker}.log"), worker)


def logs_commands(
    target: Target, workers: int, local_dir: str, run_name: str = RUN_NAME, log_dir: str = REMOTE_LOG_DIR
) -> list[list[str]]:
    """One ``scp --worker=i`` per worker: ``LOG_DIR/RUN.log`` -> ``local_dir/worker-i.log``."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return [logs_command(target, str(i), local_dir, run_name, log_dir) for i in range(workers)]


def workers_query_command(target: Target) -> list[str]:
    """Prints the accelerator type of a TPU (used to count workers for ``logs``)."""
    return [*_TPU_VM, "describe", target.name, *target.scope_flags(), "--format=value(acceleratorType)"]


# ----------------------------------------------------------------------------- status / ssh / delete


def status_commands(target: Target) -> list[list[str]]:
    """``describe`` the queued resource (if queued) and the TPU VM."""
    cmds = []
    if target.queued:
        cmds.append([*_QUEUED, "describe", target.name, *target.scope_flags()])
    cmds.append([*_TPU_VM, "describe", target.name, *target.scope_flags()])
    return cmds


def ssh_commands(target: Target, worker: str = "0", command: str | None = None) -> list[list[str]]:
    """An interactive shell on one worker, or ``command`` on the chosen workers."""
    worker = _check_worker(worker)
    if command is None and not worker.isdigit():
        raise ValueError("an interactive ssh goes to one worker; give --command to run on several")
    return [_ssh(target, worker, command)]


def delete_commands(target: Target, yes: bool = False) -> list[list[str]]:
    """``tpu-vm delete``, or ``queued-resources delete --force`` (which deletes the node too)."""
    if target.queued:
        cmd = [*_QUEUED, "delete", target.name, *target.scope_flags(), "--force"]
    else:
        cmd = [*_TPU_VM, "delete", target.name, *target.scope_flags()]
    if yes:
        cmd.append("--quiet")
    return [cmd]


def format_commands(commands: Sequence[Sequence[str]]) -> str:
    """Shell-quoted, one command per line (what ``--dry-run`` prints)."""
    return "\n".join(shlex.join(c) for c in commands)
