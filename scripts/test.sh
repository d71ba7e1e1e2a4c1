#!/usr/bin/env bash
# Runs every check and test of the workspace, with the real services they need (Azurite).
# This is the command the README gives and the one .ci/run calls.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

need_debs xfsprogs e2fsprogs util-linux sqlite3 python3
start_azurite
trap stop_azurite EXIT
# Tests that need Azurite fail rather than skip from here on.
export LIFEBOAT_REQUIRE_AZURITE=1

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
say "cargo test"
cargo test --locked --workspace "$@"
