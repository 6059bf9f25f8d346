#!/usr/bin/env bash
# Compiles the reproducible dependency sets from the ranges in the two pyproject.toml files:
#   requirements/daemon.txt  what the daemon needs at run time (the image installs exactly this)
#   requirements/dev.txt     the daemon, the in-app client, the demo and the test tools (CI)
# An existing file is the starting point, so a pin moves only when a range no longer admits
# it (or with --upgrade). `scripts/lock.sh --check` recompiles into a temporary folder and
# fails when the committed files differ: they are out of date with a pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=write
extra=()
case "${1:-}" in
  --check) mode=check ;;
  --upgrade) extra=(--upgrade) ;;
  "") ;;
  *) echo "usage: scripts/lock.sh [--check|--upgrade]" >&2; exit 2 ;;
esac
out=requirements
if [ "$mode" = check ]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
  cp requirements/*.txt "$out"/
fi
# One resolution for every platform and Python the daemon supports (--universal), so the
# files do not depend on the machine that ran this.
compile() {
  local name=$1
  shift
  uv pip compile --quiet --universal --python-version 3.11 --no-header --annotation-style line \
    "${extra[@]}" "$@" -o "$out/$name"
}
compile daemon.txt pyproject.toml
compile dev.txt pyproject.toml pgpressure-sqlalchemy/pyproject.toml --extra test --extra demo
if [ "$mode" = check ]; then
  for f in daemon.txt dev.txt; do
    if ! diff -u "requirements/$f" "$out/$f"; then
      echo "requirements/$f is out of date: run scripts/lock.sh" >&2
      exit 1
    fi
  done
  echo "requirements/*.txt are current"
fi
