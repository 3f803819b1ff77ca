"""The user's path, measured: the real ``python -m experiments.commonsense`` on a real-shaped checkpoint.

A user does not run the library benchmark; they point the CLI at a Hugging Face checkpoint and a
JSON file of LLM-Adapters records. This benchmark does exactly that, with random weights (speed
does not depend on them), and reads what the CLI itself reports (``metrics.jsonl``,
``results.json``). In the same run it times the library benchmark
(:mod:`benchmarks.train_throughput`) at the same shape and tokens per step, so the two are
compared side by side on one machine::

    python -m benchmarks.user_path --shape 1b --batch 16 --seq 256 --out benchmarks/results/user_path_1b
    python -m benchmarks.user_path --shape 135m --records 1500 --epochs 2 --batch 16 --seq 256 \\
        --natural-length --cli-args "--r 32 --alpha 64 --k 4 --lr 5e-4 --optimizer adamw"

What it writes under ``--work-dir`` (reused across runs: the checkpoint is written once per shape):

* ``ckpt-<shape>/``: ``config.json`` (Llama architecture of the shape), sharded bf16
  safetensors with an index (as the hub ships them), a word-level tokenizer;
* ``data-<n>-<seq>/``: ``train.json`` (social_i_qa-format records; with the default
  ``--fill`` each prompt is padded with filler words so every sequence reaches ``--seq``
  tokens and each CLI step has exactly ``batch x seq`` tokens, like the library benchmark)
  and ``social_i_qa/test.json`` for the CLI's evaluation after training.

Per CLI run the table gives: steady-state tokens/s (median over the logged intervals after
the first), step time, first step (compile included), peak device memory, training wall time
and the ratio to the library benchmark's tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import statistics
import subprocess
import sys
import time
from typing import Optional, Sequence

import numpy as np

from benchmarks.shapes import SHAPES, Shape

FILLER = [f"filler{i}" for i in range(64)]


# ----------------------------------------------------------------------------- inputs


def hf_config(shape: Shape, tokenizer) -> dict:
    """``config.json`` of a Llama-architecture checkpoint of ``shape`` (bf16, as published)."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **shape.hf_config_kwargs()}
    cfg.update(head_dim=shape.head_dim, torch_dtype="bfloat16", attention_bias=False, mlp_bias=False,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, max_position_embeddings=8192)
    return cfg


