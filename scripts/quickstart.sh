#!/usr/bin/env bash
# The main job on a fresh machine: build, make certificates (if ./certs has none), start the
# watchdog (dispatcher on 127.0.0.1:2222, workers on 2223 and 2224), wait until it is ready,
# send client requests, then stop the watchdog. `--keep` leaves the watchdog running.
set -euo pipefail
cd "$(dirname "$0")/.."
keep=0
[ "${1:-}" = "--keep" ] && keep=1
cargo build --release --quiet
bin=target/release/securesrv
if [ ! -f certs/ca.crt ]; then
    # The clone's certs/ (it holds a README) has git's 0755; keys belong in a 0700 directory.
    chmod 700 certs 2>/dev/null || true
    "$bin" certs init --dir certs
fi
for port in 2222 2223 2224; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "something already listens on 127.0.0.1:$port (another securesrv? e.g. one left by" \
            "'scripts/quickstart.sh --keep'); stop it first" >&2
        exit 1
    fi
done
log=$(mktemp -t securesrv-watchdog.XXXXXX.log)
"$bin" watchdog >"$log.out" 2>"$log" &
wd=$!
ok=0
# Stops the watchdog; the logs are removed after a successful run and kept otherwise.
stop() {
    kill -TERM "$wd" 2>/dev/null && wait "$wd" 2>/dev/null || true
    if [ "$ok" = 1 ]; then rm -f "$log" "$log.out"; else echo "logs kept: $log $log.out" >&2; fi
}
[ "$keep" = 1 ] || trap stop EXIT
for _ in $(seq 1 150); do
    grep -q "securesrv ready" "$log.out" 2>/dev/null && break
    kill -0 "$wd" 2>/dev/null || { echo "watchdog exited; log: $log" >&2; tail -20 "$log" >&2; exit 1; }
    sleep 0.1
done
grep -q "securesrv ready" "$log.out" || { echo "watchdog not ready after 15 s; log: $log" >&2; exit 1; }
cat "$log.out"
echo "+ securesrv client --cert certs/client.crt --key certs/client.key echo 'hello, securesrv'"
"$bin" client --cert certs/client.crt --key certs/client.key echo 'hello, securesrv'
echo
echo "+ securesrv client --cert certs/client.crt --key certs/client.key sha256 abc"
"$bin" client --cert certs/client.crt --key certs/client.key sha256 abc
if [ "$keep" = 1 ]; then
    echo "watchdog running as PID $wd (logs: $log); stop it with: kill $wd"
else
    ok=1
    echo "stopping the watchdog"
fi
