#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job on its embedded default:
# a tiny Llama-architecture model and synthetic commonsense data, built locally (no network),
# GraLoRA fine-tuning on a 4x2 (data x model) mesh of CPU host devices, then the 8-task evaluation.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m experiments.commonsense --mesh 4x2 "$@"
