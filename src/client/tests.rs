//! The call loop against listeners that misbehave at the TCP level: nothing listening, and a
//! listener that accepts but never answers the handshake. Refusals by a real dispatcher are
//! tested in `tests/client_refusals.rs`.

use super::*;
use crate::certs::InitOptions;
use tokio::net::TcpListener;

/// A client configuration (from a fresh PKI) for `addr`, with call deadline `timeout`.
fn config(addr: SocketAddr, timeout: Duration) -> (tempfile::TempDir, ClientConfig) {
    let tmp = crate::files::private_tempdir().unwrap();
    let dir = tmp.path().join("certs");
    crate::certs::init(
        &dir,
        &InitOptions {
            trust_domain: "securesrv".into(),
            workers: vec![1],
            days: 2,
            hosts: vec![],
            force: false,
        },
    )
    .unwrap();
    let material = TlsMaterial::load(
        &dir.join("ca.crt"),
        &dir.join("client.crt"),
        &dir.join("client.key"),
    )
    .unwrap();
    let mut cfg =
        ClientConfig::new(&material, addr, SpiffeId::dispatcher("securesrv").unwrap()).unwrap();
    cfg.call_timeout = timeout;
    (tmp, cfg)
}

/// A port on 127.0.0.1 where nothing listens (bound a moment ago, then released).
async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn nothing_listening_is_retried_until_the_deadline_and_reported_as_not_sent() {
    let addr = closed_port().await;
    let deadline = Duration::from_millis(600);
    let (_tmp, cfg) = config(addr, deadline);
    let client = Client::new(cfg);
    let t0 = std::time::Instant::now();
    let e = client.call("echo", b"x").await.unwrap_err();
    let took = t0.elapsed();
    assert!(matches!(e, ClientError::Connect { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains(&addr.to_string()) && text.contains("not sent"),
        "{text}"
    );
    // It kept trying until the deadline rather than giving up at the first refusal.
    assert!(took >= deadline, "gave up after {took:?}");
    assert!(took < Duration::from_secs(5), "hang guard: {took:?}");
}

#[tokio::test]
async fn the_call_deadline_bounds_a_handshake_that_never_finishes() {
    // Accepts TCP connections (the kernel does) but never speaks TLS: a stopped dispatcher.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let (_tmp, cfg) = config(addr, Duration::from_millis(300));
    // The handshake deadline (5 s) is longer than the call's: the call's must win.
    let t0 = std::time::Instant::now();
    let e = Client::connect(cfg.clone())
        .await
        .err()
        .expect("no connection");
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "connect: {:?}",
        t0.elapsed()
    );
    assert!(e.to_string().contains("not connected within 300ms"), "{e}");
    let t0 = std::time::Instant::now();
    let e = Client::new(cfg).call("echo", b"x").await.unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "call: {:?}",
        t0.elapsed()
    );
    assert!(matches!(e, ClientError::Connect { .. }), "{e:?}");
    assert!(e.to_string().contains("not sent"), "{e}");
    drop(silent);
}

#[test]
fn connect_addresses_are_ip_or_host_with_port() {
    assert_eq!(
        resolve_addr("127.0.0.1:2222"),
        Ok("127.0.0.1:2222".parse().unwrap())
    );
    assert_eq!(
        resolve_addr("[::1]:2222"),
        Ok("[::1]:2222".parse().unwrap())
    );
    let local = resolve_addr("localhost:2222").expect("localhost resolves");
    assert!(local.ip().is_loopback() && local.port() == 2222, "{local}");
    let err = resolve_addr("localhost").unwrap_err();
    assert!(err.contains("no port"), "{err}");
    let err = resolve_addr("2001:db8::1:2222").unwrap_err();
    assert!(err.contains("brackets"), "{err}");
    let err = resolve_addr("::1").unwrap_err();
    assert!(err.contains("brackets"), "{err}");
    let err = resolve_addr("localhost:http").unwrap_err();
    assert!(err.contains("port must be a number"), "{err}");
    let err = resolve_addr(":2222").unwrap_err();
    assert!(err.contains("no host"), "{err}");
    // A well-formed name is only refused when it is resolved.
    assert_eq!(
        check_addr("nosuchhost.invalid:2222").as_deref(),
        Ok("nosuchhost.invalid:2222")
    );
    let err = resolve_addr("nosuchhost.invalid:2222").unwrap_err();
    assert!(err.contains("cannot resolve"), "{err}");
}

