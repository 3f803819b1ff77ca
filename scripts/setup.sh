#!/usr/bin/env bash
# Create .venv (if missing) and install gralora-jax with its test extras at the exact pinned
# versions of constraints.txt. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
