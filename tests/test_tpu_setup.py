"""tpu_setup: accelerator shapes, the gcloud argv of every action, the CLI, and the remote
shell scripts run for real against a fake two-worker ``gcloud`` (no cloud needed)."""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from tpu_setup import accelerators as A
from tpu_setup import cli
from tpu_setup import commands as C
from tpu_setup import remote

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET = C.Target(name="my-tpu", zone="us-central2-b")
TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]
QUEUED = ["gcloud", "compute", "tpus", "queued-resources"]


# ----------------------------------------------------------------------------- accelerators

# (type, chips, hosts, JAX devices); from the Cloud TPU docs: v2-v5p count TensorCores
# (2 per chip), v5e/v6e count chips; 4 chips per host on multi-host slices; v2/v3 expose
# one JAX device per TensorCore.
SHAPES = [
    ("v2-8", 4, 1, 8),
    ("v3-8", 4, 1, 8),
    ("v3-32", 16, 4, 32),
    ("v4-8", 4, 1, 4),
    ("v4-16", 8, 2, 8),
    ("v4-32", 16, 4, 16),
    ("v4-128", 64, 16, 64),
    ("v5p-8", 4, 1, 4),
    ("v5p-32", 16, 4, 16),
    ("v5litepod-1", 1, 1, 1),
    ("v5litepod-4", 4, 1, 4),
    ("v5litepod-8", 8, 1, 8),
    ("v5litepod-16", 16, 4, 16),
    ("v5litepod-256", 256, 64, 256),
    ("v6e-8", 8, 1, 8),
    ("v6e-16", 16, 4, 16),
]


@pytest.mark.parametrize("kind,chips,hosts,devices", SHAPES)
def test_accelerator_shapes(kind, chips, hosts, devices):
    spec = A.parse_accelerator(kind)
    assert (spec.chips, spec.hosts, spec.devices) == (chips, hosts, devices)
    assert spec.multi_host == (hosts > 1)
    assert spec.devices_per_host * spec.hosts == spec.devices


@pytest.mark.parametrize(
    "bad,needle",
    [
        ("v4-6", "multiple of 8"),
        ("v4-4", "multiple of 8"),
        ("v4", "<generation>-<N>"),
        ("tpu-v4", "<generation>-<N>"),
        ("v9-8", "unknown TPU generation"),
        ("v5e-16", "v5litepod-16"),
        ("v5litepod-12", "multiple of 4"),
        ("v6e-2", "1, 4, 8"),
    ],
)
def test_bad_accelerator_types(bad, needle):
    with pytest.raises(ValueError, match=needle.replace("<", ".").replace(">", ".")):
        A.parse_accelerator(bad)


