//! A worker that holds a valid certificate but breaks the protocol on its link: the
//! dispatcher drops the link, and does not let such a worker have it dialled again at once.
//! The worker is the test's own TLS endpoint with worker 1's certificate; the dispatcher runs
//! in the test with real TLS on 127.0.0.1. The last test has such a worker answer the
//! watchdog's heartbeat.

mod common;

use common::{WAIT, free_port, pki};
use securesrv::client::{CallOptions, Client, ClientConfig, ClientError};
use securesrv::config::{Config, WorkerEntry};
use securesrv::connection::{Connection, IoLimits};
use securesrv::dispatcher::Dispatcher;
use securesrv::identity::{Role, SpiffeId};
use securesrv::message::{Bytes, Message, Ping, Pong, Reply};
use securesrv::tls::{Acceptor, ServerStream};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

type Link = Connection<ServerStream>;

/// Worker 1's address, taken by the test, and a dispatcher linking to it (pinging every
/// 100 ms) and serving clients.
struct Setup {
    pki: common::Pki,
    listen: std::net::SocketAddr,
    listener: TcpListener,
    acceptor: Acceptor,
    dispatcher: Arc<Dispatcher>,
    stop: CancellationToken,
    tracker: TaskTracker,
}

async fn setup() -> Setup {
    let pki = pki(1);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = Config {
        certs_dir: pki.dir.clone(),
        ..Config::default()
    };
    cfg.dispatcher.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    cfg.dispatcher.worker_ping_interval_ms = 100;
    cfg.worker.push(WorkerEntry {
        id: 1,
        listen: listener.local_addr().unwrap(),
    });
    cfg.validate().unwrap();
    let acceptor = pki
        .material("worker-1")
        .acceptor(Role::Worker, Duration::from_secs(5))
        .unwrap();
    let listen = cfg.dispatcher.listen;
    let (dispatcher, m) = Dispatcher::load(Arc::new(cfg)).unwrap();
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    dispatcher.start_links(&m, &stop, &tracker).unwrap();
    let clients = securesrv::server::bind(listen).await.unwrap();
    let serving = m
        .acceptor(Role::Dispatcher, Duration::from_secs(5))
        .unwrap();
    tracker.spawn(securesrv::dispatcher::run(
        dispatcher.clone(),
        clients,
        serving,
        stop.clone(),
    ));
    Setup {
        pki,
        listen,
        listener,
        acceptor,
        dispatcher,
        stop,
        tracker,
    }
}

impl Setup {
    /// The dispatcher's next link, as worker 1.
    async fn link(&self) -> Link {
        let next = async {
            let (tcp, _) = self.listener.accept().await.unwrap();
            self.acceptor.accept(tcp).await.unwrap().0
        };
        let stream = tokio::time::timeout(WAIT, next).await.expect("a link");
        Connection::new(stream, IoLimits::default())
    }

    /// The dispatcher's next link, as worker 1, and whether its handshake resumed a session.
    async fn link_resumed(&self) -> (Link, bool) {
        let link = self.link().await;
        let resumed =
            link.get_ref().get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        (link, resumed)
    }

    async fn stop(self) {
        self.stop.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(WAIT, self.tracker.wait()).await;
    }
}

/// The next ping the dispatcher sends on `link`, skipping nothing else (it sends no request
/// here); `None` once the dispatcher has closed the link.
async fn next_ping(link: &mut Link, within: Duration) -> Option<Vec<u8>> {
    match tokio::time::timeout(within, link.read_message()).await {
        Ok(Ok(Some(Message::Ping(p)))) => Some(p.nonce),
        Ok(Ok(Some(other))) => panic!("unexpected {other:?}"),
        Ok(_) => None,
        Err(_) => panic!("neither a ping nor the link's end within {within:?}"),
    }
}

async fn pong(link: &mut Link, nonce: Vec<u8>) {
    let pong = Message::Pong(Pong {
        nonce,
        in_flight: 0,
        workers_available: None,
    });
    link.send(&pong).await.unwrap();
}

