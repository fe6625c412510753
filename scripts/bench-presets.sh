#!/usr/bin/env bash
# Measure every card preset (presets/*gb.toml) in one go, for docs/benchmarks.md's GPU table (issue 7):
#   bash scripts/bench-presets.sh OUTDIR [PRESET.toml ...]
# For each preset: a real run (BENCH_STEPS optimizer steps, default 20), the same run capped at the card size
# in its name (--vram_limit 6GB for sd15-6gb), and --estimate; each writes OUTDIR/<preset>[-capped|-estimate]
# .json and a .log. A failed run does not stop the others: its JSON still says why. Then OUTDIR/table.md gets
# the table (bench --table) and each preset's suggested "Expected peak VRAM" comment.
# Environment: PYTHON (default: python), BENCH_STEPS (default 20), BENCH_ARGS (added last to every bench call,
# e.g. "--family tiny-sd1 --steps 1" for a quick check on a CPU).
# Exit status: 0 when every run succeeded, 1 when one failed (the table is written either way).
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: bash scripts/bench-presets.sh OUTDIR [PRESET.toml ...]" >&2
  exit 2
fi
mkdir -p "$1"
out=$(cd "$1" && pwd)
shift
presets=()
for preset in "$@"; do  # made absolute: the runs happen in the repository's root
  case $preset in
    /*) presets+=("$preset") ;;
    *) presets+=("$(pwd)/$preset") ;;
  esac
done
steps=${BENCH_STEPS:-20}
python=${PYTHON:-python}
read -r -a extra <<< "${BENCH_ARGS:-}"
# `python -m trainer` needs the repository on its path, and the docs name presets "presets/x.toml".
cd "$(dirname "$0")/.."
if [ ${#presets[@]} -eq 0 ]; then
  presets=(presets/*gb.toml)
fi
failed=0

json_string() {  # $1 as a JSON string (paths may hold backslashes and quotes)
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$s"
}

# bench NAME KIND LIMIT_GB ARGS...: one bench call of $preset; its JSON is written even when the process dies
# early.
bench() {
  local name=$1 kind=$2 limit=$3
  shift 3
  local json="$out/$name.json" log="$out/$name.log" code=0
  rm -f "$json"
  "$python" -m trainer bench "$@" --json "$json" ${extra[@]+"${extra[@]}"} > "$log" 2>&1 || code=$?
  if [ "$code" -ne 0 ]; then
    failed=1
    echo "$name: FAILED (exit $code), see $log:"
    tail -n 5 "$log" | sed 's/^/    /'
  else
    echo "$name: ok"
  fi
  if [ ! -s "$json" ]; then  # it stopped before writing its result (bad preset, crash): say so in the table
    local reason
    # no truncation here: cutting bytes could split a UTF-8 character; the table shortens long messages
    reason=$( (grep -m 1 -i 'error' "$log" || tail -n 1 "$log") | sed -E 's/^error: (- )?//' | tr -d '\000-\037')
    printf '{"kind": "%s", "preset": %s, "vram_limit_gb": %s, "error": %s}\n' "$kind" "$(json_string "$preset")" \
      "$limit" "$(json_string "$reason (exit status $code, see $name.log)")" > "$json"
  fi
}

for preset in "${presets[@]}"; do
  name=$(basename "$preset" .toml)
  card=$(printf '%s' "$name" | sed -nE 's/.*[^0-9.]([0-9]+(\.[0-9]+)?) *[gG][bB].*/\1/p')
  bench "$name" run null --config "$preset" --steps "$steps"
  if [ -n "$card" ]; then
    bench "$name-capped" run "$card" --config "$preset" --steps "$steps" --vram_limit "${card}GB"
  fi
  bench "$name-estimate" estimate null --config "$preset" --estimate
done

"$python" -m trainer bench --table "$out"/*.json > "$out/table.md"
cat "$out/table.md"
exit "$failed"