@pytest.mark.parametrize(
    "kind,version",
    [
        ("v4-8", "tpu-ubuntu2204-base"),
        ("v3-8", "tpu-ubuntu2204-base"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-8", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_default_runtime_versions(kind, version):
    assert A.default_runtime_version(kind) == version


def _mesh_size(mesh):
    d, m = (int(x) for x in mesh.split("x"))
    return d * m


def test_mesh_suggestions():
    assert A.suggest_mesh("v4-8") == "4x1"
    assert "2x2" in A.suggest_meshes("v4-8")
    assert A.suggest_meshes("v4-32")[:2] == ["16x1", "8x2"]
    assert A.suggest_mesh("v3-8") == "8x1"  # 8 TensorCore devices on v3
    for kind, _, hosts, devices in SHAPES:
        meshes = A.suggest_meshes(kind)
        assert all(_mesh_size(m) == devices for m in meshes), kind
        # the model axis never spans hosts unless the model needs it
        assert all(int(m.split("x")[1]) <= devices // hosts for m in meshes), kind


def test_mesh_suggestion_sized_by_model():
    # 7B params in bf16 = 13 GiB; v5e has 16 GiB/chip, half kept free -> needs 2-way model axis.
    assert A.suggest_mesh("v5litepod-16", params_billion=7) == "8x2"
    # v4 has 32 GiB per chip: 7B fits unsplit.
    assert A.suggest_mesh("v4-32", params_billion=7) == "16x1"
    # 70B = 130 GiB of bf16 weights + ~10 GiB of adapter state: no model axis within a 4-chip
    # v5e host fits it, so the weights are sharded FSDP-style over 32 of the 64 chips.
    assert A.suggest_meshes("v5litepod-64", params_billion=70) == ["2x32x1", "1x64x1"]
    assert A.suggest_meshes("v4-32", params_billion=70) == ["1x16x1"]
    with pytest.raises(ValueError, match="does not fit"):
        A.suggest_mesh("v5litepod-4", params_billion=70)
    with pytest.raises(ValueError, match="positive"):
        A.suggest_mesh("v4-8", params_billion=0)


@pytest.mark.parametrize("params_billion", [0.5, 7, 13, 34, 70, 405])
def test_mesh_model_axis_never_spans_hosts(params_billion):
    """Across every slice shape and model size: devices multiply out, the model axis fits one
    host, and every suggestion leaves half of HBM free (recomputed here from the sizes)."""
    for kind, _, hosts, devices in SHAPES:
        spec = A.parse_accelerator(kind)
        try:
            meshes = A.suggest_meshes(kind, params_billion=params_billion)
        except ValueError as e:
            assert "does not fit" in str(e)
            continue
        need_gib = params_billion * 1e9 * (2 + 0.01 * 16) / 2**30
        for mesh in meshes:
            sizes = [int(s) for s in mesh.split("x")]
            assert np.prod(sizes) == devices and sizes[-1] <= devices // hosts, (kind, mesh)
            sharded_over = sizes[-1] * (sizes[1] if len(sizes) == 3 else 1)
            assert need_gib / sharded_over <= spec.hbm_gib_per_device / 2, (kind, mesh)
    assert A.suggest_meshes("v4-128", params_billion=405) == ["1x64x1"]  # FSDP when nothing else fits


# ----------------------------------------------------------------------------- argv of every action


def test_target_validation():
    with pytest.raises(ValueError, match="name is required"):
        C.Target(name="", zone="z")
    with pytest.raises(ValueError, match="zone is required"):
        C.Target(name="t", zone="")
    with pytest.raises(ValueError, match="lowercase"):
        C.Target(name="My_TPU", zone="z")


def test_create_tpu_vm():
    [cmd] = C.create_commands(TARGET, C.CreateOptions("v4-8"))
    assert cmd == [*TPU_VM, "create", "my-tpu", "--zone=us-central2-b", "--accelerator-type=v4-8",
                   "--version=tpu-ubuntu2204-base"]


def test_create_all_options():
    target = C.Target("pod", "us-east5-a", project="proj")
    opts = C.CreateOptions("v5p-32", version="my-runtime", spot=True, network="net", subnetwork="sub",
                           description="a run", service_account="sa@p.iam.gserviceaccount.com",
                           scopes="cloud-platform")
    [cmd] = C.create_commands(target, opts)
    assert cmd == [*TPU_VM, "create", "pod", "--zone=us-east5-a", "--project=proj", "--accelerator-type=v5p-32",
                   "--version=my-runtime", "--spot", "--network=net", "--subnetwork=sub", "--description=a run",
                   "--service-account=sa@p.iam.gserviceaccount.com", "--scopes=cloud-platform"]
    [cmd] = C.create_commands(TARGET, C.CreateOptions("v4-8", preemptible=True))
    assert cmd[-1] == "--preemptible" and "--spot" not in cmd


def test_create_queued():
    opts = C.CreateOptions("v5litepod-16", spot=True, queued=True, valid_until_duration="6h", network="n")
    [cmd] = C.create_commands(TARGET, opts)
    assert cmd == [*QUEUED, "create", "my-tpu", "--zone=us-central2-b", "--node-id=my-tpu",
                   "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite", "--spot",
                   "--network=n", "--valid-until-duration=6h"]


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(spot=True, preemptible=True), "exclude each other"),
        (dict(queued=True, preemptible=True), "use --spot"),
        (dict(valid_until_duration="1h"), "only applies to --queued"),
        (dict(accelerator_type="v4-7"), "multiple of 8"),
    ],
)
def test_create_option_errors(kwargs, needle):
    kwargs = {"accelerator_type": "v4-8", **kwargs}
    with pytest.raises(ValueError, match=needle):
        C.CreateOptions(**kwargs)


def _ssh_script(cmd):
    """(workers, --command script) of a tpu-vm ssh argv."""
    assert cmd[:5] == [*TPU_VM, "ssh"]
    workers = [a.split("=", 1)[1] for a in cmd if a.startswith("--worker=")]
    assert len(workers) == 1
    return workers[0], cmd[cmd.index("--command") + 1]


def _bash_syntax_ok(script):
    result = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_setup_from_synced_code():
    [cmd] = C.setup_commands(TARGET, C.SetupOptions(extra_packages=("tensorboardX",)))
    worker, script = _ssh_script(cmd)
    assert worker == "all"
    assert "uv venv --allow-existing --python 3.11" in script
    assert "-e \"$HOME\"/gralora-jax 'jax[tpu]' tensorboardX" in script
    assert "-c \"$HOME\"/gralora-jax/constraints.txt" in script
    assert "git clone" not in script
    _bash_syntax_ok(script)


def test_setup_from_git():
    opts = C.SetupOptions(git_url="https://github.com/me/gralora-jax.git", branch="dev", use_constraints=False,
                          venv="/opt/venv", jax_spec="jax[tpu]==0.10.2")
    [cmd] = C.setup_commands(TARGET, opts)
    _, script = _ssh_script(cmd)
    assert "git clone --depth 1 --branch dev -- https://github.com/me/gralora-jax.git \"$HOME\"/gralora-jax" in script
    assert "constraints.txt" not in script
    assert "uv pip install --python /opt/venv/bin/python" in script and "'jax[tpu]==0.10.2'" in script
    _bash_syntax_ok(script)
    with pytest.raises(ValueError, match="--branch needs --git-url"):
        C.SetupOptions(branch="dev")


def test_sync():
    opts = C.SyncOptions(repo="/src/repo", ref="v1", archive="/tmp/code.tar.gz", clean=True)
    archive, scp, ssh = C.sync_commands(TARGET, opts)
    assert archive == ["git", "-C", "/src/repo", "archive", "--format=tar.gz", "--output=/tmp/code.tar.gz", "v1"]
    assert scp == [*TPU_VM, "scp", "/tmp/code.tar.gz", "my-tpu:code.tar.gz", "--zone=us-central2-b", "--worker=all"]
    worker, script = _ssh_script(ssh)
    assert worker == "all"
    assert script.startswith('rm -rf "$HOME"/gralora-jax && mkdir -p')
    assert 'tar -xzf "$HOME"/code.tar.gz -C "$HOME"/gralora-jax' in script


TRAIN = "python -m experiments.commonsense --mesh 16x1 --output-dir gs://bucket/run1"


def test_launch_runs_same_command_everywhere_in_background():
    copy, cmd = C.launch_commands(TARGET, C.LaunchOptions(TRAIN, env=(("HF_TOKEN", "a b"),)), env_file="/tmp/e")
    assert copy == [*TPU_VM, "scp", "/tmp/e", "my-tpu:.gralora-env-train", "--zone=us-central2-b", "--worker=all"]
    worker, script = _ssh_script(cmd)
    assert worker == "all"  # one ssh, every worker, concurrently: same command on each
    assert script.count(shlex.quote(TRAIN)) == 1
    assert "setsid nohup bash -c" in script and "< /dev/null &" in script
    assert '> "$HOME"/gralora-logs/train.log 2>&1' in script  # a log on each worker
    assert "PYTHONUNBUFFERED=1" in script and "JAX_PLATFORMS=tpu,cpu" in script
    assert "HF_TOKEN" not in script and "a b" not in script  # --env values travel in the file
    assert script.index('. "$HOME"/.gralora-env-train') < script.index('rm -f "$HOME"/.gralora-env-train') < \
        script.index("setsid")
    assert ". \"$HOME\"/gralora-venv/bin/activate" in script and "cd \"$HOME\"/gralora-jax" in script
    for name in remote.FORBIDDEN_ENV:
        assert name not in script
    _bash_syntax_ok(script)


def test_launch_env_and_errors():
    env = C.launch_env({"X": "1"}, jax_platforms=None)
    assert env == {"PYTHONUNBUFFERED": "1", "GRALORA_DISTRIBUTED": "1", "X": "1"}
    for bad in ("JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_ID", "TPU_WORKER_ID"):
        with pytest.raises(ValueError, match="do not set"):
            C.launch_commands(TARGET, C.LaunchOptions(TRAIN, env=((bad, "0"),)))
    with pytest.raises(ValueError, match="valid shell name"):
        C.launch_commands(TARGET, C.LaunchOptions(TRAIN, env=(("A-B", "0"),)))
    with pytest.raises(ValueError, match="needs a command"):
        C.launch_commands(TARGET, C.LaunchOptions("  "))
    with pytest.raises(ValueError, match="run name"):
        C.launch_commands(TARGET, C.LaunchOptions(TRAIN, run_name="a/b"))
    with pytest.raises(ValueError, match="--worker"):
        C.launch_commands(TARGET, C.LaunchOptions(TRAIN, worker="first"))


def test_stop():
    [cmd] = C.stop_commands(TARGET, signal="INT")
    worker, script = _ssh_script(cmd)
    assert worker == "all" and 'kill -INT -- -"$(cat "$HOME"/gralora-logs/train.pid)"' in script
    _bash_syntax_ok(script)
    with pytest.raises(ValueError, match="signal"):
        C.stop_commands(TARGET, signal="HUP")


def test_logs_one_scp_per_worker():
    cmds = C.logs_commands(TARGET, 4, "out", run_name="r1", log_dir="~/logs")
    assert len(cmds) == 4
    for i, cmd in enumerate(cmds):
        assert cmd == [*TPU_VM, "scp", "my-tpu:logs/r1.log", os.path.join("out", f"r1-worker-{i}.log"),
                       "--zone=us-central2-b", f"--worker={i}"]
    with pytest.raises(ValueError):
        C.logs_commands(TARGET, 0, "out")


def test_status_ssh_delete():
    assert C.status_commands(TARGET) == [[*TPU_VM, "describe", "my-tpu", "--zone=us-central2-b"]]
    queued = C.Target("my-tpu", "z", project="p", queued=True)
    assert C.status_commands(queued) == [
        [*QUEUED, "describe", "my-tpu", "--zone=z", "--project=p"],
        [*TPU_VM, "describe", "my-tpu", "--zone=z", "--project=p"],
    ]
    assert C.ssh_commands(TARGET) == [[*TPU_VM, "ssh", "my-tpu", "--zone=us-central2-b", "--worker=0"]]
    internal = C.Target("my-tpu", "z", internal_ip=True)
    assert C.ssh_commands(internal, worker="1-3", command="uptime") == [
        [*TPU_VM, "ssh", "my-tpu", "--zone=z", "--worker=1-3", "--internal-ip", "--command", "uptime"]
    ]
    with pytest.raises(ValueError, match="interactive"):
        C.ssh_commands(TARGET, worker="all")
    assert C.delete_commands(TARGET) == [[*TPU_VM, "delete", "my-tpu", "--zone=us-central2-b"]]
    assert C.delete_commands(queued, yes=True) == [
        [*QUEUED, "delete", "my-tpu", "--zone=z", "--project=p", "--force", "--quiet"]
    ]


def test_remote_paths():
    assert remote.remote_path("~/a b") == "\"$HOME\"/'a b'"
    assert remote.remote_path("/abs/x") == "/abs/x"
    for bad in ("", "~", "~bob/x"):
        with pytest.raises(ValueError):
            remote.remote_path(bad)


# ----------------------------------------------------------------------------- CLI


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("TPU_NAME", "TPU_ZONE", "CLOUDSDK_COMPUTE_ZONE", "GOOGLE_CLOUD_PROJECT", "CLOUDSDK_CORE_PROJECT",
                 "TPU_ACCELERATOR_TYPE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def _printed(out):
    """The printed commands (comment lines, e.g. the masked --env note, left out)."""
    return [shlex.split(line) for line in out.strip().splitlines() if not line.startswith("#")]


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["create", "--accelerator-type", "v4-32", "--spot"],
         C.create_commands(TARGET, C.CreateOptions("v4-32", spot=True))),
        (["create", "--accelerator-type", "v4-32", "--queued", "--subnetwork", "s", "--scopes", "cloud-platform"],
         C.create_commands(TARGET, C.CreateOptions("v4-32", queued=True, subnetwork="s", scopes="cloud-platform"))),
        (["create", "--accelerator-type", "v4-8", "--preemptible", "--network", "n", "--version", "v",
          "--description", "d", "--service-account", "sa"],
         C.create_commands(TARGET, C.CreateOptions("v4-8", preemptible=True, network="n", version="v",
                                                   description="d", service_account="sa"))),
        (["create", "--accelerator-type", "v4-8", "--queued", "--spot", "--valid-until-duration", "2h"],
         C.create_commands(TARGET, C.CreateOptions("v4-8", queued=True, spot=True, valid_until_duration="2h"))),
        (["setup", "--git-url", "https://g/x.git", "--extra", "tensorboardX"],
         C.setup_commands(TARGET, C.SetupOptions(git_url="https://g/x.git", extra_packages=("tensorboardX",)))),
        (["sync", "--repo", "/r", "--archive", "/tmp/a.tar.gz"],
         C.sync_commands(TARGET, C.SyncOptions(repo="/r", archive="/tmp/a.tar.gz"))),
        (["launch", "--env", "A=1", "--", *shlex.split(TRAIN)],
         C.launch_commands(TARGET, C.LaunchOptions(TRAIN, env=(("A", "1"),)))),
        (["launch", "--no-venv", "--jax-platforms", "", TRAIN],
         C.launch_commands(TARGET, C.LaunchOptions(TRAIN, venv=None, jax_platforms=None))),
        (["stop"], C.stop_commands(TARGET)),
        (["logs", "--accelerator-type", "v4-32", "--local-dir", "L"], C.logs_commands(TARGET, 4, "L")),
        (["logs", "--workers", "2"], C.logs_commands(TARGET, 2, os.path.join("tpu-logs", "my-tpu"))),
        (["status", "--queued"], C.status_commands(C.Target("my-tpu", "us-central2-b", queued=True))),
        (["ssh", "--worker", "2", "--command", "ls"], C.ssh_commands(TARGET, "2", "ls")),
        (["delete", "--yes"], C.delete_commands(TARGET, yes=True)),
        (["delete", "--queued"], C.delete_commands(C.Target("my-tpu", "us-central2-b", queued=True))),
    ],
)
def test_cli_dry_run_prints_exact_commands(clean_env, argv, expected):
    action, rest = argv[0], argv[1:]
    code, out, err = run_cli("--dry-run", action, "--name", "my-tpu", "--zone", "us-central2-b", *rest)
    assert code == 0, err
    assert _printed(out) == expected
    # --dry-run after the action works the same
    code, out2, _ = run_cli(action, "--name", "my-tpu", "--zone", "us-central2-b", "--dry-run", *rest)
    assert code == 0 and out2 == out


