//! The `securesrv` binary: a thin shell over the library (see `cli.rs`).
#![forbid(unsafe_code)]

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