/// A dispatcher stand-in on 127.0.0.1 with a 64 KiB receive buffer, for one connection: it
/// starts reading once `start` is sent, answers every request it reads with an empty reply,
/// and counts them in `read`.
struct StandIn {
    _tmp: tempfile::TempDir,
    cfg: ClientConfig,
    start: tokio::sync::oneshot::Sender<()>,
    read: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

fn answering_dispatcher(call_timeout: Duration) -> StandIn {
    use crate::message::Reply;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(8).unwrap();
    let (tmp, cfg) = config(listener.local_addr().unwrap(), call_timeout);
    let dir = tmp.path().join("certs");
    let acceptor = TlsMaterial::load(
        &dir.join("ca.crt"),
        &dir.join("dispatcher.crt"),
        &dir.join("dispatcher.key"),
    )
    .unwrap()
    .acceptor(crate::identity::Role::Dispatcher, Duration::from_secs(5))
    .unwrap();
    let (start, started) = tokio::sync::oneshot::channel::<()>();
    let read = Arc::new(AtomicU64::new(0));
    let task = tokio::spawn({
        let read = read.clone();
        async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let (stream, _) = acceptor.accept(tcp).await.unwrap();
            let _ = started.await;
            let mut conn = Connection::new(stream, IoLimits::default());
            while let Ok(Some(Message::Request(r))) = conn.read_message().await {
                read.fetch_add(1, Ordering::Relaxed);
                let reply = Message::Reply(Reply {
                    id: r.id,
                    payload: Bytes::new(),
                });
                if conn.send(&reply).await.is_err() {
                    break;
                }
            }
        }
    });
    StandIn {
        _tmp: tmp,
        cfg,
        start,
        read,
        task,
    }
}

/// Calls that time out while their frames wait for a dispatcher that does not read leave no
/// waiter behind: the writer drops such frames, so no answer would ever remove one, and a
/// long-lived client grew by one entry per such call for as long as its connection lived.
#[tokio::test]
async fn calls_that_time_out_unsent_leave_no_waiter_on_a_live_connection() {
    let timeout = Duration::from_millis(300);
    let stand_in = answering_dispatcher(timeout);
    let client = Client::connect(stand_in.cfg.clone()).await.unwrap();
    // Few of these fit in the sockets; the rest wait in the client's queue until their calls
    // have timed out.
    let payload = Bytes::from(vec![7u8; 1_000_000]);
    let calls: Vec<_> = (0..16)
        .map(|_| {
            let (c, p) = (client.clone(), payload.clone());
            let opts = CallOptions {
                idempotent: true,
                timeout,
            };
            tokio::spawn(async move { c.call_bytes("echo", p, opts).await })
        })
        .collect();
    for c in calls {
        let r = c.await.unwrap();
        assert!(matches!(r, Err(ClientError::Timeout(_))), "{r:?}");
    }
    stand_in.start.send(()).unwrap();
    // Everything written is read and answered; the frames the writer dropped never will be.
    let link = client.link.lock().await.clone().expect("connected");
    let until = Instant::now() + Duration::from_secs(10);
    while !link.pending.is_empty() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!link.tx.is_closed(), "the connection is still up");
    let left = link.pending.len();
    let read = stand_in.read.load(Ordering::Relaxed);
    assert!(read < 16, "the dispatcher read all {read} requests");
    assert_eq!(
        left, 0,
        "{left} waiters left; the dispatcher read {read} of 16"
    );
    stand_in.task.abort();
}

/// `Duration::MAX` as a call's timeout means no timeout; it used to overflow the clock.
#[tokio::test]
async fn a_call_may_have_no_timeout() {
    let stand_in = answering_dispatcher(Duration::from_secs(5));
    stand_in.start.send(()).unwrap();
    let client = Client::new(stand_in.cfg.clone());
    let opts = CallOptions {
        idempotent: true,
        timeout: Duration::MAX,
    };
    let answer = client.call_bytes("echo", Bytes::from_static(b"x"), opts);
    let answer = tokio::time::timeout(Duration::from_secs(10), answer).await;
    assert!(matches!(answer, Ok(Ok(_))), "{answer:?}");
    stand_in.task.abort();
}
