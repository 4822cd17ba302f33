//! The call loop against listeners that misbehave at the TCP level: nothing listening, and a
//! listener that accepts but never answers the handshake. Refusals by a real dispatcher are
//! tested in `tests/client_refusals.rs`.

use super::*;
use crate::certs::InitOptions;
use tokio::net::TcpListener;

/// A client configuration (from a fresh PKI) for `addr`, with call deadline `timeout`.
fn config(addr: SocketAddr, timeout: Duration) -> (tempfile::TempDir, ClientConfig) {
    let tmp = tempfile::tempdir().unwrap();
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
