#!/usr/bin/env bash
# Run every benchmark in bench/ (bench_*.py) one after the other and print their figures.
# Each starts its own throwaway PostgreSQL; nothing listens beyond 127.0.0.1.
#   bench/run.sh            all benchmarks
#   bench/run.sh metrics    only those whose name contains "metrics"
set -u
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
filter=${1:-}
failed=()
echo "pgpressure benchmarks: $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
for bench in bench/bench_*.py; do
    [[ -n "$filter" && "$bench" != *"$filter"* ]] && continue
    echo
    echo "### $bench"
    start=$SECONDS
    if ! "$python" "$bench"; then
        failed+=("$bench")
    fi
    echo "($bench took $((SECONDS - start)) s)"
done
echo
if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all benchmarks ran"
