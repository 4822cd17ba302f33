//! The watchdog: starts the dispatcher and the workers as child processes of its own binary,
//! probes each with an authenticated heartbeat, and restarts whichever exits or stops
//! answering.
//!
//! Restarts back off exponentially (reset after a stable period) and are limited in intensity,
//! as systemd's `StartLimitBurst` and OTP's restart intensity are: more than
//! `restart_limit_burst` restarts within `restart_limit_window_ms` marks a component failed.
//! A failed worker stays down (the dispatcher routes around it); a failed dispatcher makes the
//! watchdog stop everything and exit non-zero, so that an outer supervisor can take over.
//! On SIGINT/SIGTERM the dispatcher is stopped first (so in-flight requests drain through the
//! workers), then the workers; no child outlives the watchdog.

pub mod child;
pub mod orphans;
pub mod probe;

use crate::config::Config;
use crate::identity::{IdentityError, SpiffeId};
use crate::tls::{TlsConfigError, TlsMaterial};
use child::Running;
use probe::{Heard, Prober};
use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// How often exits and backoff timers are checked.
const POLL: Duration = Duration::from_millis(50);
/// Grace between SIGTERM and SIGKILL for a dispatcher that stopped answering (its successor
/// needs its port), and for a component that overran its stop or never came up.
const HUNG_GRACE: Duration = Duration::from_secs(1);
/// A gap this long between two polls means the watchdog itself did not run (SIGSTOP, a
/// paused VM, starved of CPU): its heartbeats and restarts were late by as much, and the
/// recovery times it logs next undercount. Said, since nothing else would show it.
const STALL: Duration = Duration::from_secs(2);
/// How often a subreaper watchdog looks for processes its components left behind, besides
/// after each component exit.
const SWEEP: Duration = Duration::from_secs(5);

/// How to start the children.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The securesrv binary to re-execute.
    pub exe: PathBuf,
    /// The configuration file to pass on, if any.
    pub config_file: Option<PathBuf>,
    /// The log filter to pass on, if any.
    pub log_filter: Option<String>,
}

/// Why the watchdog gave up.
#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    /// Its own certificate could not be loaded.
    #[error("{0}")]
    Tls(#[from] TlsConfigError),
    /// A configured identity is invalid.
    #[error("{0}")]
    Identity(#[from] IdentityError),
    /// The dispatcher kept failing.
    #[error(
        "dispatcher failed again after {burst} restarts within {window_ms} ms (last: {last}); giving up so that an outer supervisor can take over"
    )]
    DispatcherFailed {
        /// The configured burst.
        burst: u32,
        /// The configured window.
        window_ms: u64,
        /// Why it went down the last time.
        last: String,
    },
    /// The dispatcher refused its configuration, certificate or key (exit 64).
    #[error(
        "the dispatcher refuses its configuration, certificate or key (exit 64; its reason is \
         logged above): restarting it cannot help until that is fixed"
    )]
    DispatcherMisconfigured,
}

/// One supervised component.
struct Component {
    name: String,
    addr: SocketAddr,
    args: Vec<OsString>,
    is_dispatcher: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Started; waiting for its first heartbeat.
    Starting { since: Instant },
    /// Answering heartbeats.
    Up { since: Instant },
    /// Being stopped (SIGTERM/SIGKILL in progress); it had been up for `up_for` until it
    /// stopped answering, if it was up (a long-stable component gets its backoff reset).
    Stopping { up_for: Option<Duration> },
    /// Stopping by itself (told to by someone else, e.g. an operator's SIGTERM), since
    /// `since`: not probed, and left to finish its requests and exit, for at most
    /// `stop_grace_ms`. A SIGTERM of ours meanwhile would be its second signal, on which a
    /// component exits at once.
    Draining {
        since: Instant,
        /// When it came up, if it was up (a long-stable component gets its backoff reset).
        up_since: Option<Instant>,
    },
    /// Waiting out the restart backoff.
    Waiting { until: Instant },
    /// Restarted too often (at `since`); left down until `retry_at` (a worker; a failed
    /// dispatcher ends the watchdog).
    Failed { since: Instant, retry_at: Instant },
}

impl Phase {
    /// Whether the component, now down, had been up for `stable_after_ms`: then its restart
    /// backoff starts again from the first delay.
    fn was_stable(&self, now: Instant, stable_after_ms: u64) -> bool {
        let up_for = match *self {
            Phase::Up { since }
            | Phase::Draining {
                up_since: Some(since),
                ..
            } => Some(now.saturating_duration_since(since)),
            Phase::Stopping { up_for } => up_for,
            _ => None,
        };
        up_for.is_some_and(|d| d >= Duration::from_millis(stable_after_ms))
    }
}

