"""Cloud TPU tooling: ``python -m tpu_setup <action>`` (see :mod:`tpu_setup.cli` and docs/tpu.md).

Modules: :mod:`~tpu_setup.accelerators` (chips/hosts/devices of a TPU type, mesh
suggestions), :mod:`~tpu_setup.commands` (pure builders of the gcloud argv of every action),
:mod:`~tpu_setup.remote` (the shell scripts run on the workers), :mod:`~tpu_setup.cli`.
Stdlib plus the jax-free :mod:`gralora_jax.meshspec` (one parser of ``--mesh`` strings);
nothing in ``gralora_jax`` imports this package.
"""
