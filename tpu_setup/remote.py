"""Shell scripts that run ON the TPU workers (passed to ``gcloud ... ssh --command``).

Each function returns one line of POSIX shell. Remote paths are relative to the worker's
home directory unless absolute; they are written as ``"$HOME"/path`` so they work from any
current directory and are never mangled by quoting (a quoted ``~`` does not expand).

Layout on every worker (defaults):

    ~/gralora-jax/          the code (``sync`` unpacks a ``git archive`` here, or ``setup``
                            clones it from git)
    ~/gralora-venv/         a Python 3.11+ virtualenv made with uv (the TPU images ship
                            Python 3.10, older than the pinned jax supports)
    ~/gralora-logs/RUN.log  stdout+stderr of a launched run; RUN.pid its process group

>>> remote_path("gralora-jax")
'"$HOME"/gralora-jax'
>>> remote_path("/mnt/disk/code")
'/mnt/disk/code'
"""

from __future__ import annotations

import re
import shlex
from typing import Mapping, Sequence

# Environment variables that multi-host JAX derives by itself on Cloud TPU (from the TPU
# metadata server); setting them by hand is how a pod ends up with mismatched workers.
FORBIDDEN_ENV = frozenset(
    {
        "JAX_COORDINATOR_ADDRESS",
        "JAX_COORDINATOR_PORT",
        "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID",
        "JAX_LOCAL_DEVICE_IDS",
        "TPU_WORKER_ID",
        "TPU_WORKER_HOSTNAMES",
        "TPU_PROCESS_ADDRESSES",
        "TPU_PROCESS_PORT",
        "TPU_SKIP_MDS_QUERY",
        "CLOUD_TPU_TASK_ID",
    }
)

UV_INSTALL_URL = "https://astral.sh/uv/install.sh"
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def remote_path(path: str) -> str:
    """A remote path as a shell word; relative (or ``~/``) paths hang off ``$HOME``.

    >>> remote_path("~/my dir")
    '"$HOME"/\\'my dir\\''
    """
    if not path or path in ("~", "~/"):
        raise ValueError("a remote path must name a file or directory below the home directory")
    if path.startswith("~/"):
        path = path[2:]
    elif path.startswith("~"):
        raise ValueError(f"remote path {path!r}: '~user' paths are not supported; use an absolute path")
    if path.startswith("/"):
        return shlex.quote(path)
    return '"$HOME"/' + shlex.quote(path.rstrip("/"))


def scp_path(path: str) -> str:
    """A remote path as scp wants it after ``NAME:`` (scp resolves relative paths from home).

    >>> scp_path("~/gralora-logs/train.log")
    'gralora-logs/train.log'
    """
    if path.startswith("~/"):
        return path[2:]
    return path


def _join(parts: Sequence[str]) -> str:
    return " && ".join(parts)


def unpack_script(archive: str, remote_dir: str, clean: bool = False) -> str:
    """Unpack a code tarball (copied to ``archive``) into ``remote_dir``, then remove it.

    >>> unpack_script("gralora-jax.tar.gz", "gralora-jax")
    'mkdir -p "$HOME"/gralora-jax && tar -xzf "$HOME"/gralora-jax.tar.gz -C "$HOME"/gralora-jax && rm -f "$HOME"/gralora-jax.tar.gz'
    """
    steps = []
    if clean:
        steps.append(f"rm -rf {remote_path(remote_dir)}")
    steps += [
        f"mkdir -p {remote_path(remote_dir)}",
        f"tar -xzf {remote_path(archive)} -C {remote_path(remote_dir)}",
        f"rm -f {remote_path(archive)}",
    ]
    return _join(steps)


