#!/usr/bin/env bash
# tls-audit.sh — external TLS audit of one securesrv endpoint (dispatcher or worker).
#
# Runs testssl.sh (3.2 or later) against HOST:PORT with a client certificate, so that it gets
# past mutual TLS, judges its JSON findings (not its exit code), optionally cross-checks the
# protocol list with nmap's ssl-enum-ciphers, and probes with openssl s_client what testssl
# cannot see: that a client without a certificate, with a foreign ALPN, with a certificate from
# another CA or of the wrong role, or offering only P-384, is refused. Exit 0 = PASS, 1 = FAIL,
# 2 = usage or environment problem. Run with --help for details.
set -Eeuo pipefail
trap 'echo "${0##*/}: internal error (exit $?) at line $LINENO: $BASH_COMMAND" >&2; exit 2' ERR

readonly PROG=${0##*/}
readonly TESTSSL_MIN_VERSION=3.2
readonly TESTSSL_DEBIAN_SUITE=trixie          # Debian 13 ships testssl.sh 3.2.x
readonly EXPECTED_ALPN=securesrv/1

usage() {
    cat <<EOF
Usage: $PROG [OPTIONS] HOST:PORT [CERTS_DIR]

Audit the TLS configuration of a securesrv endpoint with an external scanner and fail on anything
weaker than the project's policy (TLS 1.3 only, AEAD suites only, key exchange X25519 or P-256
only, client certificate from our CA and of an allowed role required, ALPN $EXPECTED_ALPN required).

Arguments:
  HOST:PORT          endpoint to scan (an IPv6 literal as [ADDR]:PORT)
  CERTS_DIR          directory made by 'securesrv certs init' (default: ./certs); uses
                     CERTS_DIR/ca.crt and CERTS_DIR/NAME.crt + NAME.key as client identity

Options:
  --cert-name NAME   client identity to present (default: client, or \$TLS_AUDIT_CERT_NAME).
                     Workers only accept the dispatcher or the watchdog: use --cert-name dispatcher
  --no-nmap          skip the nmap ssl-enum-ciphers cross-check (it is skipped anyway without nmap;
                     a skip is printed after RESULT as NOT RUN)
  --role ROLE        dispatcher or worker: which certificate is of the wrong role for this endpoint
                     (default: read from the SPIFFE ID of the certificate the endpoint presents)
  --securesrv PATH   securesrv binary used to make a throw-away CA ('certs init' in a temporary
                     directory) for the foreign-CA probe (default: \$SECURESRV, else securesrv on
                     PATH, else target/release/securesrv of this repository; without one, openssl
                     makes the throw-away CA and client certificate)
  --out DIR          keep the raw results there (testssl.json, testssl.txt, nmap.xml)
  -v, --verbose      show testssl's own report while it runs
  -h, --help         show this help

What is checked (verdict from testssl's --jsonfile, judged by python3):
  * FAIL if SSLv2, SSLv3, TLS 1.0, 1.1 or 1.2 is offered, or TLS 1.3 is not
  * FAIL if any cipher suite outside TLS_AES_256_GCM_SHA384, TLS_AES_128_GCM_SHA256 and
    TLS_CHACHA20_POLY1305_SHA256 is offered, or any weak cipher category (NULL, aNULL, EXPORT,
    LOW, 3DES/IDEA, CBC, non-FS) is offered
  * FAIL on any finding marked vulnerable or of severity MEDIUM, HIGH, CRITICAL or FATAL that is
    not in the private-PKI noise list (the list is printed with every filtered finding);
    LOW and WARN findings are listed but do not fail the audit
  * FAIL if the scan is incomplete (an expected check has no result)
  * FAIL if nmap (when installed) shows any protocol but TLSv1.3 or any cipher graded below A
  * FAIL if testssl finds any key exchange group other than X25519 and P-256 (secp256r1,
    prime256v1) accepted (FS_ECDHE_curves, DH_groups), or neither of them
Direct probes with openssl s_client (stdin kept open 1 s, so TLS 1.3 post-handshake alerts are seen):
  * FAIL if a client without certificate, or with ALPN h2, is not refused, or a client with
    the certificate and ALPN $EXPECTED_ALPN cannot complete a TLS 1.3 handshake
  * FAIL if a handshake offering only P-384 (-groups P-384) succeeds, or one offering only X25519
    or only P-256 fails
  * FAIL if a client certificate from another CA (same name and role, a throw-away CA) or of the
    wrong role (a dispatcher is shown CERTS_DIR's worker-1, a worker is shown client) is not
    refused with a certificate alert (unknown ca, unsupported certificate, certificate unknown,
    certificate required, bad certificate, access denied); the wrong-role probe is SKIPPED if the
    role is unknown (see --role) or that certificate is missing
  * session resumption (-sess_out, then -sess_in: "Reused") is printed for information, never
    judged; testssl's own session-ticket results vary between runs under TLS 1.3 + mTLS and are
    printed as unreliable
Anything that did not run (nmap, a SKIPPED probe) is printed after RESULT as NOT RUN.

testssl.sh: a 'testssl' or 'testssl.sh' $TESTSSL_MIN_VERSION+ on PATH (or \$TESTSSL) is used as is;
otherwise Debian $TESTSSL_DEBIAN_SUITE's testssl.sh package is downloaded once with apt-get (a
private sources list and private state under the cache; the system's apt state is not touched),
unpacked with dpkg-deb and kept in \${XDG_CACHE_HOME:-\$HOME/.cache}/securesrv/testssl.

Environment: TESTSSL (path to a testssl.sh binary), TLS_AUDIT_CERT_NAME, SECURESRV (see
--securesrv), DEBIAN_MIRROR (default: the Debian mirror of the system's sources, else
http://deb.debian.org/debian), DEBIAN_KEYRING.

Needs: bash 4+, openssl, python3, the tools testssl.sh needs (hexdump dd grep awk tr sed wc date
cat ps kill head tail dirname timeout, and one of dig/host/drill/nslookup); apt-get and dpkg-deb
for the first download only. Missing tools are reported with the Debian package that has them.
EOF
}

say() { printf '%s\n' "$*"; }
warn() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { warn "$*"; exit 2; }

# ---------------------------------------------------------------- arguments
cert_name=${TLS_AUDIT_CERT_NAME:-client}
use_nmap=true
role_opt=
securesrv_opt=${SECURESRV:-}
out_dir=
verbose=false
positional=()
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --cert-name) [[ $# -ge 2 ]] || die "--cert-name needs a value"; cert_name=$2; shift 2 ;;
        --cert-name=*) cert_name=${1#*=}; shift ;;
        --no-nmap) use_nmap=false; shift ;;
        --role) [[ $# -ge 2 ]] || die "--role needs a value"; role_opt=$2; shift 2 ;;
        --role=*) role_opt=${1#*=}; shift ;;
        --securesrv) [[ $# -ge 2 ]] || die "--securesrv needs a value"; securesrv_opt=$2; shift 2 ;;
        --securesrv=*) securesrv_opt=${1#*=}; shift ;;
        --out) [[ $# -ge 2 ]] || die "--out needs a value"; out_dir=$2; shift 2 ;;
        --out=*) out_dir=${1#*=}; shift ;;
        -v | --verbose) verbose=true; shift ;;
        --) shift; positional+=("$@"); break ;;
        -*) die "unknown option: $1 (see --help)" ;;
        *) positional+=("$1"); shift ;;
    esac
done
[[ ${#positional[@]} -ge 1 && ${#positional[@]} -le 2 ]] || { usage >&2; exit 2; }
target=${positional[0]}
certs_dir=${positional[1]:-./certs}
[[ $cert_name =~ ^[A-Za-z0-9._-]+$ ]] || die "bad --cert-name: $cert_name"
[[ -z $role_opt || $role_opt == dispatcher || $role_opt == worker ]] ||
    die "--role must be dispatcher or worker, got: $role_opt"

# securesrv binary for the throw-away foreign CA: --securesrv / $SECURESRV (must work if given),
# else 'securesrv' on PATH, else target/release/securesrv of this repository; none: openssl.
securesrv_bin=
if [[ -n $securesrv_opt ]]; then
    securesrv_bin=$(command -v -- "$securesrv_opt" 2>/dev/null) && [[ -x $securesrv_bin ]] ||
        die "securesrv binary '$securesrv_opt' (--securesrv / SECURESRV) is not executable"
elif securesrv_bin=$(command -v securesrv 2>/dev/null); then
    :
else
    securesrv_bin=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)/target/release/securesrv
    [[ -x $securesrv_bin ]] || securesrv_bin=
fi

if [[ $target =~ ^\[([0-9A-Fa-f:.]+)\]:([0-9]+)$ ]]; then
    host=${BASH_REMATCH[1]}; port=${BASH_REMATCH[2]}; ipv6=true
elif [[ $target =~ ^([A-Za-z0-9._-]+):([0-9]+)$ ]]; then
    host=${BASH_REMATCH[1]}; port=${BASH_REMATCH[2]}; ipv6=false
else
    die "target must be HOST:PORT or [IPV6]:PORT, got: $target"
fi
((port >= 1 && port <= 65535)) || die "bad port: $port"

# ---------------------------------------------------------------- tools
((BASH_VERSINFO[0] >= 4)) || die "bash 4 or later is needed (this is $BASH_VERSION)"

declare -A pkg_of=(
    [openssl]=openssl [python3]=python3 [hexdump]=bsdextrautils [dd]=coreutils [grep]=grep
    [awk]=mawk [tr]=coreutils [sed]=sed [wc]=coreutils [date]=coreutils [cat]=coreutils
    [ps]=procps [kill]=procps [head]=coreutils [tail]=coreutils [dirname]=coreutils
    [timeout]=coreutils [mktemp]=coreutils [sort]=coreutils
)
missing=()
for tool in openssl python3 mktemp sort hexdump dd grep awk tr sed wc date cat ps kill head tail \
    dirname timeout; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool (Debian package: ${pkg_of[$tool]})")
done
# testssl.sh refuses to start without a resolver binary, even for an IP address.
if ! command -v dig >/dev/null 2>&1 && ! command -v host >/dev/null 2>&1 &&
    ! command -v drill >/dev/null 2>&1 && ! command -v nslookup >/dev/null 2>&1; then
    missing+=("one of dig/host/drill/nslookup, needed by testssl.sh (Debian package: bind9-dnsutils)")
fi
if [[ ${#missing[@]} -gt 0 ]]; then
    warn "missing tools:"
    printf '  - %s\n' "${missing[@]}" >&2
    exit 2
fi

# ---------------------------------------------------------------- certificates
ca_crt=$certs_dir/ca.crt
client_crt=$certs_dir/$cert_name.crt
client_key=$certs_dir/$cert_name.key
for f in "$ca_crt" "$client_crt" "$client_key"; do
    [[ -r $f ]] || die "cannot read $f (CERTS_DIR=$certs_dir, --cert-name=$cert_name)"
done

work=$(mktemp -d "${TMPDIR:-/tmp}/tls-audit.XXXXXX")
# shellcheck disable=SC2317,SC2329 # invoked by the trap
cleanup() { rm -rf -- "$work"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# cat a PEM file, adding the final newline if it lacks one (so the next block starts on a line).
pem_cat() { cat -- "$1"; [[ -z $(tail -c 1 -- "$1") ]] || echo; }

# The --mtls bundle: certificate + unencrypted PKCS#8 key in one mode-0600 file, removed on exit.
bundle=$work/mtls-bundle.pem
old_umask=$(umask)
umask 077
: >"$bundle"
chmod 600 "$bundle"
pem_cat "$client_crt" >>"$bundle"
if [[ $(head -n 1 "$client_key") == "-----BEGIN PRIVATE KEY-----" ]]; then
    pem_cat "$client_key" >>"$bundle"
else
    # SEC1/PKCS#1 key: convert to PKCS#8 without ever printing it (an encrypted key is refused).
    openssl pkey -in "$client_key" -passin pass: </dev/null >>"$bundle" 2>/dev/null ||
        die "$client_key is not an unencrypted private key (testssl --mtls needs one)"
fi
umask "$old_umask"
openssl x509 -in "$client_crt" -noout 2>/dev/null || die "$client_crt is not a PEM certificate"
openssl x509 -in "$ca_crt" -noout 2>/dev/null || die "$ca_crt is not a PEM certificate"

# ---------------------------------------------------------------- testssl.sh
version_ge() { [[ $(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1) == "$2" ]]; }

testssl_version_of() {
    local v
    v=$(grep -m 1 -oE '^(declare -r )?VERSION="[0-9][0-9.]*' "$1" 2>/dev/null | grep -oE '[0-9][0-9.]*$') ||
        v=$("$1" --color 0 --version </dev/null 2>/dev/null | grep -m 1 -oE 'version [0-9][0-9.]*' |
            grep -oE '[0-9][0-9.]*') || v=
    printf '%s' "$v"
}

cache_dir=${XDG_CACHE_HOME:-$HOME/.cache}/securesrv/testssl
cached_root=$cache_dir/root

fetch_testssl() {
    command -v apt-get >/dev/null 2>&1 || die "no testssl.sh $TESTSSL_MIN_VERSION+ found and no apt-get to fetch it"
    command -v dpkg-deb >/dev/null 2>&1 || die "no testssl.sh $TESTSSL_MIN_VERSION+ found and no dpkg-deb to unpack it"
    local keyring=${DEBIAN_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}
    [[ -r $keyring ]] || die "Debian archive keyring $keyring not found (package debian-archive-keyring)"
    local mirror=${DEBIAN_MIRROR:-}
    if [[ -z $mirror ]]; then
        # shellcheck disable=SC2016 # $(REPO_URI) is apt's format field, not a shell expansion
        mirror=$(apt-get indextargets 'Origin: Debian' 'Label: Debian' --format '$(REPO_URI)' 2>/dev/null |
            grep -m 1 -E '^https?://' || true)
        mirror=${mirror:-http://deb.debian.org/debian}
    fi
    mkdir -p "$cache_dir"
    local d
    d=$(mktemp -d "$cache_dir/.fetch.XXXXXX")
    [[ $d != *'"'* ]] || die "cache path must not contain a double quote: $d"
    mkdir -p "$d/empty" "$d/state/lists/partial" "$d/cache/archives/partial" "$d/log" "$d/deb"
    : >"$d/status"
    printf 'deb [signed-by=%s] %s %s main\n' "$keyring" "${mirror%/}" "$TESTSSL_DEBIAN_SUITE" >"$d/sources.list"
    # A private apt configuration: read first (APT_CONFIG), it points apt.conf.d, the main
    # apt.conf, sources, preferences, lists, cache and status at this directory, so the system's
    # hooks (e.g. APT::Update::Post-Invoke-Success), extra index targets and state are not used
    # or touched. Only the system's network settings (proxies, validity checks) are carried over.
    {
        apt-config dump 2>/dev/null |
            grep -E '^Acquire::(https?(::| )|Check-Valid-Until |Check-Date |ForceIPv[46] |Retries )' || true
        cat <<EOF
Dir::Etc::main "/dev/null";
Dir::Etc::parts "$d/empty";
Dir::Etc::sourcelist "$d/sources.list";
Dir::Etc::sourceparts "$d/empty";
Dir::Etc::preferences "$d/empty/preferences";
Dir::Etc::preferencesparts "$d/empty";
Dir::State "$d/state";
Dir::State::lists "lists/";
Dir::State::status "$d/status";
Dir::Cache "$d/cache";
Dir::Cache::archives "archives/";
Dir::Log "$d/log";
Debug::NoLocking "true";
Acquire::Languages "none";
EOF
        # As root apt would hand the download to user _apt, which cannot enter this private dir.
        [[ $EUID -ne 0 ]] || echo 'APT::Sandbox::User "root";'
    } >"$d/apt.conf"
    say "fetching testssl.sh from Debian $TESTSSL_DEBIAN_SUITE ($mirror) into $cache_dir ..." >&2
    if ! (APT_CONFIG=$d/apt.conf apt-get -q update >"$d/apt.log" 2>&1 &&
        cd "$d/deb" && APT_CONFIG=$d/apt.conf apt-get -q download testssl.sh >>"$d/apt.log" 2>&1); then
        warn "apt-get failed:"
        tail -n 15 "$d/apt.log" >&2
        rm -rf -- "$d"
        exit 2
    fi
    local deb
    deb=$(find "$d/deb" -maxdepth 1 -name 'testssl.sh_*.deb' | head -n 1)
    [[ -n $deb ]] || { rm -rf -- "$d"; die "apt-get download testssl.sh produced no .deb"; }
    mkdir "$d/root"
    dpkg-deb -x "$deb" "$d/root"
    basename "$deb" >"$d/root/.deb"
    rm -rf -- "$cached_root"
    mv -T "$d/root" "$cached_root"
    rm -rf -- "$d"
}

testssl_bin=
testssl_env=()
if [[ -n ${TESTSSL:-} ]]; then
    [[ -x $TESTSSL ]] || die "TESTSSL=$TESTSSL is not executable"
    testssl_bin=$TESTSSL
else
    for cand in testssl testssl.sh; do
        p=$(command -v "$cand" 2>/dev/null) || continue
        v=$(testssl_version_of "$p")
        if [[ -n $v ]] && version_ge "$v" "$TESTSSL_MIN_VERSION"; then testssl_bin=$p; break; fi
    done
fi
if [[ -z $testssl_bin ]]; then
    v=
    [[ -x $cached_root/usr/bin/testssl ]] && v=$(testssl_version_of "$cached_root/usr/bin/testssl")
    if [[ -z $v ]] || ! version_ge "$v" "$TESTSSL_MIN_VERSION"; then
        fetch_testssl
    fi
    testssl_bin=$cached_root/usr/bin/testssl
    [[ -r $cached_root/etc/testssl/cipher-mapping.txt ]] || die "unpacked testssl.sh lacks etc/testssl (try: rm -rf $cache_dir)"
    testssl_env=("TESTSSL_INSTALL_DIR=$cached_root/etc/testssl")
fi
testssl_version=$(testssl_version_of "$testssl_bin")
if [[ -z $testssl_version ]] || ! version_ge "$testssl_version" "$TESTSSL_MIN_VERSION"; then
    die "$testssl_bin is version '${testssl_version:-unknown}', need $TESTSSL_MIN_VERSION+ (for --mtls)"
fi

# ---------------------------------------------------------------- scan
say "tls-audit: $target  identity=$cert_name ($client_crt)  CA=$ca_crt"
say "scanner:   testssl $testssl_version ($testssl_bin), $(openssl version | cut -d' ' -f1-2)"

# Checks: -p protocols, -s cipher categories, -P cipher list per protocol, -f forward secrecy and
# groups, -S server defaults and certificate, then the TLS vulnerabilities one by one (-H
# Heartbleed, -I CCS, -T Ticketbleed, --BB ROBOT, -R renegotiation, -C CRIME, -O POODLE,
# -Z fallback SCSV, -W SWEET32, -A BEAST, -L LUCKY13, -WS Winshock, -F FREAK, -J LOGJAM,
# -D DROWN, -4 RC4). Not run: -h (HTTP headers) and -B (BREACH), which are for HTTP services, and
# -c (client simulation). --nodns min: no PTR/CAA look-ups (meaningless for a private PKI).
testssl_args=(
    --quiet --color 0 --warnings batch --nodns min
    --connect-timeout 10 --openssl-timeout 10
    --mtls "$bundle" --add-ca "$ca_crt"
    -p -s -P -f -S -H -I -T --BB -R -C -O -Z -W -A -L -WS -F -J -D -4
    --jsonfile "$work/testssl.json"
)
$ipv6 && testssl_args+=(-6)
start=$SECONDS
testssl_rc=0
if $verbose; then
    env HEADER_MAXSLEEP=1 SSL_RENEG_ATTEMPTS=1 SSL_RENEG_WAIT=0.05 ${testssl_env[@]+"${testssl_env[@]}"} \
        "$testssl_bin" "${testssl_args[@]}" "$target" </dev/null 2>&1 | tee "$work/testssl.txt" >&2 ||
        testssl_rc=$?
else
    env HEADER_MAXSLEEP=1 SSL_RENEG_ATTEMPTS=1 SSL_RENEG_WAIT=0.05 ${testssl_env[@]+"${testssl_env[@]}"} \
        "$testssl_bin" "${testssl_args[@]}" "$target" </dev/null >"$work/testssl.txt" 2>&1 ||
        testssl_rc=$?
fi
testssl_secs=$((SECONDS - start))
[[ -s $work/testssl.json ]] || { echo '[]' >"$work/testssl.json"; }

# ---------------------------------------------------------------- nmap cross-check
nmap_xml=
nmap_note=
if ! $use_nmap; then
    nmap_note="skipped (--no-nmap)"
elif ! command -v nmap >/dev/null 2>&1; then
    nmap_note="skipped (nmap not installed; Debian package: nmap)"
else
    nmap_xml=$work/nmap.xml
    nmap_args=(-Pn -n -sT --script ssl-enum-ciphers -p "$port" -oX "$nmap_xml")
    $ipv6 && nmap_args+=(-6)
    if ! timeout 120 nmap "${nmap_args[@]}" "$host" >"$work/nmap.txt" 2>&1; then
        nmap_note="nmap failed: $(tail -n 1 "$work/nmap.txt")"
        nmap_xml=
    fi
fi

# ---------------------------------------------------------------- direct probes (openssl s_client)
# testssl cannot tell a TLS 1.3 server that refuses a missing certificate after the handshake
# (the alert arrives on the first read) from one where client auth is optional, it only offers
# well-known ALPN ids, and it never presents a certificate other than --mtls. These probes keep
# stdin open for a second so the alert is seen. Each prints one line to probes.tsv:
# PASS|FAIL|SKIP|INFO <tab> name <tab> detail (SKIP and INFO never fail the audit).
#
# expect: ok           TLS 1.3 session with ALPN securesrv/1
#         refused      any alert or a closed connection
#         refused-cert an alert that refuses the client certificate (CERT_ALERTS)
#         refused-hs   the handshake itself fails with an alert (no TLS session at all)
readonly CERT_ALERTS='unknown ca|unsupported certificate|certificate unknown|certificate required|bad certificate|access denied'
probe() { # name expect extra s_client args...
    local name=$1 expect=$2 out got detail alert
    shift 2
    out=$(sleep 1 | timeout 15 openssl s_client -connect "$target" -CAfile "$ca_crt" "$@" 2>&1) || true
    alert=$(grep -oiE 'alert [a-z0-9 _]+' <<<"$out" | head -n 1 || true)
    detail=$( {
        grep -oiE 'alert [a-z0-9 _]+|connect:errno=[0-9]+' <<<"$out" | head -n 1 || true
        grep -oE '^New, [A-Za-z0-9.()]+, Cipher is [A-Za-z0-9_()-]+' <<<"$out" | head -n 1 || true
        grep -oE '^ALPN protocol: .*' <<<"$out" | head -n 1 || true
        grep -oE '^Server Temp Key: [^,]+(, [A-Za-z0-9-]+)?' <<<"$out" | head -n 1 || true
    } | paste -sd ';' - | sed 's/;/; /g')
    if grep -qiE 'alert|handshake failure|connect:errno|Connection refused|wrong version number' <<<"$out"; then
        got=refused
    elif grep -qE '^New, TLSv1\.3,' <<<"$out" && grep -qF "ALPN protocol: $EXPECTED_ALPN" <<<"$out"; then
        got=ok
    elif grep -qE '^New, (TLS|SSL)' <<<"$out"; then
        got=accepted
    else
        got=unknown
    fi
    case $expect in
        refused-cert)
            # Only an alert that refuses the certificate counts: a dead server or another
            # alert (e.g. no application protocol) says nothing about certificate checks.
            if [[ $got == refused ]] && grep -qiE "alert ($CERT_ALERTS)" <<<"$alert"; then
                got=refused-cert
            elif [[ $got == refused ]]; then
                got="refused without a certificate alert"
            fi ;;
        refused-hs)
            if [[ $got == refused && -n $alert ]] && ! grep -qE '^New, TLSv1\.[0-3],' <<<"$out"; then
                got=refused-hs
            fi ;;
    esac
    if [[ $got == "$expect" ]]; then
        printf 'PASS\t%s\t%s (%s)\n' "$name" "$got" "${detail:-no detail}"
    else
        printf 'FAIL\t%s\texpected %s, got %s (%s)\n' "$name" "$expect" "$got" "${detail:-no detail}"
    fi
}

# The endpoint's role, from the SPIFFE URI SAN of the certificate it presents (--role overrides).
server_role() {
    local out
    out=$(timeout 15 openssl s_client -connect "$target" -CAfile "$ca_crt" -cert "$bundle" \
        -key "$bundle" -alpn "$EXPECTED_ALPN" </dev/null 2>/dev/null) || true
    sed -n '/-----BEGIN CERTIFICATE-----/,/-----END CERTIFICATE-----/{p;/-----END CERTIFICATE-----/q}' <<<"$out" |
        openssl x509 -noout -ext subjectAltName 2>/dev/null |
        grep -oE 'URI:spiffe://[^/,]+/(dispatcher|worker|watchdog|client)/' | head -n 1 |
        sed -E 's|.*/([a-z]+)/$|\1|' || true
}

# A throw-away CA and client identity, unrelated to CERTS_DIR, under $work (removed on exit).
# Prefer securesrv's own 'certs init' (same key type, SANs and extensions as the real ones);
# without a securesrv binary, openssl makes a P-256 CA and a leaf with the same SAN as $cert_name.
foreign_dir=$work/foreign
foreign_how=
make_foreign_identity() {
    local name=$1 san
    if [[ -n $securesrv_bin ]]; then
        if "$securesrv_bin" certs init --dir "$foreign_dir" --workers 1 >"$work/foreign.log" 2>&1 &&
            [[ -r $foreign_dir/$name.crt && -r $foreign_dir/$name.key ]]; then
            foreign_how="made by $securesrv_bin certs init"
            return 0
        fi
        foreign_how="'$securesrv_bin certs init' failed: $(tail -n 1 "$work/foreign.log")"
        return 1
    fi
    san=$(openssl x509 -in "$certs_dir/$name.crt" -noout -ext subjectAltName 2>/dev/null | sed -n 2p |
        sed -E 's/^ +//; s/IP Address:/IP:/g; s/, /,/g' || true)
    [[ -n $san ]] || { foreign_how="$certs_dir/$name.crt has no subjectAltName to copy"; return 1; }
    mkdir -p "$foreign_dir"
    if (umask 077 &&
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
            -subj /CN=tls-audit-foreign-ca -keyout "$foreign_dir/ca.key" -out "$foreign_dir/ca.crt" \
            -addext basicConstraints=critical,CA:TRUE,pathlen:0 \
            -addext keyUsage=critical,keyCertSign,cRLSign,digitalSignature &&
        openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
            -subj "/CN=$name" -keyout "$foreign_dir/$name.key" -out "$foreign_dir/$name.csr" &&
        printf '%s\n' basicConstraints=critical,CA:FALSE keyUsage=critical,digitalSignature \
            extendedKeyUsage=clientAuth,serverAuth "subjectAltName=$san" >"$foreign_dir/ext.cnf" &&
        openssl x509 -req -in "$foreign_dir/$name.csr" -CA "$foreign_dir/ca.crt" \
            -CAkey "$foreign_dir/ca.key" -CAcreateserial -days 1 -extfile "$foreign_dir/ext.cnf" \
            -out "$foreign_dir/$name.crt") >"$work/foreign.log" 2>&1; then
        foreign_how="made by openssl (no securesrv binary; set SECURESRV or --securesrv to use certs init)"
        return 0
    fi
    foreign_how="openssl could not make one: $(tail -n 1 "$work/foreign.log")"
    return 1
}

role=$role_opt
[[ -n $role ]] || role=$(server_role)
case $role in
    dispatcher)
        wrong_name=worker-1
        if [[ ! -r $certs_dir/$wrong_name.crt ]]; then
            wrong_name=$(find "$certs_dir" -maxdepth 1 -name 'worker-*.crt' -printf '%f\n' 2>/dev/null |
                sort -V | head -n 1 || true)
            wrong_name=${wrong_name%.crt}
        fi ;;
    worker) wrong_name=client ;;
    *) wrong_name= ;;
esac
# The foreign identity has the same name (and so the same role) as the accepted one, where
# 'certs init' makes it: only the CA differs.
foreign_name=$cert_name
case $foreign_name in client | dispatcher | watchdog | worker-1) ;; *) foreign_name=client ;; esac

say "endpoint:  role ${role:-unknown}${role_opt:+ (--role)}, probes with openssl s_client ..."
{
    probe "no client certificate, ALPN $EXPECTED_ALPN" refused -alpn "$EXPECTED_ALPN"
    probe "client certificate, ALPN h2" refused -cert "$bundle" -key "$bundle" -alpn h2
    probe "client certificate, ALPN $EXPECTED_ALPN" ok -cert "$bundle" -key "$bundle" -alpn "$EXPECTED_ALPN"

    # Key exchange groups: only X25519 and P-256 (P-384 is refused as a DoS defence, SECURITY.md).
    probe "group P-384 only" refused-hs -groups P-384 -cert "$bundle" -key "$bundle" -alpn "$EXPECTED_ALPN"
    probe "group X25519 only" ok -groups X25519 -cert "$bundle" -key "$bundle" -alpn "$EXPECTED_ALPN"
    probe "group P-256 only" ok -groups P-256 -cert "$bundle" -key "$bundle" -alpn "$EXPECTED_ALPN"

    # mTLS refusals testssl cannot see: a certificate from another CA, a certificate of our CA
    # whose role may not connect to this endpoint.
    if make_foreign_identity "$foreign_name"; then
        probe "certificate from another CA ($foreign_name, $foreign_how)" refused-cert \
            -cert "$foreign_dir/$foreign_name.crt" -key "$foreign_dir/$foreign_name.key" -alpn "$EXPECTED_ALPN"
    else
        printf 'SKIP\t%s\t%s\n' "certificate from another CA" "$foreign_how"
    fi
    if [[ -z $role ]]; then
        printf 'SKIP\t%s\t%s\n' "certificate of the wrong role" \
            "cannot tell the endpoint's role from its certificate's SPIFFE ID; use --role dispatcher|worker"
    elif [[ -z $wrong_name || ! -r $certs_dir/$wrong_name.crt || ! -r $certs_dir/$wrong_name.key ]]; then
        printf 'SKIP\t%s\t%s\n' "certificate of the wrong role" \
            "no ${wrong_name:-worker-N} certificate and key in $certs_dir to present to a $role"
    else
        probe "wrong role: $wrong_name certificate to a $role" refused-cert \
            -cert "$certs_dir/$wrong_name.crt" -key "$certs_dir/$wrong_name.key" -pass pass: -alpn "$EXPECTED_ALPN"
    fi

    # Session resumption (information only): testssl's TLS_session_ticket / sessionresumption_*
    # results flip between runs under TLS 1.3 + mTLS. Save the session after a second (the
    # tickets arrive after the handshake), then offer it and look for "Reused".
    sess=$work/session.pem
    (umask 077 && sleep 1 | timeout 15 openssl s_client -connect "$target" -CAfile "$ca_crt" \
        -cert "$bundle" -key "$bundle" -alpn "$EXPECTED_ALPN" -sess_out "$sess" >/dev/null 2>&1) || true
    if [[ ! -s $sess ]]; then
        printf 'INFO\t%s\t%s\n' "session resumption" "no session saved by the first connection"
    else
        out=$(sleep 1 | timeout 15 openssl s_client -connect "$target" -CAfile "$ca_crt" \
            -cert "$bundle" -key "$bundle" -alpn "$EXPECTED_ALPN" -sess_in "$sess" 2>&1) || true
        rm -f -- "$sess"
        r=$(grep -oE '^(Reused|New), [A-Za-z0-9.()]+' <<<"$out" | head -n 1 || true)
        if [[ $r == Reused,* ]]; then
            printf 'INFO\t%s\t%s\n' "session resumption" "works (second connection: $r)"
        else
            printf 'INFO\t%s\t%s\n' "session resumption" "not resumed (second connection: ${r:-no session})"
        fi
    fi
} >"$work/probes.tsv"

if [[ -n $out_dir ]]; then
    mkdir -p "$out_dir"
    cp "$work/testssl.json" "$work/testssl.txt" "$out_dir/"
    [[ -z $nmap_xml ]] || cp "$nmap_xml" "$out_dir/"
fi

# ---------------------------------------------------------------- verdict
verdict_rc=0
python3 - "$work/testssl.json" "${nmap_xml:-}" "$nmap_note" "$work/probes.tsv" "$testssl_rc" \
    "$testssl_secs" "$work/testssl.txt" "$work/not-run.txt" <<'PY' || verdict_rc=$?
import json, re, sys
import xml.etree.ElementTree as ET

json_path, nmap_xml, nmap_note, probes_path, testssl_rc, testssl_secs, txt_path, not_run_path = sys.argv[1:9]

# ---- policy ------------------------------------------------------------------------------
PROTOS_FORBIDDEN = ["SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2"]
# The only suites the ring provider offers for TLS 1.3 (rustls restricted to TLS 1.3).
ALLOWED_SUITES = {"TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256"}
# Cipher categories that must be "not offered".
WEAK_CATEGORIES = ["cipherlist_NULL", "cipherlist_aNULL", "cipherlist_EXPORT", "cipherlist_LOW",
                   "cipherlist_3DES_IDEA", "cipherlist_OBSOLETED", "cipherlist_STRONG_NOFS"]
# Key exchange groups the endpoint may accept (testssl's names and aliases, lower case): X25519
# and P-256 only. P-384 is refused on purpose (its key exchange, computed before any certificate
# is seen, cost 6x P-256: a DoS lever, see SECURITY.md "What each link checks").
ALLOWED_GROUPS = {"x25519", "prime256v1", "secp256r1", "p-256"}
FAILING_SEVERITIES = {"MEDIUM", "HIGH", "CRITICAL", "FATAL"}
LISTED_SEVERITIES = {"LOW", "WARN"}
# Every one of these must have a result, or the scan is incomplete.
REQUIRED_IDS = (["SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2", "TLS1_3", "cipherlist_STRONG_FS",
                 "FS", "FS_ECDHE_curves", "cert_chain_of_trust", "cert_keySize",
                 "cert_expirationStatus", "clientAuth"] + WEAK_CATEGORIES +
                ["heartbleed", "CCS", "ticketbleed", "ROBOT", "secure_renego",
                 "secure_client_renego", "CRIME_TLS", "POODLE_SSL", "fallback_SCSV", "FREAK",
                 "DROWN", "LOGJAM", "BEAST", "LUCKY13", "winshock", "RC4"])
# testssl 3.2.1 files SWEET32 under the id CRIME_TLS on TLS-1.3-only servers (run_sweet32 returns
# early with a stale $jsonID); its text report shows "SWEET32 ... not vulnerable (OK)". Required
# only if something below TLS 1.3 is offered.
SWEET32_ID = "SWEET32"

# ---- known noise of securesrv's private test PKI, filtered by id ------------------------------
# (id regex, finding regex or None, reason). Matched against the id without testssl's
# " <hostCert#N>" suffix. A filtered finding never fails the audit; each one is printed.
NOISE = [
    # Revocation: the certificates carry no CRL distribution point or OCSP URI because revocation
    # is by a CRL file every component loads from its certs directory (`securesrv certs revoke`,
    # SECURITY.md), not fetched over the network (cert_revocation is HIGH "Neither CRL nor OCSP
    # URI provided"; testssl cannot see the CRL file).
    (r"cert_revocation|cert_crlDistributionPoints|cert_ocspURL|OCSP_stapling|"
     r"cert_mustStapleExtension", None,
     "no CRL/OCSP URI by design: revocation is by a CRL file each component loads from its certs "
     "directory (securesrv certs revoke), not fetched over the network"),
    # Public-web-PKI rules: CT logs, DNS CAA records, EV policies, CA/B Forum lifetime caps.
    (r"certificate_transparency|DNS_CAArecord|cert_certificatePolicies_EV|cert_extlifeSpan",
     None, "public web PKI rule (CT/CAA/EV/CA-B Forum), not applicable to a private CA"),
    # A leaf that ends soon is still valid: an operator's reminder (renew with `certs issue
    # --force`), printed with the other filtered findings, not a fault of the TLS set-up.
    # "expired" is never filtered.
    (r"cert_expirationStatus|cert_notAfter", r"^expires < \d+ days",
     "ends soon but still valid: renew it (securesrv certs issue --force); 'expired' is never filtered"),
    # Host-name match: securesrv peers are authenticated by their SPIFFE URI SAN, not by DNS
    # name or IP (the chain itself is judged by cert_chain_of_trust, with --add-ca, not filtered).
    (r"cert_trust(_wildcard)?", None, "peers are matched on the SPIFFE ID, not on the host name"),
    # HTTP checks: testssl assumes HTTP under --mtls; securesrv speaks a framed binary protocol.
    (r"HTTP_.*|HSTS.*|HPKP.*|banner_.*|cookie_.*|security_headers|X-.*|Content-Security-Policy.*|"
     r"Permissions-Policy|Referrer-Policy|Cross-Origin-.*|Expect-CT|Cache-Control|Pragma|BREACH|"
     r"service", None, "HTTP-level check, securesrv is not an HTTP service"),
    # testssl tests resumption with `openssl s_client </dev/null`, which under TLS 1.3 + mTLS
    # races the post-handshake messages (NewSessionTicket, the server's alert): the result flips
    # between runs. A failed check is a scanner limitation, not a server finding.
    (r"sessionresumption_(ticket|ID)", r"^check failed",
     "testssl's s_client resumption test races TLS 1.3 post-handshake messages (timing-dependent)"),
    # Scanner-side notes, not about the server.
    (r"NPN", r"not possible for TLS 1\.3", "NPN does not exist in TLS 1.3"),
    (r"engine_problem", None, "local OpenSSL lacks the GOST engine (client-side note)"),
]

def base_id(i):
    return re.sub(r"\s*<[^>]*>$", "", i)

def noise_reason(f):
    bid = base_id(f["id"])
    for id_re, finding_re, reason in NOISE:
        if re.fullmatch(id_re, bid) and (finding_re is None or re.search(finding_re, f["finding"])):
            return reason
    return None

def offered(text):
    t = text.lower()
    return "offered" in t and "not offered" not in t

VULN_RE = re.compile(r"(?<!not )(?<!\w)vulnerable", re.I)

findings = json.load(open(json_path))
if isinstance(findings, dict):                      # --jsonfile-pretty layout, just in case
    findings = [f for scan in findings.get("scanResult", []) for k, v in scan.items()
                if isinstance(v, list) for f in v]
by_id = {}
for f in findings:
    f.setdefault("severity", "INFO"); f.setdefault("finding", "")
    by_id.setdefault(base_id(f["id"]), []).append(f)

def first(i, default="?"):
    return by_id[i][0]["finding"] if i in by_id else default

fails, listed, filtered = [], [], []
judged = set()        # ids already failed by the protocol/cipher rules (not listed twice)

# ---- protocols
tls13 = offered(first("TLS1_3", ""))
protos = [p for p in PROTOS_FORBIDDEN + ["TLS1_3"] if p in by_id and offered(first(p))]
for p in PROTOS_FORBIDDEN:
    if p in by_id and offered(first(p)):
        fails.append(f"protocol {p} offered: {first(p)}")
        judged.add(p)
if not tls13:
    fails.append(f"TLS 1.3 not offered or not detected (TLS1_3: {first('TLS1_3', 'no result')})")

# ---- ciphers
suites = []
for f in findings:
    m = re.fullmatch(r"cipher-(\w+?)_x([0-9a-f]+)", base_id(f["id"]))
    if not m:
        continue
    name = f["finding"].split()[-1] if f["finding"].split() else "?"
    suites.append((m.group(1), name, f))
    if m.group(1) != "tls1_3":
        fails.append(f"cipher offered with {m.group(1)}: {name}")
        judged.add(f["id"])
    elif name not in ALLOWED_SUITES:
        fails.append(f"TLS 1.3 suite outside the allow-list: {name}")
        judged.add(f["id"])
if not suites:
    fails.append("no cipher suite detected (cipher-* missing)")
for c in WEAK_CATEGORIES:
    if c in by_id and offered(first(c)):
        fails.append(f"{c} offered: {first(c)}")
        judged.add(c)

# ---- key exchange groups (testssl: ECDHE curves and, if any, TLS 1.3 finite-field groups)
groups = []
for gid in ("FS_ECDHE_curves", "DH_groups"):
    for f in by_id.get(gid, []):
        groups += [g for g in re.split(r"[\s,]+", f["finding"]) if g]
bad_groups = [g for g in groups if g.lower() not in ALLOWED_GROUPS]
if bad_groups:
    fails.append("key exchange group(s) outside X25519/P-256 accepted (testssl): " + " ".join(bad_groups))
    judged.update({"FS_ECDHE_curves", "DH_groups"})
if "FS_ECDHE_curves" in by_id and not [g for g in groups if g.lower() in ALLOWED_GROUPS]:
    fails.append("neither X25519 nor P-256 accepted (testssl FS_ECDHE_curves: "
                 f"{first('FS_ECDHE_curves')})")

# ---- completeness
missing = [i for i in REQUIRED_IDS if i not in by_id]
sweet32_text = ""
if SWEET32_ID not in by_id:
    m = re.search(r"^ SWEET32 \([^)]*\)\s+(.*)$", open(txt_path, errors="replace").read(), re.M)
    sweet32_text = m.group(1).strip() if m else ""
    if sweet32_text and VULN_RE.search(sweet32_text):
        fails.append(f"SWEET32 (text report): {sweet32_text}")
    elif not sweet32_text or (protos and protos != ["TLS1_3"]):
        missing.append(SWEET32_ID)
if missing:
    fails.append("scan incomplete, no result for: " + " ".join(missing))

# ---- severities, vulnerable markers, noise
probes = [(line.rstrip("\n").split("\t") + ["", "", ""])[:3]
          for line in open(probes_path) if line.strip()]
not_run = [f"nmap cross-check: {nmap_note}"] if nmap_note and not nmap_xml else []
not_run += [f"{p[1]} ({p[2]})" for p in probes if p[0] == "SKIP"]
nocert_refused = any(p[0] == "PASS" and p[1].startswith("no client certificate") for p in probes)
for f in findings:
    sev, fid, text = f["severity"].upper(), f["id"], f["finding"]
    vulnerable = bool(VULN_RE.search(text))
    if sev not in FAILING_SEVERITIES | LISTED_SEVERITIES and not vulnerable:
        continue
    reason = noise_reason(f)
    if reason:
        filtered.append((fid, sev, text, reason))
    elif sev in FAILING_SEVERITIES or vulnerable:
        fails.append(f"{sev} {fid}: {text}")
    elif fid not in judged:
        listed.append((fid, sev, text))
# INFO-level noise that matched the list is printed too, so the filter is visible in full.
for f in findings:
    if f["severity"].upper() == "INFO" and not VULN_RE.search(f["finding"]):
        r = noise_reason(f)
        if r:
            filtered.append((f["id"], f["severity"], f["finding"], r))

# ---- nmap cross-check
nmap_line = nmap_note
if nmap_xml:
    try:
        root = ET.parse(nmap_xml).getroot()
        scripts = root.findall(".//script[@id='ssl-enum-ciphers']")
        if not scripts:
            state = root.find(".//port/state")
            fails.append("nmap ssl-enum-ciphers found no TLS (port state: "
                         f"{state.get('state') if state is not None else '?'})")
            nmap_line = "no ssl-enum-ciphers result"
        else:
            s = scripts[0]
            nprotos = [t.get("key") for t in s.findall("table")]
            nciphers, grades = [], set()
            for t in s.findall("table"):
                for c in t.findall("./table[@key='ciphers']/table"):
                    el = {e.get("key"): e.text for e in c.findall("elem")}
                    nciphers.append(f"{t.get('key')}:{el.get('name')}({el.get('kex_info')},"
                                    f"{el.get('strength')})")
                    grades.add(el.get("strength"))
            least = s.find("./elem[@key='least strength']")
            least = least.text if least is not None else "?"
            for p in nprotos:
                if p != "TLSv1.3":
                    fails.append(f"nmap: protocol {p} offered")
            if not nprotos:
                fails.append("nmap: no protocol found")
            if least != "A" or grades - {"A"}:
                fails.append(f"nmap: cipher strength below A (least strength {least})")
            nmap_line = (f"protocols: {' '.join(nprotos) or 'none'}; least strength {least}; "
                         + " ".join(nciphers))
    except ET.ParseError as e:
        fails.append(f"nmap XML unreadable: {e}")

# ---- direct probes (SKIP and INFO lines never fail; a SKIP is reported as "not run")
for p in probes:
    if p[0] not in ("PASS", "SKIP", "INFO"):
        fails.append(f"probe '{p[1]}': {p[2]}")

# ---- report
def proto_word(p):
    return {"TLS1": "TLS 1.0", "TLS1_1": "TLS 1.1", "TLS1_2": "TLS 1.2", "TLS1_3": "TLS 1.3"}.get(p, p)

print(f"scan time: testssl {testssl_secs} s (testssl exit code {testssl_rc}, not used as verdict)")
print("protocols offered:    " + (", ".join(proto_word(p) for p in protos) or "none") + "  ("
      + "; ".join(f"{proto_word(p)}: {first(p, 'no result')}" for p in PROTOS_FORBIDDEN) + ")")
print("cipher suites:        " + (" ".join(f"{n}" + ("" if pr == "tls1_3" else f"[{pr}]")
                                           for pr, n, _ in suites) or "none"))
print("key exchange groups:  testssl: " + (" ".join(groups) or "none") + " -- "
      + (("NOT ALLOWED: " + " ".join(bad_groups)) if bad_groups else "allowed (X25519, P-256 only)")
      + "; openssl -groups probes below")
print("TLS 1.3 sig algs:     " + first("FS_TLS13_sig_algs", "?"))
print("weak categories:      " + ", ".join(f"{c.split('_', 1)[1]}={first(c, 'no result')}"
                                             for c in WEAK_CATEGORIES))
print("server certificate:   " + "; ".join(x for x in [
      first("cert_keySize"), first("cert_signatureAlgorithm"),
      "SAN " + first("cert_subjectAltName"), "chain of trust " + first("cert_chain_of_trust"),
      "validity " + first("cert_expirationStatus") + " (until " + first("cert_notAfter") + ")"]))
vuln_ids = [i for i in REQUIRED_IDS[REQUIRED_IDS.index("heartbleed"):]] + [SWEET32_ID]
vuln_ok = [i for i in vuln_ids if i in by_id and all(f["severity"] == "OK" for f in by_id[i])]
if sweet32_text and not VULN_RE.search(sweet32_text):
    vuln_ok.append("SWEET32")   # from the text report, see SWEET32_ID above
if not vuln_ok:
    print("vulnerability checks: no results")
elif [i for i in vuln_ids if i in by_id and i not in vuln_ok]:
    print("vulnerability checks: not all OK, see below")
else:
    print(f"vulnerability checks: {len(vuln_ok)} OK, none vulnerable (" + " ".join(vuln_ok) + ")")
client_auth = first("clientAuth")
print(f"client auth:          testssl: '{client_auth}', CA list '{first('clientAuth_CA_list')}'"
      + (" -- testssl says 'optional' when the TLS 1.3 refusal (sent after the handshake) comes "
         "too late for it; the direct probe below is authoritative"
         if client_auth == "optional" else ""))
print(f"ALPN (testssl):       {first('ALPN')} -- testssl offers only well-known ids (h2, "
      "http/1.1, ...); ALPN securesrv/1 is checked by the probes below")
resumption = [p[2] for p in probes if p[0] == "INFO" and p[1] == "session resumption"]
print("session resumption:   openssl -sess_out/-sess_in: " + (resumption[0] if resumption else "not probed")
      + " (information, not judged)")
print("                      testssl (UNRELIABLE, varies between runs under TLS 1.3 + mTLS): "
      f"TLS_session_ticket '{first('TLS_session_ticket')}', resumption by ticket "
      f"'{first('sessionresumption_ticket')}', by ID '{first('sessionresumption_ID')}'")
print("nmap ssl-enum-ciphers: " + nmap_line)
print("direct probes (openssl s_client):")
for p in probes:
    if p[0] != "INFO":
        print(f"  {p[0]}  {p[1]}: {p[2]}")
with open(not_run_path, "w") as nr:            # one line, for the RESULT line
    nr.write(" | ".join(not_run))
if not_run:
    print("NOT RUN (not part of the verdict):")
    for x in not_run:
        print("  - " + x)
if listed:
    print("LOW/WARN findings (listed, not failing):")
    for fid, sev, text in listed:
        print(f"  {sev:8} {fid}: {text}")
if filtered:
    print("filtered as private-PKI / scanner noise (not failing):")
    seen = set()
    for fid, sev, text, reason in filtered:
        if fid in seen:
            continue
        seen.add(fid)
        print(f"  {sev:8} {fid}: {text!s:.70}  -- {reason}")
if fails:
    print("FAILURES:")
    for x in fails:
        print("  - " + x)
    sys.exit(10)
PY

total=$((SECONDS))
not_run=
[[ ! -s $work/not-run.txt ]] || not_run=$(<"$work/not-run.txt")
if [[ $verdict_rc -eq 0 ]]; then
    say "RESULT: PASS  $target  (TLS 1.3 only, allowed AEAD suites and groups only, mTLS refusals" \
        "seen, no vulnerable/MEDIUM+ findings; ${total} s)${not_run:+  NOT RUN: $not_run}"
    exit 0
fi
if [[ $verdict_rc -ne 10 ]]; then
    warn "the verdict step failed (python3 exit $verdict_rc)"
    exit 2
fi
if ! $verbose; then
    say "--- testssl report (last 25 lines) ---"
    tail -n 25 "$work/testssl.txt" | sed 's/^/  /'
fi
say "RESULT: FAIL  $target  (${total} s)${not_run:+  NOT RUN: $not_run}"
exit 1
