#!/usr/bin/env bash
# Train a LoRA: ./train.sh --config_file presets/demo.toml [more sd-scripts arguments]
# Every argument goes to `python -m trainer train` unchanged; the exit code is the trainer's.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV_PY="$ROOT/.venv/bin/python"

if [ $# -eq 0 ]; then
    echo "Usage: ./train.sh --config_file PRESET.toml [sd-scripts arguments...]"
    echo "       ./train.sh --pretrained_model_name_or_path MODEL --train_data_dir DIR --output_dir OUT ..."
    echo "Presets:"
    found=0
    for preset in "$ROOT"/presets/*.toml; do
        [ -e "$preset" ] || continue
        echo "  presets/$(basename "$preset")"
        found=1
    done
    [ "$found" -eq 1 ] || echo "  (none found in $ROOT/presets)"
    echo "Example: ./train.sh --config_file presets/demo.toml"
    exit 1
fi

if [ ! -x "$VENV_PY" ]; then
    echo "ERROR: the Python environment is missing ($VENV_PY)." >&2
    echo "Fix: run ./setup.sh first (once), then run this again." >&2
    exit 1
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUTF8=1
export PYTHONIOENCODING=utf-8
exec "$VENV_PY" -m trainer train "$@"
