//! The one optional TOML configuration shared by every component.
//!
//! Every setting has a built-in default (the `DEFAULT_*` constants), so no file is needed.
//! Unknown keys are refused (`deny_unknown_fields`), and [`Config::validate`] reports every
//! problem at once rather than the first. The CLI maps [`ConfigError`] to exit code 64.
//! This module knows no sockets and never reads key bytes.

use crate::identity::{DEFAULT_TRUST_DOMAIN, Role, SpiffeId};
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default dispatcher address (the original's port 2222).
pub const DEFAULT_DISPATCHER_LISTEN: &str = "127.0.0.1:2222";
/// Default number of workers; worker N listens on the dispatcher's port + N.
pub const DEFAULT_WORKERS: u32 = 2;
/// Default certificate directory.
pub const DEFAULT_CERTS_DIR: &str = "certs";
/// Operations every worker has.
pub const BUILTIN_OPS: &[&str] = &["echo", "sha256", "sleep"];

/// Ceiling on `workers` (each is a process and a port).
pub const MAX_WORKERS: u32 = 256;

/// Longest time any `*_ms` setting may take: one day. Far beyond any sensible timeout, and
/// small enough that no sum or product of times overflows.
pub const MAX_MS: u64 = 24 * 60 * 60 * 1000;

/// Largest count a limit may take (connections, requests in flight, cache entries): far above
/// any real deployment, far below what tokio's semaphores and channels hold (2^61 permits,
/// beyond which they panic), and small enough that products of counts do not overflow.
pub const MAX_COUNT: usize = 1 << 24;

/// Longest token lifetime, and longest clock skew. A token only has to live from its minting
/// to the worker's check, and a worker remembers every id for lifetime + skew: its replay
/// cache holds `replay_cache_entries / (lifetime + skew)` requests a second.
pub const MAX_TOKEN_LIFETIME_MS: u64 = 60_000;

/// The dispatcher's first pause before dialling a worker again; its longest pause may not be
/// shorter.
pub const RECONNECT_INITIAL_MS: u64 = 50;

/// Problems with a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// The values are inconsistent; every problem is listed.
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// Largest configuration file read.
pub const MAX_CONFIG_FILE: u64 = 1024 * 1024;

/// The parser's message and where in the file it is, never the text of the line: a file given
/// as the configuration by mistake may be a key file, whose line is a key (the parser's own
/// rendering quotes it, and a token key went to the log in full that way). The message may
/// still name a key or quote a value of the file: made printable, so that a key name with a
/// line break cannot start a line of its own in the log.
fn parse_error(text: &str, e: &toml::de::Error) -> String {
    let message = crate::identity::printable_within(e.message().trim_end(), 512);
    let Some(at) = e.span().map(|s| s.start.min(text.len())) else {
        return message.into_owned();
    };
    let before = text.as_bytes().get(..at).unwrap_or_default();
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
    // Rust's type names mean little to an operator.
    let mut message = message.into_owned();
    for (rust, plain) in [
        ("expected usize", "expected a whole number"),
        ("expected u64", "expected a whole number"),
        ("expected u32", "expected a whole number"),
    ] {
        message = message.replace(rust, plain);
    }
    // `worker = 3` for `workers = 3`: `worker` is the list of `[[worker]]` tables.
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let key: String = text
        .get(line_start..)
        .unwrap_or_default()
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    if key == "worker" && message.contains("expected a sequence") {
        message.push_str(
            " (`worker` is the list of [[worker]] tables; the number of workers is `workers`)",
        );
    }
    format!("line {line}, column {column}: {message}")
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Trust domain of all identities.
    pub trust_domain: String,
    /// Where certificates, keys and token keys live.
    pub certs_dir: PathBuf,
    /// Dispatcher settings.
    pub dispatcher: DispatcherConfig,
    /// Number of workers when no `[[worker]]` list is given.
    pub workers: u32,
    /// Explicit worker list (overrides `workers`).
    pub worker: Vec<WorkerEntry>,
    /// Limits on every endpoint.
    pub limits: Limits,
    /// Request token settings.
    pub token: TokenConfig,
    /// Watchdog settings.
    pub watchdog: WatchdogConfig,
    /// Operator-declared jobs.
    pub jobs: Vec<JobConfig>,
    /// Ops registered by a program embedding the worker library.
    pub custom_ops: Vec<CustomOp>,
    /// Which client identities may call which op (`"*"` = any client).
    pub acl: BTreeMap<String, Vec<String>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            certs_dir: DEFAULT_CERTS_DIR.into(),
            dispatcher: DispatcherConfig::default(),
            workers: DEFAULT_WORKERS,
            worker: Vec::new(),
            limits: Limits::default(),
            token: TokenConfig::default(),
            watchdog: WatchdogConfig::default(),
            jobs: Vec::new(),
            custom_ops: Vec::new(),
            acl: BTreeMap::new(),
        }
    }
}

/// `[dispatcher]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatcherConfig {
    /// Address the dispatcher listens on.
    pub listen: SocketAddr,
    /// How long a request waits for an available worker before `unavailable`.
    pub unavailable_wait_ms: u64,
    /// Requests outstanding on one worker before it counts as unavailable.
    pub max_in_flight_per_worker: usize,
    /// Interval of the dispatcher's own pings to each worker.
    pub worker_ping_interval_ms: u64,
    /// Longest pause between reconnection attempts to a worker.
    pub reconnect_backoff_max_ms: u64,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig {
            listen: DEFAULT_DISPATCHER_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 2222))),
            unavailable_wait_ms: 2_000,
            max_in_flight_per_worker: 1_024,
            worker_ping_interval_ms: 1_000,
            reconnect_backoff_max_ms: 2_000,
        }
    }
}

/// One `[[worker]]` entry.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WorkerEntry {
    /// Worker number (its identity is `.../worker/<id>`).
    pub id: u32,
    /// Address it listens on.
    pub listen: SocketAddr,
}

