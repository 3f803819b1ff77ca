"""The experiment pipeline as steps: prepare -> load -> adapt -> train -> export -> evaluate -> report.

Each step is a small function over plain objects, so a notebook can run them one by one and
look at what each returns::

    from experiments.commonsense.config import make_config
    from experiments.commonsense import run as R

    cfg = make_config(mesh="1x1", max_steps=20, tasks=("boolq",), eval_limit=16)
    inputs = R.prepare(cfg)               # sources, tokenizer, data, mesh; every check that needs no model
    model, params = R.load(inputs)        # the base (dtype, scan/remat/attention options)
    adapted = R.adapt(inputs, model, params)   # adapters + sharding, params placed on the mesh
    trained = R.train(inputs, adapted)    # resumable training; trained.params
    R.export(inputs, adapted, trained.params)  # PEFT adapter (and merged HF checkpoint)
    results = R.evaluate(inputs, adapted, trained.params)
    R.report(inputs, {"after": R.summarize(results)}, results)

:func:`run` does exactly that (plus the evaluation before training when asked). It imports
jax, so the caller sets up host devices first (``cli.main`` does).

Pieces used from the library: ``loading`` (the same ``load_pretrained`` path for the embedded
model and a user's checkpoint), ``surgery.get_gralora_model``, ``sharding``, ``train.Trainer``
(jitted sharded step, orbax checkpoints with the data position, metrics.jsonl) and
``GraLoRAModel.save_pretrained`` (PEFT export). Every file is written through
:mod:`gralora_jax.fileio` (atomic).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from experiments.commonsense import config as config_lib
from experiments.commonsense import data as data_lib
from experiments.commonsense import evaluate as eval_lib
from experiments.commonsense import report as report_lib
from experiments.commonsense.config import ExperimentConfig, UserError
from gralora_jax import fileio

def log(msg: str) -> None:
    """A progress line on process 0; a closed stdout (``| tee`` killed by the same Ctrl-C) is ignored,
    so that it never stops a run from saving its checkpoint."""
    if jax.process_index() == 0:
        try:
            print(msg, flush=True)
        except (OSError, ValueError):  # broken pipe, closed file
            pass


def mesh_context(mesh):
    """``jax.set_mesh(mesh)``: attention kernels that shard themselves (splash on TPU) see the mesh."""
    return jax.set_mesh(mesh)


def show_progress(cfg: ExperimentConfig) -> bool:
    """``--progress`` if given, else on when stderr is a terminal (and only on process 0)."""
    wanted = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    return bool(wanted) and jax.process_index() == 0


class FullModel:
    """Full fine-tuning: the base model itself, with the ``GraLoRAModel`` methods the steps need."""

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
        return contextlib.nullcontext()


# ----------------------------------------------------------------------------- step 1: prepare


@dataclasses.dataclass
class Inputs:
    """Everything a run needs except the model: what :func:`prepare` checked and loaded."""

    cfg: ExperimentConfig  # the settings (micro_batch_size resolved against the mesh)
    model_src: str  # local checkpoint dir or .gguf file (hub ids downloaded)
    train_src: str  # training data file/dir or hub dataset id
    eval_dir: str  # DIR/<task>/test.json
    tokenizer: Any  # the checkpoint's tokenizer (pad token set)
    examples: list  # tokenised training sequences (data.Example)
    eval_sets: dict  # {task: records}
    steps: int  # optimizer steps of the whole run
    mesh: Any  # jax.sharding.Mesh
    resume_step: Optional[int]  # the checkpoint this run continues, or None

    @property
    def out(self) -> str:
        return self.cfg.out_dir


def _embedded_sources(cfg: ExperimentConfig) -> tuple[str, str, str]:
    from experiments.commonsense import embedded

    root = embedded.ensure_embedded(embedded.EmbeddedSpec(seed=0), cfg.cache_dir)
    return (str(root / "model"), cfg.train_data or str(root / "data" / "train.json"),
            cfg.eval_dir or str(root / "data"))


def _make_mesh(cfg: ExperimentConfig):
    from gralora_jax import sharding

    devices = jax.devices()
    if devices[0].platform == "cpu":  # host devices are virtual: a smaller mesh may use the first ones
        devices = devices[: config_lib.mesh_devices(cfg)]
    try:
        return sharding.make_mesh(cfg.mesh, devices)
    except ValueError as e:
        raise UserError(f"--mesh {cfg.mesh}: {e}") from None


def _resolve_model(src: str) -> str:
    from gralora_jax.loading.pretrained import resolve_source

    try:
        return resolve_source(src)
    except FileNotFoundError as e:
        raise UserError(f"--model: {e}") from None


def _check_local(flag: str, path: str) -> None:
    if (os.path.isabs(path) or path.startswith(".") or path.endswith((".json", ".jsonl"))) and not os.path.exists(path):
        raise UserError(f"{flag} {path}: no such file or directory")


def _checkpoint_dir(cfg: ExperimentConfig) -> str:
    return fileio.join(cfg.out_dir, "checkpoints")


def _has_checkpoints(ckpt_dir: str) -> bool:
    p = fileio.as_path(ckpt_dir)
    return p.exists() and any(c.name.isdigit() for c in p.iterdir())


def check_resume(cfg: ExperimentConfig, steps: int) -> Optional[int]:
    """Refuse a resume whose settings differ from the checkpoint's; the step it continues from, or None."""
    ckpt_dir = _checkpoint_dir(cfg)
    if not _has_checkpoints(ckpt_dir):
        return None
    if not cfg.resume:
        raise UserError(f"{ckpt_dir} holds checkpoints but --no-resume was given: choose another --output-dir "
                        "or delete them")
    from experiments.commonsense import resume

    try:
        return resume.check_resume_guard(ckpt_dir, config_lib.resume_guard(cfg, steps))
    except ValueError as e:
        raise UserError(" ".join(str(e).split())) from None


