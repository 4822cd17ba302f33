//! `securesrv bench`: a closed-loop load generator built on the library client.
//!
//! Each of `--connections` connections keeps `--in-flight` requests outstanding for
//! `--duration` seconds after a warm-up that is not measured. Latencies go into HDR histograms
//! (microseconds); the result is requests/s, p50/p90/p99/p99.9/max and errors by kind, as a table
//! or (`--json`) one JSON object. With `--new-connection-per-request` every request opens (and
//! closes) its own connection; the client's TLS session cache lets reconnects resume.
//!
//! What counts is every call that *started* inside the measured window, however long it takes:
//! a call may retry for up to its timeout, and a server that dies or stalls mid-run shows up as
//! errors, not as silence. A call still running [`UNFINISHED_GRACE`] after the window is given
//! up on and counted as an error of kind `unfinished`, so a run never waits long for a dead server.
//!
//! [`echo_backend`] is a plain mTLS echo server speaking the same protocol, used as the
//! backend of a reference relay (e.g. nginx's stream proxy) in `scripts/bench.sh`.

use crate::client::{CallOptions, Client, ClientConfig, ClientError};
use crate::identity::SpiffeId;
use crate::message::Bytes;
use crate::tls::TlsMaterial;
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tracing::debug;

pub mod echo_backend;
#[cfg(test)]
mod tests;

/// Timeout of each call (the client retries connection trouble until it passes).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long calls still running when the window ends may take to finish before they count as
/// `unfinished`. Short, so that a run against a dead server ends soon after its window; a call
/// whose own timeout is nearer ends by itself (as a `timeout` error) before this passes.
pub const UNFINISHED_GRACE: Duration = Duration::from_secs(1);

/// Error kind of a call given up on at the end of the run.
pub const UNFINISHED: &str = "unfinished";

/// Arguments of `securesrv bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Client certificate [default: client.crt in the config's `certs_dir`, certs].
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Client private key [default: client.key in the config's `certs_dir`, certs].
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// CA certificate (default: ca.crt beside --cert).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Dispatcher (or relay) address, IP:PORT or HOST:PORT [default: the config's dispatcher
    /// address, 127.0.0.1:2222].
    #[arg(long, value_parser = crate::client::check_addr)]
    pub connect: Option<String>,
    /// Server identity to accept [default: spiffe://<the config's trust domain>/dispatcher/main].
    #[arg(long)]
    pub server_id: Option<String>,
    /// The configuration (`--config`), for what the flags above leave out and for the frame
    /// limit; the built-in defaults without it.
    #[arg(skip)]
    pub config: Option<crate::config::Config>,
    /// Concurrent connections (at least 1).
    #[arg(long, default_value_t = 32, value_parser = at_least_one)]
    pub connections: usize,
    /// Requests each connection keeps outstanding (at least 1).
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub in_flight: usize,
    /// Measured seconds (more than 0, at most a day).
    #[arg(long, default_value_t = 10.0, value_parser = measured_seconds)]
    pub duration: f64,
    /// Seconds of warm-up before measuring (at most a day).
    #[arg(long, default_value_t = 2.0, value_parser = warmup_seconds)]
    pub warmup: f64,
    /// Operation to call.
    #[arg(long, default_value = "echo")]
    pub op: String,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 64, value_parser = payload_size)]
    pub size: usize,
    /// Open a new connection for every request.
    #[arg(long)]
    pub new_connection_per_request: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Runtime threads of the load generator. One thread drives tens of thousands of
    /// requests/s and leaves the other cores to the server under test; raise it when the load
    /// generator itself is the bottleneck (it shows as one core at 100 %).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: u16,
}

/// `--connections` and `--in-flight`: 0 is refused as `--threads 0` is (a usage error), not
/// run as 1 behind the operator's back.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) if n > MAX_BENCH_COUNT => Err(format!("must be at most {MAX_BENCH_COUNT}")),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("not a count: {e}")),
    }
}

/// Most `--connections`, and most `--in-flight`: each is a task (and a connection a socket),
/// and `--in-flight` sizes a semaphore, which panics beyond `Semaphore::MAX_PERMITS`.
const MAX_BENCH_COUNT: usize = 65_536;

/// Most calls the benchmark keeps going at once (`--connections` x `--in-flight`): each is a
/// task, all spawned at start.
const MAX_BENCH_CALLS: usize = 1 << 20;