/// `[limits]`: every bound on every endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest frame body accepted or sent.
    pub max_frame_bytes: usize,
    /// Deadline for TCP connect + TLS handshake.
    pub handshake_timeout_ms: u64,
    /// A connection that sends no frame for this long, while none of its requests is
    /// running, is closed.
    pub idle_timeout_ms: u64,
    /// Once a frame has started, all of it must arrive within this time.
    pub frame_timeout_ms: u64,
    /// A peer that does not read our frames within this time is dropped.
    pub write_timeout_ms: u64,
    /// Connections a listener holds at once.
    pub max_connections: usize,
    /// Connections one peer identity may hold at once.
    pub max_connections_per_identity: usize,
    /// Connections from one source address (an IPv6 one per /64) that may be in their
    /// handshake at once, so that one host cannot hold every connection slot with connections
    /// that never authenticate. A new connection beyond it closes the address's oldest
    /// handshake, so that such a host cannot keep out other peers on its address either.
    pub max_handshakes_per_address: usize,
    /// Requests in flight on one connection.
    pub max_in_flight_per_connection: usize,
    /// Requests one client identity may have in flight at the dispatcher over all its
    /// connections. Unset: half the workers' total capacity (`workers x
    /// dispatcher.max_in_flight_per_worker / 2`), so no single identity can take it all.
    pub max_in_flight_per_identity: Option<usize>,
    /// Payload bytes one client identity may have in flight at the dispatcher over all its
    /// connections (a request holds its payload until it is answered, to send it again if its
    /// worker fails, and its answer holds as much, or its own size if larger, until it is
    /// written to the client).
    /// At least `max_frame_bytes`, so that any one request fits.
    pub max_in_flight_bytes_per_identity: usize,
    /// Deadline of a request that does not ask for one.
    pub request_timeout_ms: u64,
    /// Longest deadline a client may ask for.
    pub max_request_timeout_ms: u64,
    /// Longest `sleep` op.
    pub max_sleep_ms: u64,
    /// Requests one worker runs at once, over all its connections.
    pub worker_max_concurrent: usize,
    /// Requests one client identity may have refused at once per second at the dispatcher
    /// (`denied`, `unknown_op`, `overloaded`, ...), over all its connections; beyond it
    /// (about a second's worth may come together) its connections take no new frame until it
    /// is back within it. Each refusal writes an audit line: this bounds what one identity
    /// can write.
    pub max_refusals_per_sec_per_identity: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: crate::frame::DEFAULT_MAX_FRAME,
            handshake_timeout_ms: 5_000,
            idle_timeout_ms: 60_000,
            frame_timeout_ms: 10_000,
            write_timeout_ms: 10_000,
            max_connections: 4_096,
            max_connections_per_identity: 2_048,
            max_handshakes_per_address: 512,
            max_in_flight_per_connection: 256,
            max_in_flight_per_identity: None,
            max_in_flight_bytes_per_identity: 128 * 1024 * 1024,
            request_timeout_ms: 10_000,
            max_request_timeout_ms: 60_000,
            max_sleep_ms: 30_000,
            worker_max_concurrent: 4_096,
            max_refusals_per_sec_per_identity: 1_000,
        }
    }
}

impl Limits {
    /// The handshake deadline.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// The per-connection I/O limits.
    pub fn io(&self) -> crate::connection::IoLimits {
        crate::connection::IoLimits {
            max_frame: self.max_frame_bytes,
            frame_timeout: Duration::from_millis(self.frame_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            write_timeout: Duration::from_millis(self.write_timeout_ms),
        }
    }
}

/// `[token]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// Lifetime of a minted token (and the longest a worker accepts).
    pub lifetime_ms: u64,
    /// Tolerated clock difference between dispatcher and worker.
    pub clock_skew_ms: u64,
    /// Replay cache capacity per worker, in request ids.
    pub replay_cache_entries: usize,
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            lifetime_ms: crate::token::DEFAULT_LIFETIME_MS,
            clock_skew_ms: crate::token::DEFAULT_CLOCK_SKEW_MS,
            replay_cache_entries: crate::token::DEFAULT_REPLAY_CAPACITY,
        }
    }
}

/// `[watchdog]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchdogConfig {
    /// Time between heartbeats.
    pub heartbeat_interval_ms: u64,
    /// How long one heartbeat may take (connect + ping + pong).
    pub heartbeat_timeout_ms: u64,
    /// Failed heartbeats in a row before a component is restarted.
    pub max_missed: u32,
    /// First restart delay; doubles on each restart.
    pub restart_backoff_initial_ms: u64,
    /// Cap on the restart delay.
    pub restart_backoff_max_ms: u64,
    /// After running this long without trouble, the backoff resets.
    pub stable_after_ms: u64,
    /// More restarts than this within `restart_limit_window_ms` marks a component failed.
    pub restart_limit_burst: u32,
    /// The restart-intensity window.
    pub restart_limit_window_ms: u64,
    /// How long a component may take to stop after SIGTERM before SIGKILL.
    pub stop_grace_ms: u64,
    /// How long a started component may take to answer its first heartbeat; also how long
    /// `ready` waits for the dispatcher's links to the workers once every component is up.
    pub start_timeout_ms: u64,
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        WatchdogConfig {
            heartbeat_interval_ms: 1_000,
            heartbeat_timeout_ms: 1_000,
            max_missed: 3,
            restart_backoff_initial_ms: 100,
            restart_backoff_max_ms: 5_000,
            stable_after_ms: 30_000,
            restart_limit_burst: 5,
            restart_limit_window_ms: 60_000,
            stop_grace_ms: 5_000,
            start_timeout_ms: 10_000,
        }
    }
}

/// One `[[jobs]]` entry: a program run without a shell, payload on stdin.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// The op name clients call.
    pub name: String,
    /// Absolute path of the program.
    pub program: PathBuf,
    /// Fixed arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Killed when it runs longer than this.
    #[serde(default = "default_job_timeout")]
    pub timeout_ms: u64,
    /// Stdout beyond this many bytes fails the job; unset, [`JobConfig::output_cap`] decides.
    #[serde(default)]
    pub max_output_bytes: Option<usize>,
    /// Safe to run twice (retried on another worker if one dies mid-request).
    #[serde(default)]
    pub idempotent: bool,
}

fn default_job_timeout() -> u64 {
    10_000
}

/// The fewest connections a listener may be limited to: the watchdog's heartbeat, the
/// dispatcher's link (at a worker) and room for one more while either reconnects.
pub const MIN_CONNECTIONS: usize = 4;

