"""Test-session setup: eight CPU host devices (set before jax is imported) and shared paths."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import pytest  # noqa: E402

DATA_DIR = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    return DATA_DIR


@pytest.fixture(scope="module", autouse=True)
def matmul_precision(request):
    """A test module that sets ``MATMUL_PRECISION`` (e.g. ``"highest"``, for float32 parity with
    PyTorch or numpy) runs its fixtures and tests under ``jax.default_matmul_precision`` of it;
    other modules keep jax's default. Scoped to the module: no import-time global switch."""
    value = getattr(request.module, "MATMUL_PRECISION", None)
    if value is None:
        yield None
        return
    import jax

    with jax.default_matmul_precision(value):
        yield value