def prepare(cfg: ExperimentConfig) -> Inputs:
    """Mesh, sources, tokenizer, data and resume checks: everything that can fail before a model loads.

    Raises :class:`UserError` (one line naming the flag or file) for every mistake found.
    """
    micro = config_lib.micro_batch_size(cfg)
    cfg = dataclasses.replace(cfg, micro_batch_size=micro)
    mesh = _make_mesh(cfg)
    for flag, path in (("--train-data", cfg.train_data), ("--eval-dir", cfg.eval_dir)):
        if path is not None:
            _check_local(flag, path)
    if cfg.model is None:
        model_src, train_src, eval_dir = _embedded_sources(cfg)
    else:
        model_src, train_src, eval_dir = _resolve_model(cfg.model), cfg.train_data, cfg.eval_dir
    eval_sets = data_lib.load_eval_sets(eval_dir, cfg.tasks, cfg.eval_limit)
    records = data_lib.load_train_records(train_src)
    if len(records) < cfg.batch_size:
        raise UserError(f"{train_src}: {len(records)} training records are fewer than one batch "
                        f"(--batch-size {cfg.batch_size})")
    steps_per_epoch = len(records) // cfg.batch_size
    steps = cfg.max_steps if cfg.max_steps is not None else max(1, int(round(cfg.epochs * steps_per_epoch)))
    resume_step = check_resume(cfg, steps)
    tokenizer = _load_tokenizer(model_src)
    examples = data_lib.tokenize_records(tokenizer, records, cfg.cutoff_len, cfg.mask_prompt)
    return Inputs(cfg, model_src, train_src, eval_dir, tokenizer, examples, eval_sets, steps, mesh, resume_step)


def _load_tokenizer(model_src: str):
    from gralora_jax.loading.pretrained import load_tokenizer

    try:
        tokenizer = load_tokenizer(model_src)
    except (ValueError, OSError) as e:
        raise UserError(f"--model {model_src}: cannot load its tokenizer: {e}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise UserError(f"--model {model_src}: the tokenizer has no EOS token")
    return tokenizer


# ----------------------------------------------------------------------------- step 2: load


def _num_params(shapes) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))


def _is_scanned(params) -> bool:
    try:
        return "scan" in params["model"]["layers"]
    except (KeyError, TypeError):
        return False


