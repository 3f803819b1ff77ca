"""``python -m tpu_setup <action>``: create, provision, launch on and tear down Cloud TPUs.

The CLI only parses options, fills defaults from the environment, and then prints
(``--dry-run``) or runs the argv lists that :mod:`tpu_setup.commands` builds. Actions:

    create   a TPU VM / pod slice (tpu-vm create, or queued-resources create with --queued)
    setup    install uv, a Python 3.11 venv, jax[tpu] and this project on every worker
    sync     copy the repository (git archive of a commit) to every worker
    launch   start the same command on every worker at once, in the background, logging
             to ~/gralora-logs/RUN.log on each worker
    stop     SIGTERM the launched run on every worker (the trainer checkpoints and exits)
    logs     fetch each worker's log into a local directory (one scp per worker)
    status   describe the TPU (and its queued resource)
    ssh      a shell on one worker, or --command on some/all workers
    delete   delete the TPU (or its queued resource, --force)
    mesh     chips / hosts / JAX devices of an accelerator type and a --mesh for it

Defaults from the environment: ``--name`` from ``TPU_NAME``; ``--zone`` from ``TPU_ZONE``
(then ``CLOUDSDK_COMPUTE_ZONE``); ``--project`` from ``GOOGLE_CLOUD_PROJECT`` (then
``CLOUDSDK_CORE_PROJECT``; else gcloud's configured project); ``--accelerator-type`` from
``TPU_ACCELERATOR_TYPE``.

Example (prints the commands instead of running them)::

    python -m tpu_setup --dry-run create --name my-tpu --zone us-central2-b --accelerator-type v4-8
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Sequence, TextIO

from gralora_jax.meshspec import mesh_size, parse_mesh
from tpu_setup import commands as C
from tpu_setup import remote
from tpu_setup.accelerators import describe, parse_accelerator

ENV_NAME = "TPU_NAME"
ENV_ZONE = ("TPU_ZONE", "CLOUDSDK_COMPUTE_ZONE")
ENV_PROJECT = ("GOOGLE_CLOUD_PROJECT", "CLOUDSDK_CORE_PROJECT")
ENV_ACCELERATOR = "TPU_ACCELERATOR_TYPE"


class CliError(Exception):
    """A user mistake: printed as one line, exit status 2."""


def _env_first(names: Sequence[str]) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


# ----------------------------------------------------------------------------- parser


def _target_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("which TPU")
    g.add_argument("--name", help=f"TPU name (default: ${ENV_NAME})")
    g.add_argument("--zone", help="zone, e.g. us-central2-b (default: $TPU_ZONE, then $CLOUDSDK_COMPUTE_ZONE)")
    g.add_argument(
        "--project", help="GCP project (default: $GOOGLE_CLOUD_PROJECT, then $CLOUDSDK_CORE_PROJECT, then gcloud's)"
    )
    g.add_argument("--internal-ip", action="store_true", help="ssh/scp over internal IPs (from inside the VPC)")
    # SUPPRESS: `--dry-run` may come before or after the action without overwriting the other.
    p.add_argument("--dry-run", action="store_true", default=argparse.SUPPRESS, help="print the commands only")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tpu_setup",
        description="Create, provision, launch on and tear down Cloud TPU VMs and pod slices (wraps gcloud).",
        epilog="Every action accepts --dry-run to print the exact commands (one per line) without running them.",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands (shell-quoted) instead of running")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    target = _target_parent()

    p = sub.add_parser("create", parents=[target], help="create a TPU VM or pod slice")
    p.add_argument("--accelerator-type", help=f"v4-8, v4-32, v5litepod-16, v5p-8, v6e-8, ... (default: ${ENV_ACCELERATOR})")
    p.add_argument("--version", help="TPU runtime version (default per generation, see `mesh`)")
    p.add_argument("--spot", action="store_true", help="Spot VMs: much cheaper, can be preempted any time")
    p.add_argument("--preemptible", action="store_true", help="legacy preemptible TPU (tpu-vm create only)")
    p.add_argument("--queued", action="store_true", help="request via a queued resource (waits for capacity)")
    p.add_argument("--network", help="VPC network (gcloud default: 'default')")
    p.add_argument("--subnetwork", help="subnetwork")
    p.add_argument("--valid-until-duration", help="with --queued: give up if not granted within e.g. 6h")
    p.add_argument("--description", help="free-text description")
    p.add_argument("--service-account", help="service account for the workers (default: Compute Engine default)")
    p.add_argument("--scopes", help="OAuth scopes for it, comma-separated, e.g. cloud-platform")
    p.add_argument("--internal-ips", action="store_true",
                   help="no external IPs on the workers (then use --internal-ip from inside the VPC)")

    p = sub.add_parser("setup", parents=[target], help="install jax[tpu] and this project on every worker")
    p.add_argument("--git-url", help="clone the code from this URL (default: use the code `sync` copied)")
    p.add_argument("--branch", help="branch or tag to clone (with --git-url)")
    p.add_argument("--remote-dir", default=C.REMOTE_DIR, help="code directory on each worker (default: %(default)s)")
    p.add_argument("--venv", default=C.REMOTE_VENV, help="virtualenv on each worker (default: %(default)s)")
    p.add_argument("--python", default="3.11", dest="python_version", help="venv Python version (default: %(default)s)")
    p.add_argument("--jax-spec", default="jax[tpu]", help="jax requirement (default: %(default)s)")
    p.add_argument("--no-constraints", action="store_true", help="don't pin versions with the repo's constraints.txt")
    p.add_argument("--extra", action="append", default=[], metavar="REQ", help="another requirement (repeatable)")
    p.add_argument("--no-device-check", action="store_true",
                   help="skip the final check that jax sees TPU devices on every worker")

    p = sub.add_parser("sync", parents=[target], help="copy the repository (a git archive) to every worker")
    p.add_argument("--repo", default=".", help="local git repository (default: current directory)")
    p.add_argument("--ref", default="HEAD", help="commit to copy; committed files only (default: %(default)s)")
    p.add_argument("--remote-dir", default=C.REMOTE_DIR, help="where to unpack on each worker (default: %(default)s)")
    p.add_argument("--archive", help="local tarball path (default: <tmp>/gralora-jax-NAME.tar.gz)")
    p.add_argument("--clean", action="store_true", help="delete the remote directory first")

    p = sub.add_parser(
        "launch",
        parents=[target],
        help="run a command on all workers at once, in the background",
        description="Start COMMAND on every worker at once (nohup, own session), "
        "logging to LOG_DIR/RUN_NAME.log on each worker. Give the command after `--`, "
        "or as one quoted string.",
    )
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment (repeatable); values are sent in a file (mode 600), never printed")
    p.add_argument("--run-name", default=C.RUN_NAME, help="names the log/pid files (default: %(default)s)")
    p.add_argument("--remote-dir", default=C.REMOTE_DIR, help="working directory on each worker (default: %(default)s)")
    p.add_argument("--venv", default=C.REMOTE_VENV, help="virtualenv to activate (default: %(default)s)")
    p.add_argument("--no-venv", action="store_true", help="use the system Python")
    p.add_argument("--log-dir", default=C.REMOTE_LOG_DIR, help="log directory on each worker (default: %(default)s)")
    p.add_argument(
        "--jax-platforms", default="tpu,cpu", help="JAX_PLATFORMS for the run; '' leaves it unset (default: %(default)s)"
    )
    p.add_argument("--worker", default="all", help="workers to start on (default: all; multi-host JAX needs all)")
    p.add_argument("--accelerator-type", help="if given, check the command's --mesh against the slice's devices")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command, e.g. -- python -m experiments.commonsense ...")

    p = sub.add_parser("stop", parents=[target], help="SIGTERM the launched run on every worker")
    p.add_argument("--run-name", default=C.RUN_NAME)
    p.add_argument("--log-dir", default=C.REMOTE_LOG_DIR)
    p.add_argument("--signal", default="TERM", choices=["TERM", "INT", "KILL"])

    p = sub.add_parser("logs", parents=[target], help="fetch every worker's log (one scp per worker)")
    p.add_argument("--workers", type=int, help="number of workers (default: from --accelerator-type or describe)")
    p.add_argument("--accelerator-type", help="to count the workers without asking gcloud")
    p.add_argument("--local-dir", help="where to put them (default: tpu-logs/NAME)")
    p.add_argument("--run-name", default=C.RUN_NAME)
    p.add_argument("--log-dir", default=C.REMOTE_LOG_DIR)

    p = sub.add_parser("status", parents=[target], help="describe the TPU")
    p.add_argument("--queued", action="store_true", help="also describe its queued resource")

    p = sub.add_parser("ssh", parents=[target], help="ssh to a worker, or run --command on workers")
    p.add_argument("--worker", default="0", help="index, list (0,2), range (1-3) or all (default: 0)")
    p.add_argument("--command", help="run this instead of an interactive shell")

    p = sub.add_parser("delete", parents=[target], help="delete the TPU")
    p.add_argument("--queued", action="store_true", help="delete its queued resource (--force: with the node)")
    p.add_argument("--yes", action="store_true", help="don't ask for confirmation (gcloud --quiet)")

    p = sub.add_parser("mesh", help="chips, hosts, JAX devices and a --mesh for an accelerator type")
    p.add_argument("accelerator_type", help="e.g. v4-8, v4-32, v5litepod-16, v5p-8")
    p.add_argument("--params-billion", type=float, help="base model size, to size the model axis")
    p.add_argument("--dry-run", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


# ----------------------------------------------------------------------------- options -> commands


def _target(args: argparse.Namespace, queued: bool = False) -> C.Target:
    name = args.name or os.environ.get(ENV_NAME)
    zone = args.zone or _env_first(ENV_ZONE)
    if not name:
        raise CliError(f"{args.action}: --name is required (or set ${ENV_NAME})")
    if not zone:
        raise CliError(f"{args.action}: --zone is required (or set $TPU_ZONE)")
    project = args.project or _env_first(ENV_PROJECT)
    try:
        return C.Target(name=name, zone=zone, project=project, queued=queued, internal_ip=args.internal_ip)
    except ValueError as e:
        raise CliError(str(e)) from None


def _accelerator(args: argparse.Namespace, required: bool) -> str | None:
    value = getattr(args, "accelerator_type", None) or os.environ.get(ENV_ACCELERATOR)
    if required and not value:
        raise CliError(f"{args.action}: --accelerator-type is required (or set ${ENV_ACCELERATOR}), e.g. v4-8")
    return value


def _parse_env(pairs: Sequence[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--env wants KEY=VALUE, got {pair!r}")
        out.append((key, value))
    return tuple(out)


def _launch_command_text(words: Sequence[str]) -> str:
    words = list(words)
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        raise CliError("launch: give the command to run, e.g. `launch ... -- python -m experiments.commonsense --mesh 4x1`")
    # One word: the user quoted a whole shell command; several: quote each word.
    return words[0] if len(words) == 1 else shlex.join(words)


def mesh_flag(command: str) -> str | None:
    """The value of the last ``--mesh X`` / ``--mesh=X`` in a shell command line (as argparse
    reads it), else None; a command shlex cannot split (unbalanced quotes) has none."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    value = None
    for word, following in zip(words, words[1:] + [None]):
        if word == "--mesh" and following is not None:
            value = following
        elif word.startswith("--mesh="):
            value = word[len("--mesh="):]
    return value