/// Whether the dispatcher closes `link` within `within`, answering its pings meanwhile.
async fn closes_within(link: &mut Link, within: Duration) -> bool {
    let until = tokio::time::Instant::now() + within;
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, link.read_message()).await {
            Err(_) => return false,
            Ok(Ok(Some(Message::Ping(p)))) => pong(link, p.nonce).await,
            Ok(Ok(Some(other))) => panic!("unexpected {other:?}"),
            Ok(_) => return true,
        }
    }
}

/// A worker that sends a message it must not send as soon as each link is up made the
/// dispatcher dial it again about 20 times a second, with a WARN line each time: the bad
/// message counted as the worker having answered, which reset the backoff. Answering the
/// first ping before it did the same (18 a second). A link now counts as made only if it was
/// answered, lasted a ping interval and did not end in a violation, so such links come at
/// the backoff's pace (50 ms, doubling up to 2 s).
#[tokio::test]
async fn a_worker_that_breaks_the_protocol_on_every_link_is_redialled_with_backoff() {
    let s = setup().await;
    for answer_first_ping in [false, true] {
        let t0 = tokio::time::Instant::now();
        let mut links = 0;
        while t0.elapsed() < Duration::from_secs(3) {
            let mut link = s.link().await;
            links += 1;
            if answer_first_ping {
                let nonce = next_ping(&mut link, WAIT).await.expect("a ping");
                pong(&mut link, nonce).await;
            }
            let ping = Message::Ping(Ping { nonce: vec![7; 16] });
            link.send(&ping).await.unwrap();
            // The dispatcher's own first ping may come first; then the link's end.
            while tokio::time::timeout(WAIT, link.read_message())
                .await
                .expect("the dispatcher closes the link")
                .is_ok_and(|m| m.is_some())
            {}
        }
        // With the backoff: links at about 0, 0.05, 0.15, 0.35, 0.75, 1.55 and 3.15 s (the
        // backoff goes on from the first case into the second).
        assert!(
            links <= 10,
            "{links} links in 3 s (first ping answered: {answer_first_ping})"
        );
    }
    s.stop().await;
}

/// A worker refuses a resumed session whose certificate has expired since the ticket was
/// issued with a bare close right after the handshake, new tickets sent before it: the
/// dispatcher resumed again on its next dial, and every one after, and the refusal never
/// said why. After a resumed link the worker closed unanswered, it now dials a full
/// handshake, which a refusing worker answers with an alert.
#[tokio::test]
async fn a_resumed_link_closed_before_any_answer_is_followed_by_a_full_handshake() {
    let s = setup().await;
    // A first link, answered, then closed by the worker: the dispatcher holds its tickets.
    let (mut link, resumed) = s.link_resumed().await;
    assert!(!resumed, "the first link resumed a session");
    let nonce = next_ping(&mut link, WAIT).await.expect("a ping");
    pong(&mut link, nonce).await;
    // Its next ping comes after the pong, and the tickets before it, were read.
    let nonce = next_ping(&mut link, WAIT).await.expect("a second ping");
    pong(&mut link, nonce).await;
    drop(link);
    // The next link resumes; the worker closes it before answering anything.
    let (link, resumed) = s.link_resumed().await;
    assert!(resumed, "the second link did not resume a session");
    drop(link);
    let (link, resumed) = s.link_resumed().await;
    assert!(
        !resumed,
        "the link after a refused resumption resumed again"
    );
    drop(link);
    s.stop().await;
}

