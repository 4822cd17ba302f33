#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS_PER_TARGET seconds (default 30).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]
#
# Needs the nightly toolchain (cargo-fuzz builds with -Zsanitizer=address); installs cargo-fuzz
# if it is missing. Each target starts from its committed seeds in fuzz/corpus/<target>/, copied
# into a temporary working corpus, so a run never adds files to the committed corpus. Crashes,
# panics, timeouts (an input taking more than FUZZ_TIMEOUT seconds, default 10) and out-of-memory
# are failures: the reproducer is written to fuzz/artifacts/<target>/ and the script exits 1
# after running all targets.
#
# Environment: FUZZ_TOOLCHAIN (default nightly), FUZZ_TIMEOUT (default 10),
# FUZZ_TARGETS (space-separated subset, default: all from `cargo fuzz list`),
# FUZZ_JOBS (targets fuzzed at once, default: number of cores; each libFuzzer uses one),
# FUZZ_SANITIZER (default address; none builds and runs faster, but misses oversized
# allocations and memory errors in unsafe dependency code),
# FUZZ_TARGET_DIR (cargo target dir, default fuzz/target; point it outside the checkout, e.g.
# ~/.cache/securesrv/fuzz-target, to reuse the instrumented dependency build across fresh
# clones: a clean build is most of this script's time),
# FUZZ_EXTRA_ARGS (more libFuzzer flags, e.g. "-max_len=70000").
# Reproduce a crash: cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>
set -euo pipefail

secs="${1:-30}"
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -lt 1 ]; then
    echo "usage: $0 [SECONDS_PER_TARGET]   (a positive integer, default 30)" >&2
    exit 2
fi
toolchain="${FUZZ_TOOLCHAIN:-nightly}"
per_input_timeout="${FUZZ_TIMEOUT:-10}"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$(pwd)"
target_dir="$(realpath -m "${FUZZ_TARGET_DIR:-fuzz/target}")"
build_args=(--sanitizer "${FUZZ_SANITIZER:-address}" --target-dir "$target_dir")

if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1; then
    echo "fuzz.sh: the $toolchain toolchain is not installed (rustup toolchain list)" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

# A cargo run on a toolchain without -Z support leaves a cache that makes the next nightly
# build fail oddly; it is rebuilt at once, so always start clean.
rm -f "$target_dir/.rustc_info.json"

fuzz() { cargo "+$toolchain" fuzz "$@"; }

if [ -n "${FUZZ_TARGETS:-}" ]; then
    read -r -a targets <<<"$FUZZ_TARGETS"
else
    mapfile -t targets < <(fuzz list)
fi
if [ "${#targets[@]}" -eq 0 ]; then
    echo "fuzz.sh: no fuzz targets found" >&2
    exit 2
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/securesrv-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT

start=$(date +%s)
echo "==> building ${#targets[@]} targets (${targets[*]})"
fuzz build "${build_args[@]}"
build_done=$(date +%s)
echo "==> build took $((build_done - start)) s"

# One target: fuzz a private copy of its seeds; leaves <target>.log and <target>.rc in $work.
run_one() {
    local t=$1 corpus="$work/corpus/$1" log="$work/$1.log" rc=0
    mkdir -p "$corpus" "fuzz/artifacts/$t"
    if [ -d "fuzz/corpus/$t" ]; then
        cp -R "fuzz/corpus/$t/." "$corpus/"
    fi
    # shellcheck disable=SC2086 # FUZZ_EXTRA_ARGS is a list of flags
    fuzz run "${build_args[@]}" "$t" "$corpus" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout="$per_input_timeout" \
        -print_final_stats=1 ${FUZZ_EXTRA_ARGS:-} >"$log" 2>&1 || rc=$?
    echo "$rc" >"$work/$t.rc"
}

# libFuzzer uses one core per process: run up to FUZZ_JOBS targets at once (default: cores).
jobs_max="${FUZZ_JOBS:-$(nproc)}"
echo "==> fuzzing ${#targets[@]} targets for ${secs} s each, ${jobs_max} at a time"
for t in "${targets[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do
        wait -n || true
    done
    echo "    started $t (seeds: $(find "fuzz/corpus/$t" -type f 2>/dev/null | wc -l))"
    run_one "$t" &
done
wait

failed=()
summary=()
for t in "${targets[@]}"; do
    log="$work/$t.log"
    rc=$(cat "$work/$t.rc" 2>/dev/null || echo 99)
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1) || true
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1) || true
    cov=$( (grep -oE 'cov: [0-9]+' "$log" || true) | tail -n1 | cut -d' ' -f2)
    line="$t: ${runs:-?} runs, ${rate:-?} exec/s, cov ${cov:-?}, corpus $(find "$work/corpus/$t" -type f | wc -l) files"
    if [ "$rc" -ne 0 ]; then
        failed+=("$t")
        line="$line  ** FAILED (exit $rc) **"
        echo "---- $t: last 60 lines of its log ----"
        tail -n 60 "$log"
        echo "--------------------------------------"
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n1) || true
        if [ -n "$artifact" ]; then
            case "$artifact" in /*) ;; *) artifact="$root/${artifact#./}" ;; esac
            echo "$t: crash artifact: $artifact"
            echo "$t: reproduce with: cargo +$toolchain fuzz run ${FUZZ_TARGET_DIR:+--target-dir $target_dir }$t $artifact"
        fi
    fi
    summary+=("$line")
done

echo "==> summary (build $((build_done - start)) s, total $(( $(date +%s) - start )) s)"
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzz.sh: FAILED targets: ${failed[*]} (artifacts under fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz.sh: all targets ran clean"
