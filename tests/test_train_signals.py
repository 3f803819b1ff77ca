"""Interruption end to end, in subprocesses: SIGINT and SIGTERM checkpoint at the step boundary
and exit 130 / 143, a second Ctrl-C exits at once, and with two jax.distributed processes a
SIGTERM to one of them stops both at the same step with one checkpoint. Every resumed run
ends bit-identical to an uninterrupted one."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from test_checkpoint import ROOT, WORKER, _load, _worker


def _check(proc, code, *expect, timeout=400):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == code, out[-3000:]
    for e in expect:
        assert e in out, out[-3000:]
    return out


def _same_params(a, b):
    a, b = _load(a), _load(b)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_sigint_then_sigterm_checkpoint_exit_codes_and_exact_resume(tmp_path):
    cache = tmp_path / "jax_cache"
    args = ("--steps", "6", "--ckpt-every", "0")
    _check(_worker(tmp_path / "straight", *args, cache=cache), 0, "DONE done AT 6")
    run = tmp_path / "run"
    out = _check(_worker(run, *args, "--signal-self-at", "2", "--signal", "INT", cache=cache), 130,
                 "DONE sigint AT 2")
    assert "Traceback" not in out and sorted(os.listdir(run / "checkpoints")) == ["2"]
    _check(_worker(run, *args, "--signal-self-at", "4", "--signal", "TERM", cache=cache), 143,
           "RESUMED 1 AT 2", "DONE sigterm AT 4")
    _check(_worker(run, *args, cache=cache), 0, "RESUMED 1 AT 4", "DONE done AT 6")
    _same_params(tmp_path / "straight" / "params_step6.npz", run / "params_step6.npz")
    rows = [json.loads(x) for x in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_second_ctrl_c_exits_at_once(tmp_path):
    proc = _worker(tmp_path / "run", "--steps", "6", "--ckpt-every", "2", "--pause-after", "2",
                   cache=tmp_path / "jax_cache")
    lines, deadline = [], time.time() + 400
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("COMMITTED"):
            break
        assert time.time() < deadline, "".join(lines)
    assert lines[-1].strip() == "COMMITTED 2", "".join(lines)[-3000:]
    os.kill(proc.pid, signal.SIGINT)  # the loop waits in the data iterator: the first only sets the flag
    time.sleep(1.0)
    assert proc.poll() is None
    t0 = time.time()
    os.kill(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.time() - t0 < 10, out[-3000:]
    assert "sigint again: exiting now" in out and "Traceback" not in out, out[-3000:]


def _dist(out, port, i, *args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.Popen([sys.executable, WORKER, "--dist-train", str(i), str(port), str(out), *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _pair(out, *args):
    port = _port()
    return [_dist(out, port, i, *args) for i in range(2)]


def _finish(procs, timeout=400):
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


@pytest.mark.slow
def test_two_processes_sigterm_to_one_stops_both(tmp_path):
    steps = ("--steps", "10")
    run = tmp_path / "run"
    procs = _pair(run, *steps, "--sleep", "0.5")
    lines, deadline = [], time.time() + 400
    for line in procs[1].stdout:  # wait until process 1 is training
        lines.append(line)
        if line.startswith("STEP 3"):
            break
        assert time.time() < deadline, "".join(lines)
    assert lines and lines[-1].startswith("STEP 3"), "".join(lines)[-3000:]
    t0 = time.time()
    os.kill(procs[1].pid, signal.SIGTERM)
    outs = _finish(procs, timeout=60)
    assert time.time() - t0 < 60
    outs[1] = "".join(lines) + outs[1]
    done = []
    for p, out in zip(procs, outs):
        assert p.returncode == 143, out[-3000:]
        done.append([x for x in out.splitlines() if x.startswith("DONE")])
    assert done[0] == done[1] and done[0][0].startswith("DONE sigterm AT "), done
    stopped = int(done[0][0].split()[3])
    assert stopped < 10 and done[0][0].endswith(f"CKPT {stopped}")
    assert sorted(os.listdir(run / "checkpoints")) == [str(stopped)]

    resumed = _finish(_pair(run, *steps))
    straight = _finish(_pair(tmp_path / "straight", *steps))
    for out in resumed:
        assert f"RESUMED 1 AT {stopped}" in out and "DONE done AT 10" in out, out[-3000:]
    for out in straight:
        assert "DONE done AT 10" in out, out[-3000:]
    _same_params(tmp_path / "straight" / "params_step10.npz", run / "params_step10.npz")
