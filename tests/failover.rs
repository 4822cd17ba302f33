//! A worker process killed with SIGKILL in the middle of a request: an idempotent request is
//! answered by another worker, a non-idempotent one gets a clear `worker_lost`; the client
//! never hangs and never gets another request's answer. Workers are real processes; the
//! dispatcher runs in the test (in the last test, as a process too, for its log).

mod common;

use common::{Pki, Proc, WAIT, free_port, pki};
use nix::sys::signal::Signal;
use securesrv::client::{CallOptions, Client, ClientConfig, ClientError};
use securesrv::config::{Config, JobConfig, WorkerEntry};
use securesrv::dispatcher::{self, Dispatcher};
use securesrv::identity::{Role, SpiffeId};
use securesrv::message::ErrorCode;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

struct Setup {
    pki: Pki,
    config_file: PathBuf,
    cfg: Arc<Config>,
    workers: Vec<SocketAddr>,
}

fn setup() -> Setup {
    let pki = pki(2);
    let mut cfg = Config {
        certs_dir: pki.dir.clone(),
        ..Config::default()
    };
    for id in 1..=2 {
        cfg.worker.push(WorkerEntry {
            id,
            listen: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        });
    }
    cfg.dispatcher.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    cfg.dispatcher.worker_ping_interval_ms = 200;
    cfg.jobs.push(JobConfig {
        name: "slow-write".into(),
        program: PathBuf::from("/bin/sh"),
        args: vec!["-c".into(), "sleep 3; echo wrote".into()],
        timeout_ms: 10_000,
        max_output_bytes: Some(1024),
        idempotent: false,
    });
    cfg.acl.insert("slow-write".into(), vec!["*".into()]);
    // The worker processes read the same file.
    let text = format!(
        "certs_dir = {:?}\n[dispatcher]\nlisten = \"{}\"\n[[worker]]\nid = 1\nlisten = \"{}\"\n[[worker]]\nid = 2\nlisten = \"{}\"\n[[jobs]]\nname = \"slow-write\"\nprogram = \"/bin/sh\"\nargs = [\"-c\", \"sleep 3; echo wrote\"]\ntimeout_ms = 10000\n[acl]\nslow-write = [\"*\"]\n",
        pki.dir, cfg.dispatcher.listen, cfg.worker[0].listen, cfg.worker[1].listen
    );
    let config_file = pki.tmp.path().join("securesrv.toml");
    std::fs::write(&config_file, text).unwrap();
    cfg.validate().unwrap();
    Setup {
        workers: cfg.worker.iter().map(|w| w.listen).collect(),
        cfg: Arc::new(cfg),
        pki,
        config_file,
    }
}

fn start_worker(s: &Setup, id: u32) -> Proc {
    let p = Proc::spawn(
        &format!("worker-{id}"),
        &[
            "worker",
            "--id",
            &id.to_string(),
            "--config",
            s.config_file.to_str().unwrap(),
        ],
        s.pki.tmp.path(),
    );
    p.wait_log(&["worker listening"], WAIT);
    p
}

/// Requests in progress on a worker, asked with the watchdog's identity.
async fn in_flight(s: &Setup, id: u32) -> u32 {
    let worker = SpiffeId::worker("securesrv", id).unwrap();
    let addr = s.workers[id as usize - 1];
    s.pki.watchdog_ping(&worker, addr).await.1.in_flight
}