struct Slot {
    comp: Component,
    running: Option<Running>,
    phase: Phase,
    /// `None` while a heartbeat is in flight.
    prober: Option<Box<Prober>>,
    /// A heartbeat interval ended while the previous heartbeat was still in flight: the next
    /// one starts as soon as that one ends. Otherwise a component that never answers would be
    /// probed every second interval (its heartbeat takes the whole timeout, and the timeout
    /// is by default the interval), and be found hung after twice the time configured.
    beat_due: bool,
    /// Bumped at every start, so late heartbeat results of a previous process are ignored.
    generation: u64,
    misses: u32,
    restarts: VecDeque<Instant>,
    total_restarts: u32,
    backoff: Duration,
    /// When the last stop began, to log the time to recovery.
    down_since: Option<Instant>,
    /// Why it last went down, once it is marked failed.
    failed_because: String,
    /// Why the latest heartbeat of this start failed while it was starting: said when it
    /// never comes up (a refused certificate, say), which "no heartbeat answered" alone hides.
    start_error: Option<String>,
    /// Whether it has answered a heartbeat since the watchdog started: a component that came
    /// up once and then exits 64 may have met a passing state (a certificate and key pair
    /// replaced one file after the other, a configuration being edited), so it is restarted as
    /// after any failure, not given up on at once.
    ever_up: bool,
}

enum Event {
    Beat {
        idx: usize,
        generation: u64,
        prober: Box<Prober>,
        result: Result<Heard, String>,
    },
    Stopped {
        idx: usize,
        pid: u32,
        status: std::io::Result<ExitStatus>,
        reason: String,
    },
}

/// The supervisor's state.
struct Supervisor {
    cfg: Arc<Config>,
    exe: PathBuf,
    slots: Vec<Slot>,
    events: mpsc::UnboundedSender<Event>,
    announced: bool,
    /// Workers the dispatcher could use at its latest heartbeat: `ready` waits until it has
    /// a link to every worker that is up.
    dispatcher_sees: u32,
    /// Components being stopped in the background (live, though in no slot).
    stopping: HashSet<u32>,
    /// Stops running in the background, awaited on the way out.
    stop_tasks: tokio::task::JoinSet<()>,
    /// PIDs (and so session IDs) of the latest components that exited: their sessions'
    /// orphans are killed.
    dead: VecDeque<u32>,
    /// Whether this process adopts its components' orphans and so must kill and reap them.
    subreaper: bool,
    /// Children it had before it started any component (see [`orphans::sweep_all`]).
    inherited: HashSet<(u32, u64)>,
    /// Runtime threads per child: the cores shared out among the co-located components, so
    /// that they do not oversubscribe the machine.
    threads: usize,
}

fn component_args(cfg: &Config, spec: &Spec) -> Vec<(String, SocketAddr, Vec<OsString>, bool)> {
    let mut common: Vec<OsString> = vec!["--certs".into(), cfg.certs_dir.clone().into()];
    if let Some(f) = &spec.config_file {
        common.push("--config".into());
        common.push(f.clone().into());
    }
    if let Some(l) = &spec.log_filter {
        common.push("--log".into());
        common.push(l.into());
    }
    let mut out = Vec::new();
    let mut d: Vec<OsString> = vec![
        "dispatcher".into(),
        "--listen".into(),
        cfg.dispatcher.listen.to_string().into(),
    ];
    if cfg.worker.is_empty() {
        d.push("--workers".into());
        d.push(cfg.workers.to_string().into());
    }
    d.extend(common.iter().cloned());
    out.push(("dispatcher".to_string(), cfg.dispatcher.listen, d, true));
    for (id, addr) in cfg.worker_addresses() {
        // The layout the watchdog runs, as the dispatcher gets it: a worker checks the same
        // configuration, not the file's values that the watchdog's flags replaced.
        let mut w: Vec<OsString> = vec![
            "worker".into(),
            "--id".into(),
            id.to_string().into(),
            "--listen".into(),
            addr.to_string().into(),
            "--dispatcher-listen".into(),
            cfg.dispatcher.listen.to_string().into(),
        ];
        if cfg.worker.is_empty() {
            w.push("--workers".into());
            w.push(cfg.workers.to_string().into());
        }
        w.extend(common.iter().cloned());
        out.push((format!("worker-{id}"), addr, w, false));
    }
    out
}

