"""Third-party quirks, patched in one place, each switched on explicitly.

Every patch here works around a bug or API drift in a library we do not own, is idempotent,
touches as little as it can, and has a test (``tests/test_families.py``) that fails when the
quirk goes away, so it can be deleted then.

``patch_t5_clip``
    transformers' Flax T5 (``modeling_flax_t5``, also LongT5) computes relative-position
    buckets with ``jnp.clip(x, a_max=...)``; jax 0.10 removed the ``a_min``/``a_max`` keywords
    (``min``/``max`` remain), so building or running a Flax T5 raises ``TypeError``. The patch
    rebinds the name ``jnp`` *inside those transformers modules only* to a thin proxy of
    ``jax.numpy`` whose ``clip`` also accepts ``a_min``/``a_max``; ``jax.numpy`` itself is left
    alone. :func:`gralora_jax.loading.load_pretrained` (``build_model``) applies it where it
    builds a Flax T5; call it yourself before constructing one directly::

        from gralora_jax.quirks import patch_t5_clip
        patch_t5_clip()
        model = transformers.FlaxT5ForConditionalGeneration(config)
"""

from __future__ import annotations

import importlib
import types

import jax.numpy as jnp

T5_MODULES = (
    "transformers.models.t5.modeling_flax_t5",
    "transformers.models.longt5.modeling_flax_longt5",
)


def jnp_clip_accepts_a_max() -> bool:
    """Whether this jax's ``jnp.clip`` still takes the old ``a_max`` keyword (then no patch is needed)."""
    try:
        jnp.clip(jnp.zeros(()), a_max=1)
    except TypeError:
        return False
    return True


def _clip(a=None, a_min=None, a_max=None, *, min=None, max=None):  # noqa: A002 - numpy's names
    """``jnp.clip`` that accepts both the old (``a_min``/``a_max``) and new (``min``/``max``) keywords."""
    lo = min if a_min is None else a_min
    hi = max if a_max is None else a_max
    return jnp.clip(a, lo, hi)


class _JnpWithOldClip(types.ModuleType):
    """``jax.numpy`` with a ``clip`` that also takes ``a_min``/``a_max``; everything else forwarded."""

    def __init__(self):
        super().__init__("jax.numpy")
        self.clip = _clip

    def __getattr__(self, name):  # only called for names not set on the proxy
        return getattr(jnp, name)


def patch_t5_clip() -> list[str]:
    """Make transformers' Flax T5/LongT5 work with jax >= 0.10; returns the modules patched now.

    Idempotent (a module already patched is skipped) and a no-op when this jax's ``jnp.clip``
    still accepts ``a_max``. Modules that cannot be imported are skipped.

    >>> _ = patch_t5_clip()
    >>> patch_t5_clip()  # second call: nothing left to patch
    []
    """
    if jnp_clip_accepts_a_max():
        return []
    patched = []
    for name in T5_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - optional model families
            continue
        if isinstance(getattr(mod, "jnp", None), _JnpWithOldClip):
            continue
        mod.jnp = _JnpWithOldClip()
        patched.append(name)
    return patched