/// `--size`: at most the largest frame any configuration allows (the payload is made before
/// anything else; `--size 1000000000000` grew the process until memory ran out).
fn payload_size(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n > crate::frame::MAX_FRAME_CEILING => Err(format!(
            "must be at most {} bytes (the largest frame)",
            crate::frame::MAX_FRAME_CEILING
        )),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("not a number of bytes: {e}")),
    }
}

/// Longest `--duration` or `--warmup`, in seconds: a day.
const MAX_SECONDS: f64 = 86_400.0;

/// `--duration`: a number of seconds above 0 and at most a day.
fn measured_seconds(s: &str) -> Result<f64, String> {
    match warmup_seconds(s)? {
        0.0 => Err("must be more than 0 seconds".into()),
        v => Ok(v),
    }
}

/// `--warmup`: a number of seconds from 0 to a day.
fn warmup_seconds(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=MAX_SECONDS).contains(&v) => Ok(v),
        Ok(_) => Err(format!("must be between 0 and {MAX_SECONDS} seconds")),
        Err(e) => Err(format!("not a number of seconds: {e}")),
    }
}

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A certificate or key that is missing, unreadable or unusable (exit 64, as the client's).
    #[error("{0}")]
    Credentials(String),
    /// A bad server identity or an address that does not resolve.
    #[error("{0}")]
    Setup(String),
    /// Could not reach the server at all.
    #[error("{0}")]
    Connect(#[from] ClientError),
    /// The report could not be written to stdout (a full disk, a reader gone): the run
    /// measured nothing anyone sees.
    #[error("cannot write the report to stdout: {0}")]
    Output(std::io::Error),
}

/// The measured result. A call is measured when it started inside the window, wherever it ends.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Successful measured requests per second of the window: `requests` over `duration_s`.
    /// In a closed loop the calls started in the window and the calls completed in it differ
    /// by at most the calls in flight, so this is the throughput the window saw.
    pub rps: f64,
    /// Median latency of successful requests.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Slowest successful request.
    pub max_us: u64,
    /// Successful requests measured.
    pub requests: u64,
    /// Failed requests measured, `unfinished` ones included.
    pub errors: u64,
    /// Failed requests by kind (error code, `connection`, `timeout`, or `unfinished`: still
    /// running [`UNFINISHED_GRACE`] after the window).
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Median time a failed request took to fail (an `unfinished` one: until it was given up
    /// on); 0 without errors.
    pub error_p50_us: u64,
    /// Slowest failed request, so that a stall shows even when nothing succeeded.
    pub error_max_us: u64,
    /// Connections used.
    pub connections: usize,
    /// Requests outstanding per connection.
    pub in_flight: usize,
    /// Payload size.
    pub size: usize,
    /// Operation.
    pub op: String,
    /// Measured seconds.
    pub duration_s: f64,
    /// Whether each request used its own connection.
    pub new_connection_per_request: bool,
    /// Runtime threads of the load generator.
    pub threads: u16,
}

/// The measured window and the end of the run.
#[derive(Debug, Clone, Copy)]
struct Window {
    /// Calls started from here on are measured...
    from: Instant,
    /// ...until here; no call starts after it.
    end: Instant,
    /// Calls still running now are given up on (and, if measured, count as `unfinished`).
    give_up: Instant,
}

impl Window {
    fn contains(&self, t: Instant) -> bool {
        self.from <= t && t < self.end
    }
}

/// How one call ended.
#[derive(Debug)]
enum Outcome {
    Ok,
    /// Failed, with its error kind.
    Failed(String),
    /// Still running when the run gave up on it.
    Unfinished,
}

/// What one load task measured.
struct TaskResult {
    /// Latencies of successful calls.
    hist: Histogram<u64>,
    /// Latencies of failed calls: how long a failure (or a stall) took.
    error_hist: Histogram<u64>,
    errors: BTreeMap<String, u64>,
}

impl TaskResult {
    fn new() -> TaskResult {
        TaskResult {
            hist: new_hist(),
            error_hist: new_hist(),
            errors: BTreeMap::new(),
        }
    }

    /// Counts a call that started at `t0` and ended (or was given up on) at `t1` if it started
    /// inside the window; returns whether it was a measured success.
    fn record(&mut self, window: &Window, t0: Instant, t1: Instant, outcome: Outcome) -> bool {
        if !window.contains(t0) {
            return false;
        }
        let us = ((t1 - t0).as_micros() as u64).clamp(1, 60_000_000);
        match outcome {
            Outcome::Ok => {
                let _ = self.hist.record(us);
                return true;
            }
            Outcome::Failed(kind) => *self.errors.entry(kind).or_default() += 1,
            Outcome::Unfinished => *self.errors.entry(UNFINISHED.into()).or_default() += 1,
        }
        let _ = self.error_hist.record(us);
        false
    }

    fn add(&mut self, other: TaskResult) {
        let _ = self.hist.add(&other.hist);
        let _ = self.error_hist.add(&other.error_hist);
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }
}

fn error_kind(e: &ClientError) -> String {
    match e {
        ClientError::Remote { code, .. } => code.as_str().to_string(),
        ClientError::Connect { .. } | ClientError::ConnectionLost | ClientError::NotSent => {
            "connection".into()
        }
        ClientError::RefusedByDispatcher { .. } | ClientError::DispatcherNotAccepted { .. } => {
            "tls_refused".into()
        }
        ClientError::Timeout(_) => "timeout".into(),
        ClientError::TooLarge { .. } => "too_large".into(),
        ClientError::Request(_) => "request".into(),
    }
}

fn new_hist() -> Histogram<u64> {
    // 1 us .. 60 s, 3 significant digits: constant, valid bounds.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant histogram bounds are valid")
}

/// Runs the benchmark and prints the report.
pub async fn run(args: BenchArgs) -> Result<(), BenchError> {
    let report = measure(&args).await?;
    let text = if args.json {
        serde_json::to_string(&report).unwrap_or_default() + "\n"
    } else {
        table(&report)
    };
    crate::stdio::out_bytes(text.as_bytes()).map_err(BenchError::Output)
}

/// Runs the benchmark and returns the report.
pub async fn measure(args: &BenchArgs) -> Result<Report, BenchError> {
    let setup = |e: &dyn std::fmt::Display| BenchError::Setup(e.to_string());
    if args.connections.saturating_mul(args.in_flight) > MAX_BENCH_CALLS {
        return Err(setup(&format!(
            "--connections x --in-flight must be at most {MAX_BENCH_CALLS}"
        )));
    }
    let defaults = args.config.clone().unwrap_or_default();
    let cert = (args.cert.clone()).unwrap_or_else(|| defaults.certs_dir.join("client.crt"));
    let key = (args.key.clone()).unwrap_or_else(|| defaults.certs_dir.join("client.key"));
    let ca = args
        .ca
        .clone()
        .unwrap_or_else(|| cert.with_file_name("ca.crt"));
    let material =
        TlsMaterial::load(&ca, &cert, &key).map_err(|e| BenchError::Credentials(e.to_string()))?;
    let server_id = match &args.server_id {
        Some(id) => id.parse::<SpiffeId>(),
        None => SpiffeId::dispatcher(&defaults.trust_domain),
    }
    .map_err(|e| setup(&e))?;
    let addr = match &args.connect {
        Some(a) => crate::client::resolve_addr(a).map_err(|e| setup(&e))?,
        None => defaults.dispatcher.listen,
    };
    let mut cfg = ClientConfig::new(&material, addr, server_id)
        .map_err(|e| BenchError::Credentials(e.to_string()))?;
    cfg.io.max_frame = defaults.limits.max_frame_bytes;
    cfg.max_in_flight = args.in_flight.max(1);
    // Shared, not copied, by every call: the load generator should cost as little as it can.
    let payload = Bytes::from((0..args.size).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let opts = CallOptions {
        idempotent: true,
        timeout: CALL_TIMEOUT,
    };
    // Fail fast if the server cannot be reached at all.
    let probe = Client::connect(cfg.clone()).await?;
    probe.call_bytes(&args.op, payload.clone(), opts).await?;
    probe.close().await;

    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup.max(0.0));
    let end = measure_from + Duration::from_secs_f64(args.duration.max(0.1));
    let window = Window {
        from: measure_from,
        end,
        give_up: end + UNFINISHED_GRACE.min(opts.timeout),
    };
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.connections.max(1) {
        let shared = if args.new_connection_per_request {
            None
        } else {
            Some(Client::connect(cfg.clone()).await?)
        };
        for _ in 0..args.in_flight.max(1) {
            let (cfg, shared, payload, op) = (
                cfg.clone(),
                shared.clone(),
                payload.clone(),
                args.op.clone(),
            );
            let done = done.clone();
            tasks.spawn(async move {
                let mut r = TaskResult::new();
                loop {
                    let t0 = Instant::now();
                    if t0 >= window.end {
                        break;
                    }
                    let call = async {
                        match &shared {
                            Some(c) => c.call_bytes(&op, payload.clone(), opts).await,
                            None => {
                                // Connects within the call, retrying like a persistent
                                // client: a server that is down is waited for, not counted
                                // as thousands of refused connections a second.
                                let c = Client::new(cfg.clone());
                                let r = c.call_bytes(&op, payload.clone(), opts).await;
                                c.close().await;
                                r
                            }
                        }
                    };
                    // Bounded, so that the run ends soon after its window even when the
                    // server is gone and the client keeps re-dialling.
                    let outcome = match tokio::time::timeout_at(window.give_up, call).await {
                        Ok(Ok(_)) => Outcome::Ok,
                        Ok(Err(e)) => Outcome::Failed(error_kind(&e)),
                        Err(_) => Outcome::Unfinished,
                    };
                    if r.record(&window, t0, Instant::now(), outcome) {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
                r
            });
        }
    }
    progress(start, measure_from, end, &done, args.json).await;
    // Every task ends by `window.give_up`: no call starts after `end`, none runs past it.
    let mut total = TaskResult::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(r) = r {
            total.add(r);
        }
    }
    let TaskResult {
        hist,
        error_hist,
        errors,
    } = total;
    let secs = (end - measure_from).as_secs_f64();
    Ok(Report {
        rps: hist.len() as f64 / secs,
        p50_us: hist.value_at_quantile(0.50),
        p90_us: hist.value_at_quantile(0.90),
        p99_us: hist.value_at_quantile(0.99),
        p999_us: hist.value_at_quantile(0.999),
        max_us: hist.max(),
        requests: hist.len(),
        errors: errors.values().sum(),
        errors_by_kind: errors,
        error_p50_us: error_hist.value_at_quantile(0.50),
        error_max_us: error_hist.max(),
        connections: args.connections.max(1),
        in_flight: args.in_flight.max(1),
        size: args.size,
        op: args.op.clone(),
        duration_s: secs,
        new_connection_per_request: args.new_connection_per_request,
        threads: args.threads,
    })
}

/// Waits until `end`, drawing a progress bar on a terminal.
async fn progress(
    start: Instant,
    measure_from: Instant,
    end: Instant,
    done: &AtomicU64,
    quiet: bool,
) {
    let tty = !quiet && std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut last = (Instant::now(), 0u64);
    let mut measuring = false;
    loop {
        tick.tick().await;
        let now = Instant::now();
        if !measuring && now >= measure_from {
            measuring = true;
            debug!(
                seconds = (end - measure_from).as_secs_f64(),
                "measured window started"
            );
        }
        if tty {
            let total = (end - start).as_secs_f64();
            let frac = ((now - start).as_secs_f64() / total).min(1.0);
            let filled = (frac * 30.0) as usize;
            let n = done.load(Ordering::Relaxed);
            let rate = (n - last.1) as f64 / (now - last.0).as_secs_f64().max(1e-3);
            last = (now, n);
            let phase = if now < measure_from {
                "warm-up"
            } else {
                "measuring"
            };
            crate::stdio::err_text(&format!(
                "\r[{}{}] {:>5.1}/{:.0} s {phase:<9} {:>9.0} req/s ",
                "=".repeat(filled),
                " ".repeat(30 - filled),
                (now - start).as_secs_f64(),
                total,
                rate
            ));
        }
        if now >= end {
            break;
        }
    }
    if tty {
        crate::stdio::err_text("\n");
    }
}

/// The report as a table, errors and how long they took included.
fn table(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "{} x {} in flight, op {} with {} B payload{}, {:.1} s measured, {} load thread(s)",
        r.connections,
        r.in_flight,
        r.op,
        r.size,
        if r.new_connection_per_request {
            ", new connection per request"
        } else {
            ""
        },
        r.duration_s,
        r.threads
    );
    let _ = writeln!(out, "  requests/s   {:>12.0}", r.rps);
    let _ = writeln!(out, "  requests     {:>12}", r.requests);
    let _ = writeln!(out, "  latency p50  {:>9} us", r.p50_us);
    let _ = writeln!(out, "  latency p90  {:>9} us", r.p90_us);
    let _ = writeln!(out, "  latency p99  {:>9} us", r.p99_us);
    let _ = writeln!(out, "  latency p99.9{:>9} us", r.p999_us);
    let _ = writeln!(out, "  latency max  {:>9} us", r.max_us);
    let _ = writeln!(out, "  errors       {:>12}", r.errors);
    for (k, v) in &r.errors_by_kind {
        let _ = writeln!(out, "    {k:<12}{v:>10}");
    }
    if r.errors > 0 {
        let _ = writeln!(out, "  error p50    {:>9} us", r.error_p50_us);
        let _ = writeln!(out, "  error max    {:>9} us", r.error_max_us);
    }
    out
}
