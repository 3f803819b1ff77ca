"""The experiment pipeline behind the CLI: load -> adapt -> train (resumable) -> evaluate -> report.

``run(ExperimentConfig)`` is importable (tests and notebooks call it directly); it imports
jax, so the caller must have set up host devices first (``cli.main`` does).

Pieces used from the library: ``loading.load_pretrained`` / ``load_tokenizer`` (the same
path for the embedded model and a user's checkpoint), ``surgery.get_gralora_model`` (adapter
leaves beside kernels + interception), ``sharding`` (mesh, rules), ``train.Trainer``
(jitted sharded step, orbax checkpoints with the data position, metrics.jsonl), and
``GraLoRAModel.save_pretrained`` (PEFT export). Evaluation decodes with
``gralora_jax.models.generate`` (KV cache) when the model is one of ours, else with the
cache-less decoder of :mod:`evaluate`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from experiments.commonsense import data as data_lib
from experiments.commonsense import evaluate as eval_lib
from experiments.commonsense import report
from experiments.commonsense.cli import ExperimentConfig


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


class FullModel:
    """Full fine-tuning: the base model itself, with the ``GraLoRAModel`` methods run.py needs."""

    def __init__(self, model, params):
        self.model = model
        self.params = params

    def logits_fn(self, params, input_ids, attention_mask=None, *, dropout_rng=None, train=False, **kw):
        return self.model(input_ids, attention_mask=attention_mask, params=params, dropout_rng=dropout_rng,
                          train=train, **kw).logits

    def trainable_mask(self, full: bool = True, params=None) -> dict:
        from gralora_jax import tree

        return tree.trainable_mask(self.params if params is None else params, full=True)

    def intercept(self, train: bool = False):
        import contextlib

        return contextlib.nullcontext()


def adapter_config(cfg: ExperimentConfig, base_name: str | None):
    from gralora_jax.config import GraLoRAConfig, LoRAConfig

    common = dict(target_modules=tuple(cfg.target_modules), base_model_name_or_path=base_name, task_type="CAUSAL_LM")
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha  # PEFT writes integral alphas as ints
    if cfg.method == "gralora":
        return GraLoRAConfig(r=cfg.r, alpha=alpha, gralora_k=cfg.k, hybrid_r=cfg.hybrid_r,
                             gralora_dropout=cfg.dropout, **common)
    if cfg.method == "lora":
        return LoRAConfig(r=cfg.r, lora_alpha=alpha, lora_dropout=cfg.dropout, **common)
    return None


def resolve_sources(cfg: ExperimentConfig) -> tuple[str, str, str]:
    """(model source, training data source, eval dir); the embedded cache fills what is unset."""
    model, train, ev = cfg.model, cfg.train_data, cfg.eval_dir
    if model is None or train is None or ev is None:
        if model is None:
            from experiments.commonsense import embedded

            root = embedded.ensure_embedded(embedded.EmbeddedSpec(seed=0), cfg.cache_dir)
            model = str(root / "model")
            train = train or str(root / "data" / "train.json")
            ev = ev or str(root / "data")
        elif train is None or ev is None:
            raise ValueError("with --model, give --train-data and --eval-dir too (the synthetic data fits only "
                             "the embedded tokenizer)")
    return model, train, ev


def make_decoder(gm, tokenizer, cfg: ExperimentConfig):
    """A ``generate_fn(params, ids [B,L] right-padded prompts, lengths) -> texts`` or None (use the fallback)."""
    from gralora_jax.models import CausalLM, generate

    if not isinstance(gm.model, CausalLM):
        return None

    def wrapper():  # one object: generate() caches its compiled loop per wrapper
        return gm.intercept(False)

    return lambda params, ids, mask: generate(
        gm.model, params, ids, mask, cfg.max_new_tokens, num_beams=cfg.num_beams,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, apply_wrapper=wrapper,
    )


def run(cfg: ExperimentConfig) -> dict:
    """The whole pipeline; with several processes (``jax.distributed`` started by the CLI) every
    process runs it, process 0 alone writes files, and what is gathered for export/evaluation
    is gathered by all."""
    import contextlib

    from gralora_jax import fileio, sharding
    from gralora_jax.distributed import on_main_process, process_batch_slice
    from gralora_jax.loading.pretrained import load_tokenizer
    from gralora_jax.loading.sharded import load_pretrained_sharded
    from gralora_jax.surgery import get_gralora_model

    t0 = time.time()
    out = fileio.path_str(cfg.output_dir)  # gs://bucket/run keeps its double slash
    on_main_process(fileio.makedirs, out)
    model_src, train_src, eval_dir = resolve_sources(cfg)
    _log(f"model: {model_src}\ntrain data: {train_src}\neval dir: {eval_dir}")

    # --- mesh, then the base placed on it shard by shard (the only placed copy of the base)
    mesh = sharding.make_mesh(cfg.mesh)
    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    model, params = load_pretrained_sharded(model_src, mesh, dtype=dtype)
    tokenizer = load_tokenizer(model_src)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    acfg = adapter_config(cfg, cfg.model)
    if acfg is None:
        gm = FullModel(model, params)
    else:
        gm = get_gralora_model(model, acfg, params=params, rng=jax.random.PRNGKey(cfg.seed))
        gm.print_trainable_parameters()
    mask = gm.trainable_mask(full=cfg.method == "full")

    model_type = getattr(getattr(model, "config", None), "model_type", "default")
    rules = model_type if model_type in sharding.RULES else "default"
    specs = sharding.param_partition_specs(gm.params, rules, mesh)
    dp = sharding.data_parallel_size(mesh)
    if cfg.micro_batch_size % dp:
        raise ValueError(f"--micro-batch-size {cfg.micro_batch_size} must be a multiple of the data-parallel size {dp}")

    # --- data
    records = data_lib.load_train_records(train_src)
    examples = data_lib.tokenize_records(tokenizer, records, cfg.cutoff_len, cfg.mask_prompt)
    rows = process_batch_slice(cfg.batch_size) if jax.process_count() > 1 else None
    it = data_lib.BatchIterator(examples, cfg.batch_size, tokenizer.pad_token_id, data_lib.buckets(cfg.cutoff_len),
                                seed=cfg.seed, rows=rows)
    steps = cfg.max_steps if cfg.max_steps is not None else max(1, int(round(cfg.epochs * it.steps_per_epoch)))
    eval_sets = data_lib.load_eval_sets(eval_dir, cfg.tasks, cfg.eval_limit)
    _log(f"{len(examples)} training sequences, {it.steps_per_epoch} steps/epoch, {steps} steps; mesh {dict(mesh.shape)}")

    decoder = make_decoder(gm, tokenizer, cfg) if cfg.eval_mode == "generate" else None

    def evaluate(p) -> dict[str, eval_lib.TaskResult]:
        return eval_lib.evaluate_all(
            gm.logits_fn, p, tokenizer, eval_sets, mode=cfg.eval_mode, num_beams=cfg.num_beams,
            max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size, cutoff_len=max(cfg.cutoff_len, 512),
            mesh=mesh, generate_fn=decoder, log=_log,
        )

    results: dict[str, Any] = {"config": dataclasses.asdict(cfg), "model": model_src, "train_data": train_src,
                               "eval_dir": eval_dir}
    placed = sharding.shard_params(gm.params, mesh, specs)  # base leaves are already in place: no copy
    # the mesh in context lets attention kernels that need it (splash on TPU) shard themselves
    mesh_ctx = jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else contextlib.nullcontext()
    with mesh_ctx:
        return _train_export_evaluate(cfg, gm, acfg, mask, mesh, specs, placed, it, steps, evaluate, results,
                                      out, model_src, tokenizer, eval_sets, t0)


def _write_json(path: str, obj) -> None:
    from gralora_jax import fileio

    fileio.atomic_write_text(path, json.dumps(obj, indent=2))


def _train_export_evaluate(cfg, gm, acfg, mask, mesh, specs, placed, it, steps, evaluate, results, out, model_src,
                           tokenizer, eval_sets, t0) -> dict:
    from gralora_jax import fileio
    from gralora_jax.distributed import gather_to_host, is_main_process, on_main_process
    from gralora_jax.optim import OptimConfig
    from gralora_jax.train import TrainConfig, Trainer, make_causal_lm_loss_fn

    if cfg.eval_before:
        _log("evaluating before training ...")
        results["before"] = eval_lib.summarize(evaluate(placed))
        _log(eval_lib.format_table(results["before"], "before training"))

    # --- train
    optim = OptimConfig(optimizer=cfg.optimizer, learning_rate=cfg.lr, total_steps=max(steps, 1),
                        warmup_ratio=cfg.warmup_ratio, schedule="cosine", weight_decay=cfg.weight_decay,
                        b1=0.9, b2=0.95 if cfg.optimizer == "lion" else 0.999)
    tcfg = TrainConfig(steps=max(steps, 1), grad_accum=cfg.grad_accum, output_dir=out, seed=cfg.seed,
                       checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every, progress=False,
                       tensorboard=False)
    ckpt_dir = fileio.as_path(out) / "checkpoints"
    if not cfg.resume and ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        raise ValueError(f"{ckpt_dir} holds checkpoints but --no-resume was given: choose another --output-dir "
                         "or delete them")
    trained = placed
    if steps > 0:
        meta = {"adapter_config": acfg.to_peft_dict() if acfg is not None else {"method": "full"},
                "base_model": model_src, "user": {"experiment": "commonsense", "method": cfg.method}}
        trainer = Trainer(loss_fn=make_causal_lm_loss_fn(gm, model_dropout=False), params=placed, mask=mask,
                          optim=optim, config=tcfg, mesh=mesh, param_specs=specs, checkpoint_meta=meta)
        if cfg.resume and trainer.restore(it):
            _log(f"resumed from step {trainer.step} (data position {it.state()})")
        t_train = time.time()
        trainer.fit(it)
        results["train"] = {"steps": trainer.step, "stop_reason": trainer.stop_reason,
                            "seconds": round(time.time() - t_train, 1)}
        _log(f"trained to step {trainer.step} in {time.time() - t_train:.1f}s ({trainer.stop_reason})")
        trained = trainer.full_params()
        if trainer.stop_reason != "done":
            _log("stopped before the end (SIGTERM): checkpoint saved; run again to resume")
            on_main_process(_write_json, fileio.join(out, "results.json"), results)
            return results

    # --- export: gather (all processes), write (process 0)
    if acfg is not None:
        adapters = gather_to_host(gm.adapter_params(trained))
        on_main_process(gm.save_pretrained, fileio.join(out, "adapter"), params=adapters)
        _log(f"adapter (PEFT format) -> {fileio.join(out, 'adapter')}")
    if cfg.export_merged or acfg is None:
        host = gather_to_host(trained)
        dest = fileio.join(out, "merged" if acfg is not None else "model")
        if is_main_process():
            export_hf(gm.merge_and_unload(host) if acfg is not None else host, model_src, pathlib.Path(dest), tokenizer)
        _log(f"{'merged model' if acfg is not None else 'model'} (HF layout) -> {dest}")

    # --- evaluate
    _log("evaluating ...")
    res = evaluate(trained)
    results["after"] = eval_lib.summarize(res)
    results["average"] = results["after"]["average"]
    results["chance"] = report.chance_levels(eval_sets)
    results["seconds"] = round(time.time() - t0, 1)
    if is_main_process():
        report.write_predictions(fileio.join(out, "predictions"), res)
        _write_json(fileio.join(out, "results.json"), results)
        report.plot(results, fileio.join(out, "accuracy.png"),
                    title=f"{cfg.method} on {'embedded synthetic' if cfg.model is None else cfg.model}")
    _log(eval_lib.format_table(results["after"], f"{cfg.method}: accuracy after training"))
    _log(f"results -> {fileio.join(out, 'results.json')}, plot -> {fileio.join(out, 'accuracy.png')}")
    return results


def export_hf(params: Mapping[str, Any], model_src: str, dest: pathlib.Path, tokenizer) -> None:
    """Write ``params`` (no adapter leaves) as an HF checkpoint: config.json, model.safetensors, tokenizer."""
    from gralora_jax.loading import flax_to_torch_state_dict, write_safetensors

    dest.mkdir(parents=True, exist_ok=True)
    cfg_file = pathlib.Path(model_src) / "config.json"
    tied = False
    if cfg_file.exists():
        shutil.copy(cfg_file, dest / "config.json")
        tied = bool(json.loads(cfg_file.read_text()).get("tie_word_embeddings", False))
    sd = flax_to_torch_state_dict(params, tie_word_embeddings=tied)
    write_safetensors({k: np.asarray(v) for k, v in sd.items()}, dest / "model.safetensors")
    tokenizer.save_pretrained(dest)
