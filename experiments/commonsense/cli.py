"""``python -m experiments.commonsense``: fine-tune on commonsense data, evaluate the eight tasks.

Embedded default (no network, a couple of minutes on a 2-core CPU): a tiny random Llama
with a word-level tokenizer and synthetic LLM-Adapters-format data, written once to a
cache dir in HF layout and loaded through the same ``load_pretrained`` as a real model::

    python -m experiments.commonsense --mesh 4x2
    python -m experiments.commonsense --mesh 4x2 --method lora
    python -m experiments.commonsense --mesh 4x2 --method full --output-dir outputs/cs_full

The paper's setting (defaults switch to it when ``--model`` is given: r=64, alpha=128,
k=4, dropout 0.05, q,k,v,o,gate,up,down, Lion 0.9/0.95, lr 2e-4, warmup 0.1 + cosine,
cutoff 256, global batch 192, 2 epochs, greedy generation)::

    python -m experiments.commonsense --mesh 4x2 --model Qwen/Qwen2.5-1.5B \\
        --train-data commonsense_170k.json --eval-dir LLM-Adapters/dataset \\
        --output-dir outputs/qwen1.5b_gralora
    python -m experiments.commonsense --mesh 8x1 --model meta-llama/Llama-3.2-3B \\
        --train-data zwhe99/commonsense_170k --eval-dir LLM-Adapters/dataset --method lora --r 64 --alpha 128
    python -m experiments.commonsense --mesh 4x2 --model ./my-llama --eval-dir data \\
        --tasks boolq,piqa --eval-mode loglik --max-steps 100 --eval-limit 200

Outputs in ``--output-dir``: ``metrics.jsonl`` (training), ``checkpoints/`` (resumed
automatically when present), ``adapter/`` (PEFT ``adapter_config.json`` +
``adapter_model.safetensors``; ``full``: ``model/`` in HF layout), ``merged/`` with
``--export-merged``, ``predictions/<task>.json``, ``results.json`` and ``accuracy.png``.

Nothing here imports jax at module import time: ``main`` parses ``--mesh`` first and
makes enough CPU host devices for it before jax starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Optional, Sequence

from experiments.commonsense.tasks import TASKS, TASK_LABELS, parse_tasks

METHODS = ("gralora", "lora", "full")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Presets filled in for every option left unset: the paper's recipe with --model, small and
# fast settings for the embedded default.
PAPER = dict(
    r=64, alpha=128, k=4, hybrid_r=0, dropout=0.05, lr=2e-4, epochs=2.0, batch_size=192, micro_batch_size=16,
    cutoff_len=256, optimizer="lion", warmup_ratio=0.1, eval_mode="generate", num_beams=1, mask_prompt=False,
    max_new_tokens=32, eval_before=False, eval_batch_size=32,
)
EMBEDDED = dict(
    r=32, alpha=64, k=2, hybrid_r=0, dropout=0.0, lr=5e-3, epochs=3.0, batch_size=32, micro_batch_size=32,
    cutoff_len=128, optimizer="adamw", warmup_ratio=0.1, eval_mode="generate", num_beams=1, mask_prompt=True,
    max_new_tokens=8, eval_before=True, eval_batch_size=64,
)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    model: Optional[str] = None  # HF checkpoint dir, .gguf file or hub id; None = the embedded tiny Llama
    train_data: Optional[str] = None  # commonsense_170k JSON/JSONL file or hub dataset id; None = embedded synthetic
    eval_dir: Optional[str] = None  # LLM-Adapters layout DIR/<task>/test.json; None = embedded synthetic
    tasks: tuple[str, ...] = TASKS  # which of the eight tasks to evaluate
    output_dir: str = "outputs/commonsense"  # checkpoints, metrics, adapter, results.json, accuracy.png
    method: str = "gralora"  # gralora | lora | full
    r: int = 64  # adapter rank (GraLoRA: PEFT's r, the LoRA-equivalent parameter budget)
    alpha: float = 128  # scaling numerator (GraLoRA: alpha/(r+hybrid_r); LoRA: alpha/r)
    k: int = 4  # GraLoRA blocks per side
    hybrid_r: int = 0  # rank of the hybrid plain-LoRA path (GraLoRA only)
    dropout: float = 0.05  # adapter dropout during training
    target_modules: tuple[str, ...] = DEFAULT_TARGETS  # module names that get adapters
    lr: float = 2e-4  # peak learning rate
    epochs: float = 2.0  # passes over the training data (fractions allowed)
    batch_size: int = 192  # global batch (sequences per optimizer step)
    micro_batch_size: int = 16  # sequences per forward/backward across the mesh; batch_size/micro = grad accumulation
    cutoff_len: int = 256  # max tokens per training sequence (truncation)
    optimizer: str = "lion"  # lion | adamw | sgd
    warmup_ratio: float = 0.1  # linear warmup fraction, then cosine decay to 0
    weight_decay: float = 0.0  # decoupled weight decay (the paper uses none)
    seed: int = 42  # data order, adapter init, dropout
    max_steps: Optional[int] = None  # stop after this many optimizer steps (overrides epochs)
    eval_limit: Optional[int] = None  # evaluate only the first N records of each task
    eval_mode: str = "generate"  # generate (the authors') | loglik (score each option)
    num_beams: int = 1  # beam width for generate (the authors used 4)
    max_new_tokens: int = 32  # generation budget after "### Response:"
    eval_batch_size: int = 32  # prompts per evaluation batch
    eval_before: bool = False  # also evaluate the model before training (reported as "before")
    mask_prompt: bool = False  # loss only on the response (the authors train on the whole sequence)
    resume: bool = True  # continue from the latest checkpoint in output_dir if there is one
    export_merged: bool = False  # also write the base with adapters merged, in HF layout
    mesh: str = "1x1"  # device mesh "DATAxMODEL" (or "DATAxFSDPxMODEL")
    dtype: str = "float32"  # compute/param dtype of the base: float32 | bfloat16
    cache_dir: Optional[str] = None  # where the embedded model/data are written (default ~/.cache/gralora_jax)
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end and on SIGTERM)
    log_every: int = 10  # steps between metrics.jsonl rows

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {self.method!r}")
        if self.eval_mode not in ("generate", "loglik"):
            raise ValueError(f"--eval-mode must be generate or loglik, got {self.eval_mode!r}")
        if self.optimizer not in ("lion", "adamw", "sgd"):
            raise ValueError(f"--optimizer must be lion, adamw or sgd, got {self.optimizer!r}")
        if self.batch_size < 1 or self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"--batch-size ({self.batch_size}) must be a positive multiple of --micro-batch-size ({self.micro_batch_size})"
            )
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"--max-steps must be >= 0, got {self.max_steps}")
        if self.num_beams < 1:
            raise ValueError(f"--num-beams must be >= 1, got {self.num_beams}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        for t in self.tasks:
            if t not in TASK_LABELS:
                raise ValueError(f"unknown task {t!r}")

    @property
    def grad_accum(self) -> int:
        return self.batch_size // self.micro_batch_size

    @property
    def embedded(self) -> bool:
        return self.model is None


# ----------------------------------------------------------------------------- argparse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.commonsense",
        description=(
            "GraLoRA/LoRA/full fine-tuning on commonsense_170k and evaluation on the eight LLM-Adapters tasks. "
            "With no --model: an embedded tiny random Llama + synthetic data (no network). Unset options take "
            "the paper's values with --model (r=64 alpha=128 k=4 dropout=0.05 lion lr=2e-4 batch 192 cutoff 256 "
            "2 epochs, greedy generation) or small fast ones for the embedded default (r=32 alpha=64 k=2 adamw "
            "lr=5e-3 batch 32 cutoff 128 3 epochs, --mask-prompt, greedy generation with 8 new tokens, and an "
            "evaluation before training too)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    a = p.add_argument
    a("--model", help="HF checkpoint dir, .gguf file or hub id (default: embedded tiny Llama)")
    a("--train-data", help="commonsense_170k .json/.jsonl file or hub dataset id (default: embedded synthetic)")
    a("--eval-dir", help="LLM-Adapters eval layout DIR/<task>/test.json (default: embedded synthetic)")
    a("--tasks", default="all", help=f"comma list of tasks (default all: {','.join(TASKS)})")
    a("--output-dir", default="outputs/commonsense")
    a("--method", choices=METHODS, default="gralora")
    a("--r", type=int, help="rank (paper 64; embedded 32)")
    a("--alpha", type=float, help="alpha (paper 128; embedded 64)")
    a("--k", type=int, help="GraLoRA k (paper 4; embedded 2)")
    a("--hybrid-r", type=int, help="hybrid GraLoRA rank (default 0)")
    a("--dropout", type=float, help="adapter dropout (paper 0.05; embedded 0)")
    a("--target-modules", help=f"comma list (default {','.join(DEFAULT_TARGETS)})")
    a("--lr", type=float, help="peak learning rate (paper 2e-4; embedded 5e-3)")
    a("--epochs", type=float, help="epochs (paper 2; embedded 3)")
    a("--batch-size", type=int, help="global batch (paper 192; embedded 32)")
    a("--micro-batch-size", type=int, help="global micro-batch for gradient accumulation (paper 16; embedded 32)")
    a("--cutoff-len", type=int, help="max tokens per sequence (paper 256; embedded 128)")
    a("--optimizer", choices=("lion", "adamw", "sgd"), help="paper lion (betas 0.9/0.95); embedded adamw")
    a("--warmup-ratio", type=float, help="warmup fraction before cosine decay (default 0.1)")
    a("--weight-decay", type=float, default=0.0)
    a("--seed", type=int, default=42)
    a("--max-steps", type=int, help="stop after N optimizer steps (overrides --epochs)")
    a("--eval-limit", type=int, help="evaluate only the first N records per task")
    a("--eval-mode", choices=("generate", "loglik"),
      help="generate: greedy/beam decoding + answer extraction (authors'; default for both presets); "
           "loglik: score each option's log-likelihood (faster)")
    a("--num-beams", type=int, help="beam width for --eval-mode generate (authors: 4; default 1)")
    a("--max-new-tokens", type=int, help="generation budget (paper 32; embedded 8)")
    a("--eval-batch-size", type=int, help="prompts per evaluation batch")
    a("--eval-before", action=argparse.BooleanOptionalAction, default=None,
      help="also evaluate before training (default: on for embedded, off with --model)")
    a("--mask-prompt", action=argparse.BooleanOptionalAction, default=None,
      help="loss on the response only (default: off with --model, as the authors; on for embedded)")
    a("--resume", action=argparse.BooleanOptionalAction, default=True,
      help="resume from the latest checkpoint in --output-dir if any (default on)")
    a("--export-merged", action="store_true", help="also write base+merged adapters to OUTPUT_DIR/merged (HF layout)")
    a("--mesh", default="1x1", help='device mesh, e.g. "4x2" (data x model); on CPU the host devices are created')
    a("--dtype", choices=("float32", "bfloat16"), help="base dtype (paper bf16; default float32)")
    a("--cache-dir", help="where the embedded model/data go (default ~/.cache/gralora_jax/commonsense)")
    a("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: end and SIGTERM only)")
    a("--log-every", type=int, default=10)
    from gralora_jax.distributed import add_arguments

    add_arguments(p.add_argument_group("multi-process runs"))  # --coordinator-address, --num-processes, --process-id
    return p


def config_from_args(ns: argparse.Namespace) -> ExperimentConfig:
    """Fill unset options from the preset (paper with --model, embedded otherwise)."""
    preset = PAPER if ns.model else EMBEDDED
    v = vars(ns)

    def pick(name, default=None):
        x = v.get(name)
        return x if x is not None else preset.get(name, default)

    targets = tuple(t.strip() for t in ns.target_modules.split(",") if t.strip()) if ns.target_modules else DEFAULT_TARGETS
    return ExperimentConfig(
        model=ns.model, train_data=ns.train_data, eval_dir=ns.eval_dir, tasks=parse_tasks(ns.tasks),
        output_dir=ns.output_dir, method=ns.method, r=pick("r"), alpha=pick("alpha"), k=pick("k"),
        hybrid_r=pick("hybrid_r"), dropout=pick("dropout"), target_modules=targets, lr=pick("lr"),
        epochs=pick("epochs"), batch_size=pick("batch_size"), micro_batch_size=pick("micro_batch_size"),
        cutoff_len=pick("cutoff_len"), optimizer=pick("optimizer"), warmup_ratio=pick("warmup_ratio"),
        weight_decay=ns.weight_decay, seed=ns.seed, max_steps=ns.max_steps, eval_limit=ns.eval_limit,
        eval_mode=pick("eval_mode"), num_beams=pick("num_beams"), max_new_tokens=pick("max_new_tokens"),
        eval_batch_size=pick("eval_batch_size"), eval_before=pick("eval_before"), mask_prompt=pick("mask_prompt"),
        resume=ns.resume, export_merged=ns.export_merged, mesh=ns.mesh, dtype=ns.dtype or "float32",
        cache_dir=ns.cache_dir, checkpoint_every=ns.checkpoint_every, log_every=ns.log_every,
    )


def mesh_size(spec: str) -> int:
    """Devices a mesh string needs: ``"4x2"`` -> 8 (parsed without importing jax)."""
    try:
        parts = [int(x) for x in spec.lower().split("x")]
    except ValueError:
        raise ValueError(f"--mesh must look like 4x2, got {spec!r}") from None
    if not parts or any(n < 1 for n in parts) or len(parts) > 3:
        raise ValueError(f"--mesh must be 1-3 positive sizes like 4x2, got {spec!r}")
    return math.prod(parts)


def main(argv: Sequence[str] | None = None) -> dict:
    ns = build_parser().parse_args(argv)
    n = mesh_size(ns.mesh)
    from gralora_jax import distributed  # imports jax, starts no backend

    # before any backend use: join a multi-process run if launched as one, create CPU host devices
    try:
        dist = distributed.DistributedConfig.from_args(ns)
    except ValueError as e:
        build_parser().error(str(e))
    distributed.initialize(dist, devices=n)
    cfg = config_from_args(ns)
    from experiments.commonsense.run import run  # jax is imported from here on

    return run(cfg)
