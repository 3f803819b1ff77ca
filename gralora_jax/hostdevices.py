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


def _backend_initialised(jax_mod) -> bool:
    if jax_mod is None:
        return False
    try:
        from jax._src import xla_bridge

        return bool(getattr(xla_bridge, "_backends", {}))
    except Exception:  # pragma: no cover - private API moved: assume initialised
        return True


def ensure_host_devices(n: int, *, exact: bool = False) -> None:
    """Make sure at least ``n`` devices will be visible (exactly ``n`` CPU devices with ``exact``).

    Before jax's backend starts (and when the platform is CPU or unspecified) this sets
    ``XLA_FLAGS=--xla_force_host_platform_device_count=n`` and, when jax is already imported,
    ``jax.config.update("jax_num_cpu_devices", n)`` (an accelerator backend, if present,
    ignores both). ``exact`` is for multi-process CPU runs, where each process must create
    precisely its share of the mesh (a global mesh 4x2 over 2 processes: 4 each) even when
    ``XLA_FLAGS`` asks for more. After jax's backend is up it checks ``jax.device_count() >= n``
    and raises ``RuntimeError`` explaining how to fix it otherwise.
    """
    if n < 1:
        raise ValueError(f"ensure_host_devices: n must be >= 1, got {n}")
    jax_mod = sys.modules.get("jax")
    if not _backend_initialised(jax_mod):
        if _cpu_platform_requested():
            m = re.search(rf"{_FLAG}=(\d+)", os.environ.get("XLA_FLAGS", ""))
            if exact or m is None or int(m.group(1)) < n:
                _set_flag(n)
                if jax_mod is not None and hasattr(jax_mod, "config"):
                    jax_mod.config.update("jax_num_cpu_devices", n)  # wins over XLA_FLAGS at backend start
        return
    have = jax_mod.device_count()
    if have < n:
        raise RuntimeError(
            f"need {n} devices but jax is already initialised with {have} "
            f"({jax_mod.devices()[0].platform}). On CPU set "
            f"XLA_FLAGS={_FLAG}={n} before jax is imported (or call "
            "gralora_jax.hostdevices.ensure_host_devices before anything touches jax)."
        )
