//! One shutdown signal per process: SIGINT, SIGTERM or SIGHUP (and, for a component started
//! by the watchdog, the end of its stdin, which means the watchdog is gone) cancel one token
//! that every task selects on. A second one while draining exits at once.

use futures_util::task::AtomicWaker;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::{info, warn};

/// What runs before a forced exit (see [`before_forced_exit`]).
static BEFORE_FORCED_EXIT: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>> =
    std::sync::OnceLock::new();

/// Registers what the process runs before every exit of [`watch`] that skips the drain (the
/// second signal, the hard deadline): the binary writes out its buffered log there, so that
/// the line saying why it exited is not lost. Only the first registration counts.
pub fn before_forced_exit(f: impl Fn() + Send + Sync + 'static) {
    let _ = BEFORE_FORCED_EXIT.set(Box::new(f));
}

/// The stack of every thread securesrv starts (std's default for spawned threads; tokio's
/// too), set rather than left to RUST_MIN_STACK, which can make it too small to run on.
pub const THREAD_STACK: usize = 2 << 20;

/// How long a forced exit may take to write its last log lines.
const FORCED_EXIT_WITHIN: Duration = Duration::from_millis(500);

/// Exits with `code` after `within`, from a thread of its own, whatever the others are doing
/// (a thread blocked writing a log line keeps a forced exit from happening otherwise).
fn exit_within(code: i32, within: Duration) {
    let _ = std::thread::Builder::new()
        .name("forced-exit".into())
        .stack_size(THREAD_STACK)
        .spawn(move || {
            std::thread::sleep(within);
            std::process::exit(code)
        });
}

/// Exits at once with `code`, after the registered [`before_forced_exit`].
fn exit_now(code: i32) -> ! {
    if let Some(f) = BEFORE_FORCED_EXIT.get() {
        f();
    }
    std::process::exit(code)
}

/// Exit status used when a second signal cuts the drain short.
pub const EXIT_INTERRUPTED: i32 = 130;

/// Waits for `token`'s cancellation like [`CancellationToken::cancelled`], for a loop that
/// selects on it every turn: the token is looked at on the first poll and then only after its
/// wake-up reached this future. Each poll of `WaitForCancellationFuture` takes two locks (the
/// token's state and its waiter list), which a request loop would pay for every message; this
/// one pays three atomic operations instead. A cancellation is seen on the first turn after
/// the token's wake-up reaches this waiter (`cancel` wakes its waiters in batches of 32,
/// so with thousands of connections the last are woken a little later than the first), not on
/// the first turn after `is_cancelled` turns true.
pub fn cancelled(token: &CancellationToken) -> Cancelled<'_> {
    let flag = Arc::new(WokenFlag {
        woken: AtomicBool::new(false),
        task: AtomicWaker::new(),
    });
    Cancelled {
        wait: Box::pin(token.cancelled()),
        waker: Waker::from(flag.clone()),
        flag,
        first: true,
        done: false,
    }
}

/// The future of [`cancelled`].
#[must_use = "futures do nothing unless polled"]
pub struct Cancelled<'a> {
    wait: Pin<Box<WaitForCancellationFuture<'a>>>,
    /// Set by `waker`, which is what `wait` is polled with.
    flag: Arc<WokenFlag>,
    waker: Waker,
    first: bool,
    done: bool,
}

struct WokenFlag {
    woken: AtomicBool,
    /// The task polling the [`Cancelled`].
    task: AtomicWaker,
}

