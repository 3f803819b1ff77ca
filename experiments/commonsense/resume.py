"""The resume guard: a resumed run must keep the settings that shape its schedule, data and adapter.

The CLI stores :func:`experiments.commonsense.config.resume_guard` (steps, epochs, lr, warmup,
cutoff, batch size, method, r, alpha, k, ...) in every checkpoint's metadata
(``user.resume_guard``) and, before any evaluation or training, compares it with the new run's:
a different ``--batch-size`` would skip or repeat examples (the data position is counted in
batches), a different ``--max-steps`` would silently rebuild the cosine schedule.

>>> _differences({"lr": 1e-3, "r": 8}, {"lr": 2e-4, "r": 8})
['--lr 0.001 in the checkpoint, 0.0002 now']
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

from experiments.commonsense.config import FIELDS, flag


def _differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if a != b:
            name = flag(key) if key in FIELDS else key
            out.append(f"{name} {_show(a)} in the checkpoint, {_show(b)} now")
    return out


def _show(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def check_resume_guard(checkpoint_dir: str, guard: Mapping[str, Any]) -> Optional[int]:
    """Raise ``ValueError`` (one line naming each differing key and both values) when the latest checkpoint
    in ``checkpoint_dir`` was written with another guard; return its step (None: no checkpoint)."""
    from gralora_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(checkpoint_dir)
    try:
        step = ckpt.latest_step()
        if step is None:
            return None
        saved = (ckpt.read_metadata(step).get("user") or {}).get("resume_guard")
    finally:
        ckpt.close()
    if saved is None:
        return step
    now = json.loads(json.dumps(dict(guard)))  # the JSON form the checkpoint holds (tuples -> lists)
    diff = _differences(saved, now)
    if diff:
        raise ValueError(f"cannot resume from step {step} in {checkpoint_dir}: " + "; ".join(diff)
                         + " (run with the checkpoint's settings, or choose another --output-dir)")
    return step