/// A pong for no ping, and an answer for a request id the dispatcher never gave out, end the
/// link: read without end, they kept the dispatcher's thread busy (a flood of pongs took a
/// core). A pong for an earlier ping that comes late, even after a later ping's, does not.
#[tokio::test]
async fn a_pong_for_no_ping_or_an_answer_for_no_request_ends_the_link() {
    let s = setup().await;
    let bogus = [
        Message::Pong(Pong {
            nonce: vec![9; 16],
            in_flight: 0,
            workers_available: None,
        }),
        Message::Reply(Reply {
            id: 1_000,
            payload: Bytes::from_static(b"not yours"),
        }),
        Message::Reply(Reply {
            id: 0,
            payload: Bytes::new(),
        }),
    ];
    for (i, bad) in bogus.into_iter().enumerate() {
        let mut link = s.link().await;
        // Each ping answered only once the next has come, then both, in either order (a
        // worker on several threads may answer out of order): late pongs.
        let mut before = next_ping(&mut link, WAIT).await.expect("a ping");
        for turn in 0..4 {
            let now = next_ping(&mut link, WAIT).await.expect("a ping");
            if turn % 2 == 0 {
                pong(&mut link, now).await;
                pong(&mut link, before).await;
            } else {
                pong(&mut link, before).await;
                pong(&mut link, now).await;
            }
            before = next_ping(&mut link, WAIT).await.expect("a ping");
        }
        pong(&mut link, before).await;
        assert!(
            !closes_within(&mut link, Duration::from_millis(500)).await,
            "case {i}: late pongs ended the link"
        );
        assert_eq!(s.dispatcher.pool().available(), 1, "case {i}");
        link.send(&bad).await.unwrap();
        assert!(
            closes_within(&mut link, Duration::from_secs(5)).await,
            "case {i}: the link stayed up after {bad:?}"
        );
    }
    s.stop().await;
}

/// A worker that answers a request twice (or keeps sending answers for ids it was given) is
/// cut off once it has sent more answers than it was given requests: each is answered once.
/// The client gets the first answer, and an answer that comes after its request timed out is
/// no violation.
#[tokio::test]
async fn answers_beyond_the_requests_given_end_the_link() {
    let s = setup().await;
    let mut link = s.link().await;
    let cfg = ClientConfig::new(
        &s.pki.material("client"),
        s.listen,
        SpiffeId::dispatcher("securesrv").unwrap(),
    )
    .unwrap();
    let client = Client::new(cfg);
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.call("echo", b"x").await }
    });
    let forward = loop {
        match tokio::time::timeout(WAIT, link.read_message()).await {
            Ok(Ok(Some(Message::Ping(p)))) => pong(&mut link, p.nonce).await,
            Ok(Ok(Some(Message::Forward(f)))) => break f,
            other => panic!("expected the forward, got {other:?}"),
        }
    };
    let reply = Message::Reply(Reply {
        id: forward.id,
        payload: forward.payload.clone(),
    });
    link.send(&reply).await.unwrap();
    let answer = tokio::time::timeout(WAIT, call).await.unwrap().unwrap();
    assert_eq!(answer.unwrap(), b"x");
    assert!(
        !closes_within(&mut link, Duration::from_millis(300)).await,
        "one answer ended the link"
    );
    // A request answered only after the dispatcher has given up on it.
    let opts = CallOptions {
        idempotent: true,
        timeout: Duration::from_millis(300),
    };
    let late = tokio::spawn(async move { client.call_with("echo", b"y", opts).await });
    let forward = loop {
        match tokio::time::timeout(WAIT, link.read_message()).await {
            Ok(Ok(Some(Message::Ping(p)))) => pong(&mut link, p.nonce).await,
            Ok(Ok(Some(Message::Forward(f)))) => break f,
            other => panic!("expected the forward, got {other:?}"),
        }
    };
    let gave_up = tokio::time::timeout(WAIT, late).await.unwrap().unwrap();
    assert!(
        matches!(
            gave_up,
            Err(ClientError::Timeout(_)) | Err(ClientError::Remote { .. })
        ),
        "{gave_up:?}"
    );
    let late_reply = Message::Reply(Reply {
        id: forward.id,
        payload: forward.payload.clone(),
    });
    link.send(&late_reply).await.unwrap();
    assert!(
        !closes_within(&mut link, Duration::from_millis(300)).await,
        "a late answer ended the link"
    );
    link.send(&reply).await.unwrap();
    assert!(
        closes_within(&mut link, Duration::from_secs(5)).await,
        "the link stayed up after a second answer to one request"
    );
    s.stop().await;
}

