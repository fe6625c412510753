#!/usr/bin/env bash
# Open the trainer's page in the browser: ./gui.sh [--port 7860] [--no_browser]
# Every argument goes to `python -m trainer gui` unchanged; the exit code is Python's.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV_PY="$ROOT/.venv/bin/python"

if [ ! -x "$VENV_PY" ]; then
    echo "ERROR: the Python environment is missing ($VENV_PY)." >&2
    echo "Fix: run ./setup.sh first (once), then run this again." >&2
    exit 1
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUTF8=1
export PYTHONIOENCODING=utf-8
exec "$VENV_PY" -m trainer gui "$@"