def load(inputs: Inputs):
    """``(model, params)`` of the base: ``--dtype`` (float32 params for ``--method full``), model options.

    The params are placed on ``inputs.mesh`` as they are read, each device reading only its shard
    of the checkpoint (:func:`gralora_jax.loading.load_pretrained_sharded`): the one placed copy
    of the base, on every host of a multi-host run."""
    from gralora_jax.loading import pretrained
    from gralora_jax.loading.sharded import load_pretrained_sharded
    from gralora_jax.models import CausalLM
    from gralora_jax.models.inputs import check_token_ids

    cfg = inputs.cfg
    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    param_dtype = jnp.float32 if cfg.method == "full" else dtype
    try:
        # the base as the loaders build it, without model options: its size and kind choose them
        probe = pretrained.prepare(inputs.model_src, dtype=dtype, param_dtype=param_dtype)
        if inputs.examples:  # an id past the vocabulary would give NaN logits inside jit: refuse it here
            check_token_ids(np.concatenate([e.input_ids for e in inputs.examples]), probe.config.vocab_size,
                            what=f"token ids of {inputs.train_src} (tokenizer of {inputs.model_src})")
        ours = isinstance(probe.model, CausalLM)
        opts = config_lib.model_options(cfg, _num_params(probe.shapes), ours,
                                        num_layers=int(getattr(probe.config, "num_hidden_layers", 0) or 0))
        model, params = load_pretrained_sharded(inputs.model_src, inputs.mesh, dtype=dtype, param_dtype=param_dtype,
                                                model_options=opts or None)
    except (ValueError, OSError) as e:  # unsupported architecture, missing/corrupt weights, ...
        if isinstance(e, UserError):
            raise
        raise UserError(f"--model {inputs.model_src}: {e}") from None
    if ours:
        s = model.spec
        log(f"base: {type(model).__name__}, {_num_params(params) / 1e6:.1f}M parameters, {cfg.dtype}, "
            f"scan_layers={s.scan_layers}, remat={s.remat_policy}, attention={s.attn_implementation or 'auto'}")
    return model, params


# ----------------------------------------------------------------------------- step 3: adapt


@dataclasses.dataclass
class Adapted:
    """The model ready to train: adapters added (or the whole base for ``full``), sharded."""

    model: Any  # the base model object
    gm: Any  # GraLoRAModel (adapters) or FullModel
    adapter_config: Any  # GraLoRAConfig / LoRAConfig, None for full fine-tuning
    mask: dict  # trainable leaves
    specs: dict  # partition specs
    params: dict  # all params, placed on the mesh


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


def adapt(inputs: Inputs, model, params) -> Adapted:
    """Add the adapters (``--method``), build the trainable mask and shardings, place params on the mesh."""
    from gralora_jax import sharding
    from gralora_jax.surgery import get_gralora_model

    cfg = inputs.cfg
    acfg = adapter_config(cfg, cfg.model)
    if acfg is None:
        gm = FullModel(model, params)
    else:
        try:
            gm = get_gralora_model(model, acfg, params=params, rng=jax.random.PRNGKey(cfg.seed))
        except (ValueError, TypeError) as e:  # e.g. a --target-modules name the model lacks, k not dividing a width
            raise UserError(f"adapters on {inputs.model_src}: {e}") from None
        if jax.process_index() == 0:
            gm.print_trainable_parameters()
    mask = gm.trainable_mask(full=cfg.method == "full")
    specs = _partition_specs(model, gm.params, inputs)
    placed = sharding.shard_params(gm.params, inputs.mesh, specs)
    return Adapted(model, gm, acfg, mask, specs, placed)


def _partition_specs(model, params, inputs: Inputs) -> dict:
    """Partition specs by the model type's sharding rules (:data:`gralora_jax.sharding.RULES`); a type
    without rules may only run on a data-parallel mesh (replicated), else a one-line error."""
    from gralora_jax import sharding

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        return sharding.param_partition_specs(params, model_type, inputs.mesh)
    except ValueError as e:
        raise UserError(f"--mesh {inputs.cfg.mesh}: {e}") from None


# ----------------------------------------------------------------------------- step 4: train


