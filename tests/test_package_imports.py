"""The package and its environment helpers import without jax, so an entry point can size the
CPU host devices before jax starts; the public names still load on first use."""

import subprocess
import sys

HEAVY = ("jax", "flax", "optax", "orbax", "transformers")


def _heavy_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_package_and_env_helpers_import_without_jax():
    assert _heavy_after("import gralora_jax, gralora_jax.hostdevices, gralora_jax.meshspec") == []


def test_experiment_config_and_parser_of_mesh_import_without_jax():
    assert _heavy_after("import experiments.commonsense.config") == []


def test_public_names_load_on_first_use():
    import gralora_jax

    assert set(gralora_jax.__all__) <= set(dir(gralora_jax))
    for name in gralora_jax.__all__:
        assert getattr(gralora_jax, name) is not None
    assert gralora_jax.GraLoRAConfig.__module__ == "gralora_jax.config"
