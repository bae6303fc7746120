#!/usr/bin/env bash
# Set up a fresh machine for development: a virtual environment in .venv with the
# CPU build of torch, the inference + training requirements and the test tools.
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  echo "usage: ./setup.sh   (creates/updates .venv from requirements-dev.txt; idempotent)"
  exit 0
fi
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
