#!/usr/bin/env bash
# The test command (README, .ci/run): formatting, lints, every test.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked
