#!/usr/bin/env bash
# Audits a live dispatcher and worker with scripts/tls-audit.sh: fresh certificates in a
# temporary directory, both components started on free ports, both scanned, both stopped.
#   scripts/ci-tls-audit.sh          (needs python3, openssl, dig; see scripts/tls-audit.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin="$PWD/target/release/securesrv"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/securesrv-audit.XXXXXX")
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
"$bin" certs init --dir "$tmp/certs" --workers 1 >/dev/null
dport=$(free_port)
wport=$(free_port)
cat >"$tmp/securesrv.toml" <<TOML
certs_dir = "$tmp/certs"
[dispatcher]
listen = "127.0.0.1:$dport"
[[worker]]
id = 1
listen = "127.0.0.1:$wport"
TOML
"$bin" --config "$tmp/securesrv.toml" worker --id 1 2>"$tmp/worker.log" &
pids+=($!)
"$bin" --config "$tmp/securesrv.toml" dispatcher 2>"$tmp/dispatcher.log" &
pids+=($!)
for _ in $(seq 1 100); do
    grep -q "worker link up" "$tmp/dispatcher.log" 2>/dev/null && break
    sleep 0.1
done
grep -q "worker link up" "$tmp/dispatcher.log" || { cat "$tmp/dispatcher.log" >&2; exit 1; }
scripts/tls-audit.sh "127.0.0.1:$dport" "$tmp/certs"
scripts/tls-audit.sh --cert-name dispatcher "127.0.0.1:$wport" "$tmp/certs"