/// Runs the watchdog until `shutdown` (Ok) or until the dispatcher cannot be kept up (Err).
pub async fn run(
    cfg: Arc<Config>,
    spec: Spec,
    shutdown: CancellationToken,
) -> Result<(), WatchdogError> {
    let me = SpiffeId::watchdog(&cfg.trust_domain)?;
    let material = TlsMaterial::load_from_dir(&cfg.certs_dir, &me)?;
    let io = crate::connection::IoLimits {
        idle_timeout: Duration::from_secs(24 * 3600),
        ..cfg.limits.io()
    };
    let hs = Duration::from_millis(cfg.watchdog.heartbeat_timeout_ms)
        .min(cfg.limits.handshake_timeout());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut slots = Vec::new();
    for (name, addr, args, is_dispatcher) in component_args(&cfg, &spec) {
        let identity = if is_dispatcher {
            SpiffeId::dispatcher(&cfg.trust_domain)?
        } else {
            let id: u32 = name.trim_start_matches("worker-").parse().unwrap_or(0);
            SpiffeId::worker(&cfg.trust_domain, id)?
        };
        let prober = Prober::new(material.connector(&identity, hs)?, addr, io);
        slots.push(Slot {
            comp: Component {
                name,
                addr,
                args,
                is_dispatcher,
            },
            running: None,
            phase: Phase::Waiting {
                until: Instant::now(),
            },
            prober: Some(Box::new(prober)),
            beat_due: false,
            generation: 0,
            misses: 0,
            restarts: VecDeque::new(),
            total_restarts: 0,
            backoff: Duration::from_millis(cfg.watchdog.restart_backoff_initial_ms),
            down_since: None,
            failed_because: String::new(),
            start_error: None,
            ever_up: false,
        });
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / slots.len().max(1)).max(1);
    let mut sup = Supervisor {
        cfg: cfg.clone(),
        exe: spec.exe,
        slots,
        events: tx,
        announced: false,
        dispatcher_sees: 0,
        stopping: HashSet::new(),
        stop_tasks: tokio::task::JoinSet::new(),
        dead: VecDeque::new(),
        subreaper: orphans::is_subreaper(),
        inherited: orphans::children_now(),
        threads,
    };
    info!(components = sup.slots.len(), "watchdog starting components");
    // From before the components start: a stall of the watchdog right after it started them,
    // before its first poll, is a stall too (their start deadlines run from their spawn).
    let mut polled = Instant::now();
    for i in 0..sup.slots.len() {
        sup.start(i);
    }
    let mut poll = tokio::time::interval(POLL);
    // After a stall of its own, one poll, not one for every 50 ms missed (tokio's default
    // catches up in a burst); the stall is measured from the clock, not from the ticks.
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut beat = tokio::time::interval(Duration::from_millis(cfg.watchdog.heartbeat_interval_ms));
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweep = tokio::time::interval(SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            Some(ev) = rx.recv() => sup.on_event(ev),
            _ = poll.tick() => {
                let now = Instant::now();
                let gap = now.saturating_duration_since(polled);
                polled = now;
                if gap >= STALL {
                    warn!(
                        stalled_ms = gap.as_millis() as u64,
                        "the watchdog itself did not run (stopped, a paused VM, or no CPU \
                         for it): heartbeats and restarts were late by as much, and recovery \
                         times logged next count only from now"
                    );
                    sup.stalled(gap);
                }
                if let Some(err) = sup.poll() {
                    break Err(err);
                }
            }
            _ = beat.tick() => sup.heartbeats(),
            _ = sweep.tick() => {
                sup.sweep_orphans();
            }
        }
    };
    sup.stop_all().await;
    result
}

impl Supervisor {
    /// The watchdog itself did not run for `gap`: the deadlines it keeps for components
    /// (a start's first heartbeat, a drain) move on by as much. Otherwise every component
    /// that was starting, never probed meanwhile, was stopped as "no heartbeat answered"
    /// as soon as the watchdog ran again, and restarted, counted as a failure.
    fn stalled(&mut self, gap: Duration) {
        for slot in &mut self.slots {
            match &mut slot.phase {
                Phase::Starting { since } | Phase::Draining { since, .. } => *since += gap,
                _ => {}
            }
        }
    }