/// A heartbeat answered with an error: the reason the watchdog logs carries the component's
/// text printable and cut short (the log then quotes it), so a compromised worker can neither
/// write lines of its own into the watchdog's log nor make its text pose as fields.
#[tokio::test]
async fn a_heartbeats_error_text_reaches_the_watchdog_printable_and_cut() {
    use securesrv::message::{ErrorCode, ErrorReply};
    use securesrv::watchdog::probe::Prober;
    let pki = pki(1);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = pki
        .material("worker-1")
        .acceptor(Role::Worker, Duration::from_secs(5))
        .unwrap();
    let hostile = format!(
        "boom\" component=dispatcher misses=0\n2026-01-01T00:00:00Z INFO forged line\u{1b}[2J{}",
        "x".repeat(500)
    );
    let text = hostile.clone();
    let standin = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let stream = acceptor.accept(tcp).await.unwrap().0;
        let mut link = Connection::new(stream, IoLimits::default());
        match link.read_message().await {
            Ok(Some(Message::Ping(_))) => {}
            other => panic!("expected the watchdog's ping, got {other:?}"),
        }
        let error = Message::Error(ErrorReply {
            id: 0,
            code: ErrorCode::Internal,
            message: text,
        });
        link.send(&error).await.unwrap();
        link
    });
    let connector = pki
        .material("watchdog")
        .connector(
            &SpiffeId::new("securesrv", Role::Worker, "1").unwrap(),
            WAIT,
        )
        .unwrap();
    let mut prober = Prober::new(connector, addr, IoLimits::default());
    let reason = prober
        .beat(WAIT)
        .await
        .expect_err("an error is a failed beat");
    let _link = tokio::time::timeout(WAIT, standin).await.unwrap().unwrap();
    assert!(reason.starts_with("internal: boom\""), "{reason}");
    assert!(
        !reason.chars().any(char::is_control),
        "control characters reached the reason: {reason:?}"
    );
    assert!(
        reason.chars().count() < 120,
        "the component's text was not cut: {} characters",
        reason.chars().count()
    );
}

/// Worker 1's address held by the test (`.worker_1`, accepting with `.acceptor`), a real
/// worker 2 in this process, and a dispatcher linked to both (pinging every second) with a
/// non-idempotent job `once` (`cat`), serving clients; once worker 2 is available.
struct BesideARealWorker {
    pki: common::Pki,
    worker_1: TcpListener,
    acceptor: Acceptor,
    client: Client,
    dispatcher: Arc<Dispatcher>,
    stop: CancellationToken,
    tracker: TaskTracker,
}

