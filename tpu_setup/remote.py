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

Quoting rule: every value that reaches the worker's shell is either a fixed word of this
module, passed through :func:`shlex.quote`, or checked against a strict pattern first
(run names, log directories, git branches). Messages that mention user values are built
by :func:`_echo`, which quotes them; nothing user-given is ever placed bare inside a
double-quoted string. ``--env`` values never appear on a command line at all: they travel
in a file (mode 600) that the launch script reads and deletes (:func:`env_file_text`).

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

# uv, pinned, installed from PyPI with the worker's own pip (no curl | sh of a moving script).
UV_VERSION = "0.13.8"
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RUN_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
# Log directories are also scp paths (legacy scp hands them to the remote shell): plain characters only.
_LOG_DIR_RE = re.compile(r"^(~/)?[A-Za-z0-9_.+/-]+$")
# git branch / tag names (a subset of check-ref-format) that cannot be read as an option.
_BRANCH_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_./+-]*$")


def check_run_name(run_name: str) -> str:
    """A run name names files (``RUN.log``, ``RUN.pid``): letters, digits, ``.``, ``_``, ``-``."""
    if not _RUN_NAME_RE.match(run_name or "") or run_name in (".", ".."):
        raise ValueError(f"run name {run_name!r} may only hold letters, digits, '.', '_' and '-'")
    return run_name


def check_log_dir(log_dir: str) -> str:
    """A remote log directory: it is also an scp path, so only letters, digits and ``._+/-``
    (optionally after ``~/``), not starting with ``-``."""
    if not _LOG_DIR_RE.match(log_dir or "") or log_dir.lstrip("~/").startswith("-"):
        raise ValueError(
            f"log directory {log_dir!r} may only hold letters, digits, '.', '_', '+', '-' and '/' "
            "(optionally after '~/'), and must not start with '-'"
        )
    return log_dir


def _echo(template: str, stream: str = "", **values: str) -> str:
    """``printf`` of a message as ONE quoted shell word; ``{host}`` becomes the worker's hostname,
    other ``{fields}`` the (quoted) ``values``.

    >>> print(_echo("hi {who} on {host}", who="$(x)"))
    printf '%s\\n' 'hi ''$(x)'' on '"$(hostname)"
    """
    import string

    word = ""
    for literal, field, _, _ in string.Formatter().parse(template):
        word += shlex.quote(literal) if literal else ""
        if field == "host":
            word += '"$(hostname)"'
        elif field is not None:
            word += shlex.quote(str(values[field]))
    return f"printf '%s\\n' {word}" + (f" {stream}" if stream else "")


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
    check_devices: bool = True,
) -> str:
    """Install uv, a venv, ``jax[tpu]`` and this project (editable) on a worker.

    With ``git_url`` the code is cloned into ``remote_dir`` (or updated if already there);
    otherwise ``remote_dir`` must already hold it (``python -m tpu_setup sync``). With
    ``use_constraints`` the repo's ``constraints.txt`` (the versions CI tests) pins the
    install when the file is present. uv is installed at :data:`UV_VERSION` with pip from
    PyPI. Last, the venv's Python imports jax and this project and, with ``check_devices``,
    prints ``jax.devices()`` and fails on a worker where jax finds no TPU.
    """
    d, v = remote_path(remote_dir), remote_path(venv)
    uv = shlex.quote(f"uv=={UV_VERSION}")
    steps = [
        'export PATH="$HOME/.local/bin:$PATH"',
        # pip refuses --user installs on images marked "externally managed" unless told otherwise
        f"(python3 -m pip install --user --quiet {uv} || "
        f"python3 -m pip install --user --quiet --break-system-packages {uv})",
    ]
    if branch and not _BRANCH_RE.match(branch):
        raise ValueError(f"branch {branch!r} is not a plain git branch or tag name")
    if git_url is not None and (not git_url or git_url.startswith("-") or any(c.isspace() or ord(c) < 32 for c in git_url)):
        raise ValueError(f"git URL {git_url!r} must not be empty, start with '-' or hold whitespace")
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
            f"else git clone --depth 1{ref} -- {shlex.quote(git_url)} {d}; fi)"
        )
    else:
        message = _echo("no code in {dir} on {host}: run 'python -m tpu_setup sync' first or pass --git-url",
                        ">&2", dir=remote_dir)
        steps.append(f"(test -f {d}/pyproject.toml || {{ {message}; exit 1; }})")
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
    steps.append(f"{v}/bin/python -c {shlex.quote(_DEVICE_CHECK if check_devices else _IMPORT_CHECK)}")
    return _join(steps)