@dataclasses.dataclass
class Trained:
    params: Any  # all params after training (placed)
    steps: int  # optimizer steps reached
    stop_reason: str  # done | sigint | sigterm | diverged
    seconds: float  # training wall time, summed over every run that resumed this one


def train(inputs: Inputs, adapted: Adapted) -> Trained:
    """Train to ``inputs.steps`` (resuming the output dir's checkpoint); stops early on a signal or divergence."""
    from gralora_jax.distributed import process_batch_slice
    from gralora_jax.optim import OptimConfig
    from gralora_jax.train import TrainConfig, Trainer, make_causal_lm_loss_fn

    cfg = inputs.cfg
    if inputs.steps == 0:
        return Trained(adapted.params, 0, "done", 0.0)
    rows = process_batch_slice(cfg.batch_size) if jax.process_count() > 1 else None
    it = data_lib.BatchIterator(inputs.examples, cfg.batch_size, inputs.tokenizer.pad_token_id,
                                data_lib.buckets(cfg.cutoff_len), seed=cfg.seed, rows=rows)
    optim = OptimConfig(optimizer=cfg.optimizer, learning_rate=cfg.lr, total_steps=inputs.steps,
                        warmup_ratio=cfg.warmup_ratio, schedule="cosine", weight_decay=cfg.weight_decay,
                        b1=0.9, b2=0.95 if cfg.optimizer == "lion" else 0.999)
    tcfg = TrainConfig(steps=inputs.steps, grad_accum=cfg.batch_size // cfg.micro_batch_size, output_dir=inputs.out,
                       seed=cfg.seed, checkpoint_every=cfg.checkpoint_every,
                       checkpoint_minutes=cfg.checkpoint_minutes, log_every=cfg.log_every,
                       progress=show_progress(cfg), tensorboard=False)
    guard = config_lib.resume_guard(cfg, inputs.steps)
    meta = {"adapter_config": adapted.adapter_config.to_peft_dict() if adapted.adapter_config is not None
            else {"method": "full"},
            "base_model": inputs.model_src, "resume_guard": guard,
            "user": {"experiment": "commonsense", "method": cfg.method}}
    # The trainer donates its trainable leaves each step: give it copies so adapted.params stays usable.
    params = jax.tree_util.tree_map(lambda m, x: jnp.copy(x) if m else x, adapted.mask, adapted.params)
    trainer = Trainer(loss_fn=make_causal_lm_loss_fn(adapted.gm, right_padded=True), params=params,
                      mask=adapted.mask, optim=optim, config=tcfg, mesh=inputs.mesh, param_specs=adapted.specs,
                      checkpoint_meta=meta)
    resumed = cfg.resume and trainer.restore(it)
    if resumed:
        log(f"resumed from step {trainer.step} (data position {it.state()})")
    log(f"{len(inputs.examples)} training sequences, {it.steps_per_epoch} steps/epoch, {inputs.steps} steps; "
        f"mesh {dict(inputs.mesh.shape)}, micro-batch {cfg.micro_batch_size}")
    t = time.time()
    with mesh_context(inputs.mesh):
        trainer.fit(it)
    seconds = trainer.train_seconds
    reason = trainer.stop_reason or "done"
    earlier = f", {seconds:.1f}s with the runs it resumed" if resumed else ""
    log(f"trained to step {trainer.step} in {time.time() - t:.1f}s{earlier} ({reason})")
    return Trained(trainer.full_params(), trainer.step, reason, seconds)


# ----------------------------------------------------------------------------- step 5: export


