#!/usr/bin/env bash
# Install pykv with its dev extra into a fresh virtualenv (.venv) and run lint + the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
.venv/bin/ruff check pykv tests benchmarks
.venv/bin/python -m pytest -q "$@"
