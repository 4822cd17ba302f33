#!/usr/bin/env bash
# Generates the CA, every component's certificate and key, and the token keys:
#   scripts/gen-certs.sh [DIR] [extra `securesrv certs init` options]
# DIR defaults to ./certs. Builds the binary first if needed (set SECURESRV_BIN to use another).
# Refuses to replace an existing CA unless --force is given.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-certs}"
[ $# -gt 0 ] && shift
bin="${SECURESRV_BIN:-}"
if [ -z "$bin" ]; then
    cargo build --release --quiet
    bin=target/release/securesrv
fi
"$bin" certs init --dir "$dir" "$@"
echo "certificates and keys are in $dir (keys mode 0600; never commit them)"