    fn start(&mut self, idx: usize) {
        let slot = &mut self.slots[idx];
        slot.generation += 1;
        slot.misses = 0;
        slot.beat_due = false;
        slot.start_error = None;
        if let Some(p) = slot.prober.as_mut() {
            p.reset();
        }
        match child::spawn(&self.exe, &slot.comp.args, self.threads) {
            Ok(r) => {
                info!(component = %slot.comp.name, pid = r.pid, addr = %slot.comp.addr, restarts = slot.total_restarts, "component started");
                slot.running = Some(r);
                slot.phase = Phase::Starting {
                    since: Instant::now(),
                };
            }
            Err(e) => {
                // Said with the path: "No such file or directory" alone does not tell an
                // operator that the file gone is the watchdog's own executable (removed or
                // replaced by an upgrade while it runs).
                let exe = self.exe.display();
                error!(component = %slot.comp.name, exe = %exe, error = %e, "cannot start component");
                self.schedule_restart(idx, format!("spawn failed: {exe}: {e}"));
            }
        }
    }

    /// Child exits, backoff expiry, start deadlines. Returns an error when the dispatcher is
    /// beyond saving.
    fn poll(&mut self) -> Option<WatchdogError> {
        let now = Instant::now();
        for idx in 0..self.slots.len() {
            let slot = &mut self.slots[idx];
            if let Some(r) = slot.running.as_mut() {
                if let Ok(Some(status)) = r.child.try_wait() {
                    let pid = r.pid;
                    slot.running = None;
                    slot.down_since.get_or_insert(now);
                    // Expected when someone asked it to stop (a clean exit after a signal) or
                    // the watchdog stopped it (which it said at WARN already).
                    if child::asked_to_stop(&status) || matches!(slot.phase, Phase::Stopping { .. })
                    {
                        info!(component = %slot.comp.name, pid, status = %child::describe(&status), "component exited");
                    } else {
                        warn!(component = %slot.comp.name, pid, status = %child::describe(&status), "component exited");
                    }
                    let misconfigured = status.code() == Some(child::EXIT_CONFIG) && !slot.ever_up;
                    if child::asked_to_stop(&status) {
                        self.restart_after_clean_stop(idx);
                    } else if misconfigured && !self.slots[idx].comp.is_dispatcher {
                        self.fail_misconfigured(idx);
                    } else if !misconfigured {
                        self.schedule_restart(idx, child::describe(&status));
                    }
                    self.exited(pid);
                    let _ = self.sweep_orphans();
                    if misconfigured && self.slots[idx].comp.is_dispatcher {
                        return Some(WatchdogError::DispatcherMisconfigured);
                    }
                    continue;
                }
            }
            match self.slots[idx].phase {
                Phase::Waiting { until } if now >= until => self.start(idx),
                Phase::Failed { retry_at, .. }
                    if now >= retry_at && !self.slots[idx].comp.is_dispatcher =>
                {
                    let slot = &mut self.slots[idx];
                    info!(component = %slot.comp.name, "trying a failed component again after its restart window");
                    slot.restarts.clear();
                    slot.backoff =
                        Duration::from_millis(self.cfg.watchdog.restart_backoff_initial_ms);
                    self.start(idx);
                }
                Phase::Draining { since, .. }
                    if now.duration_since(since)
                        > Duration::from_millis(self.cfg.watchdog.stop_grace_ms) =>
                {
                    let ms = self.cfg.watchdog.stop_grace_ms;
                    self.stop(
                        idx,
                        format!("still running {ms} ms after it began stopping by itself"),
                        HUNG_GRACE,
                    );
                }
                Phase::Starting { since }
                    if now.duration_since(since)
                        > Duration::from_millis(self.cfg.watchdog.start_timeout_ms) =>
                {
                    let ms = self.cfg.watchdog.start_timeout_ms;
                    let slot = &self.slots[idx];
                    let why = match &slot.start_error {
                        Some(e) => format!(" (last: {e})"),
                        None if !slot.running.as_ref().is_some_and(Running::is_bound) => {
                            " (it never said it had bound its port)".to_string()
                        }
                        None => String::new(),
                    };
                    self.stop(
                        idx,
                        format!("no heartbeat answered within {ms} ms of start{why}"),
                        HUNG_GRACE,
                    );
                }
                // A starting component is probed on every poll once it has bound its port, so
                // that it counts as up (and the time to recovery is measured) as soon as it
                // answers.
                Phase::Starting { .. }
                    if self.slots[idx]
                        .running
                        .as_ref()
                        .is_some_and(Running::is_bound) =>
                {
                    self.beat(idx)
                }
                Phase::Failed { .. } if self.slots[idx].comp.is_dispatcher => {
                    let slot = &self.slots[idx];
                    let mut last = slot.failed_because.clone();
                    // The commonest cause, which the exit status does not say: something
                    // else (a second watchdog, a process left over) holds the address.
                    if let Err(e) = std::net::TcpListener::bind(slot.comp.addr)
                        && e.kind() == std::io::ErrorKind::AddrInUse
                    {
                        last = format!(
                            "{last}; something else listens on {} (another securesrv \
                             watchdog, or a process left over?)",
                            slot.comp.addr
                        );
                    }
                    return Some(WatchdogError::DispatcherFailed {
                        burst: self.cfg.watchdog.restart_limit_burst,
                        window_ms: self.cfg.watchdog.restart_limit_window_ms,
                        last,
                    });
                }
                _ => {}
            }
        }
        None
    }