def check_mesh(command: str, accelerator_type: str) -> None:
    """Raise if ``command`` has a ``--mesh`` that is malformed (:func:`gralora_jax.meshspec.parse_mesh`),
    whose size differs from the slice's JAX devices, or whose model axis spans hosts."""
    flag = mesh_flag(command)
    if flag is None:
        return
    try:
        axes = parse_mesh(flag)
    except ValueError as e:
        raise CliError(f"--mesh: {e}") from None
    total = mesh_size(flag)
    spec = parse_accelerator(accelerator_type)
    if total != spec.devices:
        raise CliError(
            f"--mesh {flag} has {total} devices but {spec.accelerator_type} has {spec.devices} "
            f"JAX devices over {spec.hosts} host(s); try `python -m tpu_setup mesh {spec.accelerator_type}`"
        )
    if axes["model"] > spec.devices_per_host:
        raise CliError(
            f"--mesh {flag}: the model axis ({axes['model']}) is wider than one host's {spec.devices_per_host} "
            f"devices; use an FSDP mesh (DxFx1) instead, see `python -m tpu_setup mesh {spec.accelerator_type} "
            "--params-billion N`"
        )


def plan(args: argparse.Namespace, env_file: str = C.ENV_FILE_PLACEHOLDER) -> list[list[str]]:
    """The commands an action will run (everything but running them); ``env_file`` is the
    local file holding ``launch --env`` values (a placeholder when only printing)."""
    try:
        return _plan(args, env_file)
    except ValueError as e:
        raise CliError(f"{args.action}: {e}") from None