/// A job's output cap when its entry does not set one (and a reply frame holds that much).
pub const DEFAULT_JOB_OUTPUT: usize = 64 * 1024;

impl JobConfig {
    /// The job's output cap under `limits`: as the entry sets it, else [`DEFAULT_JOB_OUTPUT`]
    /// or what a reply frame holds, whichever is less (lowering `limits.max_frame_bytes` must
    /// not make a job that names no cap invalid).
    pub fn output_cap(&self, limits: &Limits) -> usize {
        self.max_output_bytes.unwrap_or_else(|| {
            DEFAULT_JOB_OUTPUT.min(
                limits
                    .max_frame_bytes
                    .saturating_sub(crate::frame::REPLY_OVERHEAD)
                    .max(1),
            )
        })
    }
}

/// One `[[custom_ops]]` entry: an op a program embedding the worker registers itself.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CustomOp {
    /// The op name.
    pub name: String,
    /// Safe to run twice.
    #[serde(default)]
    pub idempotent: bool,
}

/// What kind of op a name refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// echo, sha256, sleep.
    Builtin,
    /// A `[[jobs]]` entry.
    Job,
    /// A `[[custom_ops]]` entry.
    Custom,
}

/// What the dispatcher needs to know about an op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpInfo {
    /// Where it comes from.
    pub kind: OpKind,
    /// Whether a lost request may be retried elsewhere.
    pub idempotent: bool,
}

/// Whether listeners on `a` and `b` (not equal) cannot both be bound: the same port, and
/// one of them the wildcard address of the other's family, or both the same address. An
/// IPv4-mapped IPv6 address (`[::ffff:127.0.0.1]`) is the IPv4 address it maps. Where
/// `dual_stack` (`net.ipv6.bindv6only` 0, Linux's default) the IPv6 wildcard takes the port
/// on every IPv4 address too.
fn listeners_clash(a: SocketAddr, b: SocketAddr, dual_stack: bool) -> bool {
    let (x, y) = (a.ip().to_canonical(), b.ip().to_canonical());
    if a.port() != b.port() {
        return false;
    }
    if x.is_ipv4() == y.is_ipv4() {
        return x == y || x.is_unspecified() || y.is_unspecified();
    }
    dual_stack && [x, y].iter().any(|ip| ip.is_ipv6() && ip.is_unspecified())
}

/// Whether this host's IPv6 wildcard listeners take the IPv4 port too: `net.ipv6.bindv6only`
/// is 0 (Linux's default, assumed when it cannot be read).
fn host_is_dual_stack() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").map_or(true, |v| v.trim() == "0")
}

