#!/usr/bin/env bash
# Builds what we publish, into dist/ (or the folder given): the daemon `pgpressure` and the
# in-app client `pgpressure-sqlalchemy`, each as an sdist and a wheel built from that sdist,
# so a file the sdist forgets shows up as a broken wheel here and not on a user's machine.
#   scripts/build-dists.sh [OUTDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-dist}")
mkdir -p "$out"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for project in . pgpressure-sqlalchemy; do
  if ! python3 -m build --sdist --wheel --outdir "$out" "$project" >"$log" 2>&1; then
    cat "$log" >&2
    echo "build-dists: building $project failed" >&2
    exit 1
  fi
done
ls -1 "$out"
