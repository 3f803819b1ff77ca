"""The paper's commonsense-reasoning experiment: fine-tune, then evaluate the eight LLM-Adapters tasks.

Modules, one job each: :mod:`.tasks` (task names and answer words), :mod:`.prompt` (the
Alpaca-style template), :mod:`.synthetic` (learnable synthetic data in the same format),
:mod:`.embedded` (tiny random Llama + tokenizer in HF layout), :mod:`.data` (loading,
tokenising, bucketed batches, resumable iterator), :mod:`.evaluate` (generation/loglik,
answer extraction, accuracy), :mod:`.report` (results files and plot), :mod:`.config`
(``ExperimentConfig``: every setting with its help, presets and checks), :mod:`.cli`
(the command line generated from it, exit codes), :mod:`.run` (the pipeline as steps:
prepare, load, adapt, train, export, evaluate, report), :mod:`.resume` (the resume guard). Run it with
``python -m experiments.commonsense --mesh 4x2`` (see ``--help``).

Importing this package does not import jax.
"""