def _plan(args: argparse.Namespace, env_file: str = C.ENV_FILE_PLACEHOLDER) -> list[list[str]]:
    action = args.action
    if action == "create":
        opts = C.CreateOptions(
            accelerator_type=_accelerator(args, required=True),
            version=args.version,
            spot=args.spot,
            preemptible=args.preemptible,
            queued=args.queued,
            network=args.network,
            subnetwork=args.subnetwork,
            valid_until_duration=args.valid_until_duration,
            description=args.description,
            service_account=args.service_account,
            scopes=args.scopes,
            internal_ips=args.internal_ips,
        )
        return C.create_commands(_target(args, queued=args.queued), opts)
    if action == "setup":
        opts = C.SetupOptions(
            git_url=args.git_url,
            branch=args.branch,
            remote_dir=args.remote_dir,
            venv=args.venv,
            python_version=args.python_version,
            jax_spec=args.jax_spec,
            use_constraints=not args.no_constraints,
            extra_packages=tuple(args.extra),
            check_devices=not args.no_device_check,
        )
        return C.setup_commands(_target(args), opts)
    if action == "sync":
        opts = C.SyncOptions(repo=args.repo, ref=args.ref, remote_dir=args.remote_dir, archive=args.archive, clean=args.clean)
        return C.sync_commands(_target(args), opts)
    if action == "launch":
        command = _launch_command_text(args.command)
        accelerator = _accelerator(args, required=False)
        if accelerator:
            check_mesh(command, accelerator)
        opts = C.LaunchOptions(
            command=command,
            env=_parse_env(args.env),
            run_name=args.run_name,
            remote_dir=args.remote_dir,
            venv=None if args.no_venv else args.venv,
            log_dir=args.log_dir,
            jax_platforms=args.jax_platforms or None,
            worker=args.worker,
        )
        return C.launch_commands(_target(args), opts, env_file)
    if action == "stop":
        return C.stop_commands(_target(args), run_name=args.run_name, log_dir=args.log_dir, signal=args.signal)
    if action == "logs":
        target = _target(args)
        workers = args.workers
        if workers is None:
            accelerator = _accelerator(args, required=False)
            if not accelerator:
                raise CliError("logs: give --workers N or --accelerator-type (needed to know how many workers)")
            workers = parse_accelerator(accelerator).hosts
        local_dir = args.local_dir or os.path.join("tpu-logs", target.name)
        return C.logs_commands(target, workers, local_dir, run_name=args.run_name, log_dir=args.log_dir)
    if action == "status":
        return C.status_commands(_target(args, queued=args.queued))
    if action == "ssh":
        return C.ssh_commands(_target(args), worker=args.worker, command=args.command)
    if action == "delete":
        return C.delete_commands(_target(args, queued=args.queued), yes=args.yes)
    raise CliError(f"unknown action {action!r}")


