#!/usr/bin/env bash
# The test command (README, .ci/run): formatting, lints, every test, and the library's docs
# (broken intra-doc links fail it).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --lib --locked
