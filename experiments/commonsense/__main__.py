"""``python -m experiments.commonsense --mesh 4x2``; see :mod:`experiments.commonsense.cli`."""

from experiments.commonsense.cli import entry

if __name__ == "__main__":
    entry()