async fn beside_a_real_worker() -> BesideARealWorker {
    use securesrv::config::JobConfig;
    use securesrv::worker::{self, Worker, ops::OpRegistry};
    let pki = pki(2);
    let worker_1 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let real = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = Config {
        certs_dir: pki.dir.clone(),
        ..Config::default()
    };
    cfg.dispatcher.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    for (id, l) in [(1, &worker_1), (2, &real)] {
        cfg.worker.push(WorkerEntry {
            id,
            listen: l.local_addr().unwrap(),
        });
    }
    cfg.jobs.push(JobConfig {
        name: "once".into(),
        program: "/bin/cat".into(),
        args: Vec::new(),
        timeout_ms: 5_000,
        max_output_bytes: Some(1024),
        idempotent: false,
    });
    cfg.acl.insert("once".into(), vec!["*".into()]);
    cfg.validate().unwrap();
    let cfg = Arc::new(cfg);
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (w, m) = Worker::load(2, cfg.clone(), OpRegistry::from_config(&cfg)).unwrap();
    let acceptor = m.acceptor(Role::Worker, WAIT).unwrap();
    tracker.spawn(worker::run(Arc::new(w), real, acceptor, stop.clone()));
    let (dispatcher, m) = Dispatcher::load(cfg.clone()).unwrap();
    dispatcher.start_links(&m, &stop, &tracker).unwrap();
    let clients = securesrv::server::bind(cfg.dispatcher.listen)
        .await
        .unwrap();
    let serving = m.acceptor(Role::Dispatcher, WAIT).unwrap();
    tracker.spawn(securesrv::dispatcher::run(
        dispatcher.clone(),
        clients,
        serving,
        stop.clone(),
    ));
    assert!(dispatcher.pool().wait_for_available(1, WAIT).await);
    let acceptor = pki
        .material("worker-1")
        .acceptor(Role::Worker, WAIT)
        .unwrap();
    let client = Client::connect(
        ClientConfig::new(
            &pki.material("client"),
            cfg.dispatcher.listen,
            SpiffeId::dispatcher("securesrv").unwrap(),
        )
        .unwrap(),
    )
    .await
    .unwrap();
    BesideARealWorker {
        pki,
        worker_1,
        acceptor,
        client,
        dispatcher,
        stop,
        tracker,
    }
}

impl BesideARealWorker {
    /// The dispatcher's link to worker 1.
    async fn link(&self) -> Link {
        let (tcp, _) = tokio::time::timeout(WAIT, self.worker_1.accept())
            .await
            .expect("the dispatcher dials worker 1")
            .unwrap();
        Connection::new(
            self.acceptor.accept(tcp).await.unwrap().0,
            IoLimits::default(),
        )
    }

    async fn stop(self) {
        let _ = &self.pki;
        self.stop.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(WAIT, self.tracker.wait()).await;
    }
}

/// A link on which the worker has not answered anything yet is not a worker to send
/// requests to. In TLS 1.3 the dispatcher's side of the handshake ends before the worker has
/// judged its certificate, so a worker that refuses the dispatcher (another CA, another trust
/// domain, its connection limit for the dispatcher) looks linked for a moment after each
/// dial, with no request outstanding: the least loaded of all. Requests sent there in that
/// moment were lost when the link ended, and a non-idempotent one came back `worker_lost`
/// ("may or may not have run") although the worker never read it and worker 2 was there all
/// along. Here worker 1 takes the link and stays silent for a while, then closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_the_worker_has_not_answered_on_gets_no_requests() {
    let s = beside_a_real_worker().await;
    // Worker 1 takes the dispatcher's link and reads what comes for 600 ms (the dispatcher
    // pings every second, so it has not yet missed two pings), answering nothing.
    let mut link = s.link().await;
    let opts = CallOptions {
        idempotent: false,
        timeout: Duration::from_secs(10),
    };
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..4 {
        let client = s.client.clone();
        calls.spawn(async move {
            let p = format!("request {i}");
            (
                p.clone(),
                client.call_with("once", p.as_bytes(), opts).await,
            )
        });
    }
    let mut forwards = 0;
    let silent_until = tokio::time::Instant::now() + Duration::from_millis(600);
    while let Ok(r) = tokio::time::timeout_at(silent_until, link.read_message()).await {
        match r {
            Ok(Some(Message::Forward(_))) => forwards += 1,
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    // As a worker refusing the dispatcher's certificate does, without a word.
    drop(link);
    let mut failed = Vec::new();
    while let Some(done) = calls.join_next().await {
        let (p, answer) = done.expect("task");
        match answer {
            Ok(a) => assert_eq!(a, p.as_bytes()),
            Err(e) => failed.push(e.to_string()),
        }
    }
    assert!(
        forwards == 0 && failed.is_empty(),
        "{forwards} requests sent to a worker that had answered nothing; failed: {failed:?}"
    );
    s.stop().await;
}

/// A worker that has answered a request `shutting_down` is stopping: it refuses every
/// request it reads on that link from then on (PROTOCOL.md §5), and closes the link once its
/// drain is over (4 s by default). Its link stayed available meanwhile, and as it refuses at
/// once it had the fewest requests outstanding: it was picked first for every new request,
/// each then costing a round trip and a retry on worker 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_said_it_is_stopping_gets_no_more_requests_on_that_link() {
    use securesrv::message::{ErrorCode, ErrorReply};
    let s = beside_a_real_worker().await;
    let mut link = s.link().await;
    // Worker 1 answers pings, and every request `shutting_down`, as a stopping worker does.
    let forwards = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stopping = tokio::spawn({
        let forwards = forwards.clone();
        async move {
            while let Ok(Some(m)) = link.read_message().await {
                let answer = match m {
                    Message::Ping(p) => Message::Pong(Pong {
                        nonce: p.nonce,
                        in_flight: 1,
                        workers_available: None,
                    }),
                    Message::Forward(f) => {
                        forwards.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        Message::Error(ErrorReply {
                            id: f.id,
                            code: ErrorCode::ShuttingDown,
                            message: "shutting down; send it elsewhere".into(),
                        })
                    }
                    other => panic!("unexpected {other:?}"),
                };
                if link.send(&answer).await.is_err() {
                    return;
                }
            }
        }
    });
    assert!(s.dispatcher.pool().wait_for_available(2, WAIT).await);
    for i in 0..10 {
        let p = format!("request {i}");
        assert_eq!(
            s.client.call("echo", p.as_bytes()).await.unwrap(),
            p.as_bytes()
        );
    }
    let sent = forwards.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        sent <= 1,
        "{sent} of 10 requests sent to a worker that had said it is stopping"
    );
    stopping.abort();
    s.stop().await;
}