def test_cli_defaults_from_environment(clean_env):
    clean_env.setenv("TPU_NAME", "env-tpu")
    clean_env.setenv("TPU_ZONE", "europe-west4-a")
    clean_env.setenv("GOOGLE_CLOUD_PROJECT", "env-proj")
    clean_env.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-16")
    code, out, err = run_cli("--dry-run", "create")
    assert code == 0, err
    assert _printed(out) == [[*TPU_VM, "create", "env-tpu", "--zone=europe-west4-a", "--project=env-proj",
                              "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite"]]
    # flags beat the environment
    code, out, _ = run_cli("--dry-run", "status", "--name", "other", "--zone", "z", "--project", "p")
    assert _printed(out) == [[*TPU_VM, "describe", "other", "--zone=z", "--project=p"]]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["create", "--zone", "z", "--accelerator-type", "v4-8"], "--name is required"),
        (["create", "--name", "t", "--accelerator-type", "v4-8"], "--zone is required"),
        (["create", "--name", "t", "--zone", "z"], "--accelerator-type is required"),
        (["create", "--name", "t", "--zone", "z", "--accelerator-type", "v4-8", "--spot", "--preemptible"],
         "exclude each other"),
        (["launch", "--name", "t", "--zone", "z"], "give the command"),
        (["launch", "--name", "t", "--zone", "z", "--accelerator-type", "v4-32", "--", "python", "-m", "x",
          "--mesh", "4x1"], "16 JAX devices"),
        (["launch", "--name", "t", "--zone", "z", "--env", "NOEQUALS", "--", "ls"], "KEY=VALUE"),
        (["launch", "--name", "t", "--zone", "z", "--accelerator-type", "v4-32", "--", "python", "-m", "x",
          "--mesh", "2x8"], "wider than one host"),
        (["ssh", "--name", "t", "--zone", "z", "--worker", "all"], "interactive"),
        (["launch", "--name", "t", "--zone", "z", "--accelerator-type", "v4-32", "--", "python", "-m", "x",
          "--mesh", "16x"], "--mesh: bad mesh spec '16x'"),
        (["launch", "--name", "t", "--zone", "z", "--accelerator-type", "v4-32", "--",
          "cd run && python -m x --mesh='2x1x8'"], "the model axis (8) is wider"),
    ],
)
def test_cli_errors(clean_env, argv, needle):
    code, out, err = run_cli("--dry-run", *argv)
    assert code == 2 and out == ""
    assert needle in err