    /// Starts one heartbeat per live component, each in its own task; for a component whose
    /// previous heartbeat is still in flight, as soon as that one ends.
    fn heartbeats(&mut self) {
        for idx in 0..self.slots.len() {
            let slot = &mut self.slots[idx];
            if matches!(slot.phase, Phase::Up { .. }) {
                if slot.prober.is_some() {
                    self.beat(idx);
                } else {
                    slot.beat_due = true;
                }
            }
        }
    }

    /// Starts a heartbeat of component `idx` unless one is already running.
    fn beat(&mut self, idx: usize) {
        let deadline = Duration::from_millis(self.cfg.watchdog.heartbeat_timeout_ms);
        let slot = &mut self.slots[idx];
        let Some(mut prober) = slot.prober.take() else {
            return; // previous beat still running; it has its own deadline
        };
        let tx = self.events.clone();
        let generation = slot.generation;
        tokio::spawn(async move {
            let result = prober.beat(deadline).await;
            let _ = tx.send(Event::Beat {
                idx,
                generation,
                prober,
                result,
            });
        });
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Beat {
                idx,
                generation,
                mut prober,
                result,
            } => {
                let slot = &mut self.slots[idx];
                if generation != slot.generation {
                    prober.reset();
                    slot.prober = Some(prober);
                    return;
                }
                slot.prober = Some(prober);
                if let (Ok(Heard::Beat(beat)), true) = (&result, slot.comp.is_dispatcher) {
                    self.dispatcher_sees = beat.workers_available.unwrap_or(0);
                }
                let slot = &mut self.slots[idx];
                match (result, slot.phase) {
                    (Ok(Heard::Stopping), Phase::Starting { .. } | Phase::Up { .. }) => {
                        let up_since = match slot.phase {
                            Phase::Up { since } => Some(since),
                            _ => None,
                        };
                        slot.phase = Phase::Draining {
                            since: Instant::now(),
                            up_since,
                        };
                        slot.misses = 0;
                        slot.down_since.get_or_insert(Instant::now());
                        // Someone asked it to stop (the documented way to restart one
                        // component): not a warning. A stop that overruns its grace is one.
                        info!(
                            component = %slot.comp.name,
                            pid = slot.running.as_ref().map(|r| r.pid),
                            grace_ms = self.cfg.watchdog.stop_grace_ms,
                            "component is stopping by itself; letting it finish its requests and exit, then starting it again"
                        );
                    }
                    (Ok(Heard::Beat(beat)), Phase::Starting { since }) => {
                        slot.phase = Phase::Up {
                            since: Instant::now(),
                        };
                        slot.ever_up = true;
                        slot.misses = 0;
                        let recovered = slot.down_since.take().map(|t| t.elapsed().as_millis());
                        info!(
                            component = %slot.comp.name,
                            pid = slot.running.as_ref().map(|r| r.pid),
                            startup_ms = since.elapsed().as_millis() as u64,
                            recovered_after_ms = recovered.map(|m| m as u64),
                            workers_available = beat.workers_available,
                            "component up"
                        );
                        self.maybe_announce();
                    }
                    (Ok(Heard::Beat(_)), Phase::Up { .. }) => {
                        if slot.misses > 0 {
                            info!(component = %slot.comp.name, after_misses = slot.misses, "heartbeat answered again");
                            slot.down_since = None;
                        }
                        slot.misses = 0;
                        if slot.comp.is_dispatcher {
                            self.maybe_announce();
                        }
                    }
                    (Err(e), Phase::Up { .. }) => {
                        slot.misses += 1;
                        // Down (for the recovery time) from the first missed heartbeat.
                        if slot.misses == 1 {
                            slot.down_since.get_or_insert(Instant::now());
                        }
                        warn!(component = %slot.comp.name, misses = slot.misses, max = self.cfg.watchdog.max_missed, reason = e.as_str(), "heartbeat failed");
                        if slot.misses >= self.cfg.watchdog.max_missed {
                            let reason =
                                format!("{} heartbeats failed in a row (last: {e})", slot.misses);
                            // A worker that was only frozen (a paused process, a stalled
                            // machine) is continued with its SIGTERM and may still finish its
                            // requests, while the other workers serve: it gets the whole
                            // grace. The dispatcher's successor needs its port at once.
                            let grace = if slot.comp.is_dispatcher {
                                HUNG_GRACE
                            } else {
                                Duration::from_millis(self.cfg.watchdog.stop_grace_ms)
                            };
                            self.stop(idx, reason, grace);
                        }
                    }
                    (Err(e), Phase::Starting { .. }) if e.contains("identity refused") => {
                        // Something answers on the component's port with another identity.
                        warn!(component = %slot.comp.name, addr = %slot.comp.addr, reason = e.as_str(), "wrong identity on the component's port");
                        slot.start_error = Some(e);
                    }
                    (Err(e), Phase::Starting { .. }) => {
                        debug!(component = %slot.comp.name, reason = e.as_str(), "not answering yet");
                        slot.start_error = Some(e);
                    }
                    _ => {}
                }
                let slot = &mut self.slots[idx];
                if std::mem::take(&mut slot.beat_due) && matches!(slot.phase, Phase::Up { .. }) {
                    self.beat(idx);
                }
            }
            Event::Stopped {
                idx,
                pid,
                status,
                reason,
            } => {
                self.stopping.remove(&pid);
                self.exited(pid);
                let _ = self.sweep_orphans();
                let slot = &mut self.slots[idx];
                let how = match &status {
                    Ok(s) => child::describe(s),
                    Err(e) => format!("wait failed: {e}"),
                };
                warn!(component = %slot.comp.name, reason = reason.as_str(), status = %how, "component stopped");
                self.schedule_restart(idx, reason);
            }
        }
    }

    /// Stops a live component in the background, with SIGKILL `grace` after SIGTERM; a
    /// `Stopped` event follows.
    fn stop(&mut self, idx: usize, reason: String, grace: Duration) {
        let slot = &mut self.slots[idx];
        let Some(r) = slot.running.take() else {
            self.schedule_restart(idx, reason);
            return;
        };
        warn!(component = %slot.comp.name, pid = r.pid, reason = reason.as_str(), "stopping component");
        let now = Instant::now();
        // Up until its first missed heartbeat (a hang is not a crash soon after a start).
        let up_for = match slot.phase {
            Phase::Up { since }
            | Phase::Draining {
                up_since: Some(since),
                ..
            } => Some(
                slot.down_since
                    .unwrap_or(now)
                    .saturating_duration_since(since),
            ),
            _ => None,
        };
        slot.phase = Phase::Stopping { up_for };
        slot.down_since.get_or_insert(now);
        let pid = r.pid;
        self.stopping.insert(pid);
        let tx = self.events.clone();
        // Finished stops are only collected here; their outcome comes as an event.
        while self.stop_tasks.try_join_next().is_some() {}
        self.stop_tasks.spawn(async move {
            let status = child::stop(r, grace).await;
            let _ = tx.send(Event::Stopped {
                idx,
                pid,
                status,
                reason,
            });
        });
    }

    /// A worker that exited 64 refuses its configuration, certificate or key, which no
    /// restart fixes: FAILED at once (with its restart window for a retry, in case someone
    /// fixes the files), rather than after a burst of restarts that each say the same.
    fn fail_misconfigured(&mut self, idx: usize) {
        let now = Instant::now();
        let window = Duration::from_millis(self.cfg.watchdog.restart_limit_window_ms);
        let slot = &mut self.slots[idx];
        slot.phase = Phase::Failed {
            since: now,
            retry_at: now + window,
        };
        let reason = "exit status 64: it refuses its configuration, certificate or key (its reason is logged above)";
        error!(
            component = %slot.comp.name,
            retry_in_ms = window.as_millis() as u64,
            last_reason = reason,
            "COMPONENT FAILED: restarting cannot help until that is fixed; trying it again once its restart window has passed"
        );
        slot.failed_because = reason.to_string();
        self.maybe_announce();
    }

    fn schedule_restart(&mut self, idx: usize, reason: String) {
        let w = &self.cfg.watchdog;
        let now = Instant::now();
        let slot = &mut self.slots[idx];
        if slot.phase.was_stable(now, w.stable_after_ms) {
            slot.backoff = Duration::from_millis(w.restart_backoff_initial_ms);
        }
        let window = Duration::from_millis(w.restart_limit_window_ms);
        while slot
            .restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            slot.restarts.pop_front();
        }
        if slot.restarts.len() >= w.restart_limit_burst as usize {
            // Whatever made it fail (a port held by another process, a full disk) may pass:
            // a failed worker gets a fresh start after the window, so that the service does
            // not run one worker short until the watchdog itself is restarted.
            slot.phase = Phase::Failed {
                since: now,
                retry_at: now + window,
            };
            let next = if slot.comp.is_dispatcher {
                "the watchdog gives up"
            } else {
                "trying it again once its restart window has passed"
            };
            error!(
                component = %slot.comp.name,
                restarts = slot.restarts.len(),
                window_ms = w.restart_limit_window_ms,
                last_reason = reason.as_str(),
                "COMPONENT FAILED: restarted too often; {next}"
            );
            slot.failed_because = reason;
            self.maybe_announce();
            return;
        }
        slot.restarts.push_back(now);
        slot.total_restarts += 1;
        let delay = slot.backoff;
        slot.backoff = (slot.backoff * 2).min(Duration::from_millis(w.restart_backoff_max_ms));
        slot.phase = Phase::Waiting { until: now + delay };
        info!(component = %slot.comp.name, reason = reason.as_str(), restart = slot.total_restarts, delay_ms = delay.as_millis() as u64, "restarting component");
    }

    /// Starts again a component that exited with status 0, or was killed by SIGTERM or SIGINT
    /// before it handled them ([`child::asked_to_stop`]). A component exits 0 only after a
    /// SIGTERM or SIGINT it was sent (by someone else: the watchdog's own stops are counted
    /// where it sends them), so this is a restart someone asked for, not a crash, and it does
    /// not count against the restart limit. The backoff still applies: reset if the component
    /// had been up for `stable_after_ms`, doubled if not, so that something sending SIGTERM
    /// in a loop restarts it at most once per `restart_backoff_max_ms`.
    fn restart_after_clean_stop(&mut self, idx: usize) {
        let w = &self.cfg.watchdog;
        let slot = &mut self.slots[idx];
        if slot.phase.was_stable(Instant::now(), w.stable_after_ms) {
            slot.backoff = Duration::from_millis(w.restart_backoff_initial_ms);
        }
        let delay = slot.backoff;
        slot.backoff = (slot.backoff * 2).min(Duration::from_millis(w.restart_backoff_max_ms));
        slot.total_restarts += 1;
        slot.phase = Phase::Waiting {
            until: Instant::now() + delay,
        };
        info!(component = %slot.comp.name, restart = slot.total_restarts, delay_ms = delay.as_millis() as u64, "restarting component after a clean stop it was asked for (not counted against the restart limit)");
    }

    /// Remembers an exited component, whose session's orphans are now to be killed.
    fn exited(&mut self, pid: u32) {
        /// Enough for every component of a large configuration, restarted a few times over.
        const REMEMBERED: usize = 256;
        if self.dead.len() >= REMEMBERED {
            self.dead.pop_front();
        }
        self.dead.push_back(pid);
    }

    /// Kills and reaps what dead components left behind (see [`orphans`]); returns how many
    /// processes it killed or reaped.
    fn sweep_orphans(&mut self) -> usize {
        if !self.subreaper {
            return 0;
        }
        let live: HashSet<u32> = self
            .slots
            .iter()
            .filter_map(|s| s.running.as_ref().map(|r| r.pid))
            .chain(self.stopping.iter().copied())
            .collect();
        orphans::sweep(&live, &dead_sessions(&self.dead, &live))
    }

    /// Prints the ready line once every component is up (or has been given up on).
    fn maybe_announce(&mut self) {
        if self.announced {
            return;
        }
        let settled = self
            .slots
            .iter()
            .all(|s| matches!(s.phase, Phase::Up { .. } | Phase::Failed { .. }));
        let dispatcher_up = self
            .slots
            .iter()
            .any(|s| s.comp.is_dispatcher && matches!(s.phase, Phase::Up { .. }));
        if !settled || !dispatcher_up {
            return;
        }
        // Since the last of them came up or was marked FAILED.
        let settled_for = self
            .slots
            .iter()
            .filter_map(|s| match s.phase {
                Phase::Up { since } | Phase::Failed { since, .. } => Some(since.elapsed()),
                _ => None,
            })
            .min()
            .unwrap_or_default();
        // Ready means a request is served at once: the dispatcher must have its links to the
        // workers that are up (it dials them as it starts). Should that take longer than a
        // component may take to start (counted from when the last of them came up), ready is
        // said anyway, with what the dispatcher sees.
        let workers_up = self
            .slots
            .iter()
            .filter(|s| !s.comp.is_dispatcher && matches!(s.phase, Phase::Up { .. }))
            .count() as u32;
        let start_timeout = Duration::from_millis(self.cfg.watchdog.start_timeout_ms);
        if self.dispatcher_sees < workers_up {
            if settled_for < start_timeout {
                return;
            }
            warn!(
                linked = self.dispatcher_sees,
                workers_up, "the dispatcher has not linked to every worker that is up"
            );
        }
        self.announced = true;
        let parts: Vec<String> = self
            .slots
            .iter()
            .map(|s| {
                let state = if matches!(s.phase, Phase::Failed { .. }) {
                    " (FAILED)"
                } else {
                    ""
                };
                format!("{} {}{}", s.comp.name, s.comp.addr, state)
            })
            .collect();
        // Serving, but without the workers marked FAILED: say so on the line itself.
        let degraded = self
            .slots
            .iter()
            .any(|s| matches!(s.phase, Phase::Failed { .. }));
        let how = if degraded { " (degraded)" } else { "" };
        // Announced once, so warned about once. The service goes on: a full disk or a reader
        // that went away (`| head`) is no reason to stop serving.
        let ready =
            crate::stdio::out_line(format_args!("securesrv ready{how}: {}", parts.join(", ")));
        if let Err(e) = ready {
            warn!(error = %e, "cannot write the ready line to stdout; serving anyway");
        }
        info!(components = %parts.join(", "), degraded, "every component answered its first heartbeat or was marked FAILED");
    }

    /// Stops the dispatcher first (its in-flight requests drain through the workers), then the
    /// workers, each SIGTERM then SIGKILL after the grace period.
    async fn stop_all(&mut self) {
        let grace = Duration::from_millis(self.cfg.watchdog.stop_grace_ms);
        info!("stopping all components");
        for dispatcher_pass in [true, false] {
            let mut stops = tokio::task::JoinSet::new();
            for slot in &mut self.slots {
                if slot.comp.is_dispatcher != dispatcher_pass {
                    continue;
                }
                if let Some(r) = slot.running.take() {
                    let name = slot.comp.name.clone();
                    self.dead.push_back(r.pid);
                    // One already stopping by itself has its grace counted from then.
                    let first = match slot.phase {
                        Phase::Draining { since, .. } => grace.saturating_sub(since.elapsed()),
                        _ => Duration::ZERO,
                    };
                    stops.spawn(async move {
                        let status = if first.is_zero() {
                            child::stop(r, grace).await
                        } else {
                            child::stop_after(r, first, HUNG_GRACE).await
                        };
                        (name, status)
                    });
                }
            }
            while let Some(done) = stops.join_next().await {
                if let Ok((name, status)) = done {
                    match status {
                        Ok(s) => {
                            info!(component = %name, status = %child::describe(&s), "component stopped")
                        }
                        Err(e) => warn!(component = %name, error = %e, "stopping component failed"),
                    }
                }
            }
        }
        // Stops begun before (a hung component) end within their grace plus a SIGKILL.
        while self.stop_tasks.join_next().await.is_some() {}
        self.dead.extend(self.stopping.drain());
        // Every component is reaped: any child of theirs left is an orphan (a job of a
        // worker that had to be SIGKILLed, a daemon a job started in a session of its own).
        // Kill them, and reap them within a short bound.
        for _ in 0..50 {
            if !self.subreaper || orphans::sweep_all(&HashSet::new(), &self.inherited) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        info!("watchdog stopped");
    }
}

/// The sessions whose leftovers are to be killed: those of components that exited, except
/// PIDs the kernel has since handed to a live component, whose session is a live one again.
fn dead_sessions(dead: &VecDeque<u32>, live: &HashSet<u32>) -> HashSet<u32> {
    dead.iter()
        .copied()
        .filter(|pid| !live.contains(pid))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_that_came_back_as_a_live_component_is_not_a_dead_session() {
        let dead = VecDeque::from([100, 200, 300]);
        let live = HashSet::from([200, 400]);
        assert_eq!(dead_sessions(&dead, &live), HashSet::from([100, 300]));
    }
}
