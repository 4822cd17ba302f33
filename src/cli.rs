//! Command-line parsing, the original's menu, and the mapping from errors to exit codes.
//!
//! Exit codes: 0 success; 1 other failure; 2 usage; 3 request refused (ACL, unknown op, bad
//! input, too large); 4 unavailable (no worker, overloaded, timeout, worker lost); 5 connection
//! or TLS failure; 6 the op ran and failed; 64 bad configuration; 130 interrupted.

mod client_cmd;
mod components;
mod logformat;
mod logwriter;
mod memcpy;
mod ping_cmd;

use clap::{Args, Parser, Subcommand};
use securesrv::config::{Config, ConfigError};
use securesrv::errln;
use securesrv::files::BoundedLine;
use securesrv::identity::Role;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit code for a bad configuration (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

/// securesrv: a hardened request-dispatch service over mutual TLS.
#[derive(Parser, Debug)]
#[command(name = "securesrv", version, about, long_about = None)]
pub struct Cli {
    /// Optional TOML configuration (every setting has a built-in default).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log filter (e.g. `info`, `debug`, `securesrv::audit=info,warn`). Also SECURESRV_LOG.
    #[arg(long, global = true, value_name = "FILTER")]
    log: Option<String>,
    /// Show the menu even when stdin is not a terminal.
    #[arg(long, hide = true)]
    menu: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create or extend the certificates and token keys.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Run the dispatcher alone (for systemd or Kubernetes supervision).
    Dispatcher(DispatcherArgs),
    /// Run one worker alone.
    Worker(WorkerArgs),
    /// Run the dispatcher and the workers, restarting any that stops answering.
    Watchdog(WatchdogArgs),
    /// Send one request (or, without OP, read `op payload` lines).
    Client(client_cmd::ClientArgs),
    /// One authenticated heartbeat to the dispatcher or a worker (a health probe).
    Ping(ping_cmd::PingArgs),
    /// Load-test a dispatcher: closed loop, HDR latencies, requests/s.
    Bench(Box<securesrv::bench::BenchArgs>),
    /// A plain mTLS echo backend for relay comparisons (benchmarks only).
    #[command(hide = true)]
    BenchEcho(BenchEchoArgs),
}

#[derive(Subcommand, Debug)]
enum CertsCmd {
    /// Make a CA, every component's certificate and key, and the token keys.
    Init {
        /// Directory to write into, created with mode 0700 [default: the config's
        /// `certs_dir`, certs].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Issue for workers 1 to N [default: the config's workers: those its `[[worker]]`
        /// list names, else 1 to `workers`, 2].
        #[arg(long, value_parser = workers_range(1))]
        workers: Option<u32>,
        /// Validity of the leaf certificates in days.
        #[arg(long, default_value_t = securesrv::certs::DEFAULT_DAYS,
              value_parser = clap::value_parser!(u32).range(1..=i64::from(securesrv::certs::MAX_DAYS)))]
        days: u32,
        /// Trust domain of the identities [default: the config's `trust_domain`, securesrv].
        #[arg(long)]
        trust_domain: Option<String>,
        /// Extra DNS name or IP for the server certificates (repeatable).
        #[arg(long = "host", value_name = "NAME")]
        hosts: Vec<String>,
        /// Replace an existing CA (invalidates everything it signed) and any other file
        /// of the set that is there.
        #[arg(long)]
        force: bool,
    },
    /// Issue one more identity from the existing CA.
    Issue {
        /// Directory holding ca.crt and ca.key [default: the config's `certs_dir`, certs].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// dispatcher, worker, watchdog or client.
        #[arg(long)]
        role: String,
        /// Name within the role (a worker's number).
        #[arg(long)]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = securesrv::certs::DEFAULT_DAYS,
              value_parser = clap::value_parser!(u32).range(1..=i64::from(securesrv::certs::MAX_DAYS)))]
        days: u32,
        /// Trust domain [default: the config's `trust_domain`, else the CA's].
        #[arg(long)]
        trust_domain: Option<String>,
        /// Extra DNS name or IP (repeatable).
        #[arg(long = "host", value_name = "NAME")]
        hosts: Vec<String>,
        /// Replace existing files of this identity.
        #[arg(long)]
        force: bool,
    },
    /// Revoke certificates of the CA (a leaked key): adds them to ca.crl, which every
    /// component and client reads beside ca.crt when it starts.
    Revoke {
        /// Directory holding ca.crt and ca.key [default: the config's `certs_dir`, certs].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Certificate files to revoke (for example certs/client.crt).
        #[arg(required = true, value_name = "CERT")]
        certs: Vec<PathBuf>,
    },
    /// Make the token keys alone (token.key and worker-N.token), for certificates made by
    /// another tool (openssl, step, cfssl); `init` makes them with the certificates.
    TokenKeys {
        /// Directory to write into [default: the config's `certs_dir`, certs].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Make keys for workers 1 to N, and for every worker whose certificate is in the
        /// directory (0: those only) [default: the config's workers: those its `[[worker]]`
        /// list names, else 1 to `workers`, 2].
        #[arg(long, value_parser = workers_range(0))]
        workers: Option<u32>,
        /// Trust domain of the workers [default: the config's, else the one in ca.crt, else
        /// securesrv].
        #[arg(long)]
        trust_domain: Option<String>,
        /// Replace an existing token.key (every worker's key changes at once).
        #[arg(long)]
        force: bool,
    },
    /// Start a new token key; previous keys stay accepted for a while.
    RotateTokenKey {
        /// Directory holding token.key and worker-N.token [default: the config's
        /// `certs_dir`, certs].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// How long workers keep accepting the previous key, in seconds (at most a day; under
        /// a minute is warned about).
        #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(0..=86_400))]
        keep_previous_secs: u64,
        /// Trust domain of the workers [default: the one their current token keys were
        /// made for: the config's `trust_domain`, the CA's, or securesrv].
        #[arg(long)]
        trust_domain: Option<String>,
    },
}