@pytest.mark.parametrize("command,flag", [
    ("python -m x --mesh 4x2", "4x2"),
    ("python -m x --mesh=2x8x1 --steps 3", "2x8x1"),
    ("cd run && python -m x --mesh '1x16x1' 2>&1 | tee log", "1x16x1"),
    ("python -m x --mesh 4x2 --mesh 8x1", "8x1"),  # argparse keeps the last
    ("python -m x --meshes 4x2 --other-mesh 2x2", None),
    ("python -m x --mesh", None),
    ("python -m x 'unbalanced --mesh 4x2", None),
])
def test_mesh_flag_read_from_command(command, flag):
    assert cli.mesh_flag(command) == flag


def test_cli_mesh_check_accepts_matching_mesh(clean_env):
    code, out, err = run_cli("--dry-run", "launch", "--name", "t", "--zone", "z", "--accelerator-type", "v4-32",
                             "--", "python", "-m", "x", "--mesh", "8x2")
    assert code == 0, err


def test_cli_missing_gcloud(clean_env):
    clean_env.setattr(shutil, "which", lambda program: None)
    code, out, err = run_cli("status", "--name", "t", "--zone", "z")
    assert code == 2 and "`gcloud` was not found on PATH" in err and "--dry-run" in err
    # --dry-run never needs gcloud
    code, out, _ = run_cli("--dry-run", "status", "--name", "t", "--zone", "z")
    assert code == 0 and out.startswith("gcloud compute tpus tpu-vm describe t")


