"""Mesh strings (``--mesh 4x2``, ``2x2x2``) as axis sizes; jax-free, so entry points can read one
before jax starts (to create enough CPU host devices, to check a batch size against it).

``"DxM"`` is data x model, ``"DxFxM"`` data x fsdp x model; every size a positive integer.

>>> parse_mesh("4x2")
{'data': 4, 'model': 2}
>>> parse_mesh("2x2x2")
{'data': 2, 'fsdp': 2, 'model': 2}
>>> mesh_size("2x2x2"), data_parallel_size("2x2x2")
(8, 4)
"""

from __future__ import annotations

import math

AXES_2D = ("data", "model")
AXES_3D = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")


def parse_mesh(spec: str) -> dict[str, int]:
    """``"DxM"`` -> ``{"data": D, "model": M}``; ``"DxFxM"`` -> ``{"data", "fsdp", "model"}``; else ``ValueError``."""
    if not isinstance(spec, str):
        raise ValueError(f"mesh spec must be a string like '4x2' or '2x2x2', got {spec!r}")
    parts = spec.strip().lower().split("x")
    if len(parts) not in (2, 3) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(
            f"bad mesh spec {spec!r}: expected 'DxM' (data x model, e.g. '4x2') or 'DxFxM' "
            "(data x fsdp x model, e.g. '2x2x2') with positive integers"
        )
    names = AXES_2D if len(parts) == 2 else AXES_3D
    return dict(zip(names, (int(p) for p in parts)))


def mesh_size(spec: str) -> int:
    """How many devices the mesh ``spec`` uses."""
    return math.prod(parse_mesh(spec).values())


def data_parallel_size(spec: str) -> int:
    """How many ways the mesh ``spec`` splits a batch (its data and fsdp axes)."""
    return math.prod(v for k, v in parse_mesh(spec).items() if k in BATCH_AXES)