/// Settings every component accepts on the command line (they override the config file).
#[derive(Args, Debug, Clone, Default)]
pub struct CommonArgs {
    /// Certificate directory.
    #[arg(long, value_name = "DIR")]
    certs: Option<PathBuf>,
    /// Started by the watchdog: exit when stdin closes.
    #[arg(long, hide = true)]
    supervised: bool,
}

#[derive(Args, Debug)]
struct DispatcherArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Address to listen on.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Number of workers (worker N at the dispatcher's port + N).
    #[arg(long)]
    workers: Option<u32>,
}

#[derive(Args, Debug)]
struct WorkerArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Worker number (1, 2, ...).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    id: u32,
    /// Address to listen on (default: this id's `[[worker]]` address, else the port of the
    /// configuration's `dispatcher.listen` + id).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// The dispatcher's address, replacing the configuration's `dispatcher.listen`: give it
    /// the dispatcher's `--listen`, as the watchdog does, so that the ports count from the same
    /// base.
    #[arg(long, value_name = "ADDR")]
    dispatcher_listen: Option<SocketAddr>,
    /// The number of workers, replacing the configuration's: give it the dispatcher's
    /// `--workers`, as the watchdog does.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=256))]
    workers: Option<u32>,
}

#[derive(Args, Debug)]
struct BenchEchoArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Certificate directory (serves with dispatcher.crt).
    #[arg(long, default_value = "certs")]
    certs: PathBuf,
}

#[derive(Args, Debug, Clone, Default)]
struct WatchdogArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Number of workers.
    #[arg(long)]
    workers: Option<u32>,
    /// Dispatcher address (workers at its port + N).
    #[arg(long)]
    listen: Option<SocketAddr>,
}

/// `--workers` of the `certs` commands: from `min` to as many as a configuration can have
/// (`init` from 1: a configuration has at least one worker, and `--workers 0` would make a
/// CA with none).
fn workers_range(min: i64) -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(min..=i64::from(securesrv::config::MAX_WORKERS))
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    // Before any thread starts (each takes the mask of the thread that starts it).
    unblock_signals();
    // Before anything else runs: this may replace the process image (see `memcpy`).
    memcpy::reexec_if_useful();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    // Before any thread starts (the log writer's): a `certs` command holds Ctrl-C, SIGTERM and
    // SIGHUP back, so that one stops it only before it has put a file in place, and never
    // leaves its staged files (keys among them) behind.
    if matches!(cli.command, Some(Command::Certs(_))) {
        if let Err(e) = securesrv::certs::interrupt::hold() {
            errln!("securesrv: cannot hold signals back while files are written: {e}");
        }
    }
    // The watchdog passes the filter on to its children.
    let policy = match cli.command {
        Some(Command::Watchdog(_)) => logwriter::Policy::watchdog(),
        _ => logwriter::Policy::component(),
    };
    let _log = init_logging(cli.log.as_deref(), policy);
    let log_filter = cli.log.clone();
    match cli.command {
        Some(cmd) => run_command(cmd, cli.config, log_filter),
        None if cli.menu || std::io::stdin().is_terminal() => menu(cli.config, log_filter),
        None => {
            errln!("securesrv: no command given; run `securesrv --help`");
            ExitCode::from(2)
        }
    }
}