def test_cli_runs_commands_and_stops_at_first_failure(clean_env, monkeypatch):
    calls = []

    class Result:
        def __init__(self, code):
            self.returncode = code

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return Result(0 if len(calls) < 2 else 7)

    monkeypatch.setattr(shutil, "which", lambda program: "/usr/bin/" + program)
    monkeypatch.setattr(subprocess, "run", fake_run)
    code, out, err = run_cli("logs", "--name", "t", "--zone", "z", "--workers", "3", "--local-dir", "unused-dir")
    assert code == 7
    assert calls == C.logs_commands(C.Target("t", "z"), 3, "unused-dir")[:2]
    assert "+ gcloud compute tpus tpu-vm scp t:gralora-logs/train.log" in err


def test_python_dash_m_mesh():
    result = subprocess.run([sys.executable, "-m", "tpu_setup", "mesh", "v4-32"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "hosts (workers)    4" in result.stdout and "chips              16" in result.stdout
    assert "suggested --mesh   16x1" in result.stdout and "8x2" in result.stdout


# ----------------------------------------------------------------------------- a fake 2-worker TPU

FAKE_GCLOUD = r'''#!PYTHON
"""Stands in for gcloud: `tpu-vm ssh --command` runs the script with bash in each chosen
worker's home (all at once for --worker=all); `tpu-vm scp` copies, NAME:path = worker home."""
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
root, n = os.environ["FAKE_TPU_ROOT"], int(os.environ["FAKE_TPU_WORKERS"])
with open(os.path.join(root, "calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\n")
worker = next(a.split("=", 1)[1] for a in args if a.startswith("--worker="))
workers = list(range(n)) if worker == "all" else [int(worker)]
home = lambda i: os.path.join(root, f"worker-{i}")
if args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    script = args[args.index("--command") + 1]
    procs = [subprocess.Popen(["bash", "-c", script], cwd=home(i), env={**os.environ, "HOME": home(i)})
             for i in workers]
    sys.exit(max(p.wait() for p in procs))
if args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    *srcs, dest = [a for a in args[4:] if not a.startswith("--")]
    for i in workers:
        where = lambda p: os.path.join(home(i), p.split(":", 1)[1]) if ":" in p else p
        for src in srcs:
            if ":" not in src:  # a local file sent to the workers: note its permissions
                with open(os.path.join(root, "sent-modes.txt"), "a") as f:
                    f.write(os.path.basename(src) + " " + oct(os.stat(src).st_mode & 0o777) + "\n")
            shutil.copy(where(src), where(dest))
    sys.exit(0)
sys.exit("fake gcloud: unsupported " + " ".join(args))
'''

FAKE_UV = r'''#!/bin/bash
# Stands in for uv: records its arguments; `uv venv PATH` makes a venv whose python is ours.
echo "$@" >> "$HOME/uv-calls.txt"
if [ "$1" = venv ]; then
  v="${@: -1}"; mkdir -p "$v/bin"
  printf '#!/bin/bash\nexec PYTHON "$@"\n' > "$v/bin/python"; chmod +x "$v/bin/python"
  echo 'export VIRTUAL_ENV_MARK=1' > "$v/bin/activate"
fi
'''


FAKE_PYTHON3 = r'''#!/bin/bash
# Stands in for the worker's system python3: records pip installs (the pinned uv), runs the rest.
if [ "$1" = -m ] && [ "$2" = pip ]; then echo "$@" >> "$HOME/pip-calls.txt"; exit 0; fi
exec PYTHON "$@"
'''

# `setup` ends by importing jax and listing its devices with the venv's python: a stub keeps it
# fast; FAKE_JAX_PLATFORM says what kind of devices it reports.
FAKE_JAX = """import os, types
__version__ = 'stub'
def devices():
    kind = os.environ.get('FAKE_JAX_PLATFORM', 'tpu')
    return [types.SimpleNamespace(platform=kind, device_kind='TPU v4' if kind == 'tpu' else kind, id=i) for i in range(4)]
def local_device_count():
    return 4
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _wait_for(predicate, timeout=20.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def fake_tpu(tmp_path, clean_env):
    """Two fake workers (home dirs) behind a fake gcloud and uv on PATH; a tiny git repo to sync."""
    root = tmp_path / "tpu"
    bindir = tmp_path / "bin"
    for d in (root / "worker-0", root / "worker-1", bindir):
        d.mkdir(parents=True)
    gcloud = bindir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.replace("PYTHON", sys.executable))
    uv = bindir / "uv"
    uv.write_text(FAKE_UV.replace("PYTHON", sys.executable))
    python3 = bindir / "python3"
    python3.write_text(FAKE_PYTHON3.replace("PYTHON", sys.executable))
    for exe in (gcloud, uv, python3):
        exe.chmod(0o755)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (repo / "constraints.txt").write_text("jax==0.10.2\n")
    (repo / "marker.txt").write_text("synced code\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    clean_env.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    clean_env.setenv("FAKE_TPU_ROOT", str(root))
    clean_env.setenv("FAKE_TPU_WORKERS", "2")
    stubs = tmp_path / "stubs"
    (stubs / "gralora_jax").mkdir(parents=True)
    (stubs / "jax.py").write_text(FAKE_JAX)
    (stubs / "gralora_jax" / "__init__.py").write_text("")
    clean_env.setenv("PYTHONPATH", str(stubs))
    clean_env.setenv("TPU_NAME", "fake-tpu")
    clean_env.setenv("TPU_ZONE", "z")
    return root, repo, tmp_path


def test_end_to_end_on_fake_workers(fake_tpu, capfd):
    root, repo, tmp = fake_tpu
    workers = [root / "worker-0", root / "worker-1"]

    code, _, err = run_cli("sync", "--repo", str(repo), "--archive", str(tmp / "code.tar.gz"))
    assert code == 0, err
    for w in workers:
        assert (w / "gralora-jax" / "marker.txt").read_text() == "synced code\n"
        assert not (w / "code.tar.gz").exists()

    capfd.readouterr()
    code, _, err = run_cli("setup", "--extra", "tensorboardX")
    assert code == 0, err
    assert capfd.readouterr().out.count("setup ok on") == 2  # the script ran to its end on both workers
    for w in workers:
        uv_calls = (w / "uv-calls.txt").read_text().splitlines()
        assert uv_calls[0] == f"venv --allow-existing --python 3.11 {w}/gralora-venv"
        assert uv_calls[1] == (f"pip install --python {w}/gralora-venv/bin/python -e {w}/gralora-jax jax[tpu] "
                               f"tensorboardX -c {w}/gralora-jax/constraints.txt")

    probe = (
        "import os, sys; print('cwd', os.getcwd()); print(open('marker.txt').read().strip()); "
        "print('env', os.environ.get('PYTHONUNBUFFERED'), os.environ.get('JAX_PLATFORMS'), "
        "os.environ.get('GRALORA_DISTRIBUTED'), os.environ.get('RUN_TAG'), os.environ.get('VIRTUAL_ENV_MARK')); "
        "print('args', sys.argv[1:])"
    )
    code, _, err = run_cli("launch", "--env", "RUN_TAG=e2e", "--run-name", "probe", "--",
                           sys.executable, "-c", probe, "--mesh", "2x1", "it's")
    assert code == 0, err
    logs = [w / "gralora-logs" / "probe.log" for w in workers]
    assert _wait_for(lambda: all(p.exists() and "args" in p.read_text() for p in logs)), [
        p.read_text() if p.exists() else None for p in logs]
    for w, log in zip(workers, logs):
        text = log.read_text()
        assert f"cwd {w / 'gralora-jax'}" in text
        assert "synced code" in text
        assert "env 1 tpu,cpu 1 e2e 1" in text
        assert "args ['--mesh', '2x1', \"it's\"]" in text

    local = tmp / "fetched"
    code, _, err = run_cli("logs", "--workers", "2", "--run-name", "probe", "--local-dir", str(local))
    assert code == 0, err
    for i, w in enumerate(workers):
        assert (local / f"probe-worker-{i}.log").read_text() == logs[i].read_text()

    # a long run: launch, refuse a second launch while alive, stop (SIGTERM the group)
    code, _, err = run_cli("launch", "--no-venv", "--", "sleep 60; echo never")
    assert code == 0, err
    pids = [int((w / "gralora-logs" / "train.pid").read_text()) for w in workers]
    assert all(_alive(p) for p in pids)
    code, _, err = run_cli("launch", "--no-venv", "--", "true")
    assert code != 0
    code, _, err = run_cli("stop")
    assert code == 0, err
    assert _wait_for(lambda: not any(_alive(p) for p in pids)), pids
    for w in workers:
        assert "never" not in (w / "gralora-logs" / "train.log").read_text()

    calls = [json.loads(line) for line in (root / "calls.jsonl").read_text().splitlines()]
    launches = [c for c in calls if c[3] == "ssh" and "nohup" in c[c.index("--command") + 1]]
    assert launches and all("--worker=all" in c for c in launches)


@pytest.mark.parametrize("module", [A, C, remote])
def test_docstring_examples(module):
    import doctest

    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_cli_logs_counts_workers_with_describe(clean_env, monkeypatch):
    calls = []

    class Result:
        returncode, stdout, stderr = 0, "v5litepod-16\n", ""

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return Result()

    monkeypatch.setattr(shutil, "which", lambda program: "/usr/bin/" + program)
    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(os, "makedirs", lambda *a, **k: None)
    code, _, err = run_cli("logs", "--name", "t", "--zone", "z", "--local-dir", "L")
    assert code == 0, err
    target = C.Target("t", "z")
    assert calls == [C.workers_query_command(target), *C.logs_commands(target, 4, "L")]
    assert calls[0][-1] == "--format=value(acceleratorType)"


# ----------------------------------------------------------------------------- setup checks, secrets, quoting


def test_setup_installs_pinned_uv_and_checks_tpu_devices(fake_tpu, capfd):
    root, repo, tmp = fake_tpu
    assert run_cli("sync", "--repo", str(repo), "--archive", str(tmp / "code.tar.gz"))[0] == 0
    capfd.readouterr()
    code, _, err = run_cli("setup")
    out = capfd.readouterr().out
    assert code == 0, err
    assert out.count("setup ok on") == 2 and "devices 4 local 4 TPU v4" in out
    for w in ("worker-0", "worker-1"):
        pip = (root / w / "pip-calls.txt").read_text().splitlines()
        assert pip[0] == f"-m pip install --user --quiet uv=={remote.UV_VERSION}"  # pinned, from PyPI
    assert "curl" not in C.format_commands(C.setup_commands(TARGET, C.SetupOptions()))
    # a worker where jax falls back to CPU fails setup, naming the problem
    clean_env = pytest.MonkeyPatch()
    clean_env.setenv("FAKE_JAX_PLATFORM", "cpu")
    try:
        code, _, err = run_cli("setup")
        assert code != 0 and "sees no TPU devices" in capfd.readouterr().err
        code, _, err = run_cli("setup", "--no-device-check")
        assert code == 0, err
    finally:
        clean_env.undo()


SECRET = "hf_s3cr3t'$(touch $HOME/PWNED)\""


def test_launch_env_values_are_masked_and_sent_in_a_private_file(fake_tpu, capfd, monkeypatch):
    root, repo, tmp = fake_tpu
    local_tmp = tmp / "local-tmp"
    local_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(local_tmp))
    code, out, _ = run_cli("--dry-run", "launch", "--env", f"HF_TOKEN={SECRET}", "--", "true")
    assert code == 0 and "HF_TOKEN=***" in out and "s3cr3t" not in out
    assert run_cli("sync", "--repo", str(repo), "--archive", str(tmp / "code.tar.gz"))[0] == 0
    capfd.readouterr()
    probe = "import os; print('token', repr(os.environ['HF_TOKEN']))"
    code, _, err = run_cli("launch", "--no-venv", "--env", f"HF_TOKEN={SECRET}", "--run-name", "sec", "--",
                           sys.executable, "-c", probe)
    captured = capfd.readouterr()
    assert code == 0, err
    assert "HF_TOKEN=***" in err and "s3cr3t" not in err + captured.out + captured.err
    logs = [root / w / "gralora-logs" / "sec.log" for w in ("worker-0", "worker-1")]
    assert _wait_for(lambda: all(p.exists() and "token" in p.read_text() for p in logs))
    for log in logs:
        assert f"token {SECRET!r}" in log.read_text()  # the value arrived intact
    calls = (root / "calls.jsonl").read_text()
    assert "s3cr3t" not in calls  # never on a gcloud command line
    sent = [line.split() for line in (root / "sent-modes.txt").read_text().splitlines()]
    assert {mode for name, mode in sent if name == "env"} == {"0o600"}
    assert not list(root.rglob(".gralora-env-*"))  # read, then deleted on the workers
    assert not list(local_tmp.iterdir())  # and the local copy is gone
    assert not _pwned(tmp)


def test_logs_dry_run_without_a_worker_count(clean_env):
    code, out, err = run_cli("--dry-run", "logs", "--name", "t", "--zone", "z", "--run-name", "r")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert shlex.split(lines[0]) == C.workers_query_command(C.Target("t", "z"))
    assert lines[1].startswith("#")
    assert shlex.split(lines[2]) == [*TPU_VM, "scp", "t:gralora-logs/r.log", os.path.join("tpu-logs", "t", "r-worker-{i}.log"),
                                     "--zone=z", "--worker={i}"]


def test_create_internal_ips():
    for queued in (False, True):
        [cmd] = C.create_commands(TARGET, C.CreateOptions("v4-8", queued=queued, internal_ips=True))
        assert "--internal-ips" in cmd
    code, out, _ = run_cli("--dry-run", "create", "--name", "t", "--zone", "z", "--accelerator-type", "v4-8",
                           "--internal-ips")
    assert code == 0 and "--internal-ips" in _printed(out)[0]


PAYLOADS = [
    "x; touch $HOME/PWNED; echo",
    "$(touch $HOME/PWNED)",
    "`touch $HOME/PWNED`",
    "x' ; touch $HOME/PWNED ; '",
    'x" ; touch $HOME/PWNED ; "',
    "x\ntouch $HOME/PWNED",
    "--upload-pack=touch $HOME/PWNED",
]


def _flag_cases(repo, tmp):
    """(action argv with a {P} slot) for every flag whose value can reach a shell or a gcloud argv."""
    return [
        ["setup", "--remote-dir", "{P}"],
        ["setup", "--venv", "{P}", "--no-device-check"],
        ["setup", "--git-url", "{P}"],
        ["setup", "--git-url", str(repo), "--branch", "{P}"],
        ["setup", "--python", "{P}"],
        ["setup", "--jax-spec", "{P}"],
        ["setup", "--extra", "{P}"],
        ["sync", "--repo", str(repo), "--remote-dir", "{P}"],
        ["sync", "--repo", str(repo), "--archive", str(tmp / "arch") + "{P}"],
        ["launch", "--run-name", "{P}", "--", "true"],
        ["launch", "--log-dir", "{P}", "--", "true"],
        ["launch", "--remote-dir", "{P}", "--", "true"],
        ["launch", "--venv", "{P}", "--", "true"],
        ["launch", "--env", "K={P}", "--no-venv", "--", "true"],
        ["launch", "--jax-platforms", "{P}", "--no-venv", "--", "true"],
        ["launch", "--worker", "{P}", "--", "true"],
        ["stop", "--run-name", "{P}"],
        ["stop", "--log-dir", "{P}"],
        ["logs", "--workers", "1", "--run-name", "{P}", "--local-dir", str(tmp / "fetched")],
        ["logs", "--workers", "1", "--log-dir", "{P}", "--local-dir", str(tmp / "fetched")],
        ["ssh", "--worker", "{P}", "--command", "true"],
        ["create", "--accelerator-type", "v4-8", "--description", "{P}"],
        ["create", "--accelerator-type", "v4-8", "--network", "{P}"],
        ["status", "--project", "{P}"],
    ]


def _pwned(tmp):
    """Files an injected `touch $HOME/PWNED` made (directories named PWNED are literal paths)."""
    return [p for p in tmp.rglob("PWNED") if p.is_file()]


@pytest.mark.slow
def test_shell_metacharacters_in_every_flag_never_run(fake_tpu, monkeypatch):
    """Every flag gets each payload: the generated remote scripts parse (bash -n), and run for
    real on the fake workers (or are refused with one line), no injected `touch` ever runs."""
    root, repo, tmp = fake_tpu
    home = tmp / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    assert run_cli("sync", "--repo", str(repo), "--archive", str(tmp / "code.tar.gz"))[0] == 0
    ran = refused = 0
    for case in _flag_cases(repo, tmp):
        for payload in PAYLOADS:
            argv = [a.replace("{P}", payload) for a in case]
            try:
                args = cli.build_parser().parse_args(argv)
                commands = cli.plan(args)
            except cli.CliError as e:
                assert "\n" not in str(e), (argv, str(e))
                refused += 1
                continue
            for cmd in commands:
                if cmd[:5] == [*TPU_VM, "ssh"] and "--command" in cmd:
                    _bash_syntax_ok(cmd[cmd.index("--command") + 1])
            code, _, err = run_cli(*argv)
            ran += 1
            assert not _pwned(tmp), (argv, err)
    time.sleep(0.5)  # anything launched in the background has run by now
    assert not _pwned(tmp)
    assert ran and refused  # both paths were exercised
