//! One shutdown signal per process: SIGINT or SIGTERM (and, for a component started by the
//! watchdog, the end of its stdin, which means the watchdog is gone) cancel one token that
//! every task selects on. A second SIGINT/SIGTERM while draining exits at once.

use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Exit status used when a second signal cuts the drain short.
pub const EXIT_INTERRUPTED: i32 = 130;

/// Watches for SIGINT/SIGTERM (and, with `parent_watch`, EOF on stdin) and cancels `token`.
/// With `parent_watch`, the process also exits on its own `hard_deadline` after the parent
/// vanished, in case draining hangs.
pub fn watch(
    token: CancellationToken,
    parent_watch: bool,
    hard_deadline: Duration,
) -> std::io::Result<()> {
    watch_with(token, parent_watch, hard_deadline, || {})
}

/// [`watch`], running `before_exit` whenever the process exits without its drain (the second
/// signal, or the hard deadline after the supervisor vanished), for what must not outlive the
/// process even then: a worker kills its jobs' process groups there.
pub fn watch_with(
    token: CancellationToken,
    parent_watch: bool,
    hard_deadline: Duration,
    before_exit: impl Fn() + Send + Sync + 'static,
) -> std::io::Result<()> {
    let before_exit = Arc::new(before_exit);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let t = token.clone();
    let on_signal = before_exit.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received; shutting down"),
            _ = int.recv() => info!("SIGINT received; shutting down"),
            _ = t.cancelled() => {}
        }
        t.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        warn!("second signal; exiting now");
        on_signal();
        std::process::exit(EXIT_INTERRUPTED);
    });
    if parent_watch {
        let t = token;
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = [0u8; 64];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            warn!("supervisor is gone (stdin closed); shutting down");
            t.cancel();
            tokio::time::sleep(hard_deadline).await;
            warn!("drain did not finish in time after supervisor loss; exiting");
            before_exit();
            std::process::exit(1);
        });
    }
    Ok(())
}
