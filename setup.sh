#!/usr/bin/env bash
# Set up trainer on Linux: find Python 3.10-3.12, make .venv next to this script, then hand over to
# `python -m trainer setup`, which picks the torch build for the NVIDIA driver (or CPU) and installs
# everything. Safe to run again: with nothing changed it finishes in seconds.
#
#   ./setup.sh [--dev] [--cpu] [--force] [--python /path/to/python3.11]
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$ROOT/.venv"
VENV_PY="$VENV/bin/python"
SETUP_ARGS=()
PYTHON_OVERRIDE=""

usage() {
    cat <<EOF
Usage: ./setup.sh [--dev] [--cpu] [--force] [--python PYTHON]
  --dev      also install the test dependencies (pytest, peft, ...)
  --cpu      install the CPU build of torch even when an NVIDIA GPU is present
  --force    reinstall even when nothing changed
  --python   the Python 3.10-3.12 to build .venv from (default: python3.12, 3.11, 3.10, python3)
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --dev|--cpu|--force|--dry-run) SETUP_ARGS+=("$1") ;;
        --python) [ $# -ge 2 ] || { usage >&2; exit 2; }; PYTHON_OVERRIDE="$2"; shift ;;
        --python=*) PYTHON_OVERRIDE="${1#--python=}" ;;
        -h|--help) usage; exit 0 ;;
        *) echo "setup.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

# Prints "MAJOR.MINOR EXECUTABLE" for a Python in the supported window; fails otherwise (missing, broken
# pyenv shim, wrong version). sys.executable is the real interpreter, not a shim.
probe_python() {
    local out
    out="$("$1" -c 'import sys; print("%d.%d %s" % (sys.version_info[0], sys.version_info[1], sys.executable))' 2>/dev/null)" || return 1
    case "${out%% *}" in
        3.10|3.11|3.12) printf '%s\n' "$out" ;;
        *) return 1 ;;
    esac
}

find_python() {
    local candidate
    if [ -n "$PYTHON_OVERRIDE" ]; then
        probe_python "$PYTHON_OVERRIDE" && return 0
        echo "ERROR: --python $PYTHON_OVERRIDE is not a working Python 3.10-3.12." >&2
        return 1
    fi
    for candidate in python3.12 python3.11 python3.10 python3; do
        command -v "$candidate" >/dev/null 2>&1 || continue
        probe_python "$candidate" && return 0
    done
    echo "ERROR: no Python 3.10, 3.11 or 3.12 found (tried python3.12, python3.11, python3.10, python3)." >&2
    echo "Fix: install one (Debian/Ubuntu: sudo apt install python3.11 python3.11-venv), or point at it:" >&2
    echo "     ./setup.sh --python /path/to/python3.11" >&2
    return 1
}

# The venv is reused only when its interpreter still runs and is in range (and matches --python if given).
venv_ok() {
    local have want
    [ -x "$VENV_PY" ] || return 1
    have="$(probe_python "$VENV_PY")" || return 1
    if [ -n "$PYTHON_OVERRIDE" ]; then
        want="$(probe_python "$PYTHON_OVERRIDE")" || return 1
        [ "${have%% *}" = "${want%% *}" ] || return 1
    fi
    return 0
}

make_venv() {
    local found version exe
    found="$(find_python)" || return 1
    version="${found%% *}"
    exe="${found#* }"
    if [ -e "$VENV" ]; then
        if [ ! -f "$VENV/pyvenv.cfg" ] && [ -n "$(ls -A "$VENV" 2>/dev/null)" ]; then
            echo "ERROR: $VENV exists but is not a virtual environment; move it away and run setup again." >&2
            return 1
        fi
        echo "Rebuilding .venv (its Python is missing or not 3.10-3.12)..."
        rm -rf "$VENV"
    fi
    echo "Creating .venv with Python $version ($exe)..."
    if ! "$exe" -m venv "$VENV"; then
        rm -rf "$VENV"
        echo "ERROR: could not create the virtual environment." >&2
        echo "Fix (Debian/Ubuntu): sudo apt install python$version-venv   then run ./setup.sh again." >&2
        return 1
    fi
    [ -x "$VENV_PY" ] || { echo "ERROR: $VENV_PY was not created." >&2; return 1; }
}

if ! venv_ok; then
    make_venv || exit 1
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUTF8=1
rc=0
"$VENV_PY" -m trainer setup ${SETUP_ARGS[@]+"${SETUP_ARGS[@]}"} || rc=$?
if [ "$rc" -ne 0 ]; then
    echo "setup.sh: setup did not finish (exit code $rc); see the messages above." >&2
fi
exit "$rc"
