"""``python -m experiments.commonsense``: fine-tune on commonsense data, evaluate the eight tasks.

Embedded default (no network, a couple of minutes on a 2-core CPU): a tiny random Llama
with a word-level tokenizer and synthetic LLM-Adapters-format data, written once to a
cache dir in HF layout and loaded through the same ``load_pretrained`` as a real model::

    python -m experiments.commonsense --mesh 4x2
    python -m experiments.commonsense --mesh 4x2 --method lora
    python -m experiments.commonsense --mesh 4x2 --method full --output-dir outputs/cs_full

The paper's setting (defaults switch to it when ``--model`` is given: r=64, alpha=128,
k=4, dropout 0.05, q,k,v,o,gate,up,down, Lion 0.9/0.95, lr 2e-4, warmup 0.1 + cosine,
cutoff 256, global batch 192, 2 epochs, greedy generation, base in bfloat16 with float32
adapters and optimizer state; scan and remat chosen by model size)::

    python -m experiments.commonsense --mesh 4x2 --model Qwen/Qwen2.5-1.5B \\
        --train-data commonsense_170k.json --eval-dir LLM-Adapters/dataset \\
        --output-dir outputs/qwen1.5b_gralora
    python -m experiments.commonsense --mesh 8x1 --model meta-llama/Llama-3.2-3B \\
        --train-data zwhe99/commonsense_170k --eval-dir LLM-Adapters/dataset --method lora --r 64 --alpha 128
    python -m experiments.commonsense --mesh 4x2 --model ./my-llama --train-data commonsense_170k.json \\
        --eval-dir LLM-Adapters/dataset --tasks boolq,piqa --eval-mode loglik --max-steps 100 --eval-limit 200

Outputs in ``--output-dir`` (default ``outputs/commonsense-METHOD``): ``metrics.jsonl``
(training), ``checkpoints/`` (resumed automatically when present, if the settings match),
``adapter/`` (PEFT ``adapter_config.json`` + ``adapter_model.safetensors``; ``full``:
``model/`` in HF layout), ``merged/`` with ``--export-merged``, ``predictions/<task>.json``,
``results.json`` and ``accuracy.png``.

Exit status: 0 done; 2 a usage, file or data error (one ``error:`` line, found before any
model is loaded where possible); 130 stopped by SIGINT (Ctrl-C) and 143 by SIGTERM, both
after saving a checkpoint (run the same command again to resume); 1 training diverged
(nothing non-finite is saved) or an unexpected failure.

Nothing here imports jax before the mesh is known: ``main`` parses the flags first and makes
enough CPU host devices for ``--mesh`` before jax starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from typing import Sequence

from experiments.commonsense import config as config_lib
from experiments.commonsense.config import ExperimentConfig, UserError

USAGE_ERROR = 2
FAILURE = 1


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser, generated from :class:`ExperimentConfig` (one option per field)."""

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, status 2, no usage dump
            raise UserError(message)

    p = Parser(
        prog="python -m experiments.commonsense",
        description=textwrap.fill(
            "GraLoRA/LoRA/full fine-tuning on commonsense_170k and evaluation on the eight LLM-Adapters tasks. "
            "With no --model: an embedded tiny random Llama + synthetic data (no network). Unset options take "
            "the paper preset's value with --model and the embedded preset's otherwise (both shown per option).",
            width=100),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    config_lib.add_arguments(p)
    from gralora_jax.distributed import add_arguments as add_distributed_arguments  # imports jax, starts no backend

    add_distributed_arguments(p.add_argument_group(
        "multi-process runs", "TPU pod slices (python -m tpu_setup launch) need none of these: the workers find "
                              "each other by themselves"))
    return p


def parse(argv: Sequence[str] | None = None) -> ExperimentConfig:
    """The config for a command line (presets applied, validated); :class:`UserError` on a mistake."""
    return config_lib.from_namespace(build_parser().parse_args(argv))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _remove_if_empty(path: str, existed: bool) -> None:
    """Remove the directories a failed run created under ``path`` if nothing was written into them."""
    if existed or "://" in path or not os.path.isdir(path):
        return
    for root, _dirs, _files in sorted(os.walk(path), key=lambda t: -len(t[0])):
        try:
            os.rmdir(root)  # only succeeds when empty
        except OSError:
            pass


def start_processes(ns: argparse.Namespace, devices: int) -> None:
    """Before any backend use: join a multi-process run when launched as one (TPU metadata,
    ``GRALORA_DISTRIBUTED=1`` or the flags) and create this process's CPU host devices for ``--mesh``."""
    from gralora_jax import distributed

    try:
        distributed.initialize(distributed.DistributedConfig.from_args(ns), devices=devices)
    except ValueError as e:  # the flags or --mesh; a failed connection keeps its traceback
        raise UserError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the experiment for ``argv``; returns the exit status (see the module docstring)."""
    out_dir, existed = None, True
    try:
        ns = build_parser().parse_args(argv)
        cfg = config_lib.from_namespace(ns)
        out_dir = cfg.out_dir
        existed = os.path.exists(out_dir)
        config_lib.micro_batch_size(cfg)  # batch vs micro-batch vs mesh: checked before any device exists
        start_processes(ns, config_lib.mesh_devices(cfg))
        from experiments.commonsense import run as run_lib  # jax is imported from here on

        results = run_lib.run(cfg)
        reason = results["train"]["stop_reason"]
        if reason == "diverged":
            raise FloatingPointError(f"training diverged at step {results['train']['steps']}; the last finite "
                                     "state is the checkpoint, nothing was exported")
        from gralora_jax.train import exit_code

        return exit_code(reason)
    except UserError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
        return USAGE_ERROR
    except FloatingPointError as e:  # divergence: nothing non-finite was saved
        print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
        return FAILURE
    except KeyboardInterrupt:
        print("interrupted (SIGINT)", file=sys.stderr, flush=True)
        return 130
    finally:
        if out_dir is not None:
            _remove_if_empty(out_dir, existed)


def entry() -> None:
    """``python -m experiments.commonsense``: :func:`main` with the process exit status."""
    sys.exit(main())