async fn wait_busy(s: &Setup, id: u32) {
    let until = Instant::now() + WAIT;
    while in_flight(s, id).await == 0 {
        assert!(Instant::now() < until, "worker {id} never got the request");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn start_dispatcher(s: &Setup) -> (Arc<Dispatcher>, CancellationToken, TaskTracker) {
    let (d, m) = Dispatcher::load(s.cfg.clone()).unwrap();
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    d.start_links(&m, &stop, &tracker).unwrap();
    let listener = securesrv::server::bind(s.cfg.dispatcher.listen)
        .await
        .unwrap();
    let acceptor = m
        .acceptor(Role::Dispatcher, Duration::from_secs(5))
        .unwrap();
    tracker.spawn(dispatcher::run(d.clone(), listener, acceptor, stop.clone()));
    (d, stop, tracker)
}

async fn client(s: &Setup) -> Client {
    let m = s.pki.material("client");
    let cfg = ClientConfig::new(
        &m,
        s.cfg.dispatcher.listen,
        SpiffeId::dispatcher("securesrv").unwrap(),
    )
    .unwrap();
    Client::connect(cfg).await.unwrap()
}

/// Worker 1 alone, the dispatcher linked to it, and a client.
async fn worker_1_and_dispatcher(
    s: &Setup,
) -> (
    Proc,
    Arc<Dispatcher>,
    CancellationToken,
    TaskTracker,
    Client,
) {
    let w1 = start_worker(s, 1);
    let (d, stop, tracker) = start_dispatcher(s).await;
    assert!(d.pool().wait_for_available(1, WAIT).await);
    let c = client(s).await;
    (w1, d, stop, tracker, c)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn stop_dispatcher(stop: CancellationToken, tracker: TaskTracker) {
    stop.cancel();
    tracker.close();
    let _ = tokio::time::timeout(WAIT, tracker.wait()).await;
}

#[test]
fn a_worker_killed_mid_request() {
    let s = setup();
    let rt = rt();
    rt.block_on(async {
        // Only worker 1 runs at first, so the slow requests land on it.
        let (w1, d, stop, tracker, c) = worker_1_and_dispatcher(&s).await;

        // Idempotent: `sleep` is retried on worker 2 and answered.
        let c1 = c.clone();
        let idem = tokio::spawn(async move {
            let started = Instant::now();
            (c1.call("sleep", b"1500").await, started.elapsed())
        });
        wait_busy(&s, 1).await;
        let w2 = start_worker(&s, 2);
        assert!(d.pool().wait_for_available(2, WAIT).await);
        w1.signal(Signal::SIGKILL);
        let (answer, took) = idem.await.unwrap();
        assert_eq!(
            answer.unwrap(),
            b"slept 1500 ms",
            "idempotent request answered by worker 2"
        );
        assert!(took < WAIT);
        drop(w1);

        // Non-idempotent: worker 2 is the only one left, so the job runs there; kill it.
        let c2 = c.clone();
        let job = tokio::spawn(async move {
            c2.call_with(
                "slow-write",
                b"",
                CallOptions {
                    idempotent: false,
                    timeout: Duration::from_secs(20),
                },
            )
            .await
        });
        wait_busy(&s, 2).await;
        w2.signal(Signal::SIGKILL);
        match job.await.unwrap() {
            Err(ClientError::Remote {
                code: ErrorCode::WorkerLost,
                message,
            }) => {
                assert!(message.contains("may or may not have run"), "{message}");
            }
            other => panic!("non-idempotent request must fail with worker_lost, got {other:?}"),
        }
        drop(w2);

        // A restarted worker is picked up again without any operator action.
        let _w1 = start_worker(&s, 1);
        assert!(d.pool().wait_for_available(1, WAIT).await);
        assert_eq!(c.call("echo", b"back").await.unwrap(), b"back");
        stop_dispatcher(stop, tracker).await;
    });
}

#[test]
fn a_request_read_after_its_token_expired_goes_to_another_worker() {
    // A paused worker reads the requests queued for it only after their tokens expired, and
    // refuses them. A refused token means the request never ran, so it goes to another worker
    // instead of reaching the client as a token error.
    let mut s = setup();
    let mut cfg = (*s.cfg).clone();
    cfg.token.lifetime_ms = 1000;
    // No ping misses during the pause: the link stays up, as in a stall shorter than the
    // dispatcher's patience.
    cfg.dispatcher.worker_ping_interval_ms = 60_000;
    s.cfg = Arc::new(cfg);
    let rt = rt();
    rt.block_on(async {
        let (w1, d, stop, tracker, c) = worker_1_and_dispatcher(&s).await;
        common::stop_process(w1.pid);
        let started = Instant::now();
        let c1 = c.clone();
        let call = tokio::spawn(async move { c1.call("echo", b"late").await });
        let until = Instant::now() + WAIT;
        while d.pool().slots()[0].outstanding() == 0 {
            assert!(Instant::now() < until, "the request never went to worker 1");
            if call.is_finished() {
                let answer = call.await;
                let slots: Vec<_> = d
                    .pool()
                    .slots()
                    .iter()
                    .map(|s| (s.id, s.outstanding()))
                    .collect();
                panic!(
                    "answered after {:?} while worker 1 is paused: {answer:?}; available {}, outstanding {slots:?}",
                    started.elapsed(),
                    d.pool().available()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _w2 = start_worker(&s, 2);
        assert!(d.pool().wait_for_available(2, WAIT).await);
        // Let the token expire while worker 1 is paused, then let it go on.
        tokio::time::sleep_until((started + Duration::from_millis(1300)).into()).await;
        w1.signal(Signal::SIGCONT);
        let answer = tokio::time::timeout(WAIT, call)
            .await
            .expect("the client is answered")
            .unwrap();
        assert_eq!(answer.unwrap(), b"late", "answered by worker 2");
        assert_eq!(c.call("echo", b"next").await.unwrap(), b"next");
        stop_dispatcher(stop, tracker).await;
    });
}

#[test]
fn a_stopping_worker_frees_its_port_at_once_and_still_answers() {
    // Told to stop, a worker accepts nothing more: its port is free for a successor at once,
    // while it finishes the request it is running (the drain is 4 s by default).
    let s = setup();
    let rt = rt();
    rt.block_on(async {
        let (mut w1, _d, stop, tracker, c) = worker_1_and_dispatcher(&s).await;
        let sent = Instant::now();
        let call = tokio::spawn(async move { c.call("sleep", b"2500").await });
        wait_busy(&s, 1).await;
        w1.signal(Signal::SIGTERM);
        let until = Instant::now() + WAIT;
        let successor = loop {
            match std::net::TcpListener::bind(s.workers[0]) {
                Ok(l) => break l,
                Err(e) => {
                    assert!(Instant::now() < until, "the port stayed taken: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        // The sleep began after `sent`, so it was still running.
        assert!(
            sent.elapsed() < Duration::from_millis(2500),
            "the port was freed only after the request had run"
        );
        drop(successor);
        let answer = tokio::time::timeout(WAIT, call).await.unwrap().unwrap();
        assert_eq!(answer.unwrap(), b"slept 2500 ms");
        assert!(
            w1.wait_exit(WAIT).is_some(),
            "the worker exits after its drain"
        );
        stop_dispatcher(stop, tracker).await;
    });
}

/// Worker 1's port, taken before the dispatcher starts, and a dispatcher process (for its
/// log): every dial the dispatcher makes reaches the returned listener, and none is refused
/// uncounted.
fn dispatcher_dialling_a_squatter(s: &Setup) -> (std::net::TcpListener, Proc) {
    let squatter = std::net::TcpListener::bind(s.workers[0]).unwrap();
    squatter.set_nonblocking(true).unwrap();
    let dispatcher = Proc::spawn(
        "dispatcher",
        &["dispatcher", "--config", s.config_file.to_str().unwrap()],
        s.pki.tmp.path(),
    );
    (squatter, dispatcher)
}

/// A worker that comes back after its dispatcher failed to reach it for a while is logged as
/// up, however many dials failed meanwhile. The line used to be written only when that count
/// was 0 or a power of two, so after most restarts it never came, while OPERATIONS.md tells
/// operators to wait for it between restarts.
#[test]
fn a_worker_back_after_any_number_of_failed_dials_is_logged_as_up() {
    let s = setup();
    let (squatter, dispatcher) = dispatcher_dialling_a_squatter(&s);
    // Six failed dials; the next comes 1.6 s after the sixth (the backoff doubles from
    // 50 ms), time for the worker to start. Six, and a seventh if the worker is slow, are
    // not powers of two.
    for n in 1..=6 {
        let mut dialled = None;
        assert!(
            common::wait_until(WAIT, || {
                dialled = squatter.accept().ok();
                dialled.is_some()
            }),
            "the dispatcher's dial {n} never came"
        );
    }
    drop(squatter);
    let _worker = start_worker(&s, 1);
    let up = dispatcher.wait_log(&["worker link up", "worker=1"], WAIT);
    assert!(
        common::field(&up, "after_failures").is_some_and(|n| n != "0"),
        "{up}"
    );
}

/// As above, after a run of links that ended before the worker answered (a crash loop): once
/// a dial has failed, the next link made is logged as up. The links of the crash loop used
/// to keep quieting the line after the worker was back.
#[test]
fn a_worker_back_after_a_crash_loop_is_logged_as_up() {
    let s = setup();
    let (squatter, dispatcher) = dispatcher_dialling_a_squatter(&s);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::from_std(squatter).unwrap();
        let acceptor = s
            .pki
            .material("worker-1")
            .acceptor(Role::Worker, WAIT)
            .unwrap();
        // Three links that end at once, each logged as up (the quieting starts later)...
        for n in 1..=3 {
            let (tcp, _) = tokio::time::timeout(WAIT, listener.accept())
                .await
                .unwrap_or_else(|_| panic!("the dispatcher's link {n} never came"))
                .unwrap();
            drop(acceptor.accept(tcp).await);
        }
        // ...then a dial that fails: the worker is down.
        let (tcp, _) = tokio::time::timeout(WAIT, listener.accept())
            .await
            .expect("the dispatcher's next dial never came")
            .unwrap();
        drop(tcp);
    });
    dispatcher.wait_for_n(true, &["worker link up", "worker=1"], 3, WAIT);
    let _worker = start_worker(&s, 1);
    dispatcher.wait_for_n(true, &["worker link up", "worker=1"], 4, WAIT);
}
