#!/usr/bin/env bash
# Creates .venv with the Python reference tools (see docs/reference-venv.md).
# Only for producing fixtures and peer benchmarks: swift and its tests never need it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet 'dvc==3.67.1'
echo "reference venv ready: $(.venv/bin/dvc --version | tail -1) at .venv/"
