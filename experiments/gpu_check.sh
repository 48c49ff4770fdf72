#!/usr/bin/env bash
# The GPU check (README, "Speed"; experiments/gpu_check.py says what it measures): on a machine with one GPU, in under
# 8 minutes, one summary table; on a machine without one, the smoke mode of the same checks, in seconds.
#
#     bash experiments/gpu_check.sh                  # the full check on a GPU, the smoke mode on a CPU
#     bash experiments/gpu_check.sh --smoke          # the smoke mode anywhere
#     bash experiments/gpu_check.sh --json out.json  # also the rows as JSON
#     PYTHON=/path/to/python bash experiments/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
# Unbuffered, so that a run stopped at a time limit still shows how far it got; a hard stop at 8 minutes.
PYTHONUNBUFFERED=1 exec timeout 480 "$PYTHON" experiments/gpu_check.py "$@"
