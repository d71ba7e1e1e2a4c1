# Shared shell helpers for scripts/*: sourced, not run.
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS="$ROOT/target/tools"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# What scripts/test-windows needs: Debian's Rust toolchain with its std source (the Windows std
# is built from it), mingw-w64 to link and compile C for Windows, wine to run the tests, and
# wixl (msitools) to build the MSI from packaging/windows/lifeboat-agent.wxs.
WINDOWS_DEBS="rustc-web cargo-web rust-web-src gcc-mingw-w64-x86-64 wine64 wixl msitools"

# Whether every Debian package named is installed.
have_debs() {
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || return 1
  done
}

# Installs Debian packages that are missing (needs root, as on CI and the dev machines).
need_debs() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "missing Debian packages: ${missing[*]} (install them, or run as root)"
  say "installing ${missing[*]}"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Installs the pinned Azurite (scripts/azurite/package-lock.json) under target/tools once.
install_azurite() {
  local dir="$TOOLS/azurite"
  if [ -x "$dir/node_modules/.bin/azurite-blob" ] && cmp -s "$ROOT/scripts/azurite/package-lock.json" "$dir/package-lock.json"; then
    return 0
  fi
  command -v npm >/dev/null || need_debs nodejs npm
  say "installing Azurite (pinned in scripts/azurite/package.json)"
  rm -rf "$dir" && mkdir -p "$dir"
  cp "$ROOT/scripts/azurite/package.json" "$ROOT/scripts/azurite/package-lock.json" "$dir/"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null) || die "npm could not install Azurite"
}

# Starts Azurite's blob service on a free loopback port with a throw-away data directory and
# exports LIFEBOAT_AZURITE; stop_azurite (or the EXIT trap) stops it.
start_azurite() {
  install_azurite
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  AZURITE_DIR=$(mktemp -d /tmp/lifeboat-azurite.XXXXXX)
  "$TOOLS/azurite/node_modules/.bin/azurite-blob" --blobHost 127.0.0.1 --blobPort "$port" \
    --location "$AZURITE_DIR" --disableTelemetry --silent >"$AZURITE_DIR/azurite.log" 2>&1 &
  AZURITE_PID=$!
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      export LIFEBOAT_AZURITE="http://127.0.0.1:$port/devstoreaccount1"
      say "Azurite listening on 127.0.0.1:$port (pid $AZURITE_PID)"
      return 0
    fi
    kill -0 "$AZURITE_PID" 2>/dev/null || { cat "$AZURITE_DIR/azurite.log" >&2; die "Azurite exited at start"; }
    sleep 0.1
  done
  die "Azurite did not start listening on port $port"
}

stop_azurite() {
  if [ -n "${AZURITE_PID:-}" ]; then
    kill "$AZURITE_PID" 2>/dev/null || true
    wait "$AZURITE_PID" 2>/dev/null || true
    AZURITE_PID=
  fi
  [ -n "${AZURITE_DIR:-}" ] && rm -rf "$AZURITE_DIR"
  AZURITE_DIR=
}
