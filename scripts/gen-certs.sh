#!/usr/bin/env bash
# Generates the CA, every component's certificate and key, and the token keys:
#   scripts/gen-certs.sh [DIR] [extra `securesrv certs init` options, e.g. --workers 3]
# DIR is relative to where it is run from; without it, `certs init` decides (--dir, or the
# certs_dir of a --config, or ./certs). Builds the binary first if needed (set SECURESRV_BIN
# to use another). Refuses to replace an existing CA, or any file it would write, unless
# --force is given.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
dir=()
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
    dir=(--dir "$1")
    shift
fi
bin="${SECURESRV_BIN:-}"
if [ -z "$bin" ]; then
    (cd "$repo" && cargo build --release --quiet)
    bin="$repo/target/release/securesrv"
fi
# ${dir[@]+...}: an empty array under `set -u` on bash before 4.4 too.
"$bin" certs init ${dir[@]+"${dir[@]}"} "$@"
echo "certificates and keys written (keys mode 0600; never commit them)"