def export(inputs: Inputs, adapted: Adapted, params) -> dict[str, str]:
    """The PEFT adapter (``adapter/``), and the merged base (``merged/``) with ``--export-merged``;
    full fine-tuning writes ``model/``. Returns ``{what: directory}``.

    Every process takes part in gathering what is written (the adapter leaves; the whole tree
    for a merged or full export), process 0 alone writes."""
    from gralora_jax import tree as tree_lib
    from gralora_jax.distributed import gather_to_host, is_main_process

    cfg = inputs.cfg
    written = {}
    trainable, _ = tree_lib.split_trainable(params, adapted.mask)
    finite = jax.jit(lambda t: jax.tree.map(lambda x: jnp.all(jnp.isfinite(x.astype(jnp.float32))), t))(trainable)
    bad = [k for k, v in tree_lib.flatten(finite).items() if not bool(v)]  # replicated scalars: readable anywhere
    if bad:
        raise FloatingPointError(f"refusing to export: {len(bad)} trained tensor(s) hold NaN or Inf (first: {bad[0]})")
    if adapted.adapter_config is not None:
        adapters = gather_to_host(adapted.gm.adapter_params(params))
        dest = fileio.join(inputs.out, "adapter")
        if is_main_process():
            adapted.gm.save_pretrained(dest, params=adapters)
        log(f"adapter (PEFT format) -> {dest}")
        written["adapter"] = dest
    if cfg.export_merged or adapted.adapter_config is None:
        host = gather_to_host(params)
        what = "merged" if adapted.adapter_config is not None else "model"
        dest = fileio.join(inputs.out, what)
        if is_main_process():
            merged = adapted.gm.merge_and_unload(host) if adapted.adapter_config is not None else host
            export_hf(merged, adapted.model.config, dest, inputs.tokenizer)
        log(f"{'merged model' if what == 'merged' else 'model'} (HF layout) -> {dest}")
        written[what] = dest
    return written


def export_hf(params: Mapping[str, Any], model_config, dest: str, tokenizer) -> None:
    """Write ``params`` (no adapter leaves) as an HF checkpoint transformers loads: ``config.json`` (from the
    loaded model's config, so GGUF and hub sources get one too), ``model.safetensors``, the tokenizer.

    The directory is assembled beside ``dest`` and renamed into place, so a reader never sees half of it.
    """
    from gralora_jax.loading import flax_to_torch_state_dict, write_safetensors
    from gralora_jax.models.layout import unstack_layer_params

    if _is_scanned(params):
        params = unstack_layer_params(params)
    tied = bool(getattr(model_config, "tie_word_embeddings", False))
    sd = {k: np.asarray(v) for k, v in flax_to_torch_state_dict(params, tie_word_embeddings=tied).items()}
    if not all(np.isfinite(v.astype(np.float32)).all() for v in sd.values()):
        raise FloatingPointError(f"refusing to export {dest}: the weights hold NaN or Inf")
    config = model_config.to_dict()
    config["torch_dtype"] = str(next(iter(sd.values())).dtype) if sd else "float32"
    if not config.get("architectures"):
        config["architectures"] = [_architecture(model_config)]
    with _staged_dir(dest) as tmp:
        write_safetensors(sd, os.path.join(tmp, "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        fileio.atomic_write_text(os.path.join(tmp, "config.json"), json.dumps(config, indent=2, sort_keys=True))


def _architecture(model_config) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_config.model_type]


@contextlib.contextmanager
def _staged_dir(dest: str):
    """Yield a local temporary directory; on success it replaces ``dest`` (copied there when remote)."""
    if fileio.is_remote(dest):
        tmp = tempfile.mkdtemp(prefix="gralora-export-")
        try:
            yield tmp
            for name in sorted(os.listdir(tmp)):
                with open(os.path.join(tmp, name), "rb") as f:
                    fileio.atomic_write_bytes(fileio.join(dest, name), f.read())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(dest) + ".", dir=parent)
    try:
        yield tmp
        old = None
        if os.path.exists(dest):
            old = tempfile.mkdtemp(prefix=".old-" + os.path.basename(dest) + ".", dir=parent)
            os.replace(dest, os.path.join(old, "x"))
        os.replace(tmp, dest)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- step 6: evaluate


def make_decoder(gm, tokenizer, cfg: ExperimentConfig):
    """``generate_fn(params, ids, mask)``: :func:`gralora_jax.models.generate` (KV cache, ``--num-beams``)
    over the adapted model, ours or a transformers Flax causal LM, with its adapters routed in."""
    from gralora_jax.models import generate

    def wrapper():  # one object: generate() caches its compiled loop per wrapper
        return gm.intercept(False)

    return lambda params, ids, mask: generate(
        gm.model, params, ids, mask, cfg.max_new_tokens, num_beams=cfg.num_beams,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, apply_wrapper=wrapper,
    )


