"""Fake several CPU devices for entry points (``--mesh 4x2`` on a laptop or CI).

XLA reads ``--xla_force_host_platform_device_count`` once, when jax initialises its CPU
backend, so the flag must be set before the first ``import jax`` does any work. Entry points
call :func:`ensure_host_devices` at the very top; it sets the flag if jax is not loaded yet,
does nothing when enough devices already exist, and otherwise raises a clear error instead
of letting a later ``make_mesh`` fail obscurely.

>>> ensure_host_devices(1)  # always satisfiable
"""

from __future__ import annotations

import os
import re
import sys

_FLAG = "--xla_force_host_platform_device_count"


def _set_flag(n: int) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    flags = re.sub(rf"{_FLAG}=\d+", "", flags).strip()
    os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}={n}".strip()


def _cpu_platform_requested() -> bool:
    plat = os.environ.get("JAX_PLATFORMS", os.environ.get("JAX_PLATFORM_NAME", "")).lower()
    return plat in ("", "cpu") or plat.startswith("cpu")


def ensure_host_devices(n: int) -> None:
    """Make sure at least ``n`` devices will be visible.

    Before jax is imported (and when the platform is CPU or unspecified) this sets
    ``XLA_FLAGS=--xla_force_host_platform_device_count=n`` (an accelerator backend, if
    present, ignores it). After jax's backend is up it checks ``jax.device_count() >= n``
    and raises ``RuntimeError`` explaining how to fix it otherwise.
    """
    if n < 1:
        raise ValueError(f"ensure_host_devices: n must be >= 1, got {n}")
    jax_mod = sys.modules.get("jax")
    initialised = False
    if jax_mod is not None:
        try:
            from jax._src import xla_bridge

            initialised = bool(getattr(xla_bridge, "_backends", {}))
        except Exception:  # pragma: no cover - private API moved: assume initialised
            initialised = True
    if not initialised:
        if _cpu_platform_requested():
            m = re.search(rf"{_FLAG}=(\d+)", os.environ.get("XLA_FLAGS", ""))
            if m is None or int(m.group(1)) < n:
                _set_flag(n)
        return
    have = jax_mod.device_count()
    if have < n:
        raise RuntimeError(
            f"need {n} devices but jax is already initialised with {have} "
            f"({jax_mod.devices()[0].platform}). On CPU set "
            f"XLA_FLAGS={_FLAG}={n} before jax is imported (or call "
            "gralora_jax.hostdevices.ensure_host_devices before anything touches jax)."
        )
