#!/usr/bin/env bash
# Builds the pgpressure image from ./Dockerfile without a Docker engine, with Debian's
# mmdebstrap and buildah (root needed; scripts/setup.sh installs both):
#
#   scripts/build-image.sh [TAG]     default TAG: localhost/pgpressure:<version>
#
# 1. A Debian bookworm minbase root with Debian's python3, python3-venv, python-is-python3
#    and ca-certificates, made by mmdebstrap from this machine's Debian sources, stands in
#    for the Dockerfile's default python:3.12-slim-bookworm (which needs a registry this
#    machine does not reach). Like Debian's slim images it leaves out man pages, docs and
#    locales; merged /usr comes from mmdebstrap's hook, not the usrmerge package (and perl).
#    The root is kept as a tarball under $PGPRESSURE_IMAGE_CACHE (default
#    /var/tmp/pgpressure-image-cache), named by a hash of everything that goes into it, and
#    imported into buildah's storage once as localhost/pgpressure-base:<hash>.
# 2. `buildah bud --isolation chroot --layers` builds the Dockerfile on that base, with the
#    machine's CA bundle and pip configuration mounted (-v, read-only) so pip in the build
#    reaches the package index this machine uses. Nothing of them ends up in the image.
#
# Prints what it builds and, last, the image's size: "image TAG: N bytes (M MB)".
# Environment: PGPRESSURE_IMAGE_CACHE (see above), PGPRESSURE_APT_SOURCES (apt sources
# files for mmdebstrap, default: this machine's Debian bookworm ones), PYTHON (the python
# whose pip configuration is used, default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "build-image: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (buildah's chroot isolation and mmdebstrap's root mode)"
for tool in buildah mmdebstrap; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not installed (scripts/setup.sh installs it)"
done

version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n1)
[ -n "$version" ] || version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' exporter/__init__.py)
tag=${1:-localhost/pgpressure:${version:-dev}}
cache=${PGPRESSURE_IMAGE_CACHE:-/var/tmp/pgpressure-image-cache}
mkdir -p "$cache"

# --- 1. the base: Debian bookworm minbase with Debian's Python ------------------------------
suite=bookworm
if [ -n "${PGPRESSURE_APT_SOURCES:-}" ]; then
  read -r -a sources <<<"$PGPRESSURE_APT_SOURCES"
else
  sources=()
  for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    if [ -f "$f" ] && grep -v '^\s*#' "$f" | grep -qw "$suite"; then
      sources+=("$f")
    fi
  done