/// Clears the signal mask this process inherited. A parent that takes its own signals through
/// `signalfd` or `sigwait` blocks them, and its children keep the mask through `exec` unless it
/// clears it. A component with SIGTERM, SIGINT or SIGHUP blocked would not stop when told to,
/// and a worker with SIGCHLD blocked would never see a job exit: it checks its jobs on each
/// SIGCHLD, so every job was answered `timeout` at the end of its timeout. (Ignored signals
/// are another matter: see `shutdown::watch_with` for SIGHUP under `nohup`.)
fn unblock_signals() {
    use nix::sys::signal::{SigSet, SigmaskHow, pthread_sigmask};
    if let Err(e) = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None) {
        errln!("securesrv: cannot clear the inherited signal mask: {e}");
    }
}

fn run_command(cmd: Command, config: Option<PathBuf>, log: Option<String>) -> ExitCode {
    if let Command::Dispatcher(DispatcherArgs { common, .. })
    | Command::Worker(WorkerArgs { common, .. }) = &cmd
    {
        if common.supervised {
            if let Err(e) = securesrv::watchdog::child::prepare_supervised() {
                // Still supervised, by the lifeline; only a stopped orphan or a SIGKILLed
                // worker's jobs would be left behind.
                errln!("securesrv: cannot prepare for supervision: {e}");
            }
        }
    }
    match cmd {
        Command::Certs(c) => certs(c, config),
        Command::Dispatcher(a) => {
            let cfg = load_config(config.as_deref(), |cfg| {
                apply_layout(cfg, a.listen, a.workers);
                apply_common(cfg, &a.common);
            });
            match cfg {
                Ok(cfg) => components::dispatcher(cfg, a.common.supervised),
                Err(code) => code,
            }
        }
        Command::Worker(a) => {
            let cfg = load_config(config.as_deref(), |cfg| {
                apply_layout(cfg, a.dispatcher_listen, a.workers);
                apply_common(cfg, &a.common);
            });
            let cfg = match cfg {
                Ok(cfg) => cfg,
                Err(code) => return code,
            };
            let Some(listen) = a.listen.or_else(|| cfg.worker_address(a.id)) else {
                errln!(
                    "securesrv: worker {} is not in the configuration; give --listen",
                    a.id
                );
                return ExitCode::from(EXIT_CONFIG);
            };
            components::worker(cfg, a.id, listen, a.common.supervised)
        }
        Command::Watchdog(a) => watchdog(config, a, log),
        Command::Client(a) => client_cmd::run(a, config),
        Command::Ping(a) => ping_cmd::run(a, config),
        Command::Bench(mut a) => match load_config(config.as_deref(), |_| {}) {
            Ok(cfg) => {
                a.config = Some(cfg);
                components::bench(*a)
            }
            Err(code) => code,
        },
        Command::BenchEcho(a) => match load_config(config.as_deref(), |_| {}) {
            Ok(cfg) => components::bench_echo(cfg, a.listen, a.certs),
            Err(code) => code,
        },
    }
}

fn watchdog(config: Option<PathBuf>, a: WatchdogArgs, log: Option<String>) -> ExitCode {
    let cfg = load_config(config.as_deref(), |cfg| {
        apply_layout(cfg, a.listen, a.workers);
        apply_common(cfg, &a.common);
    });
    match cfg {
        Ok(cfg) => components::watchdog(cfg, config, log),
        Err(code) => code,
    }
}

/// `--listen` and `--workers` for the dispatcher (and the watchdog that starts it): a worker
/// count replaces any explicit worker list.
fn apply_layout(cfg: &mut Config, listen: Option<SocketAddr>, workers: Option<u32>) {
    if let Some(l) = listen {
        cfg.dispatcher.listen = l;
    }
    if let Some(w) = workers {
        cfg.workers = w;
        cfg.worker.clear();
    }
}

