#!/usr/bin/env bash
# Cairn's one set-up script: installs everything a fresh Debian/Ubuntu machine needs
# (apt packages, .venv, the project in editable mode, pyfuse3 built with Cairn's patches,
# generated gRPC code), then runs what you ask for. Re-running it is fast: each step checks
# whether it is already done.
#
#   ./run.sh setup          install only
#   ./run.sh demo           install, then run the main job (a local Cairn stack)
#   ./run.sh test [ARGS]    install, then run the whole test suite (ARGS go to pytest)
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="$ROOT/.venv"
APT_PACKAGES="nats-server redis-server etcd-server xz-utils fuse3 libfuse3-dev pkg-config python3-venv python3-dev gcc git patch procps rsync sqlite3"
# pyfuse3 is built from its source release with third_party/pyfuse3/locks.patch (file locks
# that hold across mounts), loop.patch (a cheaper session loop) and extents.patch (reads of
# registered extents answered in C); the build has pyfuse3.CAIRN_LOCKS, CAIRN_LOOP and
# CAIRN_EXTENTS at the levels below.
PYFUSE3_VERSION=3.5.0
PYFUSE3_PATCHES="locks loop extents"
PYFUSE3_MARKERS="CAIRN_LOCKS=1 CAIRN_LOOP=2 CAIRN_EXTENTS=1"

say() { printf '[cairn-setup] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    say "need root (or sudo) to install: $*"; exit 1; fi
}

install_apt() {
  local missing=()
  for p in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq
  as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The packaged services are not wanted running: Cairn starts its own on free ports.
  for svc in redis-server nats-server etcd; do
    as_root systemctl disable --now "$svc" >/dev/null 2>&1 || true
  done
}

install_venv() {
  local stamp="$VENV/.cairn-installed"
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    python3 -m venv "$VENV"
  fi
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    say "installing Python dependencies into .venv"
    "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
    "$VENV/bin/python" -m pip install -q -e ".[test]"
    touch "$stamp"
  fi
}

install_pyfuse3() {
  local check="import sys, pyfuse3; sys.exit(any(getattr(pyfuse3, k, 0) != int(v) for k, v in (m.split('=') for m in '$PYFUSE3_MARKERS'.split())))"
  "$VENV/bin/python" -c "$check" 2>/dev/null && return 0
  say "building pyfuse3 $PYFUSE3_VERSION with third_party/pyfuse3/{${PYFUSE3_PATCHES// /,}}.patch"
  local started=$SECONDS work
  work=$(mktemp -d)
  (
    trap 'rm -rf "$work"' EXIT
    # Build tools: Cython regenerates the C from the patched sources; setuptools_scm reads
    # the source release's own version when pip checks what it downloaded.
    "$VENV/bin/python" -m pip install -q "Cython>=3.0,<4" "setuptools_scm>=8"
    "$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
      -d "$work" "pyfuse3==$PYFUSE3_VERSION"
    tar -xzf "$work/pyfuse3-$PYFUSE3_VERSION.tar.gz" -C "$work"
    local src="$work/pyfuse3-$PYFUSE3_VERSION"
    local name
    for name in $PYFUSE3_PATCHES; do
      patch -d "$src" -p1 --quiet --forward <"$ROOT/third_party/pyfuse3/$name.patch"
    done
    rm -f "$src/src/pyfuse3/__init__.c"  # the release's pre-generated C, without the patch
    "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation "$src"
  )
  if ! "$VENV/bin/python" -c "$check"; then
    say "the pyfuse3 just built lacks one of $PYFUSE3_MARKERS"; exit 1
  fi
  say "pyfuse3 built and installed in $((SECONDS - started)) s"
}

generate_proto() {
  "$VENV/bin/python" -m cairn.rpc.codegen
}

# The k8s test tier runs against a real control plane: kube-apiserver, kube-controller-manager
# and kube-scheduler from ../shared/k8s (xz-compressed, beside a development checkout only),
# unpacked once into .cache/k8s/<version>/ with a link to Debian's etcd, the folder named by
# KUBEBUILDER_ASSETS as envtest's binaries are. Without ../shared/k8s the tier skips.
K8S_SHARED="$ROOT/../shared/k8s"
K8S_BINARIES="kube-apiserver kube-controller-manager kube-scheduler"

k8s_assets() {
  [ -n "${KUBEBUILDER_ASSETS:-}" ] && return 0  # the user's own binaries win
  [ -d "$K8S_SHARED" ] || return 0
  local version dir name tmp
  version=$(grep -o -m1 'v[0-9][0-9]*\.[0-9][0-9]*\.[0-9][0-9]*' "$K8S_SHARED/README.md" 2>/dev/null || true)
  dir="$ROOT/.cache/k8s/${version:-unversioned}"
  for name in $K8S_BINARIES; do
    [ -f "$K8S_SHARED/$name.xz" ] || { say "$K8S_SHARED/$name.xz is missing"; return 0; }
  done
  mkdir -p "$dir"
  for name in $K8S_BINARIES; do
    # Done when executable and not older than its archive. The unpack goes to a temporary
    # name first, so an interrupted one is never taken for a finished binary.
    [ -x "$dir/$name" ] && ! [ "$K8S_SHARED/$name.xz" -nt "$dir/$name" ] && continue
    say "unpacking $name into ${dir#"$ROOT"/}"
    tmp=$(mktemp "$dir/.$name.XXXXXX")
    if ! xz -dc "$K8S_SHARED/$name.xz" >"$tmp"; then
      rm -f "$tmp"; say "could not unpack $K8S_SHARED/$name.xz"; exit 1
    fi
    chmod 755 "$tmp"
    mv -f "$tmp" "$dir/$name"
  done
  if command -v etcd >/dev/null; then
    ln -sfn "$(command -v etcd)" "$dir/etcd"
  fi
  export KUBEBUILDER_ASSETS="$dir"
}

setup() {
  install_apt
  install_venv
  install_pyfuse3
  generate_proto
}

cmd=${1:-setup}
shift || true
case "$cmd" in
  setup) setup ;;
  demo) setup; exec "$VENV/bin/cairn" demo "$@" ;;
  test) setup; k8s_assets; exec "$VENV/bin/python" -m pytest "$@" ;;
  -h|--help|help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) say "unknown command '$cmd' (try: setup, demo, test)"; exit 2 ;;
esac
