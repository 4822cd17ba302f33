#!/usr/bin/env bash
# Benchmarks securesrv (client -> dispatcher -> worker, mutual TLS 1.3) and, with
# --compare-nginx, an nginx `stream` mTLS relay in front of `securesrv bench-echo`.
# Run `scripts/bench.sh --help` for the details.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/bench.sh [--workers N] [--duration S] [--warmup S] [--rounds N] [--compare-nginx]
                        [--idle-connections N] [--load-threads N] [--json FILE] [--help]

Builds the release binary, makes throw-away certificates in a temporary directory, starts a
watchdog (dispatcher + N workers) on a free port block and measures with
`securesrv bench --json` (32 connections each, op echo):

  small      64 B payload, 1 request in flight per connection
  16KiB      16 KiB payload, 1 request in flight per connection
  new-conn   64 B payload, a new TLS connection (resumed) for every request

Memory: the dispatcher's RSS growth per idle connection, from N (default 2000) mTLS
connections (client certificate, ALPN securesrv/1) each answered once and then held open.

With --compare-nginx every target runs side by side: the watchdog, nginx and its backend are
all up, and each round runs every workload against securesrv, nginx and the bare backend in
turn (securesrv first in odd rounds, nginx first in even ones), so that drift of the machine
over the run affects all of them alike. The table gives each target's median round by rps (its
p50 and p99 come from that same run), the rps ratio of those medians and the p99 ratio of those
runs; the per-round ratios follow, and the JSON keeps every round.

--compare-nginx also runs the same workloads and the memory probe through an nginx `stream`
relay (TLS 1.3, client certificate required, ALPN securesrv/1, mTLS again to the backend)
in front of `securesrv bench-echo`, and the workloads against bench-echo directly (reference
for the relay's cost). Ratios in the table are securesrv / nginx: rps > 1 and p99 < 1 mean
securesrv is better. nginx runs as a foreground child with its own prefix, config, pid and
logs in the temporary directory; no system configuration is read or changed.

Options:
  --workers N            workers behind the dispatcher (default 1)
  --duration S           measured seconds per workload and round (default 5)
  --warmup S             unmeasured warm-up seconds per workload and round (default 1)
  --rounds N             rounds of all workloads (default 3)
  --compare-nginx        also measure the nginx relay and the bare echo backend
  --idle-connections N   connections for the memory probe (default 2000; 0 = skip)
  --load-threads N       runtime threads of the load generator (default 1, which leaves the
                         other cores to the relay and the backend; every target gets the same)
  --json FILE            also write every number to FILE
  -h, --help             this text

Environment: NGINX=/path/to/nginx picks the nginx binary (default: nginx on PATH).

Needs: cargo, python3; for --compare-nginx: nginx >= 1.21.4 with the stream module
(Debian 12: apt-get install nginx libnginx-mod-stream).
EOF
}

die() { echo "bench.sh: $*" >&2; exit 1; }
note() { echo "bench.sh: $*" >&2; }