# ----------------------------------------------------------------------------- running


def require_programs(commands: Sequence[Sequence[str]], which: Callable[[str], str | None] | None = None) -> None:
    """Raise a clear error when a program the commands need (gcloud, git) is not on PATH."""
    which = which or shutil.which  # looked up at call time (tests replace shutil.which)
    for program in dict.fromkeys(c[0] for c in commands):
        if which(program) is None:
            hint = (
                "install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), then "
                "`gcloud auth login` and `gcloud config set project PROJECT`"
                if program == C.GCLOUD
                else "install it or put it on PATH"
            )
            raise CliError(f"`{program}` was not found on PATH: {hint} (or use --dry-run to see the commands)")


def run_commands(commands: Sequence[Sequence[str]], err: TextIO) -> int:
    """Run the commands in order, echoing each; stop at the first failure and return its status."""
    for cmd in commands:
        print(f"+ {shlex.join(cmd)}", file=err, flush=True)
        code = subprocess.run(list(cmd)).returncode
        if code:
            print(f"tpu_setup: command failed with exit status {code}", file=err)
            return code
    return 0


def _count_workers(args: argparse.Namespace, err: TextIO) -> None:
    """For `logs` without --workers/--accelerator-type: ask gcloud for the accelerator type."""
    if args.action != "logs" or args.workers is not None or _accelerator(args, required=False):
        return
    query = C.workers_query_command(_target(args))
    require_programs([query])
    print(f"+ {shlex.join(query)}", file=err, flush=True)
    result = subprocess.run(query, capture_output=True, text=True)
    if result.returncode:
        raise CliError(f"logs: could not describe the TPU to count its workers: {result.stderr.strip()}")
    args.accelerator_type = result.stdout.strip().split("/")[-1]


