//! Running one component as a process: runtime, configuration, binding, signals.

use securesrv::config::Config;
use securesrv::dispatcher::{self, Dispatcher};
use securesrv::identity::Role;
use securesrv::worker::{self, Worker};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info};

/// Raises the soft limit on open files to the hard limit, so that `limits.max_connections`
/// (not a conservative default of 1024 descriptors) is what bounds connections.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err() {
            tracing::debug!(soft, hard, "cannot raise the open-file limit");
        }
    }
}

/// Runs `fut` on a multi-threaded runtime with one worker thread per core. The runtime is
/// not waited for on the way out: a blocking read of stdin (the supervisor lifeline) would
/// otherwise hold the process open.
pub fn block_on(fut: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    let threads = std::env::var("SECURESRV_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    block_on_threads(threads, fut)
}

pub use securesrv::shutdown::THREAD_STACK;

/// Runs `fut` on a runtime with `threads` worker threads (the current-thread scheduler for one).
pub fn block_on_threads(
    threads: usize,
    fut: impl std::future::Future<Output = ExitCode>,
) -> ExitCode {
    raise_fd_limit();
    // One thread: the current-thread scheduler, which skips the work-stealing machinery.
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    // A stack size of our own for every runtime thread: left to std, it is taken from
    // RUST_MIN_STACK, and `RUST_MIN_STACK=16384` made the watchdog and the dispatcher abort
    // with a stack overflow at their first connection (a huge one: a panic at start).
    builder.thread_stack_size(THREAD_STACK);
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail("cannot start runtime", e),
    };
    let code = rt.block_on(fut);
    rt.shutdown_background();
    code
}

/// A failure caused by the configuration, certificates or keys: exit code 64, as for
/// `client` (`certs` exits 1 for its files; docs/OPERATIONS.md lists the codes).
fn fail_config(what: &str, e: impl std::fmt::Display) -> ExitCode {
    let _ = fail(what, e);
    ExitCode::from(crate::cli::EXIT_CONFIG)
}

/// Says why the command fails: as a log line, or where the log filter drops error lines, as a
/// plain line on stderr (never both: both go to stderr).
fn fail(what: &str, e: impl std::fmt::Display) -> ExitCode {
    if tracing::enabled!(tracing::Level::ERROR) {
        error!("{what}: {e}");
    } else {
        // One write, so that the lines of components failing together do not interleave.
        let line = format!("securesrv: {what}: {e}\n");
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    }
    ExitCode::FAILURE
}

fn grace(cfg: &Config) -> Duration {
    Duration::from_millis(cfg.watchdog.stop_grace_ms)
}

/// `securesrv dispatcher`
pub fn dispatcher(cfg: Config, supervised: bool) -> ExitCode {
    block_on(async move {
        let cfg = Arc::new(cfg);
        let (d, material) = match Dispatcher::load(cfg.clone()) {
            Ok(x) => x,
            Err(e) => return fail_config("dispatcher", e),
        };
        let acceptor = match material.acceptor(Role::Dispatcher, cfg.limits.handshake_timeout()) {
            Ok(a) => a,
            Err(e) => return fail_config("dispatcher", e),
        };
        let listener = match securesrv::server::bind(cfg.dispatcher.listen).await {
            Ok(l) => l,
            Err(e) => return fail("dispatcher", e),
        };
        let shutdown = CancellationToken::new();
        let supervisor = supervised.then(|| shutdown.clone());
        if let Err(e) = securesrv::shutdown::watch(shutdown.clone(), supervisor, grace(&cfg)) {
            return fail("cannot install signal handlers", e);
        }
        let links = CancellationToken::new();
        let tracker = TaskTracker::new();
        if let Err(e) = d.start_links(&material, &links, &tracker) {
            return fail_config("dispatcher", e);
        }
        let addr = listener.local_addr().map_or(cfg.dispatcher.listen, |a| a);
        info!(addr = %addr, workers = d.pool().slots().len(), "dispatcher listening");
        if supervised {
            securesrv::watchdog::child::announce_bound();
        }
        dispatcher::run(d, listener, acceptor, shutdown).await;
        // Worker links outlive the client connections so that draining requests finish.
        links.cancel();
        tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
        info!("dispatcher stopped");
        ExitCode::SUCCESS
    })
}