fn apply_common(cfg: &mut Config, common: &CommonArgs) {
    if let Some(c) = &common.certs {
        cfg.certs_dir = c.clone();
    }
}

/// A `rotate-token-key` window shorter than this is warned about.
const SHORT_ROTATION_WINDOW_SECS: u64 = 60;

/// Loads the configuration, applies the command-line overrides and validates the result
/// (once, so that a flag may replace a value the file has wrong, and a problem of the flag's
/// value is named); on failure prints every problem and returns exit code 64.
pub fn load_config(
    path: Option<&std::path::Path>,
    overrides: impl FnOnce(&mut Config),
) -> Result<Config, ExitCode> {
    let result = Config::read(path).and_then(|mut cfg| {
        overrides(&mut cfg);
        cfg.validate().map(|()| cfg)
    });
    result.map_err(|e: ConfigError| {
        match (&e, path) {
            // Values are checked after the command's flags are applied: name both sources.
            (ConfigError::Invalid(problems), Some(p)) => errln!(
                "securesrv: invalid configuration in {} (with the command's flags applied):\n  - {}",
                p.display(),
                problems.join("\n  - ")
            ),
            _ => errln!("securesrv: {e}"),
        }
        ExitCode::from(EXIT_CONFIG)
    })
}

/// The runtime of a one-shot command (`client`, `ping`): one thread, its stack set whatever
/// RUST_MIN_STACK says; a failure to start it is said, exit 1.
fn command_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .thread_stack_size(components::THREAD_STACK)
        .enable_all()
        .build()
        .map_err(|e| {
            errln!("securesrv: cannot start runtime: {e}");
            ExitCode::FAILURE
        })
}

/// The certificate, key and CA a command presents: as given, else `STEM.crt` and `STEM.key` in
/// `certs_dir`, and `ca.crt` beside the certificate.
fn identity_files(
    cfg: &Config,
    stem: &str,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
) -> (PathBuf, PathBuf, PathBuf) {
    let cert = cert.unwrap_or_else(|| cfg.certs_dir.join(format!("{stem}.crt")));
    let key = key.unwrap_or_else(|| cfg.certs_dir.join(format!("{stem}.key")));
    let ca = ca.unwrap_or_else(|| {
        cert.parent()
            .map_or_else(|| PathBuf::from("ca.crt"), |d| d.join("ca.crt"))
    });
    (cert, key, ca)
}

/// Whether the configuration file `path` sets `trust_domain` itself (it has been read and
/// parsed once already, so it is known to be there and well-formed).
fn sets_trust_domain(path: &std::path::Path) -> bool {
    securesrv::files::read_regular(path, securesrv::config::MAX_CONFIG_FILE)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| toml::from_str::<toml::Table>(&text).ok())
        .is_some_and(|table| table.contains_key("trust_domain"))
}

