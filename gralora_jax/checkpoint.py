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

>>> ckpt = Checkpointer("/tmp/run/ckpt", keep=2, adapter_config={"r": 8})  # doctest: +SKIP
>>> ckpt.save(state, data_state={"epoch": 0, "index": 96})                  # doctest: +SKIP
>>> state, data_state = ckpt.restore_latest(template_state)                 # doctest: +SKIP

``directory`` may be local or any path etils/orbax understands (``gs://bucket/run``).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from gralora_jax import tree as tree_lib

FORMAT = "gralora_jax.train_state/1"


def _abs(directory) -> str:
    directory = os.fspath(directory)
    return directory if "://" in directory else os.path.abspath(directory)


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
        async_save: bool = True,
    ):
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = _abs(directory)
        self.adapter_config = _jsonable(dict(adapter_config)) if adapter_config is not None else None
        self.base_model = None if base_model is None else str(base_model)
        self.base_hash = param_shapes_hash(base_params) if base_params is not None else None
        self.mesh = dict(mesh.shape) if mesh is not None else None
        self.user = _jsonable(dict(user or {}))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    # ------------------------------------------------------------------ save
    def metadata(self, state: Any, step: int, data_state: Any = None) -> dict:
        return {
            "format": FORMAT,
            "step": int(step),
            "leaves": _leaf_table(state),
            "adapter_config": self.adapter_config,
            "base_model": {"name": self.base_model, "param_shapes_hash": self.base_hash},
            "mesh": self.mesh,
            "user": self.user,
            "data_state": _jsonable(data_state),
        }

    def save(self, state: Any, *, step: int | None = None, data_state: Any = None, force: bool = True) -> bool:
        """Start saving ``state`` (a pytree; ``state.step`` gives the step unless ``step`` is
        passed). Returns once the arrays are copied off the devices; writing continues in the
        background until :meth:`wait_until_finished`. ``data_state`` must be JSON-serialisable."""
        if step is None:
            step = int(jax.device_get(state.step))
        leaves = jax.tree_util.tree_leaves(state)
        items = {f"leaf_{i:05d}": v for i, v in enumerate(leaves)}
        return self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(items),
                meta=ocp.args.JsonSave(self.metadata(state, step, data_state)),
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
            raise ValueError(f"checkpoint step {step} in {self.directory} is corrupt or incomplete: {e}") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"checkpoint step {step} in {self.directory} is not a {FORMAT} checkpoint")
        return meta

    def check_compatible(self, meta: Mapping[str, Any], template_state: Any) -> None:
        """Raise ``ValueError`` listing every difference between a checkpoint and this run."""
        problems = []
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
        template arrays' own shardings). Checks everything before reading any array.
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
            raise ValueError(f"checkpoint step {step} in {self.directory} could not be read: {e}") from e
        state = jax.tree_util.tree_unflatten(treedef, [restored[f"leaf_{i:05d}"] for i in range(len(leaves))])
        return state, meta.get("data_state")

    def restore_latest(self, template_state: Any, shardings: Any = None) -> tuple[Any, Any] | None:
        """Restore the newest checkpoint (see :meth:`restore`); ``None`` when there is none."""
        step = self.latest_step()
        if step is None:
            return None
        return self.restore(step, template_state, shardings)
