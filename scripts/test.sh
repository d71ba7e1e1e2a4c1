#!/usr/bin/env bash
# Runs every check and test of the workspace, with the real services they need (Azurite).
# This is the command the README gives and the one .ci/run calls.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

need_debs xfsprogs e2fsprogs util-linux sqlite3 python3 python3-grpcio iproute2 faketime
start_azurite
trap stop_azurite EXIT
# Tests that need Azurite fail rather than skip from here on.
export LIFEBOAT_REQUIRE_AZURITE=1

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
say "cargo test"
log=$(mktemp /tmp/lifeboat-test.XXXXXX)
set +e
cargo test --locked --workspace "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# A suite beyond cargo test (a script printing `<name> test: PASS/FAIL/SKIPPED`): run when
# `$2` is empty, otherwise its skip line says why. Its exit status lands in `suite_status`.
suite() {
  local name=$1 why=$2 script=$3
  if [ -n "$why" ]; then
    echo "$name test: SKIPPED ($why)" | tee -a "$log"
    suite_status=0
    return
  fi
  say "$script"
  set +e
  "$script" 2>&1 | tee -a "$log"
  suite_status=${PIPESTATUS[0]}
  set -e
}
selected=${*:+cargo test arguments given: $*}
root=$([ "$(id -u)" -eq 0 ] && echo yes || true)

# The Debian package under a booted systemd (a container): root only, a few minutes; not when
# the arguments select some cargo tests only.
if [ -n "$selected" ]; then
  why=$selected
elif [ -z "$root" ]; then
  why="needs root: debootstrap, systemd-nspawn, loop mounts"
else
  why=
fi
suite package "$why" scripts/test-package
pkg_status=$suite_status
# The workspace built for Windows, its tests under wine (scripts/test-windows): root (it
# installs the cross toolchain and wine) or the packages already there, and not when the
# arguments select some tests only. About 15 minutes from nothing on 2 cores (the Windows std
# and every dependency are built for the target), 4 with a warm target/windows.
# LIFEBOAT_WINDOWS=0 leaves it out of a local run.
# shellcheck disable=SC2086 # a list of names
if [ "${LIFEBOAT_WINDOWS:-1}" = 0 ]; then
  why="LIFEBOAT_WINDOWS=0"
elif [ -n "$selected" ]; then
  why=$selected
elif [ -z "$root" ] && ! have_debs $WINDOWS_DEBS; then
  why="needs root to install rustc-web, mingw-w64 and wine"
else
  why=
fi
suite windows "$why" scripts/test-windows
win_status=$suite_status
# One closing line over every test binary, the package test and the Windows test, so the total
# is not hidden behind the last (often empty) doc-test run.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1); if ($(i) ~ /^ignored;?$/) s += $(i-1) } }
     /^(package|windows) test: PASS/ { p++ } /^(package|windows) test: FAIL/ { f++ } /^(package|windows) test: SKIPPED/ { s++ }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
rm -f "$log"
[ "$status" -eq 0 ] || exit "$status"
[ "$pkg_status" -eq 0 ] || exit "$pkg_status"
exit "$win_status"