impl Wake for WokenFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Future for Cancelled<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(());
        }
        // Registered before the flag is read: a wake-up in between is seen now, one after it
        // wakes this task again.
        this.flag.task.register(cx.waker());
        if !this.first && !this.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.first = false;
        let ready = this
            .wait
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
            .is_ready();
        this.done = ready;
        if ready {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// Watches for SIGINT/SIGTERM and cancels `token`. With `supervisor`, EOF on stdin (the
/// supervisor is gone) cancels that token, which is `token` or a child of it, and the process
/// exits on its own `hard_deadline` after it, in case the stop hangs.
pub fn watch(
    token: CancellationToken,
    supervisor: Option<CancellationToken>,
    hard_deadline: Duration,
) -> std::io::Result<()> {
    watch_with(token, supervisor, hard_deadline, || {})
}

/// The next SIGHUP, or never when it is not listened for.
async fn hangup(hup: &mut Option<tokio::signal::unix::Signal>) {
    match hup {
        Some(h) => {
            h.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// Whether signal `number` was ignored when this process started (a disposition inherited
/// through `exec`, as `nohup` sets for SIGHUP). Read from `/proc/self/status`, since asking
/// for a disposition takes unsafe code; false if it cannot be read.
fn ignored_at_start(number: i32) -> bool {
    let Some(bit) = u32::try_from(number - 1).ok().filter(|b| *b < 64) else {
        return false;
    };
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|l| {
                let mask = l.strip_prefix("SigIgn:")?.trim();
                u64::from_str_radix(mask, 16).ok()
            })
        })
        .is_some_and(|mask| mask & (1 << bit) != 0)
}

/// [`watch`], running `before_exit` whenever the process exits without its drain (the second
/// signal, or the hard deadline after the supervisor vanished), for what must not outlive the
/// process even then: a worker kills its jobs' process groups there.
pub fn watch_with(
    token: CancellationToken,
    supervisor: Option<CancellationToken>,
    hard_deadline: Duration,
    before_exit: impl Fn() + Send + Sync + 'static,
) -> std::io::Result<()> {
    let before_exit = Arc::new(before_exit);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // SIGHUP (a closed terminal, or someone expecting a reload) stops as SIGTERM does rather
    // than killing the process without its drain; under the watchdog that is a restart,
    // which reads the configuration and certificates again. Unless it was ignored when the
    // process started (`nohup`): then it stays ignored, as the operator asked.
    let mut hup = if ignored_at_start(SignalKind::hangup().as_raw_value()) {
        None
    } else {
        Some(signal(SignalKind::hangup())?)
    };
    let t = token.clone();
    let on_signal = before_exit.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received; shutting down"),
            _ = int.recv() => info!("SIGINT received; shutting down"),
            _ = hangup(&mut hup) => info!("SIGHUP received; shutting down"),
            _ = t.cancelled() => {}
        }
        t.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = hangup(&mut hup) => {}
        }
        // What must not outlive the process first, then the line saying why: writing a log
        // line can block (a full buffer, a stuck stderr), and the exit must happen anyway.
        on_signal();
        exit_within(EXIT_INTERRUPTED, FORCED_EXIT_WITHIN);
        warn!("second signal; exiting now");
        exit_now(EXIT_INTERRUPTED);
    });
    // SIGUSR1 and SIGUSR2 would end the process at once, without its drain (and, sent to
    // the watchdog, every component with it): logrotate's `postrotate` sends them by habit.
    // Logs go to stderr, with nothing to reopen, so they are ignored, and said to be.
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = usr1.recv() => "SIGUSR1",
                _ = usr2.recv() => "SIGUSR2",
            };
            info!(
                signal = name,
                "signal ignored: logs go to stderr, with nothing to reopen; SIGTERM stops"
            );
        }
    });
    if let Some(t) = supervisor {
        // A thread of its own, started now: tokio's stdin reads on its blocking pool, whose
        // thread, refused under a process limit (systemd TasksMax=, a pod's pids limit),
        // panicked in its task, and the component went on without noticing its supervisor's
        // death. A component that cannot watch its supervisor does not start.
        let (gone, went) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("supervisor-watch".into())
            .stack_size(THREAD_STACK)
            .spawn(move || {
                let mut stdin = std::io::stdin().lock();
                let mut buf = [0u8; 64];
                loop {
                    match std::io::Read::read(&mut stdin, &mut buf) {
                        Ok(0) => break,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                        Ok(_) => {}
                    }
                }
                let _ = gone.send(());
            })
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot start the thread that watches the supervisor: {e}"),
                )
            })?;
        tokio::spawn(async move {
            let _ = went.await;
            warn!("supervisor is gone (stdin closed); shutting down");
            t.cancel();
            tokio::time::sleep(hard_deadline).await;
            before_exit();
            exit_within(1, FORCED_EXIT_WITHIN);
            warn!("drain did not finish in time after supervisor loss; exiting");
            exit_now(1);
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Count(std::sync::atomic::AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn woken(c: &Arc<Count>) -> usize {
        c.0.load(Ordering::SeqCst)
    }

    #[test]
    fn cancelled_is_pending_until_cancelled_and_then_stays_ready() {
        let token = CancellationToken::new();
        let mut c = cancelled(&token);
        for _ in 0..3 {
            assert_eq!((&mut c).now_or_never(), None);
        }
        token.cancel();
        assert_eq!((&mut c).now_or_never(), Some(()));
        assert_eq!((&mut c).now_or_never(), Some(()));
    }

    #[test]
    fn cancelled_before_the_first_poll_or_through_a_parent_is_seen() {
        let token = CancellationToken::new();
        token.cancel();
        assert_eq!(cancelled(&token).now_or_never(), Some(()));

        let parent = CancellationToken::new();
        let child = parent.child_token();
        let mut c = cancelled(&child);
        assert_eq!((&mut c).now_or_never(), None);
        parent.cancel();
        assert_eq!((&mut c).now_or_never(), Some(()));
    }

    /// Polled by one waker and then another (the future moved to another task), the
    /// cancellation wakes the latest one, once.
    #[test]
    fn cancelled_wakes_the_waker_of_the_latest_poll() {
        let token = CancellationToken::new();
        let mut c = cancelled(&token);
        let (first, second) = (Arc::new(Count::default()), Arc::new(Count::default()));
        let (w1, w2) = (Waker::from(first.clone()), Waker::from(second.clone()));
        assert!(
            Pin::new(&mut c)
                .poll(&mut Context::from_waker(&w1))
                .is_pending()
        );
        assert!(
            Pin::new(&mut c)
                .poll(&mut Context::from_waker(&w2))
                .is_pending()
        );
        token.cancel();
        assert_eq!((woken(&first), woken(&second)), (0, 1));
        assert!(
            Pin::new(&mut c)
                .poll(&mut Context::from_waker(&w2))
                .is_ready()
        );
    }

    /// Cancelled by the task that waits on it, on a current-thread runtime.
    #[tokio::test]
    async fn cancelled_by_its_own_task_is_seen_on_the_next_poll() {
        let token = CancellationToken::new();
        let mut c = cancelled(&token);
        assert_eq!((&mut c).now_or_never(), None);
        token.cancel();
        tokio::time::timeout(Duration::from_secs(5), c)
            .await
            .expect("seen without another wake-up");
    }

    /// A task that waits for nothing else is woken by the cancellation, which comes once the
    /// task's own waker is registered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_wakes_a_task_waiting_only_for_it() {
        let token = CancellationToken::new();
        let t = token.clone();
        let (waiting, is_waiting) = tokio::sync::oneshot::channel();
        let waiter = tokio::spawn(async move {
            let mut c = cancelled(&t);
            let mut waiting = Some(waiting);
            std::future::poll_fn(|cx| {
                let r = Pin::new(&mut c).poll(cx);
                if r.is_pending() {
                    if let Some(w) = waiting.take() {
                        let _ = w.send(());
                    }
                }
                r
            })
            .await
        });
        cancel_once_ready(&token, is_waiting, waiter).await;
    }

    /// In a loop that keeps selecting on it (as the request loops do), a cancellation from
    /// another task ends the loop.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_ends_a_busy_select_loop() {
        let token = CancellationToken::new();
        let t = token.clone();
        let (turning, is_turning) = tokio::sync::oneshot::channel();
        let waiter = tokio::spawn(async move {
            let mut c = cancelled(&t);
            let mut turning = Some(turning);
            let mut ticks = 0u32;
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            loop {
                tokio::select! {
                    biased;
                    _ = &mut c => break ticks,
                    _ = tick.tick() => ticks += 1,
                }
                if ticks == 3 {
                    if let Some(t) = turning.take() {
                        let _ = t.send(());
                    }
                }
            }
        });
        let ticks = cancel_once_ready(&token, is_turning, waiter).await;
        assert!(ticks >= 3);
    }

    /// Waits (bounded) until the waiting task says it is ready, cancels `token`, and returns
    /// what the task returns once the cancellation has ended it (bounded too).
    async fn cancel_once_ready<T>(
        token: &CancellationToken,
        ready: tokio::sync::oneshot::Receiver<()>,
        waiter: tokio::task::JoinHandle<T>,
    ) -> T {
        tokio::time::timeout(Duration::from_secs(5), ready)
            .await
            .expect("the task got ready")
            .expect("the task did not end first");
        token.cancel();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the cancellation woke the waiting task")
            .expect("the task did not panic")
    }
}