def evaluate(inputs: Inputs, adapted: Adapted, params) -> dict[str, eval_lib.TaskResult]:
    """Accuracy on every task of ``inputs.eval_sets`` by ``--eval-mode``, with ``params`` (placed)."""
    cfg = inputs.cfg
    decoder = make_decoder(adapted.gm, inputs.tokenizer, cfg) if cfg.eval_mode == "generate" else None
    with mesh_context(inputs.mesh):
        return eval_lib.evaluate_all(
            adapted.gm.logits_fn, params, inputs.tokenizer, inputs.eval_sets, mode=cfg.eval_mode,
            batch_size=cfg.eval_batch_size, cutoff_len=max(cfg.cutoff_len, 512), mesh=inputs.mesh,
            generate_fn=decoder, log=log, progress=show_progress(cfg),
        )


summarize = eval_lib.summarize


# ----------------------------------------------------------------------------- step 7: report


def report(inputs: Inputs, results: dict, task_results: Mapping[str, eval_lib.TaskResult] | None = None) -> None:
    """``results.json`` (+ ``predictions/``, ``accuracy.png`` when there are after-training results)."""
    if jax.process_index() != 0:
        return
    out = inputs.out
    if "after" in results:
        results.setdefault("chance", report_lib.chance_levels(inputs.eval_sets))
        results.setdefault("average", results["after"]["average"])
        if task_results is not None:
            report_lib.write_predictions(fileio.join(out, "predictions"), task_results)
        cfg = inputs.cfg
        report_lib.plot(results, fileio.join(out, "accuracy.png"),
                        title=f"{cfg.method} on {'embedded synthetic' if cfg.model is None else cfg.model}")
    fileio.atomic_write_text(fileio.join(out, "results.json"), json.dumps(results, indent=2))


# ----------------------------------------------------------------------------- all of it


def _earlier_results(inputs: Inputs) -> dict:
    path = fileio.join(inputs.out, "results.json")
    try:
        return json.loads(fileio.read_text(path)) if fileio.exists(path) else {}
    except (OSError, ValueError):
        return {}


def run(cfg: ExperimentConfig) -> dict:
    """Every step in order; returns what ``results.json`` holds (``train.stop_reason`` says how training ended)."""
    t0 = time.time()
    inputs = prepare(cfg)
    log(f"model: {inputs.model_src}\ntrain data: {inputs.train_src}\neval dir: {inputs.eval_dir}")
    model, params = load(inputs)
    adapted = adapt(inputs, model, params)
    results: dict[str, Any] = {"config": dataclasses.asdict(inputs.cfg), "model": inputs.model_src,
                               "train_data": inputs.train_src, "eval_dir": inputs.eval_dir}
    if inputs.cfg.eval_before:
        earlier = _earlier_results(inputs) if inputs.resume_step is not None else {}
        if "before" in earlier:  # measured by the run this one resumes
            results["before"] = earlier["before"]
        else:
            log("evaluating before training ...")
            results["before"] = summarize(evaluate(inputs, adapted, adapted.params))
            log(eval_lib.format_table(results["before"], "before training"))
    trained = train(inputs, adapted)
    results["train"] = {"steps": trained.steps, "stop_reason": trained.stop_reason,
                        "seconds": round(trained.seconds, 1)}
    if trained.stop_reason != "done":
        if trained.stop_reason in ("sigint", "sigterm"):
            log(f"stopped by {trained.stop_reason.upper()} at step {trained.steps}: checkpoint saved; "
                "run the same command again to resume")
        report(inputs, results)
        return results
    export(inputs, adapted, trained.params)
    log("evaluating ...")
    task_results = evaluate(inputs, adapted, trained.params)
    results["after"] = summarize(task_results)
    results["seconds"] = round(time.time() - t0, 1)
    report(inputs, results, task_results)
    log(eval_lib.format_table(results["after"], f"{cfg.method}: accuracy after training"))
    log(f"results -> {fileio.join(inputs.out, 'results.json')}, plot -> {fileio.join(inputs.out, 'accuracy.png')}")
    return results
