"""Check on a GPU that cuDNN flash attention computes what the XLA path computes, and time both.

    python -m benchmarks.attention_check            # Llama-3.2-1B attention shape, batch 8 x 1024
    python -m benchmarks.attention_check --json out.json

For each case (causal; causal + sliding window; causal + right-padding lengths) the output
and the gradients w.r.t. q, k, v of ``gralora_jax.models.attention.attention`` in bfloat16
through ``implementation="cudnn"`` and ``"xla"`` are compared with a float32 XLA reference
on the same inputs. cuDNN passes when its largest error is within 2x XLA-bf16's own (plus
1e-3): both are bf16 computations of the same function, neither is the reference. It also
prints what the default (``implementation=None``) chooses on this machine and the forward +
backward time of each path. Exit status 1 when a case fails, so a script can fall back to
``--attn xla``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from gralora_jax.models import attention as att


def _inputs(batch, seq, heads, kv_heads, head_dim, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (batch, seq, heads, head_dim), jnp.float32)
    k = jax.random.normal(ks[1], (batch, seq, kv_heads, head_dim), jnp.float32)
    v = jax.random.normal(ks[2], (batch, seq, kv_heads, head_dim), jnp.float32)
    ct = jax.random.normal(ks[3], (batch, seq, heads, head_dim), jnp.float32)  # output cotangent
    return q, k, v, ct


def _fwd_bwd(impl, case, scale):
    def f(q, k, v, ct):
        out, vjp = jax.vjp(lambda q, k, v: att.attention(q, k, v, scale=scale, implementation=impl, **case), q, k, v)
        return (out, *vjp(ct.astype(out.dtype)))

    return jax.jit(f)


def _valid(case, batch, seq):
    """Query rows that are defined (right padding leaves rows past the length arbitrary)."""
    lengths = case.get("kv_lengths")
    if lengths is None:
        return np.ones((batch, seq), bool)
    return np.arange(seq)[None, :] < np.asarray(lengths)[:, None]


def _max_err(got, ref, valid):
    g = np.asarray(got, np.float32)[valid]
    r = np.asarray(ref, np.float32)[valid]
    return float(np.max(np.abs(g - r)) / (np.max(np.abs(r)) + 1e-12))


def _time(fn, args, reps=10):
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps


def run(batch=8, seq=1024, heads=32, kv_heads=8, head_dim=64) -> dict:
    q, k, v, ct = _inputs(batch, seq, heads, kv_heads, head_dim)
    scale = head_dim ** -0.5
    half = [t.astype(jnp.bfloat16) for t in (q, k, v)]
    cases = {
        "causal": {},
        "causal+window256": {"window": 256},
        "causal+lengths": {"kv_lengths": jnp.array([seq - 37 * i for i in range(batch)], jnp.int32)},
    }
    report = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
              "default_choice": att.choose_implementation(None, half[0]),
              "shape": dict(batch=batch, seq=seq, heads=heads, kv_heads=kv_heads, head_dim=head_dim), "cases": {}}
    ok_all = True
    for name, case in cases.items():
        ref = _fwd_bwd("xla", case, scale)(q, k, v, ct)
        valid = _valid(case, batch, seq)
        row = {}
        for impl in ("xla", "cudnn"):
            fn = _fwd_bwd(impl, case, scale)
            try:
                got = fn(*half, ct)
            except Exception as e:  # cuDNN missing or shape unsupported: report, do not crash
                row[impl] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                continue
            errs = [_max_err(g, r, valid) for g, r in zip(got, ref)]
            row[impl] = {"rel_err_out_dq_dk_dv": errs, "fwd_bwd_ms": 1e3 * _time(fn, (*half, ct))}
        if "error" in row.get("cudnn", {}) or "error" in row.get("xla", {}):
            row["pass"] = False
        else:
            bound = [2 * e + 1e-3 for e in row["xla"]["rel_err_out_dq_dk_dv"]]
            row["pass"] = all(c <= b for c, b in zip(row["cudnn"]["rel_err_out_dq_dk_dv"], bound))
        ok_all &= row["pass"]
        report["cases"][name] = row
    report["pass"] = ok_all
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    report = run(a.batch, a.seq, a.heads, a.kv_heads, a.head_dim)
    text = json.dumps(report, indent=1)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
