#!/usr/bin/env bash
# One command to install agentkernel on a fresh Debian 12 machine: system packages, the Python package
# (with its development tools) in .venv, and the guest artifacts (`agentkernel setup`).
set -euo pipefail
cd "$(dirname "$0")"

scripts/install-system-deps.sh

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'

.venv/bin/agentkernel setup --yes
