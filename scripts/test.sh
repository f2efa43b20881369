#!/usr/bin/env bash
# The project's checks: lint, type-check, then the test suite (which boots real microVMs).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