def setup_script(
    remote_dir: str,
    venv: str,
    python_version: str = "3.11",
    jax_spec: str = "jax[tpu]",
    git_url: str | None = None,
    branch: str | None = None,
    use_constraints: bool = True,
    extra_packages: Sequence[str] = (),
) -> str:
    """Install uv, a venv, ``jax[tpu]`` and this project (editable) on a worker.

    With ``git_url`` the code is cloned into ``remote_dir`` (or updated if already there);
    otherwise ``remote_dir`` must already hold it (``python -m tpu_setup sync``). With
    ``use_constraints`` the repo's ``constraints.txt`` (the versions CI tests) pins the
    install when the file is present.
    """
    d, v = remote_path(remote_dir), remote_path(venv)
    steps = [
        'export PATH="$HOME/.local/bin:$PATH"',
        f"(command -v uv >/dev/null || curl -LsSf {UV_INSTALL_URL} | sh)",
    ]
    if git_url:
        ref = f" --branch {shlex.quote(branch)}" if branch else ""
        checkout = (
            f"git -C {d} fetch --depth 1 origin {shlex.quote(branch)} && git -C {d} checkout -B "
            f"{shlex.quote(branch)} FETCH_HEAD"
            if branch
            else f"git -C {d} pull --ff-only"
        )
        steps.append(
            f"(if [ -d {d}/.git ]; then {checkout}; "
            f"else git clone --depth 1{ref} {shlex.quote(git_url)} {d}; fi)"
        )
    else:
        steps.append(
            f"(test -f {d}/pyproject.toml || "
            f"{{ echo \"no code in {remote_dir} on $(hostname): run 'python -m tpu_setup sync' "
            f"first or pass --git-url\" >&2; exit 1; }})"
        )
    steps.append(f"uv venv --allow-existing --python {shlex.quote(python_version)} {v}")
    packages = ["-e", d, shlex.quote(jax_spec)] + [shlex.quote(p) for p in extra_packages]
    install = f"uv pip install --python {v}/bin/python " + " ".join(packages)
    if use_constraints:
        # `-c` only when the repo ships the file; jax[tpu]'s libtpu is not pinned there.
        install = (
            f"(if [ -f {d}/constraints.txt ]; then {install} -c {d}/constraints.txt; "
            f"else {install}; fi)"
        )
    steps.append(install)
    # Only import (no device query): on a pod slice, touching the TPUs from one worker
    # alone may wait for the others.
    steps.append(
        f"{v}/bin/python -c 'import jax, gralora_jax; "
        f"print(\"setup ok on\", __import__(\"socket\").gethostname(), \"jax\", jax.__version__)'"
    )
    return _join(steps)


def _check_env(env: Mapping[str, str]) -> None:
    for key in env:
        if not _ENV_NAME_RE.match(key):
            raise ValueError(f"environment variable name {key!r} is not a valid shell name")
        if key in FORBIDDEN_ENV:
            raise ValueError(
                f"do not set {key} by hand: on Cloud TPU, jax.distributed.initialize() reads the "
                f"worker list and this worker's id from the TPU metadata server, and a hand-set "
                f"value makes the workers disagree"
            )


def launch_script(
    command: str,
    remote_dir: str,
    venv: str | None,
    log_dir: str,
    run_name: str,
    env: Mapping[str, str],
) -> str:
    """Start ``command`` in the background on one worker, detached from the ssh session.

    The run gets its own session (``setsid``) so it survives the ssh connection closing and
    so ``stop`` can signal the whole process group; stdout and stderr go to
    ``log_dir/run_name.log`` and the process group id to ``log_dir/run_name.pid``. It
    refuses to start while the previous run of that name is still alive (a TPU can only
    be held by one process).
    """
    if not command.strip():
        raise ValueError("launch needs a command to run, e.g. 'python -m experiments.commonsense --mesh 4x1'")
    _check_env(env)
    if not re.match(r"^[A-Za-z0-9_.-]+$", run_name):
        raise ValueError(f"run name {run_name!r} may only hold letters, digits, '.', '_' and '-'")
    logs = remote_path(log_dir)
    log, pid = f"{logs}/{run_name}.log", f"{logs}/{run_name}.pid"
    steps = [
        f"mkdir -p {logs}",
        f"(if [ -f {pid} ] && kill -0 -- -\"$(cat {pid})\" 2>/dev/null; then "
        f"echo \"run {run_name} is still running on $(hostname); stop it first "
        f"(python -m tpu_setup stop)\" >&2; exit 1; fi)",
        f"cd {remote_path(remote_dir)}",
    ]
    if venv:
        steps.append(f". {remote_path(venv)}/bin/activate")
    if env:
        steps.append("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()))
    steps.append(
        f"{{ setsid nohup bash -c {shlex.quote(command)} > {log} 2>&1 < /dev/null & "
        f"echo $! > {pid}; }}"
    )
    steps.append(f"echo \"started {run_name} on $(hostname): pid $(cat {pid}), log {log_dir}/{run_name}.log\"")
    return _join(steps)


def stop_script(log_dir: str, run_name: str, signal: str = "TERM") -> str:
    """Signal a launched run's whole process group (SIGTERM: the trainer checkpoints, exits)."""
    if signal not in ("TERM", "INT", "KILL"):
        raise ValueError(f"signal must be TERM, INT or KILL, got {signal!r}")
    pid = f"{remote_path(log_dir)}/{run_name}.pid"
    return (
        f"if [ -f {pid} ] && kill -0 -- -\"$(cat {pid})\" 2>/dev/null; then "
        f"kill -{signal} -- -\"$(cat {pid})\" && echo \"sent SIG{signal} to {run_name} on $(hostname)\"; "
        f"else echo \"{run_name} is not running on $(hostname)\"; fi"
    )
