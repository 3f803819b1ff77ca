"""The experiment's settings as data: one frozen dataclass, its flags, its presets, its checks.

Every setting is one field of :class:`ExperimentConfig`. A field's metadata carries its help
text, its value in the paper preset (when it differs from the embedded one) and its bounds,
and everything else is generated from that: the argparse options (:func:`add_arguments`,
``--name-with-dashes`` for ``name_with_dashes``; booleans get ``--x/--no-x``), the presets
(:data:`PAPER`, :data:`EMBEDDED`) and the validation (:func:`validate`, run by the
constructor), so an option is written once.

Presets are overlays. The dataclass defaults *are* the embedded preset (the tiny model and
synthetic data built when ``model`` is None); :func:`make_config` lays the paper's values over
them when ``model`` is given, then the caller's values over that::

    >>> make_config(mesh="4x2").r
    32
    >>> cfg = make_config(model="./ckpt", train_data="train.json", eval_dir="eval", r=16)
    >>> cfg.r, cfg.alpha, cfg.dtype, cfg.given
    (16, 128.0, 'bfloat16', ('eval_dir', 'model', 'r', 'train_data'))
    >>> try:
    ...     make_config(lr=float("nan"))
    ... except UserError as e:
    ...     print(e)
    --lr must be a finite number > 0, got nan

This module imports neither jax nor the jax parts of the library (``--help`` and parse errors
stay fast): the mesh string is read by the jax-free :mod:`gralora_jax.meshspec`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from typing import Any, Optional

from experiments.commonsense.tasks import TASKS, parse_tasks
from gralora_jax import meshspec

METHODS = ("gralora", "lora", "full")
OPTIMIZERS = ("lion", "adamw", "sgd")
EVAL_MODES = ("generate", "loglik")
DTYPES = ("float32", "bfloat16")
ATTENTION = ("auto", "xla", "cudnn", "splash")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# "auto" or one of gralora_jax.models.spec.REMAT_POLICIES (checked in validate: importing the
# library here would make --help slow).
REMAT_AUTO = "auto"

# Thresholds of the automatic --scan-layers / --remat choice (see model_options).
SCAN_FROM_LAYERS = 24
REMAT_FROM_PARAMS = 3e9
AUTO_RULE = (
    f"auto: scan for a model of >= {SCAN_FROM_LAYERS} layers (scan keeps compile time flat in depth: on an H200 "
    "the unrolled 30-layer SmolLM2-135M train step compiled in 68-168 s, scanned in 14-19 s; unrolled steps are "
    "faster, so shallower models stay unrolled: the 16-layer Llama-3.2-1B step at 16x256 with dropout ran 78.9 ms "
    "unrolled (31 s compile) against 94.2 ms scanned), "
    f"remat 'full' from {REMAT_FROM_PARAMS:.0e} parameters (activations of an 8B model at batch 16x256 need it on "
    "one 80-141 GB accelerator); both off below, and off for models gralora_jax.models does not implement"
)


class UserError(ValueError):
    """A mistake in the command line, a file or the environment: reported as one ``error:`` line, exit 2."""


_NO_PAPER = object()


def _opt(default, help: str, *, paper=_NO_PAPER, choices=None, low=None, low_open=False, high=None,
         high_open=False, parse=None, metavar=None, cli=True):
    """A field with its help, paper-preset value, choices, bounds and flag parser as metadata."""
    meta = dict(help=help, paper=paper, choices=choices, low=low, low_open=low_open, high=high,
                high_open=high_open, parse=parse, metavar=metavar, cli=cli)
    return dataclasses.field(default=default, metadata=meta)


def _comma_list(text: str) -> tuple[str, ...]:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _task_list(text: str) -> tuple[str, ...]:
    try:
        return parse_tasks(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Settings of one run. Defaults are the embedded preset; build with :func:`make_config` for presets."""

    # -- what to train on
    model: Optional[str] = _opt(None, "HF checkpoint dir, .gguf file or hub id; unset: the embedded tiny "
                                      "random Llama (and the paper preset for every unset option when set)")
    train_data: Optional[str] = _opt(None, "commonsense_170k .json/.jsonl file or hub dataset id (needed with "
                                           "--model; default: embedded synthetic data)")
    eval_dir: Optional[str] = _opt(None, "LLM-Adapters evaluation layout DIR/<task>/test.json (needed with "
                                         "--model; default: embedded synthetic data)")
    tasks: tuple[str, ...] = _opt(TASKS, "comma list of tasks to evaluate, or 'all'", parse=_task_list,
                                  metavar="LIST")
    output_dir: Optional[str] = _opt(None, "where checkpoints, metrics, the adapter and results go "
                                           "(default outputs/commonsense-METHOD)")
    cache_dir: Optional[str] = _opt(None, "where the embedded model and data are written "
                                          "(default ~/.cache/gralora_jax/commonsense)")
    # -- adapter
    method: str = _opt("gralora", "what to train", choices=METHODS)
    r: int = _opt(32, "adapter rank (GraLoRA: PEFT's r, the LoRA-equivalent parameter budget)", paper=64, low=1)
    alpha: float = _opt(64.0, "scaling numerator (GraLoRA: alpha/(r+hybrid_r); LoRA: alpha/r)", paper=128.0,
                        low=0, low_open=True)
    k: int = _opt(2, "GraLoRA blocks per side (r must be divisible by k)", paper=4, low=1)
    hybrid_r: int = _opt(0, "rank of GraLoRA's shared plain-LoRA path", low=0)
    dropout: float = _opt(0.0, "adapter dropout during training", paper=0.05, low=0, high=1, high_open=True)
    target_modules: tuple[str, ...] = _opt(DEFAULT_TARGETS, "comma list of module names that get adapters",
                                           parse=_comma_list, metavar="LIST")
    # -- optimisation
    lr: float = _opt(5e-3, "peak learning rate", paper=2e-4, low=0, low_open=True)
    epochs: float = _opt(3.0, "passes over the training data (fractions allowed)", paper=2.0, low=0, low_open=True)
    max_steps: Optional[int] = _opt(None, "stop after this many optimizer steps (replaces --epochs; 0: no "
                                          "training)", low=0)
    batch_size: int = _opt(32, "global batch: sequences per optimizer step", paper=192, low=1)
    micro_batch_size: Optional[int] = _opt(
        None, "sequences per forward/backward over the whole mesh (batch/micro = gradient accumulation); "
              "default: the largest divisor of --batch-size that is at most 16 (with --model) or 32 "
              "(embedded) and a multiple of the mesh's data-parallel size", low=1)
    cutoff_len: int = _opt(128, "max tokens per training sequence (longer ones are truncated)", paper=256, low=2)
    optimizer: str = _opt("adamw", "lion uses betas 0.9/0.95, adamw 0.9/0.999", paper="lion", choices=OPTIMIZERS)
    warmup_ratio: float = _opt(0.1, "linear warmup fraction of the steps, then cosine decay to 0", low=0, high=1)
    weight_decay: float = _opt(0.0, "decoupled weight decay (the paper uses none)", low=0)
    seed: int = _opt(42, "data order, adapter init, dropout", low=0)
    mask_prompt: bool = _opt(True, "loss on the response tokens only (the authors train on the whole sequence)",
                             paper=False)
    # -- model execution
    dtype: str = _opt("float32", "dtype of the frozen base (adapters, their optimizer state and full "
                                 "fine-tuning's weights stay float32)", paper="bfloat16", choices=DTYPES)
    scan_layers: Optional[bool] = _opt(None, "nn.scan over the decoder layers; " + AUTO_RULE)
    remat: str = _opt(REMAT_AUTO, "per-layer rematerialisation policy: auto, none, full, or a "
                                  "jax.checkpoint_policies name (dots_saveable, nothing_saveable, ...)")
    attn: str = _opt("auto", "attention kernel; auto: cuDNN flash attention on GPU in bf16 where it applies, "
                             "XLA elsewhere", choices=ATTENTION)
    mesh: str = _opt("1x1", "device mesh DATAxMODEL or DATAxFSDPxMODEL; on CPU the host devices are created",
                     metavar="DxM")
    # -- evaluation
    eval_mode: str = _opt("generate", "generate: decode and take the first answer word (the authors'); "
                                      "loglik: score each option's log-likelihood", choices=EVAL_MODES)
    eval_limit: Optional[int] = _opt(None, "evaluate only the first N records of each task", low=1)
    num_beams: int = _opt(1, "beam width for generate (the authors used 4)", low=1)
    max_new_tokens: int = _opt(8, "generation budget after '### Response:'", paper=32, low=1)
    eval_batch_size: int = _opt(64, "prompts per evaluation batch", paper=32, low=1)
    eval_before: bool = _opt(True, "also evaluate the untrained model (reported as 'before')", paper=False)
    # -- run control
    resume: bool = _opt(True, "continue from the latest checkpoint in the output dir when there is one")
    export_merged: bool = _opt(False, "also write the base with the adapter merged, as an HF checkpoint "
                                      "(OUTPUT_DIR/merged)")
    checkpoint_every: int = _opt(0, "steps between checkpoints (0: none by step count; see --checkpoint-minutes)",
                                 low=0)
    checkpoint_minutes: float = _opt(15.0, "also checkpoint once this many minutes have passed since the last "
                                           "checkpoint, so a preempted run loses at most about that much "
                                           "(0: only by --checkpoint-every, at the end and on SIGINT/SIGTERM)",
                                     low=0, metavar="MIN")
    log_every: int = _opt(10, "steps between metrics.jsonl rows", low=1)
    progress: Optional[bool] = _opt(None, "progress bars for training and evaluation (default: on when "
                                          "stderr is a terminal)")
    given: tuple[str, ...] = _opt((), "the fields set explicitly (by flags or make_config)", cli=False)

    def __post_init__(self):
        validate(self)

    @property
    def embedded(self) -> bool:
        """True when the embedded tiny model is used (no ``model``)."""
        return self.model is None

    @property
    def out_dir(self) -> str:
        """``output_dir``, or ``outputs/commonsense-<method>`` so the methods' runs never collide."""
        return self.output_dir or f"outputs/commonsense-{self.method}"


