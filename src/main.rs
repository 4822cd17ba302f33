//! The `securesrv` binary: a thin shell over the library (see `cli.rs`).
#![forbid(unsafe_code)]
// A failed `println!` or `eprintln!` panics (a full disk, a closed pipe): use
// `securesrv::stdio`.
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]

mod cli;

// mimalloc, not glibc's malloc: the relay allocates and frees record-sized buffers for every
// TLS record in each direction (inside rustls). With glibc's allocator a 16 KiB request cost
// the worker about a fifth more CPU (docs/PERFORMANCE.md, "What was done").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