/// `securesrv worker --id N`
pub fn worker(cfg: Config, id: u32, listen: SocketAddr, supervised: bool) -> ExitCode {
    block_on(async move {
        let cfg = Arc::new(cfg);
        let ops = worker::ops::OpRegistry::from_config(&cfg);
        for problem in ops.unusable(&cfg) {
            tracing::warn!("{problem}");
        }
        // `worker::run` kills the jobs still running after its drain; an exit without the
        // drain (a second signal, or a drain too slow after the supervisor vanished) must not
        // leave them behind either.
        let jobs = ops.job_groups().clone();
        let (w, material) = match Worker::load(id, cfg.clone(), ops) {
            Ok(x) => x,
            Err(e) => return fail_config(&format!("worker {id}"), e),
        };
        let acceptor = match material.acceptor(Role::Worker, cfg.limits.handshake_timeout()) {
            Ok(a) => a,
            Err(e) => return fail_config(&format!("worker {id}"), e),
        };
        let listener = match securesrv::server::bind(listen).await {
            Ok(l) => l,
            Err(e) => return fail(&format!("worker {id}"), e),
        };
        let shutdown = CancellationToken::new();
        let kill_jobs = move || {
            jobs.kill_all();
        };
        // The supervisor gone, the dispatcher (its sibling) drains: it still forwards the
        // requests it has read, so the links it has stay served until it closes them.
        let accepting = shutdown.child_token();
        let supervisor = supervised.then(|| accepting.clone());
        if let Err(e) =
            securesrv::shutdown::watch_with(shutdown.clone(), supervisor, grace(&cfg), kill_jobs)
        {
            return fail("cannot install signal handlers", e);
        }
        let addr = listener.local_addr().map_or(listen, |a| a);
        info!(addr = %addr, identity = %w.identity(), "worker listening");
        if supervised {
            securesrv::watchdog::child::announce_bound();
        }
        worker::run_accepting(Arc::new(w), listener, acceptor, shutdown, accepting).await;
        info!("worker stopped");
        ExitCode::SUCCESS
    })
}

/// `securesrv watchdog`
pub fn watchdog(cfg: Config, config_file: Option<PathBuf>, log_filter: Option<String>) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return fail("cannot find own executable", e),
    };
    // Every component on this host: listen addresses that cannot all be bound here are a
    // configuration error, said before anything starts.
    let clashes = cfg.co_located_clashes();
    if !clashes.is_empty() {
        return fail_config("watchdog", clashes.join("; "));
    }
    if cfg.watchdog.stop_grace_ms == 0 {
        tracing::warn!(
            "watchdog.stop_grace_ms is 0: a component told to stop is killed at once, without \
             finishing its requests"
        );
    }
    block_on(async move {
        let shutdown = CancellationToken::new();
        // A second signal stops the components at once too, rather than leaving them to
        // drain after the watchdog has gone.
        if let Err(e) = securesrv::shutdown::watch_with(
            shutdown.clone(),
            None,
            grace(&cfg),
            securesrv::watchdog::child::stop_all_now,
        ) {
            return fail("cannot install signal handlers", e);
        }
        // Orphans of a component (jobs of a SIGKILLed worker) become ours, to be killed.
        if let Err(e) = securesrv::watchdog::orphans::become_subreaper() {
            tracing::warn!(error = %e, "cannot become a child subreaper; jobs of a killed worker may outlive it");
        }
        let spec = securesrv::watchdog::Spec {
            exe,
            config_file,
            // Without --log the children inherit SECURESRV_LOG from the environment.
            log_filter,
        };
        match securesrv::watchdog::run(Arc::new(cfg), spec, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e @ securesrv::watchdog::WatchdogError::DispatcherFailed { .. }) => {
                fail("watchdog", e)
            }
            Err(e) => fail_config("watchdog", e),
        }
    })
}

/// `securesrv bench`
pub fn bench(args: securesrv::bench::BenchArgs) -> ExitCode {
    block_on_threads(usize::from(args.threads), async move {
        match securesrv::bench::run(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e @ securesrv::bench::BenchError::Credentials(_)) => fail_config("bench", e),
            Err(e) => fail("bench", e),
        }
    })
}

/// `securesrv bench-echo`
pub fn bench_echo(cfg: Config, listen: SocketAddr, certs: PathBuf) -> ExitCode {
    block_on(async move {
        let id = match securesrv::identity::SpiffeId::dispatcher(&cfg.trust_domain) {
            Ok(id) => id,
            Err(e) => return fail_config("bench-echo", e),
        };
        let material = match securesrv::tls::TlsMaterial::load_from_dir(&certs, &id) {
            Ok(m) => m,
            Err(e) => return fail_config("bench-echo", e),
        };
        let listener = match securesrv::server::bind(listen).await {
            Ok(l) => l,
            Err(e) => return fail("bench-echo", e),
        };
        let shutdown = CancellationToken::new();
        if let Err(e) = securesrv::shutdown::watch(shutdown.clone(), None, grace(&cfg)) {
            return fail("cannot install signal handlers", e);
        }
        match securesrv::bench::echo_backend::run(&material, listener, &cfg.limits, shutdown).await
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail("bench-echo", e),
        }
    })
}