/// `securesrv certs ...`. What a flag leaves out comes from `--config` (its `certs_dir`,
/// `trust_domain`, `workers`), so that the certificates made are those the components of that
/// configuration will look for.
fn certs(cmd: CertsCmd, config: Option<PathBuf>) -> ExitCode {
    let cfg = match load_config(config.as_deref(), |_| {}) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let dir_or_default = |dir: Option<PathBuf>| dir.unwrap_or_else(|| cfg.certs_dir.clone());
    // The workers of the configuration, by number (a `[[worker]]` list names its own).
    let workers_or_configured = |workers: Option<u32>| match workers {
        Some(n) => securesrv::certs::numbered_workers(n),
        None => (cfg.worker_addresses().into_iter().map(|(id, _)| id)).collect(),
    };
    // The config's trust domain, when the config sets one: the built-in default must not hide
    // the one in ca.crt (a config without `trust_domain` issued `securesrv` identities from a
    // CA of another trust domain, which its components refuse).
    let configured_td = config
        .as_deref()
        .filter(|p| sets_trust_domain(p))
        .map(|_| cfg.trust_domain.clone());
    let result = match cmd {
        CertsCmd::Revoke { dir, certs } => {
            return match securesrv::certs::revoke(&dir_or_default(dir), &certs) {
                Ok(done) => {
                    let mut said = String::new();
                    for entry in &done.entries {
                        said += &format!("revoked {}\n", shown(entry));
                    }
                    let crl = done.crl.display().to_string();
                    said += &format!(
                        "wrote {}\nComponents and clients read it when they start: restart the \
                         watchdog (or each component), and copy {} beside ca.crt wherever that \
                         is copied (docs/OPERATIONS.md, \"Revoking a certificate\").\n",
                        shown(&crl),
                        shown(&crl)
                    );
                    say_done(&said)
                }
                Err(e) => certs_failed(&e),
            };
        }
        CertsCmd::Init {
            dir,
            workers,
            days,
            trust_domain,
            hosts,
            force,
        } => {
            let dir = dir_or_default(dir);
            // What the CA to be replaced signed (nothing without --force: no CA is replaced).
            let before = if force {
                signed_by_the_ca_in(&dir)
            } else {
                Vec::new()
            };
            let had_crl = force && dir.join(securesrv::certs::CA_CRL).exists();
            let done = securesrv::certs::init(
                &dir,
                &securesrv::certs::InitOptions {
                    trust_domain: trust_domain.unwrap_or_else(|| cfg.trust_domain.clone()),
                    workers: workers_or_configured(workers),
                    days,
                    hosts,
                    force,
                },
            );
            if let Ok(written) = &done {
                say_what_the_old_ca_left(&dir, &before, written, had_crl);
            }
            done
        }
        CertsCmd::Issue {
            dir,
            role,
            name,
            days,
            trust_domain,
            hosts,
            force,
        } => match role.parse::<Role>() {
            Ok(role) => {
                let dir = dir_or_default(dir);
                // A configuration without `trust_domain` has its components use the default:
                // a CA of another trust domain issues them nothing they would take.
                let implicit = config.as_deref().filter(|p| !sets_trust_domain(p));
                let ca_domain = securesrv::certs::ca_trust_domain_in(&dir);
                if let (None, Some(file), Some(ca_domain)) = (&trust_domain, implicit, &ca_domain) {
                    if *ca_domain != cfg.trust_domain {
                        errln!(
                            "securesrv: {} does not set trust_domain, so the components that \
                             read it use {}, but {} is the CA of trust domain {}: set \
                             trust_domain = \"{}\" in it, or pass --trust-domain",
                            shown(&file.display().to_string()),
                            cfg.trust_domain,
                            shown(&dir.join("ca.crt").display().to_string()),
                            ca_domain,
                            ca_domain
                        );
                        return ExitCode::FAILURE;
                    }
                }
                securesrv::certs::issue(
                    &dir,
                    &securesrv::certs::IssueOptions {
                        role,
                        name,
                        trust_domain: trust_domain.or(configured_td),
                        days,
                        hosts,
                        force,
                    },
                )
            }
            Err(e) => {
                errln!("securesrv: {e} (use dispatcher, worker, watchdog or client)");
                return ExitCode::from(2);
            }
        },
        CertsCmd::RotateTokenKey {
            dir,
            keep_previous_secs,
            trust_domain,
        } => {
            // Every component must be restarted within the window, and the dispatcher's
            // fallback to the previous key ends a token lifetime before it does.
            if keep_previous_secs < SHORT_ROTATION_WINDOW_SECS {
                errln!(
                    "securesrv: warning: the previous token key retires {keep_previous_secs} s from now; components not restarted by then refuse or sign tokens with a retired key (requests fail with `internal`). Restart every worker, then the dispatcher, at once, or the whole service (docs/OPERATIONS.md, \"Token key rotation\")"
                );
            }
            securesrv::certs::rotate_token_key(
                &dir_or_default(dir),
                trust_domain.or(configured_td).as_deref(),
                keep_previous_secs.saturating_mul(1000),
            )
        }
        CertsCmd::TokenKeys {
            dir,
            workers,
            trust_domain,
            force,
        } => securesrv::certs::token_keys(
            &dir_or_default(dir),
            trust_domain.or(configured_td).as_deref(),
            &workers_or_configured(workers),
            force,
        ),
    };
    match result {
        Ok(paths) => {
            let said: String = (paths.iter())
                .map(|p| format!("wrote {}\n", shown(&p.display().to_string())))
                .collect();
            say_done(&said)
        }
        Err(e) => certs_failed(&e),
    }
}

