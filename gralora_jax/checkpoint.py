"""Train-state checkpoints with orbax: save async, keep the last N, restore strictly.

A checkpoint holds everything needed to continue *exactly*: the trainable params (the
adapters, or everything for full fine-tuning), the optimizer state, the step, the rng and
the data iterator's position, plus metadata JSON: the adapter config (PEFT dict), the base
model's identity (name/path and a hash of all parameter paths/shapes/dtypes), the mesh and
a user dict. The frozen base is never written: it is reloaded from its own checkpoint.

The state pytree is stored leaf by leaf (``leaf_00000`` ...) and the metadata records each
leaf's key path, shape and dtype. Restoring first reads only the metadata and compares it
with the template state: any difference in config, base identity, leaf paths, shapes or
dtypes raises ``ValueError`` before a single array is read, so nothing is half-loaded.
Arrays are restored straight into the template's shardings (any mesh).

Nothing non-finite is ever written: :meth:`Checkpointer.save` refuses a state with a NaN/Inf
leaf (``FloatingPointError``). A checkpoint that cannot be read, or that holds non-finite
values (written by an older version), is *corrupt*: :meth:`Checkpointer.restore_latest`
warns, deletes it and falls back to the previous good step, so keep at least two.

A *resume guard* is a caller-chosen dict of settings that must not change across a resume
(schedule length, learning rate, batch size, ...). It is stored in the metadata and
:func:`compare_resume_guard` compares it with the current one from the metadata alone, before
any model or train step exists; :meth:`Checkpointer.restore` checks it too.

>>> ckpt = Checkpointer("/tmp/run/ckpt", keep=2, adapter_config={"r": 8})  # doctest: +SKIP
>>> ckpt.save(state, data_state={"epoch": 0, "index": 96})                  # doctest: +SKIP
>>> state, data_state = ckpt.restore_latest(template_state)                 # doctest: +SKIP

``directory`` may be local or any path etils/orbax understands (``gs://bucket/run``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from gralora_jax import fileio
from gralora_jax import tree as tree_lib

FORMAT = "gralora_jax.train_state/1"


MIN_KEEP = 2  # a corrupt latest checkpoint needs a previous one to fall back to


class CorruptCheckpointError(ValueError):
    """A checkpoint step that cannot be read or holds non-finite values (restore falls back past it)."""


def _abs(directory) -> str:
    return fileio.path_str(directory) if fileio.is_remote(directory) else os.path.abspath(os.fspath(directory))


def _finite_flags(leaves: list) -> jax.Array:
    """One bool per leaf: all elements finite (non-float leaves are always finite)."""
    return jnp.stack([jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
                      for x in leaves])


def nonfinite_leaves(tree: Any) -> list[str]:
    """Key paths of the leaves of ``tree`` holding a NaN or Inf (one small device reduction,
    replicated over the leaves' mesh so every process can read it)."""
    with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
    if not with_path:
        return []
    leaves = [v for _, v in with_path]
    sharding = getattr(leaves[0], "sharding", None)
    out = (jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
           if isinstance(sharding, jax.sharding.NamedSharding) else None)
    with jax.transfer_guard_device_to_host("allow"):
        flags = np.asarray(jax.device_get(jax.jit(_finite_flags, out_shardings=out)(leaves)))
    return [jax.tree_util.keystr(k) for (k, _), ok in zip(with_path, flags) if not ok]


GUARD_UNSET = "<unset>"  # a guard key one side lacks


def guard_changes(saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None) -> list[tuple[str, Any, Any]]:
    """``[(key, saved value, current value), ...]`` for every key whose value differs (JSON-normalised;
    a missing key reads :data:`GUARD_UNSET`), sorted by key."""
    a, b = _jsonable(dict(saved or {})), _jsonable(dict(current or {}))
    return [(k, a.get(k, GUARD_UNSET), b.get(k, GUARD_UNSET)) for k in sorted(set(a) | set(b))
            if a.get(k, GUARD_UNSET) != b.get(k, GUARD_UNSET)]


def guard_differences(saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None) -> list[str]:
    """``["key saved -> current", ...]`` for every key whose value differs (JSON-normalised)."""
    return [f"{k} {a!r} -> {b!r}" for k, a, b in guard_changes(saved, current)]


def _guard_error(directory: str, step: int, diffs: list[str]) -> ValueError:
    return ValueError(f"cannot resume from {directory} (step {step}): settings changed since that checkpoint: "
                      f"{', '.join(diffs)}; use the original settings or another output directory")


def param_shapes_hash(params: Mapping[str, Any]) -> str:
    """sha256 over the sorted ``path:shape:dtype`` lines of a params tree (arrays or structs)."""
    lines = sorted(
        f"{p}:{tuple(np.shape(v))}:{np.dtype(getattr(v, 'dtype', np.float32)).name}"
        for p, v in tree_lib.flatten(params).items()
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _leaf_table(state: Any) -> list[list]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(state)
    return [[jax.tree_util.keystr(k), list(np.shape(v)), np.dtype(v.dtype).name] for k, v in leaves]


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


class Checkpointer:
    """Orbax ``CheckpointManager`` wrapper for one training run.

    ``directory``: where step folders go. ``keep``: how many recent checkpoints to keep.
    ``adapter_config``: the adapter config as a PEFT dict (compared on restore).
    ``base_model``: name or path of the base model; ``base_params``: the full params tree (or
    shapes) whose path/shape hash identifies the base (both compared on restore when given).
    ``mesh``: recorded only (restoring onto another mesh is allowed). ``user``: any JSON dict.
    ``resume_guard``: settings that must not change across a resume (see
    :func:`compare_resume_guard`); ``None`` = not checked. After a restore, ``last_meta`` is the
    restored checkpoint's metadata (``progress`` holds what the trainer stored with ``extra``).
    """

    def __init__(
        self,
        directory,
        *,
        keep: int = 3,
        adapter_config: Mapping[str, Any] | None = None,
        base_model: str | None = None,
        base_params: Mapping[str, Any] | None = None,
        mesh=None,
        user: Mapping[str, Any] | None = None,
        resume_guard: Mapping[str, Any] | None = None,
        async_save: bool = True,
    ):
        if keep is None or keep < MIN_KEEP:
            raise ValueError(f"keep must be >= {MIN_KEEP} (a corrupt latest checkpoint falls back to the previous one), "
                             f"got {keep}")
        self.directory = _abs(directory)
        self.adapter_config = _jsonable(dict(adapter_config)) if adapter_config is not None else None
        self.base_model = None if base_model is None else str(base_model)
        self.base_hash = param_shapes_hash(base_params) if base_params is not None else None
        self.mesh = dict(mesh.shape) if mesh is not None else None
        self.user = _jsonable(dict(user or {}))
        self.resume_guard = None if resume_guard is None else _jsonable(dict(resume_guard))
        self.last_meta: dict | None = None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    # ------------------------------------------------------------------ save
    def metadata(self, state: Any, step: int, data_state: Any = None, extra: Mapping[str, Any] | None = None) -> dict:
        return {
            "format": FORMAT,
            "step": int(step),
            "leaves": _leaf_table(state),
            "adapter_config": self.adapter_config,
            "base_model": {"name": self.base_model, "param_shapes_hash": self.base_hash},
            "mesh": self.mesh,
            "user": self.user,
            "data_state": _jsonable(data_state),
            "resume_guard": self.resume_guard,
            "progress": _jsonable(dict(extra or {})),
        }

    def save(self, state: Any, *, step: int | None = None, data_state: Any = None, force: bool = True,
             extra: Mapping[str, Any] | None = None) -> bool:
        """Start saving ``state`` (a pytree; ``state.step`` gives the step unless ``step`` is
        passed). Returns once the arrays are copied off the devices; writing continues in the
        background until :meth:`wait_until_finished`. ``data_state`` and ``extra`` (stored as the
        metadata's ``progress``) must be JSON-serialisable. A state with a NaN/Inf leaf raises
        ``FloatingPointError`` and nothing is written."""
        bad = nonfinite_leaves(state)
        if bad:
            raise FloatingPointError(f"refusing to checkpoint a non-finite state: NaN/Inf in {', '.join(bad[:5])}"
                                     + (" ..." if len(bad) > 5 else ""))
        if step is None:
            with jax.transfer_guard_device_to_host("allow"):
                step = int(jax.device_get(state.step))
        leaves = jax.tree_util.tree_leaves(state)
        items = {f"leaf_{i:05d}": v for i, v in enumerate(leaves)}
        with jax.transfer_guard_device_to_host("allow"):
            return self._manager.save(
                int(step),
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(items),
                    meta=ocp.args.JsonSave(self.metadata(state, step, data_state, extra)),
                ),
                force=force,
            )

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    # ------------------------------------------------------------------ restore
    def read_metadata(self, step: int) -> dict:
        if step not in self._manager.all_steps():
            raise ValueError(
                f"no checkpoint for step {step} in {self.directory} (available: {self.all_steps()})"
            )
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # missing/corrupt metadata file
            raise CorruptCheckpointError(
                f"checkpoint step {step} in {self.directory} is corrupt or incomplete: {_first_line(e)}") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CorruptCheckpointError(f"checkpoint step {step} in {self.directory} is not a {FORMAT} checkpoint")
        return meta

    def check_compatible(self, meta: Mapping[str, Any], template_state: Any) -> None:
        """Raise ``ValueError`` listing every difference between a checkpoint and this run."""
        problems = []
        if self.resume_guard is not None and meta.get("resume_guard") is not None:
            diffs = guard_differences(meta["resume_guard"], self.resume_guard)
            if diffs:
                raise _guard_error(self.directory, int(meta.get("step", -1)), diffs)
        if meta.get("adapter_config") != self.adapter_config:
            problems.append(
                f"adapter config differs: checkpoint {meta.get('adapter_config')} vs this run {self.adapter_config}"
            )
        saved_base = meta.get("base_model") or {}
        for key, mine in (("name", self.base_model), ("param_shapes_hash", self.base_hash)):
            if mine is not None and saved_base.get(key) is not None and saved_base[key] != mine:
                problems.append(f"base model {key} differs: checkpoint {saved_base[key]!r} vs this run {mine!r}")
        saved, want = meta.get("leaves", []), _leaf_table(template_state)
        if saved != want:
            saved_d = {p: (s, d) for p, s, d in saved}
            want_d = {p: (s, d) for p, s, d in want}
            diffs = [f"missing in checkpoint: {p}" for p in want_d if p not in saved_d]
            diffs += [f"unexpected in checkpoint: {p}" for p in saved_d if p not in want_d]
            diffs += [
                f"{p}: checkpoint shape/dtype {saved_d[p]} vs template {want_d[p]}"
                for p in want_d
                if p in saved_d and saved_d[p] != want_d[p]
            ]
            if not diffs:
                diffs = ["leaf order differs"]
            problems.append("state tree differs: " + "; ".join(diffs[:10]) + (" ..." if len(diffs) > 10 else ""))
        if problems:
            raise ValueError(f"refusing to restore checkpoint from {self.directory}: " + " | ".join(problems))

    def restore(self, step: int, template_state: Any, shardings: Any = None) -> tuple[Any, Any]:
        """Restore ``step`` into the structure of ``template_state`` -> ``(state, data_state)``.

        ``shardings``: tree of ``jax.sharding.Sharding`` matching the template (default: the
        template arrays' own shardings). Checks everything before reading any array; raises
        :class:`CorruptCheckpointError` when the step cannot be read or holds NaN/Inf.
        """
        meta = self.read_metadata(step)
        self.check_compatible(meta, template_state)
        leaves, treedef = jax.tree_util.tree_flatten(template_state)
        if shardings is None:
            shard_leaves = [getattr(x, "sharding", None) for x in leaves]
        else:
            shard_leaves = treedef.flatten_up_to(shardings)
        abstract = {
            f"leaf_{i:05d}": jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s)
            for i, (x, s) in enumerate(zip(leaves, shard_leaves))
        }
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )["state"]
        except Exception as e:
            raise CorruptCheckpointError(
                f"checkpoint step {step} in {self.directory} could not be read: {_first_line(e)}") from e
        state = jax.tree_util.tree_unflatten(treedef, [restored[f"leaf_{i:05d}"] for i in range(len(leaves))])
        bad = nonfinite_leaves(state)
        if bad:
            raise CorruptCheckpointError(f"checkpoint step {step} in {self.directory} holds NaN/Inf in {bad[0]}")
        self.last_meta = meta
        return state, meta.get("data_state")

    def restore_latest(self, template_state: Any, shardings: Any = None) -> tuple[Any, Any] | None:
        """Restore the newest good checkpoint (see :meth:`restore`); ``None`` when there is none.

        A corrupt step is reported with a warning, deleted, and the previous one is tried; when
        every step is corrupt the newest one's :class:`CorruptCheckpointError` is raised. A
        checkpoint that does not fit this run (``ValueError``) is never skipped.
        """
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            return None
        errors = []
        for step in steps:
            try:
                out = self.restore(step, template_state, shardings)
            except CorruptCheckpointError as e:
                errors.append(e)
                warnings.warn(f"{e}; trying the previous checkpoint", RuntimeWarning, stacklevel=2)
                continue
            for bad in steps[: len(errors)]:  # newer than the restored one: redone steps save there again
                self._manager.delete(bad)
            return out
        raise errors[0]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def read_latest_metadata(directory) -> dict | None:
    """Metadata of the newest checkpoint in ``directory`` whose metadata reads (``None``: none).

    Needs no template, model or mesh; corrupt steps are skipped with a warning.
    """
    if not fileio.exists(directory):
        return None
    # read-only: orbax logs a warning for that mode on every open, which says nothing to a user here
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        options = ocp.CheckpointManagerOptions(create=False, read_only=True, save_interval_steps=0)
        manager = ocp.CheckpointManager(_abs(directory), options=options, item_names=("state", "meta"))
    finally:
        absl_logger.setLevel(level)
    try:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception as e:
                warnings.warn(f"checkpoint step {step} in {directory} has unreadable metadata ({_first_line(e)}); "
                              "looking at the previous one", RuntimeWarning, stacklevel=2)
                continue
            if isinstance(meta, dict) and meta.get("format") == FORMAT:
                return meta
        return None
    finally:
        manager.close()


def compare_resume_guard(directory, guard: Mapping[str, Any]) -> int | None:
    """Compare ``guard`` with the resume guard of the newest checkpoint in ``directory``.

    Returns that checkpoint's step (``None`` when there is no checkpoint, so nothing to check);
    raises a one-line ``ValueError`` naming each differing key with both values. Reads only
    metadata: call it before loading a model or evaluating.

    >>> compare_resume_guard("/nonexistent/checkpoints", {"lr": 1e-3}) is None
    True
    """
    meta = read_latest_metadata(directory)
    if meta is None:
        return None
    diffs = guard_differences(meta.get("resume_guard") or {}, guard)
    if meta.get("resume_guard") is not None and diffs:
        raise _guard_error(_abs(directory), int(meta["step"]), diffs)
    return int(meta["step"])