impl Config {
    /// Reads `path` (or the defaults for `None`) and validates it.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let cfg = Self::read(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads `path` (or the defaults for `None`) without validating it: for a caller that
    /// changes it first (command-line overrides) and validates the result.
    pub fn read(path: Option<&Path>) -> Result<Config, ConfigError> {
        Ok(match path {
            None => Config::default(),
            Some(p) => {
                let read = |source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                };
                let bytes = crate::files::read_regular(p, MAX_CONFIG_FILE).map_err(read)?;
                let text = String::from_utf8(bytes).map_err(|_| {
                    read(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "not a text file (UTF-8)",
                    ))
                })?;
                Self::parse(&text).map_err(|message| ConfigError::Parse {
                    path: p.to_path_buf(),
                    message,
                })?
            }
        })
    }

    /// Parses TOML text (no validation).
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| parse_error(text, &e))
    }

    /// Checks every value; lists all problems.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Vec::new();
        if crate::identity::SpiffeId::new(&self.trust_domain, Role::Client, "x").is_err() {
            p.push(format!(
                "trust_domain {:?} is not valid (1-{} of {})",
                self.trust_domain,
                crate::identity::MAX_TRUST_DOMAIN_LEN,
                crate::identity::TRUST_DOMAIN_CHARS
            ));
        }
        let (l, d, t, w) = (&self.limits, &self.dispatcher, &self.token, &self.watchdog);
        // Times: (name, value, whether 0 means something). A 0 where it does not would turn a
        // limit, the backoff or the restart window off without saying so.
        for (name, v, zero_ok) in [
            ("limits.handshake_timeout_ms", l.handshake_timeout_ms, false),
            ("limits.idle_timeout_ms", l.idle_timeout_ms, false),
            ("limits.frame_timeout_ms", l.frame_timeout_ms, false),
            ("limits.write_timeout_ms", l.write_timeout_ms, false),
            ("limits.request_timeout_ms", l.request_timeout_ms, false),
            (
                "limits.max_request_timeout_ms",
                l.max_request_timeout_ms,
                false,
            ),
            ("limits.max_sleep_ms", l.max_sleep_ms, true),
            (
                "dispatcher.unavailable_wait_ms",
                d.unavailable_wait_ms,
                true,
            ),
            (
                "dispatcher.worker_ping_interval_ms",
                d.worker_ping_interval_ms,
                false,
            ),
            (
                "dispatcher.reconnect_backoff_max_ms",
                d.reconnect_backoff_max_ms,
                false,
            ),
            ("token.lifetime_ms", t.lifetime_ms, false),
            ("token.clock_skew_ms", t.clock_skew_ms, true),
            (
                "watchdog.heartbeat_interval_ms",
                w.heartbeat_interval_ms,
                false,
            ),
            (
                "watchdog.heartbeat_timeout_ms",
                w.heartbeat_timeout_ms,
                false,
            ),
            (
                "watchdog.restart_backoff_initial_ms",
                w.restart_backoff_initial_ms,
                false,
            ),
            (
                "watchdog.restart_backoff_max_ms",
                w.restart_backoff_max_ms,
                false,
            ),
            ("watchdog.stable_after_ms", w.stable_after_ms, true),
            (
                "watchdog.restart_limit_window_ms",
                w.restart_limit_window_ms,
                false,
            ),
            ("watchdog.stop_grace_ms", w.stop_grace_ms, true),
            ("watchdog.start_timeout_ms", w.start_timeout_ms, false),
        ] {
            if v == 0 && !zero_ok {
                p.push(format!("{name} must be greater than 0"));
            } else if v > MAX_MS {
                p.push(format!("{name} must be at most {MAX_MS} (one day)"));
            }
        }
        // Counts: each sizes a semaphore, a channel or a cache.
        if (1..MIN_CONNECTIONS).contains(&l.max_connections) {
            p.push(format!(
                "limits.max_connections must be at least {MIN_CONNECTIONS}: the watchdog's \
                 heartbeat connection counts against it, and at a worker the dispatcher's link, \
                 so fewer leave no room to serve"
            ));
        }
        for (name, v) in [
            ("limits.max_connections", l.max_connections),
            (
                "limits.max_connections_per_identity",
                l.max_connections_per_identity,
            ),
            (
                "limits.max_handshakes_per_address",
                l.max_handshakes_per_address,
            ),
            (
                "limits.max_in_flight_per_connection",
                l.max_in_flight_per_connection,
            ),
            (
                "limits.max_in_flight_per_identity",
                l.max_in_flight_per_identity.unwrap_or(1),
            ),
            ("limits.worker_max_concurrent", l.worker_max_concurrent),
            (
                "limits.max_refusals_per_sec_per_identity",
                l.max_refusals_per_sec_per_identity as usize,
            ),
            ("token.replay_cache_entries", t.replay_cache_entries),
            (
                "dispatcher.max_in_flight_per_worker",
                d.max_in_flight_per_worker,
            ),
        ] {
            if v == 0 || v > MAX_COUNT {
                p.push(format!("{name} must be between 1 and {MAX_COUNT}"));
            }
        }
        for (name, v) in [
            ("watchdog.max_missed", w.max_missed),
            ("watchdog.restart_limit_burst", w.restart_limit_burst),
        ] {
            if v == 0 || v as usize > MAX_COUNT {
                p.push(format!("{name} must be between 1 and {MAX_COUNT}"));
            }
        }
        // A hung component is killed after about max_missed beats: within a day, as every
        // other wait, so that a large count cannot turn hang detection off.
        let beat = w.heartbeat_interval_ms.max(w.heartbeat_timeout_ms);
        if u64::from(w.max_missed).saturating_mul(beat) > MAX_MS {
            p.push(format!(
                "watchdog.max_missed x max(heartbeat_interval_ms, heartbeat_timeout_ms) must be \
                 at most {MAX_MS} (one day): a hung component must be found"
            ));
        }
        if t.lifetime_ms > MAX_TOKEN_LIFETIME_MS || t.clock_skew_ms > MAX_TOKEN_LIFETIME_MS {
            p.push(format!(
                "token.lifetime_ms and token.clock_skew_ms must be at most {MAX_TOKEN_LIFETIME_MS} \
                 (a worker remembers every request id for their sum)"
            ));
        }
        if d.reconnect_backoff_max_ms < RECONNECT_INITIAL_MS {
            p.push(format!(
                "dispatcher.reconnect_backoff_max_ms must be at least {RECONNECT_INITIAL_MS}"
            ));
        }
        // A connection quiet for the idle timeout is closed: the pings that keep a link up
        // must come sooner, with room for one that is late. The dispatcher skips a ping while
        // the last one is unwritten (a gap of two intervals); a heartbeat may take its whole
        // timeout before the next interval starts.
        for (name, gap) in [
            (
                "2 x dispatcher.worker_ping_interval_ms",
                d.worker_ping_interval_ms.saturating_mul(2),
            ),
            (
                "watchdog.heartbeat_interval_ms + heartbeat_timeout_ms",
                w.heartbeat_interval_ms
                    .saturating_add(w.heartbeat_timeout_ms),
            ),
        ] {
            if gap >= l.idle_timeout_ms {
                p.push(format!(
                    "{name} must be less than limits.idle_timeout_ms, or the link is closed as idle between pings"
                ));
            }
        }
        if l.max_frame_bytes < 1024 || l.max_frame_bytes > crate::frame::MAX_FRAME_CEILING {
            p.push(format!(
                "limits.max_frame_bytes must be between 1024 and {}",
                crate::frame::MAX_FRAME_CEILING
            ));
        }
        if l.max_in_flight_bytes_per_identity < l.max_frame_bytes {
            p.push(
                "limits.max_in_flight_bytes_per_identity is less than limits.max_frame_bytes"
                    .into(),
            );
        }
        if l.request_timeout_ms > l.max_request_timeout_ms {
            p.push("limits.request_timeout_ms exceeds limits.max_request_timeout_ms".into());
        }
        if self.dispatcher.max_in_flight_per_worker > l.worker_max_concurrent {
            p.push(
                "dispatcher.max_in_flight_per_worker exceeds limits.worker_max_concurrent".into(),
            );
        }
        if l.max_connections_per_identity > l.max_connections {
            p.push("limits.max_connections_per_identity exceeds limits.max_connections".into());
        }
        if self.watchdog.restart_backoff_initial_ms > self.watchdog.restart_backoff_max_ms {
            p.push(
                "watchdog.restart_backoff_initial_ms exceeds watchdog.restart_backoff_max_ms"
                    .into(),
            );
        }
        self.validate_workers(&mut p);
        self.validate_ops(&mut p);
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(p))
        }
    }

    fn validate_workers(&self, p: &mut Vec<String>) {
        // Port 0 would bind wherever the system chooses, and nobody else could find it:
        // clients and the watchdog dial the dispatcher, the dispatcher and the watchdog the
        // workers (whose ports are derived from the dispatcher's unless listed).
        let port_zero = self.dispatcher.listen.port() == 0;
        if port_zero {
            p.push("dispatcher.listen needs a port other than 0".into());
        }
        if self.worker.is_empty() {
            if self.workers == 0 || self.workers > MAX_WORKERS {
                p.push(format!("workers must be between 1 and {MAX_WORKERS}"));
            } else if !port_zero && u32::from(self.dispatcher.listen.port()) + self.workers > 65_535
            {
                p.push("dispatcher port + workers exceeds 65535".into());
            }
            return;
        }
        if self.worker.len() > MAX_WORKERS as usize {
            p.push(format!(
                "{} [[worker]] entries: at most {MAX_WORKERS}",
                self.worker.len()
            ));
        }
        let mut ids = HashSet::new();
        let mut addrs = HashSet::from([self.dispatcher.listen]);
        for w in &self.worker {
            if w.id == 0 {
                p.push("worker id 0 is not allowed (workers are numbered from 1)".into());
            }
            if !ids.insert(w.id) {
                p.push(format!("worker {} is listed twice", w.id));
            }
            if w.listen.port() == 0 {
                p.push(format!("worker {} needs a listen port other than 0", w.id));
            } else if !addrs.insert(w.listen) {
                p.push(format!("address {} is used twice", w.listen));
            }
        }
    }

    /// For the watchdog, which runs every component on this host: the listen addresses that
    /// cannot all be bound here, each pair said once. A wildcard address takes its port on
    /// every address of its family (an IPv6 one, on a dual-stack host, on IPv4's too), so
    /// another component on that port cannot listen (a crash loop at run time, blamed on
    /// "another watchdog"). Not part of [`Config::validate`]:
    /// components supervised one by one may run on different hosts from one file (a
    /// dispatcher on `0.0.0.0:2222`, a worker on `10.0.0.5:2222`).
    pub fn co_located_clashes(&self) -> Vec<String> {
        self.co_located_clashes_on(host_is_dual_stack())
    }

    /// [`Config::co_located_clashes`] on a host whose IPv6 wildcard takes the IPv4 port too
    /// (`dual_stack`) or not.
    pub fn co_located_clashes_on(&self, dual_stack: bool) -> Vec<String> {
        let named: Vec<(String, SocketAddr)> =
            std::iter::once(("the dispatcher".to_string(), self.dispatcher.listen))
                .chain(
                    self.worker_addresses()
                        .into_iter()
                        .map(|(id, addr)| (format!("worker {id}"), addr)),
                )
                .collect();
        let mut p = Vec::new();
        for (i, (a_name, a)) in named.iter().enumerate() {
            for (b_name, b) in &named[i + 1..] {
                if a != b && listeners_clash(*a, *b, dual_stack) {
                    p.push(format!(
                        "{a_name} ({a}) and {b_name} ({b}) cannot both listen on this host: \
                         a wildcard address takes its port on every address of its family \
                         (an IPv6 one on IPv4's too, unless net.ipv6.bindv6only is 1), and \
                         [::ffff:a.b.c.d] is a.b.c.d"
                    ));
                }
            }
        }
        p
    }

    fn validate_ops(&self, p: &mut Vec<String>) {
        let mut names: HashSet<&str> = BUILTIN_OPS.iter().copied().collect();
        let declared = self.jobs.iter().map(|j| (j.name.as_str(), "job")).chain(
            self.custom_ops
                .iter()
                .map(|c| (c.name.as_str(), "custom op")),
        );
        for (name, what) in declared {
            if !valid_op_name(name) {
                p.push(format!(
                    "{what} name {name:?} is not valid (1-64 of a-z 0-9 _ - .)"
                ));
            }
            if !names.insert(name) {
                p.push(format!(
                    "{what} {name:?} clashes with another op of that name"
                ));
            }
        }
        for j in &self.jobs {
            if !j.program.is_absolute() {
                p.push(format!(
                    "job {:?}: program {:?} must be an absolute path (jobs run without a shell or PATH)",
                    j.name, j.program
                ));
            }
            if j.timeout_ms == 0 || j.timeout_ms > MAX_MS {
                p.push(format!(
                    "job {:?}: timeout_ms must be between 1 and {MAX_MS} (one day)",
                    j.name
                ));
            }
            // The output goes back in one reply frame, beside the reply's envelope.
            let most = self
                .limits
                .max_frame_bytes
                .saturating_sub(crate::frame::REPLY_OVERHEAD);
            if j.max_output_bytes.is_some_and(|cap| cap == 0 || cap > most) {
                p.push(format!(
                    "job {:?}: max_output_bytes must be between 1 and {most} \
                     (limits.max_frame_bytes less {} bytes for the reply around it)",
                    j.name,
                    crate::frame::REPLY_OVERHEAD
                ));
            }
        }
        for (op, who) in &self.acl {
            if !names.contains(op.as_str()) {
                p.push(format!("acl names unknown op {op:?}"));
            }
            for entry in who {
                if entry == "*" {
                    continue;
                }
                match entry.parse::<SpiffeId>() {
                    Ok(id)
                        if id.role() == Role::Client && id.trust_domain() == self.trust_domain => {}
                    Ok(_) => p.push(format!(
                        "acl {op:?}: {entry:?} is not a client identity of trust domain {:?}",
                        self.trust_domain
                    )),
                    Err(e) => p.push(format!("acl {op:?}: {entry:?}: {e}")),
                }
            }
        }
    }

    /// The workers the dispatcher forwards to: `(id, address)`.
    pub fn worker_addresses(&self) -> Vec<(u32, SocketAddr)> {
        if !self.worker.is_empty() {
            return self.worker.iter().map(|w| (w.id, w.listen)).collect();
        }
        (1..=self.workers)
            .map(|n| {
                let mut a = self.dispatcher.listen;
                a.set_port(self.dispatcher.listen.port().saturating_add(n as u16));
                (n, a)
            })
            .collect()
    }

    /// The address of worker `id` (configured or derived from the dispatcher's port).
    pub fn worker_address(&self, id: u32) -> Option<SocketAddr> {
        if let Some(w) = self.worker.iter().find(|w| w.id == id) {
            return Some(w.listen);
        }
        if self.worker.is_empty() {
            let port = u32::from(self.dispatcher.listen.port()).checked_add(id)?;
            let mut a = self.dispatcher.listen;
            a.set_port(u16::try_from(port).ok()?);
            return Some(a);
        }
        None
    }

    /// What an op is, if this configuration knows it.
    pub fn op_info(&self, op: &str) -> Option<OpInfo> {
        if BUILTIN_OPS.contains(&op) {
            return Some(OpInfo {
                kind: OpKind::Builtin,
                idempotent: true,
            });
        }
        if let Some(j) = self.jobs.iter().find(|j| j.name == op) {
            return Some(OpInfo {
                kind: OpKind::Job,
                idempotent: j.idempotent,
            });
        }
        self.custom_ops
            .iter()
            .find(|c| c.name == op)
            .map(|c| OpInfo {
                kind: OpKind::Custom,
                idempotent: c.idempotent,
            })
    }

    /// The ACL decision: listed ops allow `"*"` or the exact client identity; unlisted
    /// built-ins are open to every client; unlisted jobs and custom ops are closed. Only a
    /// client of this trust domain is a client: the worker asks this of the identity a token
    /// names, where no handshake has checked the trust domain.
    pub fn acl_allows(&self, client: &SpiffeId, op: &str) -> bool {
        if client.role() != Role::Client || client.trust_domain() != self.trust_domain {
            return false;
        }
        match self.acl.get(op) {
            Some(who) => {
                let me = client.to_string();
                who.iter().any(|w| w == "*" || *w == me)
            }
            None => matches!(
                self.op_info(op),
                Some(OpInfo {
                    kind: OpKind::Builtin,
                    ..
                })
            ),
        }
    }

    /// The dispatcher's per-identity in-flight bound (see
    /// [`Limits::max_in_flight_per_identity`]).
    pub fn dispatcher_in_flight_per_identity(&self) -> usize {
        self.limits.max_in_flight_per_identity.unwrap_or_else(|| {
            let capacity = (self.worker_addresses().len())
                .saturating_mul(self.dispatcher.max_in_flight_per_worker);
            (capacity / 2).max(1)
        })
    }

    /// How long a component lets in-flight requests finish once it is told to stop: most of
    /// the watchdog's grace period before SIGKILL.
    pub fn drain_period(&self) -> Duration {
        Duration::from_millis(self.watchdog.stop_grace_ms.saturating_mul(4) / 5)
    }

    /// A job by name.
    pub fn job(&self, op: &str) -> Option<&JobConfig> {
        self.jobs.iter().find(|j| j.name == op)
    }
}

