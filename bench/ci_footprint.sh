#!/usr/bin/env bash
# What the README's test command costs on a fresh clone: wall time, the machine's memory in use above what it
# was before, pytest's temporary files, the size of .venv; sampled every 5 s while `.ci/run` runs.
#   bash bench/ci_footprint.sh [LOG]      (LOG gets the run's output, pytest's -rP prints included)
# Run it on an otherwise idle machine: memory is read machine-wide (`free`), so other work counts too.
set -u
src=$(cd "$(dirname "$0")/.." && pwd)
log=${1:-/tmp/ci_footprint.log}
clone=$(mktemp -d /tmp/ci-clone.XXXX)
git clone -q "$src" "$clone"
tmp_root=/tmp/pytest-of-$(id -un)
used() { free -b | awk '/^Mem:/ {print $3}'; }
tmp_size() { du -sb "$tmp_root" 2>/dev/null | cut -f1 || true; }
base=$(used) tmp_base=$(tmp_size)
peak_mem=0 peak_tmp=0
t0=$(date +%s)
(cd "$clone" && PYTEST_ADDOPTS="${PYTEST_ADDOPTS:-} -rP" bash .ci/run) > "$log" 2>&1 &
run=$!
while kill -0 "$run" 2>/dev/null; do
  m=$(( $(used) - base )); [ "$m" -gt "$peak_mem" ] && peak_mem=$m
  t=$(( $(tmp_size || echo 0) + 0 - ${tmp_base:-0} )); [ "$t" -gt "$peak_tmp" ] && peak_tmp=$t
  sleep 5
done
wait "$run"; rc=$?
gib() { awk -v b="$1" 'BEGIN {printf "%.1f GiB", b / 2^30}'; }
echo "exit $rc; $(( ($(date +%s) - t0) / 60 )) min $(( ($(date +%s) - t0) % 60 )) s with set-up; $(grep -E '^[0-9]+ passed' "$log" | tail -1)"
echo "memory in use above the start: peak $(gib "$peak_mem"); pytest's temporary files: peak $(gib "$peak_tmp")"
echo ".venv: $(du -sh "$clone/.venv" | cut -f1); $(nproc) CPU cores; log: $log; clone: $clone"