/// Log lines written while the guard lives, by this thread (a current-thread runtime runs
/// every task of the test on it).
#[derive(Clone, Default)]
struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let lines = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || lines.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        // Whether a log statement is wanted is decided once for all threads, by the first to
        // reach it: another test's thread, with no subscriber, would have it never wanted.
        tracing::callsite::rebuild_interest_cache();
        guard
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A worker that takes the link and never answers a ping is reported as not answering at
/// the second unanswered ping, as one that stops answering is. Since a link is used only
/// once its worker has answered, such a link was never marked as answering, and in a first
/// version nothing was said until the link was dropped, after five (found by review).
#[tokio::test(flavor = "current_thread")]
async fn a_worker_that_never_answers_a_ping_is_reported_at_the_second_miss() {
    let lines = Lines::default();
    let _capture = lines.capture();
    let s = setup().await;
    let mut link = s.link().await;
    // Pings every 100 ms: the second miss comes at the third ping, the link's drop at the
    // sixth. Read them without answering until the line is there.
    let mut pings = 0;
    while !lines.text().contains("worker not answering pings") {
        assert!(
            next_ping(&mut link, WAIT).await.is_some(),
            "the link closed after {pings} pings, and nothing said the worker does not answer:\n{}",
            lines.text()
        );
        pings += 1;
    }
    assert!(pings <= 4, "said only after {pings} pings");
    s.stop().await;
}

/// A worker that takes every link and never answers is said not to answer on the first
/// link and then as the redial loop says its own lines (the 2nd, 4th, 8th ... link in a row),
/// not for every link.
#[tokio::test(flavor = "current_thread")]
async fn a_worker_that_never_answers_on_any_link_is_not_reported_for_each() {
    let lines = Lines::default();
    let _capture = lines.capture();
    let s = setup().await;
    for n in 1..=4 {
        let mut link = s.link().await;
        // Unanswered, the dispatcher drops the link after 5 pings.
        while next_ping(&mut link, WAIT).await.is_some() {}
        let said = lines.text().matches("worker not answering pings").count();
        let expected = [1, 2, 2, 3][n - 1];
        assert_eq!(said, expected, "after {n} links:\n{}", lines.text());
    }
    s.stop().await;
}