def _warn_if_dirty(args: argparse.Namespace, err: TextIO) -> None:
    if args.action != "sync" or args.ref != "HEAD" or shutil.which("git") is None:
        return
    result = subprocess.run(["git", "-C", args.repo, "status", "--porcelain"], capture_output=True, text=True)
    if result.returncode == 0 and result.stdout.strip():
        print(
            "tpu_setup sync: warning: the working tree has uncommitted changes; only committed files "
            f"({args.ref}) are copied",
            file=err,
        )


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Entry point; returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        if args.action == "mesh":
            try:
                print(describe(args.accelerator_type, args.params_billion), file=out)
            except ValueError as e:
                raise CliError(f"mesh: {e}") from None
            return 0
        if args.dry_run:
            print(_dry_run_text(args), file=out)
            return 0
        _count_workers(args, err)
        with _env_file(args) as env_file:
            commands = plan(args, env_file)
            require_programs(commands)
            _warn_if_dirty(args, err)
            if args.action == "logs":
                for cmd in commands:
                    os.makedirs(os.path.dirname(cmd[6]) or ".", exist_ok=True)
            _note_env(args, err)
            return run_commands(commands, err)
    except CliError as e:
        print(f"tpu_setup: error: {e}", file=err)
        return 2


def _dry_run_text(args: argparse.Namespace) -> str:
    """What ``--dry-run`` prints: the commands, one per line; ``logs`` without a worker count
    prints the describe step and the per-worker scp as a template."""
    if args.action == "logs" and args.workers is None and not _accelerator(args, required=False):
        target = _target(args)
        local_dir = args.local_dir or os.path.join("tpu-logs", target.name)
        try:
            scp = C.logs_command(target, "{i}", local_dir, run_name=args.run_name, log_dir=args.log_dir)
        except ValueError as e:
            raise CliError(f"logs: {e}") from None
        return "\n".join([
            C.format_commands([C.workers_query_command(target)]),
            "# then, for each worker i from 0 to (workers of that accelerator type) - 1:",
            C.format_commands([scp]),
        ])
    text = C.format_commands(plan(args))
    note = _env_note(args)
    return text + ("\n" + note if note else "")


def _env_note(args: argparse.Namespace) -> str | None:
    if args.action != "launch" or not args.env:
        return None
    return (f"# --env {remote.mask_env(dict(_parse_env(args.env)))}: sent to the workers in a file (mode 600), "
            "read and deleted there; never on a command line")


def _note_env(args: argparse.Namespace, err: TextIO) -> None:
    note = _env_note(args)
    if note:
        print(note, file=err)


@contextlib.contextmanager
def _env_file(args: argparse.Namespace):
    """For ``launch --env``: a private local file (mode 600) with the values, removed afterwards."""
    if args.action != "launch" or not args.env:
        yield C.ENV_FILE_PLACEHOLDER
        return
    text = _env_text(args)
    directory = tempfile.mkdtemp(prefix="tpu-setup-env-")  # mode 700
    path = os.path.join(directory, "env")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _env_text(args: argparse.Namespace) -> str:
    try:
        return remote.env_file_text(dict(_parse_env(args.env)))
    except ValueError as e:
        raise CliError(f"launch: {e}") from None
