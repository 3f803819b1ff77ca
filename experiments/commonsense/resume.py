"""The resume guard in the CLI's words: which flags changed since the checkpoint a run would resume.

The CLI gives :func:`experiments.commonsense.config.resume_guard` (steps, epochs, lr, warmup,
cutoff, batch size, method, r, alpha, k, ...) to the trainer's checkpoints as their resume guard
(:class:`gralora_jax.checkpoint.Checkpointer`, which refuses a restore with other values too) and,
before any model loads, compares it with the newest checkpoint's through the engine's
:func:`gralora_jax.checkpoint.read_latest_metadata` / :func:`~gralora_jax.checkpoint.guard_changes`;
only the wording (flag names, "in the checkpoint, ... now") is the CLI's.

>>> _describe([("lr", 1e-3, 2e-4), ("r", 8, 16)])
['--lr 0.001 in the checkpoint, 0.0002 now', '--r 8 in the checkpoint, 16 now']
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from experiments.commonsense.config import FIELDS, flag


def _describe(changes) -> list[str]:
    return [f"{flag(k) if k in FIELDS else k} {_show(a)} in the checkpoint, {_show(b)} now" for k, a, b in changes]


def _show(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def check_resume_guard(checkpoint_dir: str, guard: Mapping[str, Any]) -> Optional[int]:
    """Raise ``ValueError`` (one line naming each differing flag and both values) when the newest
    checkpoint in ``checkpoint_dir`` was written with another guard; return its step (None: no checkpoint)."""
    from gralora_jax.checkpoint import guard_changes, read_latest_metadata

    meta = read_latest_metadata(checkpoint_dir)
    if meta is None:
        return None
    step = int(meta["step"])
    saved = meta.get("resume_guard")
    changes = guard_changes(saved, guard) if saved is not None else []
    if changes:
        raise ValueError(f"cannot resume from step {step} in {checkpoint_dir}: " + "; ".join(_describe(changes))
                         + " (run with the checkpoint's settings, or choose another --output-dir)")
    return step