/// A `certs` command's failure on stderr; exit 1, or 130 if it was interrupted (nothing
/// written).
fn certs_failed(e: &securesrv::certs::CertError) -> ExitCode {
    errln!("securesrv: {}", shown(&e.to_string()));
    match e {
        securesrv::certs::CertError::Interrupted(_) => ExitCode::from(130),
        _ => ExitCode::FAILURE,
    }
}

/// The certificate files (`*.crt`, but `ca.crt`) in `dir` that name `dir`'s `ca.crt` as
/// their issuer.
fn signed_by_the_ca_in(dir: &std::path::Path) -> Vec<PathBuf> {
    // The subject (or issuer) of the first certificate in a PEM file, DER.
    let name_in = |path: &std::path::Path, subject: bool| -> Option<Vec<u8>> {
        let pem = securesrv::files::read_regular(path, 1024 * 1024).ok()?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).ok()?;
        let cert = pem.parse_x509().ok()?;
        let name = if subject {
            cert.subject()
        } else {
            cert.issuer()
        };
        Some(name.as_raw().to_vec())
    };
    let Some(ca) = name_in(&dir.join(securesrv::certs::CA_CERT), true) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "crt")
                && p.file_name()
                    .is_some_and(|n| n != securesrv::certs::CA_CERT)
                && name_in(p, false).is_some_and(|issuer| issuer == ca)
        })
        .collect();
    found.sort();
    found
}

/// After `certs init --force`: the certificates the old CA signed that the new set did not
/// replace (they no longer verify: issued again, or removed), and the old CA's revocation
/// list, removed. Both went without a word.
fn say_what_the_old_ca_left(
    dir: &std::path::Path,
    before: &[PathBuf],
    written: &[PathBuf],
    had_crl: bool,
) {
    let left: Vec<String> = (before.iter())
        .filter(|p| !written.contains(p))
        .map(|p| shown(&p.display().to_string()).into_owned())
        .collect();
    if !left.is_empty() {
        let (verify, them) = if left.len() == 1 {
            ("verifies", "it")
        } else {
            ("verify", "them")
        };
        errln!(
            "securesrv: the old CA signed {}, which no longer {verify}: issue {them} again \
             (`securesrv certs issue --force ...`) or remove {them}",
            left.join(", "),
        );
    }
    if had_crl {
        errln!(
            "securesrv: removed {} (the old CA's revocation list; what it listed does not \
             verify against the new CA either)",
            shown(&dir.join(securesrv::certs::CA_CRL).display().to_string())
        );
    }
}