workers=1
duration=5
warmup=1
rounds=3
compare_nginx=0
idle_conns=2000
json_out=""
load_threads=1
while [ $# -gt 0 ]; do
    case "$1" in
        --workers) workers=${2:?--workers needs a value}; shift 2 ;;
        --workers=*) workers=${1#*=}; shift ;;
        --duration) duration=${2:?--duration needs a value}; shift 2 ;;
        --duration=*) duration=${1#*=}; shift ;;
        --warmup) warmup=${2:?--warmup needs a value}; shift 2 ;;
        --warmup=*) warmup=${1#*=}; shift ;;
        --idle-connections) idle_conns=${2:?--idle-connections needs a value}; shift 2 ;;
        --idle-connections=*) idle_conns=${1#*=}; shift ;;
        --load-threads) load_threads=${2:?--load-threads needs a value}; shift 2 ;;
        --load-threads=*) load_threads=${1#*=}; shift ;;
        --rounds) rounds=${2:?--rounds needs a value}; shift 2 ;;
        --rounds=*) rounds=${1#*=}; shift ;;
        --compare-nginx) compare_nginx=1; shift ;;
        --json) json_out=${2:?--json needs a file}; shift 2 ;;
        --json=*) json_out=${1#*=}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
[[ "$workers" =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive integer"
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || die "--rounds must be a positive integer"
[[ "$load_threads" =~ ^[1-9][0-9]*$ ]] || die "--load-threads must be a positive integer"
[[ "$idle_conns" =~ ^[0-9]+$ ]] || die "--idle-connections must be a non-negative integer"
[[ "$duration" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--duration must be a number of seconds"
[[ "$warmup" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--warmup must be a number of seconds"
command -v python3 >/dev/null || die "python3 is needed (memory probe, table, JSON)"
if [ -n "$json_out" ]; then
    case "$json_out" in /*) ;; *) json_out="$PWD/$json_out" ;; esac
fi

cd "$(dirname "$0")/.."
repo=$PWD

# --- clean-up: every process this script starts is recorded and killed by PID -------------
tmp=$(mktemp -d -t securesrv-bench.XXXXXX)
pids=()
# Stops PID: TERM, then KILL after 5 s; then its children (nginx workers, recorded before the
# master goes away).
halt_pid() {
    local pid=$1 i kids
    kids=$(pgrep -P "$pid" 2>/dev/null || true)
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        [ "$i" = 50 ] && kill -KILL "$pid" 2>/dev/null
        sleep 0.1
    done
    wait "$pid" 2>/dev/null || true
    for i in $kids; do kill -KILL "$i" 2>/dev/null || true; done
}
cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in "${pids[@]+"${pids[@]}"}"; do halt_pid "$pid"; done
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Stops one recorded process now (the trap would otherwise stop it at exit).
stop_pid() {
    halt_pid "$1"
    forget_pid "$1"
}

# Forgets a recorded process that has already been reaped with `wait`.
forget_pid() {
    local i keep=()
    for i in "${pids[@]+"${pids[@]}"}"; do [ "$i" = "$1" ] || keep+=("$i"); done
    pids=("${keep[@]+"${keep[@]}"}")
}

# --- file descriptors: 2000 idle connections (x2 through nginx) need more than 1024 ---------
need_fds=$((idle_conns * 2 + 1024))
hard=$(ulimit -Hn)
if [ "$hard" = unlimited ] || [ "$hard" -ge 65536 ]; then
    ulimit -n 65536
else
    ulimit -n "$hard"
fi
if [ "$(ulimit -n)" -lt "$need_fds" ]; then
    idle_conns=$((($(ulimit -n) - 1024) / 2))
    [ "$idle_conns" -lt 0 ] && idle_conns=0
    note "ulimit -n is only $(ulimit -n); using $idle_conns idle connections"
fi

# --- build, and run a private copy so a concurrent rebuild cannot swap it mid-run -----------
bin="$tmp/securesrv"
for attempt in 1 2 3; do
    cargo build --release --quiet
    if cp target/release/securesrv "$bin.new" 2>/dev/null && "$bin.new" --help >/dev/null 2>&1; then
        mv "$bin.new" "$bin"
        break
    fi
    [ "$attempt" = 3 ] && die "could not get a working target/release/securesrv"
    note "target/release/securesrv changed under us; rebuilding (attempt $((attempt + 1)))"
    sleep 2
done

certs="$tmp/certs"
"$bin" certs init --dir "$certs" --workers "$workers" >"$tmp/certs-init.log" 2>&1 ||
    { cat "$tmp/certs-init.log" >&2; die "certs init failed"; }

# --- a free block of ports: dispatcher, workers, bench-echo, nginx -------------------------
nports=$((workers + 3))
base=$(python3 - "$nports" <<'PY'
import random, socket, sys
n = int(sys.argv[1])
for _ in range(200):
    base = random.randrange(20000, 32000 - n)
    socks = []
    try:
        for p in range(base, base + n):
            s = socket.socket()
            s.bind(("127.0.0.1", p))
            socks.append(s)
    except OSError:
        continue
    finally:
        for s in socks:
            s.close()
    print(base)
    sys.exit(0)
sys.exit("no free port block")
PY
) || die "no free port block found"
disp_port=$base
echo_port=$((base + workers + 1))
nginx_port=$((base + workers + 2))

cfg="$tmp/securesrv.toml"
cat >"$cfg" <<EOF
certs_dir = "$certs"
workers = $workers
[dispatcher]
listen = "127.0.0.1:$disp_port"
EOF

results="$tmp/results"
mkdir -p "$results"

# --- helpers ----------------------------------------------------------------------------------
# Waits (bounded) until 127.0.0.1:PORT accepts TCP connections while PID lives.
wait_port() {
    local port=$1 pid=$2 what=$3 log=$4 i
    for i in $(seq 1 150); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        kill -0 "$pid" 2>/dev/null || { tail -20 "$log" >&2; die "$what exited"; }
        [ "$i" = 150 ] && { tail -20 "$log" >&2; die "$what not listening after 15 s"; }
        sleep 0.1
    done
}

# run_bench TARGET WORKLOAD ADDR ROUND: one `securesrv bench` run, result in
# $results/TARGET.WORKLOAD.ROUND.json
run_bench() {
    local target=$1 workload=$2 addr=$3 round=$4 try out="$results/$1.$2.$4.json"
    local args=(--cert "$certs/client.crt" --key "$certs/client.key" --ca "$certs/ca.crt"
        --connect "$addr" --server-id "spiffe://securesrv/dispatcher/main"
        --connections 32 --in-flight 1 --duration "$duration" --warmup "$warmup" --op echo --threads "$load_threads" --json)
    case "$workload" in
        small) args+=(--size 64) ;;
        16KiB) args+=(--size 16384) ;;
        new-conn) args+=(--size 64 --new-connection-per-request) ;;
    esac
    for try in 1 2; do
        echo "  round $round/$rounds: $target / $workload ..." >&2
        if "$bin" bench "${args[@]}" >"$out.tmp" 2>"$out.err" && python3 -c \
            'import json,sys; d=json.load(open(sys.argv[1])); assert "rps" in d' "$out.tmp" 2>/dev/null; then
            mv "$out.tmp" "$out"
            return 0
        fi
        note "bench $target/$workload failed (try $try):"
        tail -5 "$out.err" >&2
        sleep 1
    done
    rm -f "$out.tmp"
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
rss_sum() { # a process and its direct children (nginx master + workers)
    local total=0 p
    for p in "$1" $(pgrep -P "$1" 2>/dev/null || true); do total=$((total + $(rss_kib "$p"))); done
    echo "$total"
}

cat >"$tmp/idle_conns.py" <<'PY'
# Opens N mutual-TLS connections (client cert, ALPN securesrv/1), sends one 0-byte echo on
# each and reads the reply (so the server has finished the handshake and accepted the
# connection), then holds them all open until the file DONE appears.
import os, socket, ssl, struct, sys, time
host, port, ca, cert, key, n, ready, done = sys.argv[1:9]
port, n = int(port), int(n)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.load_verify_locations(ca)
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(["securesrv/1"])
# {"request": {"id": 1, "op": "echo", "payload": b""}} in MessagePack, length-prefixed
body = b"\x81\xa7request\x83\xa2id\x01\xa2op\xa4echo\xa7payload\xc4\x00"
frame = struct.pack(">I", len(body)) + body

def read_exact(s, k):
    buf = b""
    while len(buf) < k:
        chunk = s.recv(k - len(buf))
        if not chunk:
            raise ConnectionError("closed by server")
        buf += chunk
    return buf

conns, failed, last_err = [], 0, ""
for _ in range(n):
    try:
        s = ctx.wrap_socket(socket.create_connection((host, port), timeout=10),
                            server_hostname="localhost")
        if s.selected_alpn_protocol() != "securesrv/1":
            raise ssl.SSLError("ALPN not negotiated")
        s.sendall(frame)
        (length,) = struct.unpack(">I", read_exact(s, 4))
        answer = read_exact(s, length)
        if not answer.startswith(b"\x81\xa5reply"):
            raise ValueError("unexpected answer %r" % answer[:40])
        conns.append(s)
    except Exception as e:  # noqa: BLE001 - report and carry on
        failed += 1
        last_err = repr(e)
        if failed > 50:
            break
time.sleep(1.0)  # let the server settle (tickets, buffers) before it is measured
with open(ready + ".tmp", "w") as f:
    f.write("%d %d %s\n" % (len(conns), failed, last_err.replace("\n", " ")))
os.rename(ready + ".tmp", ready)
deadline = time.time() + 300
while not os.path.exists(done) and time.time() < deadline:
    time.sleep(0.1)
for s in conns:
    s.close()
PY

# mem_probe TARGET PORT PID_OR_GROUP: RSS growth per idle connection -> $results/mem.TARGET.json
mem_probe() {
    local target=$1 port=$2 pid=$3 before after live failed err probe i
    [ "$idle_conns" -gt 0 ] || return 0
    echo "  $target / $idle_conns idle connections ..." >&2
    sleep 0.5
    before=$(rss_sum "$pid")
    rm -f "$tmp/mem.ready" "$tmp/mem.done"
    python3 "$tmp/idle_conns.py" 127.0.0.1 "$port" "$certs/ca.crt" "$certs/client.crt" \
        "$certs/client.key" "$idle_conns" "$tmp/mem.ready" "$tmp/mem.done" 2>"$tmp/mem.err" &
    probe=$!
    pids+=("$probe")
    for i in $(seq 1 1200); do
        [ -f "$tmp/mem.ready" ] && break
        kill -0 "$probe" 2>/dev/null || break
        [ "$i" = 1200 ] && note "memory probe: no answer after 120 s"
        sleep 0.1
    done
    if [ ! -f "$tmp/mem.ready" ]; then
        note "memory probe against $target failed:"; tail -5 "$tmp/mem.err" >&2
        touch "$tmp/mem.done"; stop_pid "$probe"
        return 0
    fi
    after=$(rss_sum "$pid")
    read -r live failed err <"$tmp/mem.ready"
    touch "$tmp/mem.done"
    wait "$probe" 2>/dev/null || true
    forget_pid "$probe"
    [ "$failed" -gt 0 ] && note "memory probe against $target: $failed connections failed (last: $err)"
    python3 -c 'import json,sys
b,a,n=int(sys.argv[1]),int(sys.argv[2]),int(sys.argv[3])
json.dump({"idle_connections":n,"failed":int(sys.argv[4]),"rss_before_kib":b,"rss_after_kib":a,
"kib_per_connection":(a-b)/n if n else None},open(sys.argv[5],"w"))' \
        "$before" "$after" "$live" "$failed" "$results/mem.$target.json"
}

workloads=(small 16KiB new-conn)
start_time=$(date -u +%Y-%m-%dT%H:%M:%SZ)

# --- securesrv: watchdog, dispatcher, workers ------------------------------------------------
echo "securesrv: dispatcher on 127.0.0.1:$disp_port, $workers worker(s); $rounds round(s) of ${duration}s runs after ${warmup}s warm-up" >&2
wd_out="$tmp/watchdog.out"
wd_err="$tmp/watchdog.err"
"$bin" --config "$cfg" watchdog --workers "$workers" >"$wd_out" 2>"$wd_err" &
wd=$!
pids+=("$wd")
for i in $(seq 1 300); do
    grep -q "^securesrv ready" "$wd_out" 2>/dev/null && break
    kill -0 "$wd" 2>/dev/null || { tail -20 "$wd_err" >&2; die "watchdog exited"; }
    [ "$i" = 300 ] && { tail -20 "$wd_err" >&2; die "watchdog not ready after 30 s"; }
    sleep 0.1
done
disp_pid=$(sed 's/\x1b\[[0-9;]*m//g' "$wd_err" |
    grep -o 'component started component=dispatcher pid=[0-9]*' | tail -1 | grep -o '[0-9]*$' || true)
if [ -z "$disp_pid" ] || ! kill -0 "$disp_pid" 2>/dev/null; then
    note "dispatcher PID not found in the watchdog log; skipping its memory probe"
    disp_pid=""
fi

[ -n "$disp_pid" ] && mem_probe securesrv "$disp_port" "$disp_pid"

# --- nginx relay and the bare echo backend ---------------------------------------------------
nginx_status="not requested"
nginx_version=""
install_hint() {
    cat >&2 <<'EOF'
bench.sh: nginx with the stream module is needed for --compare-nginx. Install it with
    Debian 12 / Ubuntu:   sudo apt-get install nginx libnginx-mod-stream
                          (nginx-light does NOT include the stream module)
    Fedora / RHEL:        sudo dnf install nginx nginx-mod-stream
    Alpine:               apk add nginx nginx-mod-stream
Continuing with securesrv only.
EOF
}
if [ "$compare_nginx" = 1 ]; then
    nginx_bin=${NGINX:-$(command -v nginx || true)}
    [ -z "$nginx_bin" ] && [ -x /usr/sbin/nginx ] && nginx_bin=/usr/sbin/nginx
    load_module=""
    if [ -z "$nginx_bin" ] || [ ! -x "$nginx_bin" ]; then
        nginx_status="nginx not found${nginx_bin:+ at $nginx_bin}"
    else
        nginx_v=$("$nginx_bin" -V 2>&1 || true)
        nginx_version=$(printf '%s\n' "$nginx_v" | sed -n 's|^nginx version: ||p' | head -1)
        if [[ "$nginx_v" =~ --with-stream=dynamic ]]; then
            mods=$(printf '%s\n' "$nginx_v" | grep -o -- '--modules-path=[^ ]*' | head -1 | cut -d= -f2)
            [ -z "$mods" ] && mods=$(printf '%s\n' "$nginx_v" | grep -o -- '--prefix=[^ ]*' | head -1 | cut -d= -f2)/modules
            if [ -f "$mods/ngx_stream_module.so" ]; then
                load_module="load_module $mods/ngx_stream_module.so;"
                nginx_status=ok
            else
                nginx_status="stream module not installed ($mods/ngx_stream_module.so missing)"
            fi
        elif [[ "$nginx_v" =~ --with-stream( |$) ]]; then
            nginx_status=ok
        else
            nginx_status="nginx built without the stream module"
        fi
        if [ "$nginx_status" = ok ] && ! [[ "$nginx_v" =~ --with-stream_ssl_module ]]; then
            nginx_status="nginx built without stream_ssl_module"
        fi
    fi
    if [ "$nginx_status" = ok ]; then
        ngx="$tmp/nginx"
        mkdir -p "$ngx"
        user_line=""
        [ "$(id -u)" = 0 ] && user_line="user root;"
        cat >"$ngx/nginx.conf" <<EOF
# Generated by scripts/bench.sh: an mTLS -> mTLS TCP relay in front of securesrv bench-echo.
$load_module
$user_line
daemon off;
master_process on;
worker_processes auto;
worker_rlimit_nofile $((idle_conns * 2 + 4096));
pid $ngx/nginx.pid;
error_log $ngx/error.log warn;
events {
    worker_connections $((idle_conns * 2 + 4096));
}
stream {
    server {
        listen 127.0.0.1:$nginx_port ssl;
        ssl_certificate $certs/dispatcher.crt;
        ssl_certificate_key $certs/dispatcher.key;
        ssl_protocols TLSv1.3;
        ssl_verify_client on;
        ssl_client_certificate $certs/ca.crt;
        ssl_verify_depth 2;
        ssl_alpn securesrv/1;
        ssl_session_cache shared:securesrv_bench:10m;
        ssl_session_tickets on;

        proxy_pass 127.0.0.1:$echo_port;
        proxy_ssl on;
        proxy_ssl_certificate $certs/client.crt;
        proxy_ssl_certificate_key $certs/client.key;
        proxy_ssl_trusted_certificate $certs/ca.crt;
        proxy_ssl_verify on;
        proxy_ssl_verify_depth 2;
        proxy_ssl_name localhost;
        proxy_ssl_protocols TLSv1.3;
        proxy_ssl_session_reuse on;
        proxy_connect_timeout 5s;
        proxy_timeout 300s;
    }
}
EOF
        if ! "$nginx_bin" -t -q -p "$ngx/" -c "$ngx/nginx.conf" -e "$ngx/error.log" >"$ngx/test.log" 2>&1; then
            cat "$ngx/test.log" >&2
            nginx_status="nginx -t rejected the relay configuration (needs nginx >= 1.21.4 for ssl_alpn)"
        fi
    fi
    if [ "$nginx_status" != ok ]; then
        note "$nginx_status"
        install_hint
    else
        echo "nginx $nginx_version: relay on 127.0.0.1:$nginx_port -> bench-echo on 127.0.0.1:$echo_port" >&2
        "$bin" --config "$cfg" bench-echo --listen "127.0.0.1:$echo_port" --certs "$certs" \
            >"$tmp/echo.out" 2>"$tmp/echo.err" &
        echo_pid=$!
        pids+=("$echo_pid")
        wait_port "$echo_port" "$echo_pid" "securesrv bench-echo" "$tmp/echo.err"
        "$nginx_bin" -p "$ngx/" -c "$ngx/nginx.conf" -e "$ngx/error.log" >"$ngx/stdout.log" 2>&1 &
        nginx_pid=$!
        pids+=("$nginx_pid")
        wait_port "$nginx_port" "$nginx_pid" "nginx" "$ngx/error.log"
        mem_probe nginx "$nginx_port" "$nginx_pid"
    fi
fi

# --- the workloads, in rounds; every target side by side in each round -----------------------
for round in $(seq 1 "$rounds"); do
    for w in "${workloads[@]}"; do
        if [ "$nginx_status" != ok ]; then
            run_bench securesrv "$w" "127.0.0.1:$disp_port" "$round"
        elif [ $((round % 2)) = 1 ]; then
            run_bench securesrv "$w" "127.0.0.1:$disp_port" "$round"
            run_bench nginx "$w" "127.0.0.1:$nginx_port" "$round"
            run_bench direct "$w" "127.0.0.1:$echo_port" "$round"
        else
            run_bench nginx "$w" "127.0.0.1:$nginx_port" "$round"
            run_bench securesrv "$w" "127.0.0.1:$disp_port" "$round"
            run_bench direct "$w" "127.0.0.1:$echo_port" "$round"
        fi
    done
done
if [ -n "$disp_pid" ]; then
    restarts=$(grep -c 'component started component=dispatcher' "$wd_err" || true)
    [ "${restarts:-1}" -gt 1 ] && note "warning: the dispatcher was restarted during the run"
fi
if [ "$nginx_status" = ok ]; then
    stop_pid "$nginx_pid"
    stop_pid "$echo_pid"
fi
stop_pid "$wd"

# --- table and JSON ------------------------------------------------------------------------------
python3 - "$results" "$json_out" "$start_time" "$SECONDS" "$workers" "$duration" "$warmup" "$load_threads" "$rounds" \
    "$nginx_status" "$nginx_version" "$(git -C "$repo" describe --always --dirty 2>/dev/null || echo unknown)" <<'PY'
import json, os, sys
res_dir, json_out, started, elapsed, workers, duration, warmup, load_threads, rounds, ngx_status, ngx_version, rev = sys.argv[1:13]
rounds = int(rounds)
workloads = [("small", "64 B, 32 conns"), ("16KiB", "16 KiB, 32 conns"), ("new-conn", "64 B, new conn/req")]
targets = ["securesrv", "nginx", "direct"]

def load(name):
    p = os.path.join(res_dir, name + ".json")
    return json.load(open(p)) if os.path.exists(p) else None

def median_run(runs):
    """The run with the median rps (the lower middle one for an even count), or None."""
    runs = sorted((r for r in runs if r is not None), key=lambda r: r["rps"])
    return runs[(len(runs) - 1) // 2] if runs else None

every = {t: {w: [load("%s.%s.%d" % (t, w, i)) for i in range(1, rounds + 1)] for w, _ in workloads}
         for t in targets}
results = {t: {w: median_run(every[t][w]) for w, _ in workloads} for t in targets}
memory = {t: load("mem." + t) for t in ("securesrv", "nginx")}
nginx_on = any(results["nginx"].values()) or memory["nginx"] is not None

def ratio(a, b):
    return a / b if a is not None and b else None

def f(x, fmt="{:.0f}"):
    return "-" if x is None else fmt.format(x)

def g(r, k):
    return None if r is None else r.get(k)

ratios = {}
for w, _ in workloads:
    s, n = results["securesrv"][w], results["nginx"][w]
    ratios[w] = {"rps": ratio(g(s, "rps"), g(n, "rps")), "p99": ratio(g(s, "p99_us"), g(n, "p99_us"))}
mem_ratio = ratio(g(memory["securesrv"], "kib_per_connection"), g(memory["nginx"], "kib_per_connection"))

header = ["workload", "securesrv rps", "p50 us", "p99 us"]
if nginx_on:
    header += ["nginx rps", "p50 us", "p99 us", "rps ratio", "p99 ratio", "direct rps", "p50 us", "p99 us"]
rows = []
for w, label in workloads:
    s, n, d = (results[t][w] for t in targets)
    row = [label, f(g(s, "rps")), f(g(s, "p50_us")), f(g(s, "p99_us"))]
    if nginx_on:
        row += [f(g(n, "rps")), f(g(n, "p50_us")), f(g(n, "p99_us")),
                f(ratios[w]["rps"], "{:.2f}"), f(ratios[w]["p99"], "{:.2f}"),
                f(g(d, "rps")), f(g(d, "p50_us")), f(g(d, "p99_us"))]
    rows.append(row)
ms, mn = memory["securesrv"], memory["nginx"]
mem_row = ["idle conn RSS KiB/conn", f(g(ms, "kib_per_connection"), "{:.1f}"), "", ""]
if nginx_on:
    mem_row += [f(g(mn, "kib_per_connection"), "{:.1f}"), "", "", f(mem_ratio, "{:.2f}"), "", "", "", ""]
rows.append(mem_row)

widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
def line(r):
    return "| " + " | ".join(str(c).ljust(widths[i]) if i == 0 else str(c).rjust(widths[i])
                             for i, c in enumerate(r)) + " |"
print()
print("securesrv %s, %s worker(s), median of %d round(s) of %ss measured after %ss warm-up, op echo, "
      "1 request in flight per connection, load generator on %s thread(s)"
      % (rev, workers, rounds, duration, warmup, load_threads))
print(line(header))
print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
for r in rows:
    print(line(r))
if nginx_on:
    print("ratios = securesrv / nginx relay (rps > 1 and p99 < 1 favour securesrv); "
          "direct = securesrv bench-echo without the relay")
else:
    print("nginx relay: %s" % ngx_status)
for t in ("securesrv", "nginx"):
    m = memory[t]
    if m:
        print("memory %-9s: RSS %d -> %d KiB with %d idle connections (%s)" % (
            t, m["rss_before_kib"], m["rss_after_kib"], m["idle_connections"],
            "dispatcher process" if t == "securesrv" else "nginx master + workers"))
if nginx_on and rounds > 1:
    for w, label in workloads:
        per_round = [ratio(g(s, "rps"), g(n, "rps")) for s, n in zip(every["securesrv"][w], every["nginx"][w])]
        print("rps ratio by round, %-18s: %s" % (label, " ".join(f(x, "{:.2f}") for x in per_round)))
for t in targets:
    for w, label in workloads:
        valid = sum(r is not None for r in every[t][w])
        if (t == "securesrv" or nginx_on) and valid < rounds:
            print("warning: %s / %s: only %d of %d rounds succeeded; its median is of those"
                  % (t, label, valid, rounds))
        for i, r in enumerate(every[t][w], 1):
            if r and r.get("errors"):
                print("errors %s/%s round %d: %s %s" % (t, w, i, r["errors"], r.get("errors_by_kind", {})))
print("total time: %ss" % elapsed)

if json_out:
    doc = {"started": started, "elapsed_s": int(elapsed), "revision": rev,
           "params": {"workers": int(workers), "duration_s": float(duration), "warmup_s": float(warmup),
                      "rounds": rounds,
                      "connections": 32, "in_flight": 1, "op": "echo",
                      "load_threads": int(load_threads)},
           "workloads": {w: label for w, label in workloads},
           "nginx": {"status": ngx_status, "version": ngx_version or None},
           "results": results, "rounds": every, "memory": memory,
           "ratios": dict(ratios, idle_memory=mem_ratio)}
    with open(json_out, "w") as fh:
        json.dump(doc, fh, indent=2)
        fh.write("\n")
    print("JSON written to %s" % json_out)
PY