FIELDS = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
PAPER: dict[str, Any] = {n: f.metadata["paper"] for n, f in FIELDS.items() if f.metadata["paper"] is not _NO_PAPER}
EMBEDDED: dict[str, Any] = {n: FIELDS[n].default for n in PAPER}
MICRO_BATCH_CAP = {"paper": 16, "embedded": 32}  # the automatic --micro-batch-size's upper bound per preset


def flag(name: str) -> str:
    """The command-line spelling of a field: ``"batch_size"`` -> ``"--batch-size"``."""
    return "--" + name.replace("_", "-")


def _base_type(name: str):
    hint = typing.get_type_hints(ExperimentConfig)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union else hint


# ----------------------------------------------------------------------------- construction


def make_config(**overrides) -> ExperimentConfig:
    """The embedded preset, the paper preset over it when ``model`` is given, ``overrides`` over both."""
    unknown = set(overrides) - set(FIELDS) - {"given"}
    if unknown:
        raise UserError(f"unknown setting(s) {sorted(unknown)}")
    preset = PAPER if overrides.get("model") else {}
    given = tuple(sorted(set(overrides) - {"given"}))
    return ExperimentConfig(**{**preset, **overrides, "given": given})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per field (unset options are absent from the namespace: the preset decides)."""
    for name, f in FIELDS.items():
        m = f.metadata
        if not m["cli"]:
            continue
        typ = _base_type(name)
        default = "all" if f.default == TASKS else ",".join(f.default) if isinstance(f.default, tuple) else f.default
        shown = default if name not in PAPER else f"{default} embedded, {PAPER[name]} with --model"
        help_ = m["help"] + ("" if f.default is None else f" (default: {shown})")
        kw: dict[str, Any] = dict(default=argparse.SUPPRESS, help=help_, dest=name)
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = m["parse"] or typ
            if m["choices"]:
                kw["choices"] = m["choices"]
            if m["metavar"]:
                kw["metavar"] = m["metavar"]
        parser.add_argument(flag(name), **kw)


def from_namespace(ns: argparse.Namespace) -> ExperimentConfig:
    """:func:`make_config` of the options present in ``ns`` (argparse built by :func:`add_arguments`)."""
    return make_config(**{k: v for k, v in vars(ns).items() if k in FIELDS})


# ----------------------------------------------------------------------------- validation


def _check_bounds(name: str, value: Any) -> None:
    m = FIELDS[name].metadata
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, high = m["low"], m["high"]
    parts = []
    if low is not None:
        parts.append(f"{'>' if m['low_open'] else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if m['high_open'] else '<='} {high:g}")
    bad = not math.isfinite(value)
    bad |= low is not None and (value <= low if m["low_open"] else value < low)
    bad |= high is not None and (value >= high if m["high_open"] else value > high)
    if bad:
        what = "a finite number" if isinstance(value, float) or _base_type(name) is float else "an integer"
        raise UserError(f"{flag(name)} must be {what} {' and '.join(parts)}, got {value}".replace("  ", " "))


def validate(cfg: ExperimentConfig) -> None:
    """Every check that needs neither the model nor the devices; raises :class:`UserError` naming the flag."""
    for name, f in FIELDS.items():
        value = getattr(cfg, name)
        typ = _base_type(name)
        if value is None:
            if f.default is not None:
                raise UserError(f"{flag(name)} needs a value")
            continue
        if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise UserError(f"{flag(name)} must be an integer, got {value!r}")
        if typ is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UserError(f"{flag(name)} must be a number, got {value!r}")
        if f.metadata["choices"] and value not in f.metadata["choices"]:
            raise UserError(f"{flag(name)} must be one of {', '.join(f.metadata['choices'])}; got {value!r}")
        _check_bounds(name, value)
    for t in cfg.tasks:
        try:
            parse_tasks(t)
        except ValueError as e:
            raise UserError(f"--tasks: {e}") from None
    if not cfg.tasks:
        raise UserError("--tasks names no task")
    if not cfg.target_modules:
        raise UserError("--target-modules names no module")
    if cfg.remat != REMAT_AUTO:
        from gralora_jax.models.spec import REMAT_POLICIES  # only when the value needs checking

        if cfg.remat not in REMAT_POLICIES:
            raise UserError(f"--remat must be auto or one of {', '.join(REMAT_POLICIES)}; got {cfg.remat!r}")
    if cfg.method == "gralora" and cfg.r % cfg.k:
        raise UserError(f"--r ({cfg.r}) must be divisible by --k ({cfg.k}) for GraLoRA")
    if cfg.micro_batch_size is not None and cfg.batch_size % cfg.micro_batch_size:
        raise UserError(f"--batch-size ({cfg.batch_size}) must be a multiple of --micro-batch-size "
                        f"({cfg.micro_batch_size})")
    if cfg.model is not None and (cfg.train_data is None or cfg.eval_dir is None):
        raise UserError("with --model, give --train-data and --eval-dir too (the embedded synthetic data fits "
                        "only the embedded tokenizer)")
    _check_mesh(cfg.mesh)


def _check_mesh(spec: str) -> str:
    """``spec`` if it is a mesh string (:func:`gralora_jax.meshspec.parse_mesh`), else :class:`UserError`."""
    try:
        meshspec.parse_mesh(spec)
        return spec
    except ValueError:
        raise UserError(f"--mesh must be DATAxMODEL or DATAxFSDPxMODEL with positive sizes (e.g. 4x2, 2x2x2), "
                        f"got {spec!r}") from None


# ----------------------------------------------------------------------------- values resolved against the mesh / model


def data_parallel_size(cfg: ExperimentConfig) -> int:
    """Sequences are split over the data (and FSDP) axes of ``--mesh``."""
    return meshspec.data_parallel_size(_check_mesh(cfg.mesh))


def mesh_devices(cfg: ExperimentConfig) -> int:
    """How many devices ``--mesh`` uses."""
    return meshspec.mesh_size(_check_mesh(cfg.mesh))


def micro_batch_size(cfg: ExperimentConfig) -> int:
    """The micro-batch the run uses: ``--micro-batch-size`` checked against the mesh, or chosen to fit it.

    Errors name only the flags the user set (or the preset a value came from).
    """
    dp = data_parallel_size(cfg)
    preset = "embedded" if cfg.embedded else "paper"
    where = lambda name: flag(name) if name in cfg.given else f"{flag(name)} (the {preset} preset's)"  # noqa: E731
    if cfg.batch_size % dp:
        raise UserError(f"{where('batch_size')} {cfg.batch_size} is not divisible by the data-parallel size {dp} of "
                        f"--mesh {cfg.mesh}: choose a batch size that is a multiple of {dp}, or another mesh")
    if cfg.micro_batch_size is not None:
        if cfg.micro_batch_size % dp:
            raise UserError(f"--micro-batch-size {cfg.micro_batch_size} is not divisible by the data-parallel "
                            f"size {dp} of --mesh {cfg.mesh}")
        return cfg.micro_batch_size
    cap = max(MICRO_BATCH_CAP[preset], dp)
    return max(m for m in range(dp, cfg.batch_size + 1, dp) if cfg.batch_size % m == 0 and m <= cap)


def model_options(cfg: ExperimentConfig, num_params: int, ours: bool, num_layers: int = 0) -> dict[str, Any]:
    """``scan_layers`` / ``remat_policy`` / ``attn_implementation`` for the model (the auto rule: AUTO_RULE).

    ``ours``: the model is a :mod:`gralora_jax.models` class (the only ones with these options);
    asking for them explicitly on another model is an error.

    >>> model_options(make_config(), 10**6, True)
    {'scan_layers': False, 'remat_policy': 'none', 'attn_implementation': None}
    >>> model_options(make_config(), 8 * 10**9, True, num_layers=32)
    {'scan_layers': True, 'remat_policy': 'full', 'attn_implementation': None}
    >>> model_options(make_config(), 1_235_814_400, True, num_layers=16)["scan_layers"]
    False
    >>> model_options(make_config(), 135 * 10**6, True, num_layers=30)["scan_layers"]
    True
    """
    if not ours:
        explicit = [flag(n) for n in ("scan_layers", "remat", "attn") if n in cfg.given
                    and getattr(cfg, n) not in (False, "none", "auto", REMAT_AUTO)]
        if explicit:
            raise UserError(f"{', '.join(explicit)} need a model type that gralora_jax.models implements; "
                            "this checkpoint loads as a transformers Flax model")
        return {}
    scan = cfg.scan_layers if cfg.scan_layers is not None else num_layers >= SCAN_FROM_LAYERS
    remat = cfg.remat if cfg.remat != REMAT_AUTO else ("full" if num_params >= REMAT_FROM_PARAMS else "none")
    return {"scan_layers": bool(scan), "remat_policy": remat,
            "attn_implementation": None if cfg.attn == "auto" else cfg.attn}


def resume_guard(cfg: ExperimentConfig, steps: int) -> dict[str, Any]:
    """The settings a resumed run must share with the checkpoint it continues (schedule, data, adapter)."""
    keys = ("model", "train_data", "method", "r", "alpha", "k", "hybrid_r", "dropout", "target_modules", "lr",
            "epochs", "max_steps", "batch_size", "cutoff_len", "optimizer", "warmup_ratio", "weight_decay", "seed",
            "mask_prompt")
    guard = {k: getattr(cfg, k) for k in keys}
    guard["target_modules"] = list(cfg.target_modules)
    guard["steps"] = steps
    return guard
