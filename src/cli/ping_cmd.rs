//! `securesrv ping`: one authenticated heartbeat, as the watchdog sends, for a supervisor of
//! the operator's own (a systemd `ExecStartPost=`, a Kubernetes exec probe) that runs the
//! dispatcher and the workers without the watchdog. Exit 0 when the component answered the
//! fresh nonce in time.

use super::{EXIT_CONFIG, load_config};
use securesrv::errln;
use securesrv::identity::SpiffeId;
use securesrv::tls::TlsMaterial;
use securesrv::watchdog::probe::{Heard, Prober};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Arguments of `securesrv ping`.
#[derive(clap::Args, Debug)]
pub struct PingArgs {
    /// Certificate to present [default: watchdog.crt in `certs_dir`: a watchdog identity may
    /// ping the dispatcher and every worker; a client's may ping the dispatcher only].
    #[arg(long, value_name = "PATH")]
    cert: Option<PathBuf>,
    /// Its key [default: watchdog.key in `certs_dir`].
    #[arg(long, value_name = "PATH")]
    key: Option<PathBuf>,
    /// CA certificate [default: ca.crt beside the certificate].
    #[arg(long, value_name = "PATH")]
    ca: Option<PathBuf>,
    /// Ping worker N (its address and identity from the configuration) instead of the
    /// dispatcher.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    worker: Option<u32>,
    /// Address to ping, replacing the configuration's (IP:PORT, [IPv6]:PORT or HOST:PORT).
    #[arg(long, value_name = "ADDR")]
    connect: Option<String>,
    /// Deadline for connecting and for the answer.
    #[arg(long, value_name = "MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    timeout_ms: u64,
}

/// Runs `securesrv ping`. Exit codes: 0 answered; 5 not answered (nothing listening, as when
/// the component is down or stopping, no handshake or no pong in time, another identity at
/// the address, or our certificate refused); 64 bad configuration or certificate files, or a
/// worker the configuration does not have; 1 the answer could not be written.
pub fn run(args: PingArgs, config: Option<PathBuf>) -> ExitCode {
    let cfg = match load_config(config.as_deref(), |_| {}) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (cert, key, ca) = super::identity_files(&cfg, "watchdog", args.cert, args.key, args.ca);
    let (identity, addr) = match args.worker {
        None => (
            SpiffeId::dispatcher(&cfg.trust_domain),
            Some(cfg.dispatcher.listen),
        ),
        Some(n) => (
            SpiffeId::worker(&cfg.trust_domain, n),
            cfg.worker_addresses()
                .into_iter()
                .find_map(|(id, a)| (id == n).then_some(a)),
        ),
    };
    let identity = match identity {
        Ok(id) => id,
        Err(e) => {
            errln!("securesrv: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let addr: SocketAddr = match (args.connect.as_deref(), addr) {
        (Some(given), _) => match securesrv::client::resolve_addr(given) {
            Ok(a) => a,
            Err(e) => {
                errln!("securesrv: --connect: {e}");
                return ExitCode::from(5);
            }
        },
        (None, Some(a)) => a,
        (None, None) => {
            errln!(
                "securesrv: worker {} is not in the configuration (`workers` or `[[worker]]`); \
                 give --connect to ping it anyway",
                args.worker.unwrap_or_default()
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    let material = match TlsMaterial::load(&ca, &cert, &key) {
        Ok(m) => m,
        Err(e) => {
            errln!("securesrv: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let connector = match material.connector(&identity, timeout) {
        Ok(c) => c,
        Err(e) => {
            errln!("securesrv: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let rt = match super::command_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let io = securesrv::connection::IoLimits {
        idle_timeout: timeout,
        ..cfg.limits.io()
    };
    let heard = rt.block_on(async {
        let mut prober = Prober::new(connector, addr, io);
        prober.beat(timeout).await
    });
    match heard {
        Ok(Heard::Beat(beat)) => {
            let workers = beat
                .workers_available
                .map_or_else(String::new, |n| format!(" workers_available={n}"));
            let said = securesrv::stdio::out_line(format_args!(
                "ok {identity} at {addr}: in_flight={}{workers}",
                beat.in_flight
            ));
            match said {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    errln!("securesrv: cannot write to stdout: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        // Only a connection opened before the stop hears this; a new one finds the port
        // closed. Either way: not serving.
        Ok(Heard::Stopping) => {
            errln!("securesrv: {identity} at {addr} is stopping (shutting_down)");
            ExitCode::from(5)
        }
        Err(e) => {
            errln!("securesrv: {identity} at {addr}: {e}");
            ExitCode::from(5)
        }
    }
}