# The post-install checks run with the venv's Python on every worker at once (so on a pod
# slice all hosts bring up their TPUs together).
_IMPORT_CHECK = (
    "import socket, jax, gralora_jax; "
    "print('setup ok on', socket.gethostname(), 'jax', jax.__version__)"
)
_DEVICE_CHECK = (
    "import socket, sys, jax, gralora_jax; "
    "host = socket.gethostname(); devices = jax.devices(); tpus = [d for d in devices if d.platform == 'tpu']; "
    "print('setup ok on', host, 'jax', jax.__version__, 'devices', len(devices), "
    "'local', jax.local_device_count(), tpus[0].device_kind) if tpus else "
    "sys.exit(f'setup FAILED on {host}: jax {jax.__version__} sees no TPU devices, only {devices} "
    "(libtpu missing, or another process holds the TPU?)')"
)


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


def env_file_text(env: Mapping[str, str]) -> str:
    """The ``--env`` file a launch sources: one ``export KEY=VALUE`` per line, values quoted.

    >>> print(env_file_text({"HF_TOKEN": "hf_x'y"}), end="")
    export HF_TOKEN='hf_x'"'"'y'
    """
    _check_env(env)
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


def env_file_name(run_name: str) -> str:
    """Where a launch's ``--env`` file is copied on each worker (relative to home, for scp)."""
    return f".gralora-env-{check_run_name(run_name)}"


def mask_env(env: Mapping[str, str]) -> str:
    """``KEY=*** ...``: how ``--env`` values are shown (never the values themselves)."""
    return " ".join(f"{k}=***" for k in env)


def launch_script(
    command: str,
    remote_dir: str,
    venv: str | None,
    log_dir: str,
    run_name: str,
    env: Mapping[str, str],
    env_file: str | None = None,
) -> str:
    """Start ``command`` in the background on one worker, detached from the ssh session.

    The run gets its own session (``setsid``) so it survives the ssh connection closing and
    so ``stop`` can signal the whole process group; stdout and stderr go to
    ``log_dir/run_name.log`` and the process group id to ``log_dir/run_name.pid``. It
    refuses to start while the previous run of that name is still alive (a TPU can only
    be held by one process).

    ``env`` (non-secret settings) is exported on the command line; ``env_file`` (a path
    relative to home, see :func:`env_file_name`) is a file of ``export`` lines holding the
    user's ``--env`` values: it is read, then deleted, before anything else happens.
    """
    if not command.strip():
        raise ValueError("launch needs a command to run, e.g. 'python -m experiments.commonsense --mesh 4x1'")
    _check_env(env)
    check_run_name(run_name)
    logs = remote_path(check_log_dir(log_dir))
    log, pid = f"{logs}/{run_name}.log", f"{logs}/{run_name}.pid"
    steps = [f"mkdir -p {logs}"]
    if env_file:
        f = remote_path(env_file)
        steps.append(f"{{ set -a; . {f}; rc=$?; set +a; rm -f {f}; test $rc = 0; }}")
    steps += [
        f"(if [ -f {pid} ] && kill -0 -- -\"$(cat {pid})\" 2>/dev/null; then "
        + _echo("run {run} is still running on {host}; stop it first (python -m tpu_setup stop)", ">&2", run=run_name)
        + "; exit 1; fi)",
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
    steps.append(
        _echo("started {run} on {host}: pid ", run=run_name) + f'"$(cat {pid})"'
        + shlex.quote(f", log {log_dir}/{run_name}.log")
    )
    return _join(steps)


def stop_script(log_dir: str, run_name: str, signal: str = "TERM") -> str:
    """Signal a launched run's whole process group (SIGTERM: the trainer checkpoints, exits)."""
    if signal not in ("TERM", "INT", "KILL"):
        raise ValueError(f"signal must be TERM, INT or KILL, got {signal!r}")
    pid = f"{remote_path(check_log_dir(log_dir))}/{check_run_name(run_name)}.pid"
    return (
        f"if [ -f {pid} ] && kill -0 -- -\"$(cat {pid})\" 2>/dev/null; then "
        f"kill -{signal} -- -\"$(cat {pid})\" && " + _echo("sent SIG{sig} to {run} on {host}", sig=signal, run=run_name)
        + "; else " + _echo("{run} is not running on {host}", run=run_name) + "; fi"
    )
