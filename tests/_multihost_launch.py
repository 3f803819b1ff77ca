"""Run one command as N local CPU processes joined by jax.distributed (a pod slice in miniature).

    python tests/_multihost_launch.py N -- python -m experiments.commonsense --mesh 4x2 ...

Each process gets ``--coordinator-address 127.0.0.1:PORT --num-processes N --process-id I``
appended (PORT: a free port), ``JAX_PLATFORMS=cpu`` and no ``XLA_FLAGS`` (the command creates its
own share of the mesh's devices); outputs go to this terminal prefixed with ``[I]``. Exits with
the first non-zero exit code, after stopping the others, or 0 when all succeed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, cmd: list[str], *, cwd: str | None = None, timeout: float = 600.0,
           echo=None) -> tuple[int, list[str]]:
    """Run ``cmd`` as ``n`` processes; returns (exit code, each process's combined output)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    procs = [
        subprocess.Popen(cmd + ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(n),
                                "--process-id", str(i)],
                         cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(n)
    ]
    outputs: list[list[str]] = [[] for _ in procs]

    def pump(i, p):
        for line in p.stdout:
            outputs[i].append(line)
            if echo:
                echo(f"[{i}] {line}")

    threads = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    code = 0
    while any(p.poll() is None for p in procs):
        bad = [p.returncode for p in procs if p.returncode not in (None, 0)]
        if bad or time.monotonic() > deadline:
            code = bad[0] if bad else 124
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.2)
    for p in procs:
        p.wait()
    for t in threads:
        t.join(timeout=5)
    code = code or next((p.returncode for p in procs if p.returncode), 0)
    return code, ["".join(o) for o in outputs]


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    code, _ = launch(int(argv[0]), argv[2:], echo=lambda s: print(s, end="", flush=True))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
