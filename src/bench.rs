//! `securesrv bench`: a closed-loop load generator built on the library client.
//!
//! Each of `--connections` connections keeps `--in-flight` requests outstanding for
//! `--duration` seconds after a warm-up that is not measured. Latencies go into HDR histograms
//! (microseconds); the result is requests/s, p50/p90/p99/p99.9/max and errors by kind, as a table
//! or (`--json`) one JSON object. With `--new-connection-per-request` every request opens (and
//! closes) its own connection; the client's TLS session cache lets reconnects resume.
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
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

pub mod echo_backend;

/// Arguments of `securesrv bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Client certificate.
    #[arg(long, default_value = "certs/client.crt")]
    pub cert: PathBuf,
    /// Client private key.
    #[arg(long, default_value = "certs/client.key")]
    pub key: PathBuf,
    /// CA certificate (default: ca.crt beside --cert).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Dispatcher (or relay) address.
    #[arg(long, default_value = "127.0.0.1:2222")]
    pub connect: SocketAddr,
    /// Server identity to accept.
    #[arg(long, default_value = "spiffe://securesrv/dispatcher/main")]
    pub server_id: String,
    /// Concurrent connections.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Requests each connection keeps outstanding.
    #[arg(long, default_value_t = 1)]
    pub in_flight: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of warm-up before measuring.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Operation to call.
    #[arg(long, default_value = "echo")]
    pub op: String,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 64)]
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

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Bad certificate, key or identity.
    #[error("{0}")]
    Setup(String),
    /// Could not reach the server at all.
    #[error("{0}")]
    Connect(#[from] ClientError),
}

/// The measured result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Successful requests per second in the measured window.
    pub rps: f64,
    /// Median latency.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Slowest request.
    pub max_us: u64,
    /// Successful requests measured.
    pub requests: u64,
    /// Failed requests measured.
    pub errors: u64,
    /// Failed requests by kind (error code or `connection` / `timeout`).
    pub errors_by_kind: BTreeMap<String, u64>,
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

/// What one load task measured.
struct TaskResult {
    hist: Histogram<u64>,
    errors: BTreeMap<String, u64>,
}

fn error_kind(e: &ClientError) -> String {
    match e {
        ClientError::Remote { code, .. } => code.as_str().to_string(),
        ClientError::Connect { .. } | ClientError::ConnectionLost => "connection".into(),
        ClientError::Timeout(_) => "timeout".into(),
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
    if args.json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else {
        print_table(&report);
    }
    Ok(())
}

/// Runs the benchmark and returns the report.
pub async fn measure(args: &BenchArgs) -> Result<Report, BenchError> {
    let ca = args.ca.clone().unwrap_or_else(|| {
        args.cert
            .parent()
            .map_or_else(|| PathBuf::from("ca.crt"), |d| d.join("ca.crt"))
    });
    let material = TlsMaterial::load(&ca, &args.cert, &args.key)
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let server_id: SpiffeId = args
        .server_id
        .parse()
        .map_err(|e: crate::identity::IdentityError| BenchError::Setup(e.to_string()))?;
    let mut cfg = ClientConfig::new(&material, args.connect, server_id)
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    cfg.max_in_flight = args.in_flight.max(1);
    // Shared, not copied, by every call: the load generator should cost as little as it can.
    let payload = Bytes::from((0..args.size).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let opts = CallOptions {
        idempotent: true,
        timeout: Duration::from_secs(30),
    };
    // Fail fast if the server cannot be reached at all.
    let probe = Client::connect(cfg.clone()).await?;
    probe.call_bytes(&args.op, payload.clone(), opts).await?;
    probe.close().await;

    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup.max(0.0));
    let end = measure_from + Duration::from_secs_f64(args.duration.max(0.1));
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
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
            let (done, stop) = (done.clone(), stop.clone());
            tasks.spawn(async move {
                let mut r = TaskResult {
                    hist: new_hist(),
                    errors: BTreeMap::new(),
                };
                while !stop.load(Ordering::Relaxed) {
                    let t0 = Instant::now();
                    let result = match &shared {
                        Some(c) => c.call_bytes(&op, payload.clone(), opts).await,
                        None => match Client::connect(cfg.clone()).await {
                            Ok(c) => {
                                let r = c.call_bytes(&op, payload.clone(), opts).await;
                                c.close().await;
                                r
                            }
                            Err(e) => Err(e),
                        },
                    };
                    let t1 = Instant::now();
                    if t0 < measure_from || t1 > end {
                        continue;
                    }
                    match result {
                        Ok(_) => {
                            let us = (t1 - t0).as_micros().max(1) as u64;
                            let _ = r.hist.record(us.min(60_000_000));
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => *r.errors.entry(error_kind(&e)).or_default() += 1,
                    }
                }
                r
            });
        }
    }
    progress(start, measure_from, end, &done, args.json).await;
    stop.store(true, Ordering::Relaxed);
    let mut hist = new_hist();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(r) = r {
            let _ = hist.add(&r.hist);
            for (k, v) in r.errors {
                *errors.entry(k).or_default() += v;
            }
        }
    }
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
    loop {
        tick.tick().await;
        let now = Instant::now();
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
            eprint!(
                "\r[{}{}] {:>5.1}/{:.0} s {phase:<9} {:>9.0} req/s ",
                "=".repeat(filled),
                " ".repeat(30 - filled),
                (now - start).as_secs_f64(),
                total,
                rate
            );
        }
        if now >= end {
            break;
        }
    }
    if tty {
        eprintln!();
    }
}

fn print_table(r: &Report) {
    println!(
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
    println!("  requests/s   {:>12.0}", r.rps);
    println!("  requests     {:>12}", r.requests);
    println!("  latency p50  {:>9} us", r.p50_us);
    println!("  latency p90  {:>9} us", r.p90_us);
    println!("  latency p99  {:>9} us", r.p99_us);
    println!("  latency p99.9{:>9} us", r.p999_us);
    println!("  latency max  {:>9} us", r.max_us);
    println!("  errors       {:>12}", r.errors);
    for (k, v) in &r.errors_by_kind {
        println!("    {k:<12}{v:>10}");
    }
}