/// Op names: 1-64 of `a-z 0-9 _ - .`.
pub fn valid_op_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_no_file() {
        let cfg = Config::load(None).unwrap();
        assert_eq!(cfg.dispatcher.listen.to_string(), "127.0.0.1:2222");
        assert_eq!(
            cfg.worker_addresses(),
            vec![
                (1, "127.0.0.1:2223".parse().unwrap()),
                (2, "127.0.0.1:2224".parse().unwrap())
            ]
        );
        assert_eq!(cfg.certs_dir, PathBuf::from("certs"));
    }

    /// A key file given as the configuration by mistake: the error says where it failed,
    /// never what the line holds (the parser's own message quoted the line, a token key).
    #[test]
    fn a_parse_error_never_quotes_the_file() {
        let key = "810dd5e98394c9a1f0e1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e4f5a6b";
        for text in [
            format!("# securesrv token keys\nkey 1 {key}\n"),
            format!("-----BEGIN PRIVATE KEY-----\n{key}\n-----END PRIVATE KEY-----\n"),
            format!("workers = 2\n{key}\n"),
        ] {
            let err = Config::parse(&text).unwrap_err();
            assert!(!err.contains(&key[..16]), "the key is in the error: {err}");
            assert!(err.starts_with("line "), "{err}");
        }
        let err = Config::parse("workers = 2\nkey 1 abc\n").unwrap_err();
        assert!(err.starts_with("line 2, column 5: "), "{err}");
        // A key name the message quotes cannot break the line.
        let err = Config::parse("\"x\\n2026-12-01T00:00:00Z ERROR forged\" = 1\n").unwrap_err();
        assert!(err.contains("unknown field"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Config::parse("[limits]\nmax_frame = 5\n").unwrap_err();
        assert!(err.contains("max_frame"), "{err}");
        assert!(Config::parse("listen = \"x\"").is_err());
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let cfg = Config::parse(
            r#"
            workers = 0
            [limits]
            max_frame_bytes = 10
            request_timeout_ms = 0
            max_in_flight_bytes_per_identity = 1
            [watchdog]
            restart_limit_window_ms = 0
            [[jobs]]
            name = "echo"
            program = "bin/date"
            [[jobs]]
            name = "big"
            program = "/bin/cat"
            max_output_bytes = 10
            [acl]
            nosuch = ["*"]
            echo = ["spiffe://securesrv/worker/1", "bogus"]
            "#,
        )
        .unwrap();
        let Err(ConfigError::Invalid(problems)) = cfg.validate() else {
            panic!("expected invalid");
        };
        let all = problems.join("\n");
        for needle in [
            "workers must be",
            "max_frame_bytes",
            "request_timeout_ms must be greater than 0",
            "max_in_flight_bytes_per_identity is less than",
            "clashes",
            "absolute path",
            "unknown op \"nosuch\"",
            "not a client identity",
            "\"bogus\"",
            "restart_limit_window_ms must be greater than 0",
            "job \"big\": max_output_bytes must be between 1 and",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn type_errors_speak_plainly_and_worker_for_workers_is_pointed_out() {
        let err = Config::parse("worker = 3\n").unwrap_err();
        assert!(
            err.starts_with("line 1, column 10:")
                && err.contains("the number of workers is `workers`"),
            "{err}"
        );
        let err = Config::parse("[limits]\nmax_connections = \"x\"\n").unwrap_err();
        assert!(err.contains("expected a whole number"), "{err}");
        assert!(!err.contains("usize"), "{err}");
    }

    #[test]
    fn a_job_without_an_output_cap_fits_a_smaller_frame() {
        let job = "[[jobs]]\nname = \"j\"\nprogram = \"/bin/cat\"\n";
        // The default cap where it fits, however the configuration was deserialised.
        let cfg = Config::parse(job).unwrap();
        assert_eq!(cfg.jobs[0].output_cap(&cfg.limits), DEFAULT_JOB_OUTPUT);
        cfg.validate().unwrap();
        let cfg: Config = toml::from_str(job).unwrap();
        assert_eq!(cfg.jobs[0].output_cap(&cfg.limits), DEFAULT_JOB_OUTPUT);
        // Under a smaller frame, what a reply holds; the configuration stays valid.
        let cfg = Config::parse(&format!("[limits]\nmax_frame_bytes = 4096\n{job}")).unwrap();
        assert_eq!(
            cfg.jobs[0].output_cap(&cfg.limits),
            4096 - crate::frame::REPLY_OVERHEAD
        );
        cfg.validate().unwrap();
        // A cap the entry sets is kept, and judged.
        let cfg = Config::parse(&format!(
            "[limits]\nmax_frame_bytes = 4096\n{job}max_output_bytes = 65536\n"
        ))
        .unwrap();
        assert_eq!(cfg.jobs[0].output_cap(&cfg.limits), 65536);
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn values_that_would_break_a_component_are_refused() {
        // Each passed the old checks (greater than 0) and then panicked in a semaphore or a
        // channel, wrapped in arithmetic, stormed a worker with dials, or had every request
        // refused `internal`.
        for (text, needle) in [
            (
                "[limits]\nmax_in_flight_per_connection = 4611686018427387904",
                "max_in_flight_per_connection must be between 1 and",
            ),
            (
                "[limits]\nmax_connections = 3\nmax_connections_per_identity = 1",
                "max_connections must be at least 4",
            ),
            (
                "[limits]\nmax_connections = 4611686018427387904",
                "max_connections must be between 1 and",
            ),
            (
                "[limits]\nmax_in_flight_per_identity = 4611686018427387904",
                "max_in_flight_per_identity must be between 1 and",
            ),
            (
                "[dispatcher]\nmax_in_flight_per_worker = 4611686018427387904",
                "max_in_flight_per_worker must be between 1 and",
            ),
            (
                "[token]\nreplay_cache_entries = 4611686018427387904",
                "replay_cache_entries must be between 1 and",
            ),
            (
                "[watchdog]\nstop_grace_ms = 18446744073709551615",
                "stop_grace_ms must be at most 86400000",
            ),
            (
                "[limits]\nmax_sleep_ms = 86400001",
                "max_sleep_ms must be at most",
            ),
            (
                "[token]\nlifetime_ms = 86400000",
                "token.lifetime_ms and token.clock_skew_ms must be at most 60000",
            ),
            (
                "[token]\nclock_skew_ms = 600000",
                "token.lifetime_ms and token.clock_skew_ms must be at most 60000",
            ),
            (
                "[dispatcher]\nreconnect_backoff_max_ms = 0",
                "reconnect_backoff_max_ms must be greater than 0",
            ),
            (
                "[dispatcher]\nreconnect_backoff_max_ms = 10",
                "reconnect_backoff_max_ms must be at least 50",
            ),
            (
                "[dispatcher]\nworker_ping_interval_ms = 1000\n[limits]\nidle_timeout_ms = 2000",
                "2 x dispatcher.worker_ping_interval_ms must be less than limits.idle_timeout_ms",
            ),
            (
                "[watchdog]\nheartbeat_interval_ms = 30000\nheartbeat_timeout_ms = 30000",
                "heartbeat_interval_ms + heartbeat_timeout_ms must be less than limits.idle_timeout_ms",
            ),
            (
                "[[jobs]]\nname = \"j\"\nprogram = \"/bin/cat\"\ntimeout_ms = 86400001",
                "job \"j\": timeout_ms must be between 1 and 86400000",
            ),
            (
                &format!("trust_domain = \"{}\"", "t".repeat(175)),
                "trust_domain",
            ),
            (
                "trust_domain = \"Bad Domain\"",
                "trust_domain \"Bad Domain\" is not valid (1-174 of a-z 0-9 . - _)",
            ),
            (
                "[watchdog]\nrestart_limit_burst = 4294967295",
                "watchdog.restart_limit_burst must be between 1 and 16777216",
            ),
            (
                "[dispatcher]\nlisten = \"127.0.0.1:0\"",
                "dispatcher.listen needs a port other than 0",
            ),
            (
                "[[worker]]\nid = 1\nlisten = \"127.0.0.1:0\"",
                "worker 1 needs a listen port other than 0",
            ),
            (
                "[watchdog]\nmax_missed = 86401",
                "watchdog.max_missed x max(heartbeat_interval_ms, heartbeat_timeout_ms) must be at most 86400000",
            ),
        ] {
            let cfg = Config::parse(text).unwrap();
            let Err(ConfigError::Invalid(p)) = cfg.validate() else {
                panic!("accepted: {text}");
            };
            assert!(p.iter().any(|m| m.contains(needle)), "{text}: {p:?}");
        }
        // The edges are accepted.
        let edges = format!(
            "trust_domain = \"{}\"\n[token]\nlifetime_ms = 60000\nclock_skew_ms = 60000\n\
             [limits]\nmax_connections = {MAX_COUNT}\nmax_connections_per_identity = 1\n\
             max_sleep_ms = {MAX_MS}\n[dispatcher]\nreconnect_backoff_max_ms = 50\n",
            "t".repeat(crate::identity::MAX_TRUST_DOMAIN_LEN)
        );
        Config::parse(&edges).unwrap().validate().unwrap();
        // The longest identity of that trust domain still fits a token's claim.
        let id = SpiffeId::new(
            &"t".repeat(crate::identity::MAX_TRUST_DOMAIN_LEN),
            Role::Client,
            &"n".repeat(64),
        )
        .unwrap();
        assert_eq!(id.to_string().len(), 255);
    }

    #[test]
    fn a_job_output_cap_leaves_room_for_the_reply_around_it() {
        let job = |cap: usize| {
            Config::parse(&format!(
                "[[jobs]]\nname = \"j\"\nprogram = \"/bin/cat\"\nmax_output_bytes = {cap}\n"
            ))
            .unwrap()
            .validate()
        };
        let max = crate::frame::DEFAULT_MAX_FRAME;
        assert!(job(max - crate::frame::REPLY_OVERHEAD).is_ok());
        // Accepted before; its full output could never be sent.
        let Err(ConfigError::Invalid(p)) = job(max) else {
            panic!("a cap of the whole frame is refused");
        };
        assert!(p[0].contains("for the reply around it"), "{p:?}");
    }

    #[test]
    fn acl_defaults_and_grants() {
        let cfg = Config::parse(
            r#"
            [[jobs]]
            name = "report"
            program = "/bin/cat"
            [[jobs]]
            name = "open-job"
            program = "/bin/cat"
            [acl]
            report = ["spiffe://securesrv/client/alice"]
            open-job = ["*"]
            sleep = ["spiffe://securesrv/client/alice"]
            "#,
        )
        .unwrap();
        cfg.validate().unwrap();
        let alice: SpiffeId = "spiffe://securesrv/client/alice".parse().unwrap();
        let bob: SpiffeId = "spiffe://securesrv/client/bob".parse().unwrap();
        let watchdog = SpiffeId::watchdog("securesrv").unwrap();
        // A client of another trust domain is no client of ours, for `*` and the open
        // built-ins too: the worker re-checks the ACL for the identity a token names, and
        // let such an identity through where the dispatcher's handshake would not.
        let outsider: SpiffeId = "spiffe://other/client/bob".parse().unwrap();
        let table = [
            (&alice, "echo", true),
            (&bob, "echo", true),
            (&alice, "report", true),
            (&bob, "report", false),
            (&bob, "open-job", true),
            (&alice, "sleep", true),
            (&bob, "sleep", false),
            (&bob, "nosuch", false),
            (&watchdog, "echo", false),
            (&outsider, "echo", false),
            (&outsider, "open-job", false),
        ];
        for (who, op, allowed) in table {
            assert_eq!(cfg.acl_allows(who, op), allowed, "{who} {op}");
        }
        assert_eq!(cfg.op_info("report").map(|i| i.idempotent), Some(false));
        assert_eq!(cfg.op_info("echo").map(|i| i.idempotent), Some(true));
    }

    #[test]
    fn explicit_worker_list() {
        let cfg = Config::parse(
            r#"
            [[worker]]
            id = 7
            listen = "127.0.0.1:4000"
            [[worker]]
            id = 7
            listen = "127.0.0.1:4000"
            "#,
        )
        .unwrap();
        let Err(ConfigError::Invalid(p)) = cfg.validate() else {
            panic!("duplicates must be refused");
        };
        assert_eq!(p.len(), 2, "{p:?}");

        // As many as `workers` may be, and no more.
        let entry = |n: u32| {
            format!(
                "[[worker]]\nid = {n}\nlisten = \"127.0.0.1:{}\"\n",
                3000 + n
            )
        };
        let list = |count: u32| (1..=count).map(entry).collect::<String>();
        assert!(
            Config::parse(&list(MAX_WORKERS))
                .unwrap()
                .validate()
                .is_ok()
        );
        let Err(ConfigError::Invalid(p)) =
            Config::parse(&list(MAX_WORKERS + 1)).unwrap().validate()
        else {
            panic!("too many workers must be refused");
        };
        assert_eq!(p, ["257 [[worker]] entries: at most 256"]);
    }

    #[test]
    fn addresses_that_cannot_all_be_bound_on_one_host_are_found() {
        // A wildcard address takes its port on every address of its family: a component on
        // 127.0.0.1 of that port cannot listen (EADDRINUSE), and the watchdog ran into a crash
        // loop, then blamed "another securesrv watchdog, or a process left over" and exited 1.
        let two = |dispatcher: &str, worker: &str| {
            let cfg = Config::parse(&format!(
                "[dispatcher]\nlisten = \"{dispatcher}\"\n\
                 [[worker]]\nid = 1\nlisten = \"{worker}\"\n\
                 [[worker]]\nid = 2\nlisten = \"127.0.0.1:4002\"\n"
            ))
            .unwrap();
            // Valid for components on different hosts; the watchdog runs them on one.
            cfg.validate().unwrap();
            cfg.co_located_clashes()
        };
        for (d, w) in [
            ("0.0.0.0:4000", "127.0.0.1:4000"),
            ("127.0.0.1:4000", "0.0.0.0:4000"),
            ("[::]:4000", "[::1]:4000"),
            ("0.0.0.0:4002", "10.0.0.1:4000"),
        ] {
            let p = two(d, w);
            assert_eq!(p.len(), 1, "{d} {w}: {p:?}");
            assert!(p[0].contains("cannot both listen"), "{d} {w}: {p:?}");
        }
        // Other addresses on one port, or another family's, can.
        for (d, w) in [
            ("127.0.0.2:4000", "127.0.0.1:4000"),
            ("0.0.0.0:4000", "[::1]:4000"),
            ("0.0.0.0:4000", "127.0.0.1:4001"),
        ] {
            assert_eq!(two(d, w), Vec::<String>::new(), "{d} {w}");
        }
        // Ports derived from the dispatcher's never clash.
        let cfg = Config::parse("workers = 3\n[dispatcher]\nlisten = \"0.0.0.0:4000\"\n").unwrap();
        assert_eq!(cfg.co_located_clashes(), Vec::<String>::new());
    }

    #[test]
    fn an_ipv6_wildcard_or_a_v4_mapped_address_clashes_with_ipv4_on_a_dual_stack_host() {
        // Linux's default (`net.ipv6.bindv6only` 0): `[::]:P` takes P on every IPv4 address
        // too, and `[::ffff:a.b.c.d]:P` is `a.b.c.d:P`. Either beside an IPv4 listener of its
        // port made the second fail with EADDRINUSE, a crash loop the check did not foresee.
        let two = |dispatcher: &str, worker: &str, dual_stack: bool| {
            let cfg = Config::parse(&format!(
                "[dispatcher]\nlisten = \"{dispatcher}\"\n\
                 [[worker]]\nid = 1\nlisten = \"{worker}\"\n"
            ))
            .unwrap();
            cfg.validate().unwrap();
            cfg.co_located_clashes_on(dual_stack)
        };
        for (d, w) in [
            ("[::]:4000", "127.0.0.1:4000"),
            ("0.0.0.0:4000", "[::]:4000"),
            ("0.0.0.0:4000", "[::ffff:127.0.0.1]:4000"),
            ("127.0.0.1:4000", "[::ffff:127.0.0.1]:4000"),
        ] {
            for (a, b) in [(d, w), (w, d)] {
                let p = two(a, b, true);
                assert_eq!(p.len(), 1, "{a} {b}: {p:?}");
                assert!(p[0].contains("cannot both listen"), "{a} {b}: {p:?}");
            }
        }
        // Where an IPv6 wildcard holds IPv6 alone, it leaves IPv4 free.
        assert_eq!(
            two("[::]:4000", "127.0.0.1:4000", false),
            Vec::<String>::new()
        );
        // Other addresses, or other ports, still can.
        for (d, w) in [
            ("127.0.0.2:4000", "[::ffff:127.0.0.1]:4000"),
            ("[::1]:4000", "0.0.0.0:4000"),
            ("[::]:4000", "127.0.0.1:4001"),
        ] {
            assert_eq!(two(d, w, true), Vec::<String>::new(), "{d} {w}");
        }
    }
}