fi
# (no sources file: mmdebstrap's default, deb.debian.org with updates and security)
mm_args=(
  --variant=minbase
  --include=python3,python3-venv,python-is-python3,ca-certificates
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
  # what Debian's slim images leave out (copyright files stay)
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-exclude=/usr/share/groff/*'
  --dpkgopt='path-exclude=/usr/share/lintian/*'
  --dpkgopt='path-exclude=/usr/share/linda/*'
  # the machine's archive may be a dated snapshot, whose Release files have expired
  --aptopt='Acquire::Check-Valid-Until "false"'
  --aptopt='Acquire::Check-Date "false"'
)
key=$(
  {
    mmdebstrap --version
    uname -m
    echo "$suite"
    printf '%s\n' "${mm_args[@]}"
    for f in "${sources[@]}"; do cat "$f"; done
  } | sha256sum | cut -c1-16
)
base=localhost/pgpressure-base:$key
tarball=$cache/base-$key.tar
(
  # one build of a base at a time (two test runs may start together)
  flock -w 900 9 || die "timed out waiting for $cache/lock"
  if buildah inspect --type image "$base" >/dev/null 2>&1; then
    echo "build-image: base $base (cached)"
    exit 0
  fi
  if [ ! -f "$tarball" ]; then
    echo "build-image: mmdebstrap $suite minbase -> $tarball (sources: ${sources[*]:-default})"
    rm -rf "$cache/partial.tar"
    if ! mmdebstrap --format=tar "${mm_args[@]}" "$suite" "$cache/partial.tar" \
      "${sources[@]}" >"$cache/mmdebstrap.log" 2>&1; then
      tail -n 30 "$cache/mmdebstrap.log" >&2
      die "mmdebstrap failed (whole log: $cache/mmdebstrap.log)"
    fi
    mv "$cache/partial.tar" "$tarball"
  fi
  echo "build-image: importing $tarball as $base"
  ctr=$(buildah from scratch)
  trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
  buildah add --quiet "$ctr" "$tarball" / >/dev/null # a local tarball is unpacked
  buildah config \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 \
    --cmd '["python3"]' \
    --label "org.opencontainers.image.description=Debian $suite minbase with Debian's python3 (mmdebstrap)" \
    "$ctr"
  buildah commit --quiet --rm "$ctr" "$base" >/dev/null
  trap - EXIT
) 9>"$cache/lock"

# --- 2. the image: this machine's pip configuration, mounted into the build -----------------
# `pip config list` gives what pip here uses (files and PIP_* variables); it becomes the
# build's /etc/pip.conf, and every local path it names (CA bundle, find-links folders, file://
# indexes with their files, constraint files) is mounted read-only at the same place.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mounts=()
while IFS= read -r path; do
  # (a symlink: its target, mounted where the configuration names it)
  if [ -e "$path" ]; then
    mounts+=(-v "$(realpath "$path"):$path:ro")
  fi
done < <(
  "${PYTHON:-python3}" - "$work/pip.conf" <<'EOF'
import ast, configparser, os, re, subprocess, sys
from urllib.parse import unquote, urlsplit

try:
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
except (OSError, subprocess.SubprocessError):
    listed = ""
settings = {}
for line in listed.splitlines():
    m = re.match(r"^(.*)\.([^.=]+)=(.*)$", line)
    if not m:
        continue
    section, name, value = m.group(1), m.group(2), ast.literal_eval(m.group(3))
    section = "global" if section == ":env:" else section  # PIP_* apply to every command
    if section == "global" and m.group(1) != ":env:" and ("global", name) in settings:
        continue  # the environment wins over the files
    settings[(section, name)] = value
conf = configparser.ConfigParser(interpolation=None)
paths = set()
for (section, name), value in sorted(settings.items()):
    if not conf.has_section(section):
        conf.add_section(section)
    conf.set(section, name, value)
    for word in value.split():
        if word.startswith("file://"):
            path = unquote(urlsplit(word).path)
            # a local simple index links its files as ../../files/...: mount its parent
            path = path.rstrip("/")
            paths.add(os.path.dirname(path) if path.endswith("/simple") else path)
        elif word.startswith("/"):
            paths.add(word)
with open(sys.argv[1], "w") as f:
    conf.write(f)
print("\n".join(sorted(paths)))
EOF
)
mounts+=(-v "$work/pip.conf:/etc/pip.conf:ro")
ca=/etc/ssl/certs/ca-certificates.crt
if [ -f "$ca" ] && [[ " ${mounts[*]} " != *" $ca:$ca:ro "* ]]; then
  mounts+=(-v "$ca:$ca:ro")
fi

echo "build-image: buildah bud $tag (Dockerfile, PYTHON_IMAGE=$base)"
echo "build-image: mounted into the build: ${mounts[*]}"
buildah bud --isolation chroot --layers --format docker --pull-never \
  --build-arg "PYTHON_IMAGE=$base" "${mounts[@]}" -t "$tag" -f Dockerfile .

# the image's size: its layers, uncompressed, as `buildah images` counts them
bytes=$(buildah inspect --type image "$tag" | "${PYTHON:-python3}" -c '
import json, sys
manifest = json.load(sys.stdin)["Manifest"]
manifest = json.loads(manifest) if isinstance(manifest, str) else manifest
print(sum(layer["size"] for layer in manifest["layers"]))')
echo "image $tag: $bytes bytes ($((bytes / 1000000)) MB)"