/// What a `certs` command did, on stdout. Exit 1 if it cannot be said: the files are written,
/// but a script reading the list would miss them (and a panic would have exited 101).
fn say_done(said: &str) -> ExitCode {
    match securesrv::stdio::out_bytes(said.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            errln!("securesrv: the files were written, but cannot be listed on stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A `certs` command's output line with the file names in it made printable: they come from
/// the command line and the configuration, and a line break or control character in one
/// would print a line of its own (a forged log line) or drive the terminal.
fn shown(line: &str) -> std::borrow::Cow<'_, str> {
    securesrv::identity::printable_within(line, usize::MAX)
}

/// A path as the menu shows it in a command to type: printable, quoted if the shell would
/// split it or read it otherwise.
fn shown_arg(path: &std::path::Path) -> String {
    securesrv::identity::shell_word(&path.display().to_string())
}

/// The longest menu choice kept (a longer line is an invalid option, read through).
const MENU_LINE_MAX: usize = 1024;

/// The original's menu.
fn menu(config: Option<PathBuf>, log: Option<String>) -> ExitCode {
    use securesrv::stdio::out_bytes as out;
    let mut stdin = std::io::stdin().lock();
    loop {
        // The menu is for a terminal; the choice is read whether it could be shown or not.
        let _ = out(b"1. Run Watchdog (and servers)\n2. Run Client\nChoose an option: ");
        // Read as bytes: a line that is not UTF-8 is an invalid option, not the end of input.
        let mut line = Vec::new();
        match securesrv::files::read_line_bounded(&mut stdin, MENU_LINE_MAX, &mut line) {
            Ok(BoundedLine::End) => {
                let _ = out(b"\n");
                return ExitCode::SUCCESS;
            }
            Ok(BoundedLine::Line) => {}
            Ok(BoundedLine::TooLong(len)) => {
                let _ = securesrv::stdio::out_line(format_args!(
                    "Invalid option (a line of {len} bytes); enter 1, 2 or q."
                ));
                continue;
            }
            Err(e) => {
                errln!("securesrv: cannot read standard input: {e}");
                return ExitCode::FAILURE;
            }
        }
        match line.trim_ascii() {
            b"1" => {
                drop(stdin);
                let cfg = match load_config(config.as_deref(), |_| {}) {
                    Ok(cfg) => cfg,
                    Err(code) => return code,
                };
                // The watchdog takes the terminal over: say how to reach what it runs.
                let client = match &config {
                    Some(path) => format!("securesrv --config {} ", shown_arg(path)),
                    None => "securesrv ".to_string(),
                };
                let _ = securesrv::stdio::out_line(format_args!(
                    "The watchdog runs in this terminal until Ctrl-C. To send requests, run \
                     `{client}client` in another terminal (or `{}` there and choose 2).",
                    client.trim_end()
                ));
                return components::watchdog(cfg, config, log);
            }
            b"2" => {
                drop(stdin);
                return client_cmd::run(client_cmd::ClientArgs::default(), config);
            }
            b"q" | b"quit" | b"exit" => return ExitCode::SUCCESS,
            other => {
                let _ = securesrv::stdio::out_line(format_args!(
                    "Invalid option {:?}; enter 1, 2 or q.",
                    String::from_utf8_lossy(other)
                ));
            }
        }
    }
}

/// `filter` with rustls's own lines turned off, unless it names rustls. A peer that reaches
/// the port, with no certificate, can make rustls write a warning per alert it sends and a line
/// as long as the server name in its hello (64 KB), none of them throttled; our own line for a
/// refused handshake says why, at most once a second. `--log rustls=debug` brings them back.
fn quiet_rustls(filter: &str) -> String {
    let names_rustls = filter.split(',').any(|directive| {
        let target = directive.split(['=', '[']).next().unwrap_or("").trim();
        target == "rustls" || target.starts_with("rustls::")
    });
    if names_rustls {
        filter.to_string()
    } else if filter.trim().is_empty() {
        "rustls=off".to_string()
    } else {
        format!("{filter},rustls=off")
    }
}

/// Logs go to stderr through a buffered writer (see `logwriter`): audit lines must not cost a
/// system call each, and a stderr that takes nothing must not stop the process (`policy`).
fn init_logging(filter: Option<&str>, policy: logwriter::Policy) -> logwriter::Guard {
    use tracing_subscriber::EnvFilter;
    let filter = filter
        .map(str::to_string)
        .or_else(|| std::env::var("SECURESRV_LOG").ok())
        .unwrap_or_else(|| "info".into());
    let env_filter = EnvFilter::try_new(quiet_rustls(&filter)).unwrap_or_else(|e| {
        errln!("securesrv: invalid log filter {filter:?} ({e}); logging at info");
        EnvFilter::new(quiet_rustls("info"))
    });
    let (writer, guard) = logwriter::buffered_stderr(policy);
    securesrv::audit::install(Box::new(writer.clone()));
    let last_words = writer.clone();
    securesrv::shutdown::before_forced_exit(move || {
        // Waited for briefly: a blocked stderr (a paused terminal, a stuck pipe) must not
        // keep a forced exit from happening.
        let _ = last_words.flush_within(std::time::Duration::from_millis(200));
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(writer)
        .with_ansi(false)
        .event_format(logformat::LeanFormat)
        .fmt_fields(logformat::LeanFields)
        .try_init();
    guard
}

#[cfg(test)]
mod tests {
    use super::quiet_rustls;

    #[test]
    fn rustls_is_quiet_unless_a_directive_names_its_target() {
        assert_eq!(quiet_rustls("info"), "info,rustls=off");
        assert_eq!(quiet_rustls(""), "rustls=off");
        assert_eq!(
            quiet_rustls("warn,tokio_rustls=debug"),
            "warn,tokio_rustls=debug,rustls=off"
        );
        for named in [
            "info,rustls=debug",
            "rustls::conn=trace",
            "debug, rustls[x]=info",
        ] {
            assert_eq!(quiet_rustls(named), named);
        }
    }
}