def random_weights(shape: Shape, seed: int = 0) -> dict[str, np.ndarray]:
    """PyTorch-named bf16 weights of ``shape``: tiles of one random block (fast at 8B; values
    are irrelevant to speed), scaled ``1/sqrt(fan_in)``."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    block = rng.standard_normal(1 << 20).astype(np.float32)

    def tensor(shape_, fan_in):
        n = int(np.prod(shape_))
        start = int(rng.integers(0, block.size))
        reps = -(-(n + start) // block.size)
        flat = np.tile(block, reps)[start:start + n] / np.sqrt(fan_in)
        return flat.reshape(shape_).astype(ml_dtypes.bfloat16)

    h = shape.hidden
    sd = {"model.embed_tokens.weight": tensor((shape.vocab, h), 1.0)}
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        for name, (fi, fo) in shape.projection_shapes().items():
            group = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            sd[f"{p}{group}.{name}.weight"] = tensor((fo, fi), fi)
        sd[p + "input_layernorm.weight"] = np.ones(h, ml_dtypes.bfloat16)
        sd[p + "post_attention_layernorm.weight"] = np.ones(h, ml_dtypes.bfloat16)
    sd["model.norm.weight"] = np.ones(h, ml_dtypes.bfloat16)
    if not shape.tied:
        sd["lm_head.weight"] = tensor((shape.vocab, h), h)
    return sd


def social_iqa_records(n: int, seed: int, fill_to: Optional[int]) -> list[dict]:
    """``n`` social_i_qa-format records; ``fill_to`` pads each instruction with filler words so
    that its tokenized prompt alone is at least that many (word-level) tokens."""
    from experiments.commonsense import synthetic

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = synthetic.make_example("social_i_qa", rng)
        if fill_to:
            words = [rng.choice(FILLER) for _ in range(fill_to)]
            r = {**r, "instruction": " ".join(words) + " " + r["instruction"]}
        out.append(r)
    return out


def ensure_inputs(shape: Shape, work: str, n_records: int, seq: int, fill: bool, n_eval: int) -> tuple[str, str, str]:
    """(checkpoint dir, train.json, eval dir), written once into ``work``."""
    from experiments.commonsense import embedded, synthetic
    from gralora_jax.loading.safetensors_io import write_sharded_safetensors

    data = os.path.join(work, f"data-{n_records}-{seq if fill else 'natural'}")
    train_file = os.path.join(data, "train.json")
    if not os.path.exists(train_file):
        recs = social_iqa_records(n_records, 0, seq if fill else None)
        tests = social_iqa_records(n_eval, 1, None)
        os.makedirs(os.path.join(data, "social_i_qa"), exist_ok=True)
        with open(os.path.join(data, "social_i_qa", "test.json"), "w") as f:
            json.dump(tests, f)
        with open(train_file + ".tmp", "w") as f:
            json.dump(recs, f)
        os.replace(train_file + ".tmp", train_file)
    ckpt = os.path.join(work, f"ckpt-{shape.name}")
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        t = time.perf_counter()
        texts = synthetic.corpus(social_iqa_records(2000, 0, 0)) + [" ".join(FILLER)]
        tok = embedded.build_tokenizer(texts)
        if len(tok) > shape.vocab:
            raise ValueError(f"the benchmark tokenizer has {len(tok)} tokens, more than shape {shape.name}'s vocab")
        tmp = ckpt + ".tmp"
        os.makedirs(tmp, exist_ok=True)
        tok.save_pretrained(tmp)
        write_sharded_safetensors(random_weights(shape), tmp, max_shard_bytes=5 * 2**30)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(shape, tok), f, indent=2)
        os.replace(tmp, ckpt)
        print(f"wrote {ckpt} in {time.perf_counter() - t:.1f}s", flush=True)
    return ckpt, train_file, data


# ----------------------------------------------------------------------------- runs


def run_cli(ckpt: str, train: str, eval_dir: str, out_dir: str, *, batch: int, seq: int, steps: Optional[int],
            epochs: Optional[float], eval_limit: int, extra: Sequence[str], timeout: float) -> dict:
    """One ``python -m experiments.commonsense`` run; what it reported."""
    argv = [sys.executable, "-m", "experiments.commonsense", "--model", ckpt, "--train-data", train,
            "--eval-dir", eval_dir, "--tasks", "social_i_qa", "--eval-limit", str(eval_limit),
            "--mesh", "1x1", "--output-dir", out_dir, "--batch-size", str(batch),
            "--micro-batch-size", str(batch), "--cutoff-len", str(seq), "--log-every", "5", "--no-resume"]
    argv += ["--max-steps", str(steps)] if steps is not None else ["--epochs", str(epochs)]
    argv += list(extra)
    print("$ " + " ".join(shlex.quote(a) for a in argv[1:]), flush=True)
    t = time.perf_counter()
    env = {**os.environ, "JAX_LOG_COMPILES": "1"}  # compile logs: what compiled, how often, how long
    proc = subprocess.run(argv, timeout=timeout, text=True, capture_output=True, env=env)
    wall = time.perf_counter() - t
    log = proc.stdout + proc.stderr
    with open(out_dir.rstrip("/") + ".log", "w") as f:
        f.write(log)
    tail = log[-3000:]
    row: dict = {"argv": argv[1:], "returncode": proc.returncode, "wall_s": wall, **compile_summary(log)}
    if proc.returncode != 0:
        print(tail, flush=True)
        return row
    metrics = [json.loads(x) for x in open(os.path.join(out_dir, "metrics.jsonl")) if x.strip()]
    results = json.load(open(os.path.join(out_dir, "results.json")))
    train_rows = [m for m in metrics if "tokens_per_s" in m]
    steady = train_rows[1:] or train_rows
    row.update(
        steps=results.get("train", {}).get("steps"),
        train_s=results.get("train", {}).get("seconds"),
        tokens_per_s=statistics.median(m["tokens_per_s"] for m in steady) if steady else None,
        step_s=statistics.median(m["step_time"] for m in steady) if steady else None,
        first_step_s=next((m["first_step_s"] for m in metrics if "first_step_s" in m), None),
        peak_bytes=max((m.get("peak_bytes", 0) for m in metrics), default=0) or None,
        final_loss=train_rows[-1]["loss"] if train_rows else None,
        accuracy=results.get("average"),
    )
    return row


_COMPILE = re.compile(r"Finished XLA compilation of jit\((?P<name>[^)]*)\) in (?P<s>[0-9.eE+-]+) sec")


def compile_summary(log: str) -> dict:
    """From a ``JAX_LOG_COMPILES=1`` log: the train step's compiles (count, seconds) and all compiles'
    seconds; the step function is the one compiled most expensively."""
    per: dict[str, list[float]] = {}
    for m in _COMPILE.finditer(log):
        per.setdefault(m.group("name"), []).append(float(m.group("s")))
    if not per:
        return {}
    step = per.get("step") or max(per.values(), key=sum)
    return {"step_compiles": len(step), "step_compile_s": sum(step), "first_compile_s": step[0],
            "all_compile_s": sum(map(sum, per.values())),
            "top_compiles": sorted(((sum(v), k, len(v)) for k, v in per.items()), reverse=True)[:6]}


def run_library(shape: str, batch: int, seq: int, method: str, out: str, remat: str, timeout: float, *,
                rank="64", alpha="128") -> dict:
    argv = [sys.executable, "-m", "benchmarks.train_throughput", "--shape", shape, "--batch", str(batch), "--seq",
            str(seq), "--loss", "chunked", "--methods", method, "--no-peft", "--steps", "10", "--warmup", "3",
            "--remat", remat, "--rank", str(rank), "--alpha", str(alpha), "--out", out, "--timeout", str(timeout)]
    print("$ " + " ".join(argv[1:]), flush=True)
    proc = subprocess.run(argv, timeout=timeout + 60, text=True, capture_output=True)
    if proc.returncode != 0:
        print((proc.stdout + proc.stderr)[-3000:], flush=True)
        return {"returncode": proc.returncode}
    res = [r for r in json.load(open(out + ".json"))["results"] if r.get("method") == method]
    return res[0] if res else {"returncode": proc.returncode}


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    head = ("| shape | run | tokens/step | CLI tokens/s | library tokens/s | CLI / library | CLI step (ms) | "
            "step compiles (s) | peak (GiB) | train (s) | steps |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cli, lib = r["cli"], r.get("library") or {}
        ratio = cli.get("tokens_per_s") / lib["tokens_per_s"] if cli.get("tokens_per_s") and lib.get("tokens_per_s") else None
        lines.append(
            f"| {r['shape']} | {r['label']} | {r['batch']} x {r['seq']} | {_fmt(cli.get('tokens_per_s'), ',.0f')} | "
            f"{_fmt(lib.get('tokens_per_s'), ',.0f')} | {_fmt(ratio, '.3f')} | "
            f"{_fmt(cli.get('step_s') and cli['step_s'] * 1e3, '.1f')} | "
            f"{cli.get('step_compiles', '-')} ({_fmt(cli.get('step_compile_s'), '.1f')}) | "
            f"{_fmt(cli.get('peak_bytes') and cli['peak_bytes'] / 2**30, '.1f')} | {_fmt(cli.get('train_s'), '.1f')} | "
            f"{_fmt(cli.get('steps'), 'd')} |"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.user_path", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=16, help="global batch = micro-batch (no accumulation)")
    ap.add_argument("--seq", type=int, default=256, help="--cutoff-len; with --fill every sequence has this length")
    ap.add_argument("--steps", type=int, default=30, help="CLI --max-steps (ignored with --epochs)")
    ap.add_argument("--epochs", type=float, default=None, help="run whole epochs instead of --steps")
    ap.add_argument("--records", type=int, default=None, help="training records (default: enough for --steps)")
    ap.add_argument("--natural-length", action="store_true", help="records of their natural length (no filler)")
    ap.add_argument("--method", default="gralora", choices=("gralora", "lora"))
    ap.add_argument("--cli-args", default="", help="extra CLI flags, one string (e.g. '--dropout 0 --remat full')")
    ap.add_argument("--label", default="paper preset", help="names this CLI run in the table")
    ap.add_argument("--library", action=argparse.BooleanOptionalAction, default=True,
                    help="also time benchmarks.train_throughput at the same shape (default on)")
    ap.add_argument("--library-remat", default="none")
    ap.add_argument("--eval-limit", type=int, default=16)
    ap.add_argument("--work-dir", default="/tmp/gralora_user_path")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    a = ap.parse_args(argv)

    shape = SHAPES[a.shape]
    n = a.records or max(64, a.batch * (a.steps + 2))
    ckpt, train, eval_dir = ensure_inputs(shape, a.work_dir, n, a.seq, not a.natural_length, a.eval_limit)
    extra = shlex.split(a.cli_args) + (["--method", a.method])
    out_dir = os.path.join(a.work_dir, f"run-{a.shape}-{a.batch}x{a.seq}-{int(time.time())}")
    cli = run_cli(ckpt, train, eval_dir, out_dir, batch=a.batch, seq=a.seq,
                  steps=None if a.epochs else a.steps, epochs=a.epochs, eval_limit=a.eval_limit, extra=extra,
                  timeout=a.timeout)
    row = {"shape": a.shape, "label": a.label, "batch": a.batch, "seq": a.seq, "cli": cli,
           "date": time.strftime("%Y-%m-%d")}
    if a.library:
        args = shlex.split(a.cli_args)

        def flag(name, default):
            return args[args.index(name) + 1] if name in args else default

        method = "lora" if a.method == "lora" else f"gralora{flag('--k', 4)}"
        row["library"] = run_library(a.shape, a.batch, a.seq, method, out_dir + "-library", a.library_remat,
                                     a.timeout, rank=flag("--r", 64), alpha=flag("--alpha", 128))
    rows = [row]
    md = table(rows)
    print(md, flush=True)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out + ".json", "w") as f:
            json.dump(rows, f, indent=1, default=str)
        with open(a.out + ".md", "w") as f:
            f.write(md + "\n")
    return rows


if __name__ == "__main__":
    main()
