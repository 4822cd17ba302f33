//! The client library against TLS refusals, with a real dispatcher and worker on 127.0.0.1: a
//! certificate from another CA or of another role is refused once, and the call says so at
//! once — final, never retried, never "may or may not have run" — and so is a dispatcher the
//! client does not trust; the dispatcher keeps serving good clients meanwhile.

mod common;

use common::{Pki, WAIT, pki, start_cluster};
use rustls::AlertDescription;
use securesrv::client::{Client, ClientConfig, ClientError, FailureKind};
use securesrv::identity::SpiffeId;
use securesrv::tls::TlsMaterial;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// A client trusting the CA in `ca_dir`, with identity `stem` from `cert_dir`, for `addr`.
fn client(ca_dir: &Path, cert_dir: &Path, stem: &str, addr: SocketAddr) -> Client {
    let m = TlsMaterial::load(
        &ca_dir.join("ca.crt"),
        &cert_dir.join(format!("{stem}.crt")),
        &cert_dir.join(format!("{stem}.key")),
    )
    .expect("load material");
    let cfg = ClientConfig::new(&m, addr, SpiffeId::dispatcher("securesrv").unwrap())
        .expect("client config");
    // The default 15 s deadline: a refusal that was retried would use it all.
    Client::new(cfg)
}

/// Forwards every connection to `to` and counts them: how often a client dialled. Each
/// direction is copied on its own, as TCP carries them: a failed write towards a dispatcher
/// that has closed must not drop the alert it sent before closing.
async fn counting_relay(to: SocketAddr) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
    let addr = l.local_addr().expect("addr");
    let dials = Arc::new(AtomicUsize::new(0));
    let counter = dials.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = l.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let Ok(outbound) = TcpStream::connect(to).await else {
                continue;
            };
            let (mut in_r, mut in_w) = inbound.into_split();
            let (mut out_r, mut out_w) = outbound.into_split();
            let upstream = tokio::spawn(async move {
                let _ = tokio::io::copy(&mut in_r, &mut out_w).await;
                let _ = out_w.shutdown().await;
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut out_r, &mut in_w).await;
                let _ = in_w.shutdown().await;
                upstream.abort();
            });
        }
    });
    (addr, dials)
}

/// Calls `echo` and returns the error, how long it took and how many connections it made.
async fn refused_call(pki: &Pki, c: Client, dials: &AtomicUsize) -> (ClientError, Duration, usize) {
    let before = dials.load(Ordering::SeqCst);
    let t0 = Instant::now();
    let e = tokio::time::timeout(WAIT, c.call("echo", b"hi"))
        .await
        .expect("hang guard")
        .expect_err("must be refused");
    let took = t0.elapsed();
    c.close().await;
    let _ = pki;
    (e, took, dials.load(Ordering::SeqCst) - before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_certificates_end_the_call_at_once_with_the_reason() {
    let ours = pki(1);
    let other = pki(1);
    let cluster = start_cluster(&ours, 1, |_| {}).await;
    let (relay, dials) = counting_relay(cluster.addr).await;

    // Our CA trusted, our certificate refused: from another CA, or of another role (a worker's
    // certificate is not for clients; the dispatcher's identity may not call the dispatcher).
    let cases = [
        (&other.dir, "client", AlertDescription::UnknownCA),
        (
            &ours.dir,
            "worker-1",
            AlertDescription::UnsupportedCertificate,
        ),
        (
            &ours.dir,
            "dispatcher",
            AlertDescription::CertificateUnknown,
        ),
    ];
    for (cert_dir, stem, expected) in cases {
        let c = client(&ours.dir, cert_dir, stem, relay);
        let (e, took, n) = refused_call(&ours, c, &dials).await;
        let text = e.to_string();
        match &e {
            ClientError::RefusedByDispatcher { alert, addr } => {
                assert_eq!((*alert, *addr), (expected, relay), "{stem}: {text}");
            }
            other => panic!("{stem}: expected a refusal, got {other:?}"),
        }
        assert!(
            text.contains(&format!(
                "refused our certificate (TLS alert: {expected:?})"
            )),
            "{stem}: {text}"
        );
        assert!(!text.contains("may or may not"), "{stem}: {text}");
        assert_eq!(e.kind(), FailureKind::Connection);
        assert_eq!(
            n, 1,
            "{stem}: a refusal is not retried ({n} dials, {took:?})"
        );
        // Only a hang guard: a retried refusal would take the whole 15 s deadline.
        assert!(took < Duration::from_secs(5), "{stem}: {took:?}");
    }

    // We do not trust the dispatcher: its certificate is from a CA we do not know.
    let c = client(&other.dir, &ours.dir, "client", relay);
    let (e, took, n) = refused_call(&ours, c, &dials).await;
    assert!(
        matches!(e, ClientError::DispatcherNotAccepted { .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("was not accepted"), "{e}");
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    assert_eq!(n, 1, "not retried ({took:?})");

    // The dispatcher went on serving a good client, directly and through the relay.
    let good = cluster.client(&ours).await;
    assert_eq!(
        good.call("echo", b"still here").await.unwrap(),
        b"still here"
    );
    let relayed = client(&ours.dir, &ours.dir, "client", relay);
    assert_eq!(relayed.call("echo", b"relayed").await.unwrap(), b"relayed");
    good.close().await;
    relayed.close().await;
    cluster.stop().await;
}

/// A client whose key leaked, put on the CA's revocation list (`certs revoke`): the dispatcher
/// started after it refuses that client at once with `certificate_revoked`, and serves the
/// others; the leaked certificate's holder cannot even load it next to the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_is_refused_and_the_others_are_served() {
    let ours = pki(1);
    ours.add_client("leaked");
    // The holder of the leaked key loaded it before the revocation.
    let leaked = ours.material("client-leaked");
    let revoked =
        securesrv::certs::revoke(&ours.dir, &[ours.dir.join("client-leaked.crt")]).unwrap();
    assert!(
        revoked.entries[0].contains("client/leaked"),
        "{:?}",
        revoked.entries
    );
    let cluster = start_cluster(&ours, 1, |_| {}).await;
    let (relay, dials) = counting_relay(cluster.addr).await;

    let cfg = ClientConfig::new(&leaked, relay, SpiffeId::dispatcher("securesrv").unwrap())
        .expect("client config");
    let (e, took, n) = refused_call(&ours, Client::new(cfg), &dials).await;
    match &e {
        ClientError::RefusedByDispatcher { alert, .. } => {
            assert_eq!(*alert, AlertDescription::CertificateRevoked, "{e}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(n, 1, "a refusal is not retried ({n} dials, {took:?})");

    let good = cluster.client(&ours).await;
    assert_eq!(good.call("echo", b"served").await.unwrap(), b"served");
    good.close().await;
    let err = TlsMaterial::load(
        &ours.dir.join("ca.crt"),
        &ours.dir.join("client-leaked.crt"),
        &ours.dir.join("client-leaked.key"),
    )
    .expect_err("a revoked certificate of our own is refused when loaded");
    assert!(err.to_string().contains("revoked"), "{err}");
    cluster.stop().await;
}

/// A client whose certificate expires while it holds session tickets: the dispatcher refuses
/// each resumed handshake with a bare `close_notify` (PROTOCOL.md §1, "Session resumption"),
/// and sends fresh tickets first, so a client that kept resuming never made the full
/// handshake that names the cause. The call must end with the dispatcher's
/// `certificate_expired`, not "may or may not have run" after its whole deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_expires_between_calls_is_reported_as_expired() {
    use securesrv::certs::{CertAuthority, LeafSpec, write_file};
    use securesrv::identity::Role;
    let ours = pki(1);
    let id = SpiffeId::new("securesrv", Role::Client, "brief").unwrap();
    let mut spec = LeafSpec::for_identity(&id, 1, &[]).unwrap();
    let until = time::OffsetDateTime::now_utc() + time::Duration::seconds(3);
    spec.not_after = until;
    let leaf = CertAuthority::load(&ours.dir)
        .unwrap()
        .issue(&spec)
        .unwrap();
    write_file(
        &ours.dir.join("brief.key"),
        leaf.key_pem.as_bytes(),
        0o600,
        true,
    )
    .unwrap();
    write_file(
        &ours.dir.join("brief.crt"),
        leaf.cert_pem.as_bytes(),
        0o644,
        true,
    )
    .unwrap();
    let cluster = start_cluster(&ours, 1, |_| {}).await;
    let (relay, dials) = counting_relay(cluster.addr).await;
    let mut cfg = ClientConfig::new(
        &ours.material("brief"),
        relay,
        SpiffeId::dispatcher("securesrv").unwrap(),
    )
    .expect("client config");
    cfg.call_timeout = Duration::from_secs(3);
    let c = Client::new(cfg);
    // Served while the certificate is valid; the tickets come with the answer.
    assert_eq!(c.call("echo", b"early").await.unwrap(), b"early");
    // The next call dials again, offering one of those tickets.
    c.close().await;
    // A bounded wait on the clock: the certificate's last second must be over.
    let deadline = Instant::now() + WAIT;
    while time::OffsetDateTime::now_utc() <= until + time::Duration::seconds(1) {
        assert!(Instant::now() < deadline, "hang guard");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = dials.load(Ordering::SeqCst);
    let e = tokio::time::timeout(WAIT, c.call("echo", b"late"))
        .await
        .expect("hang guard")
        .expect_err("an expired certificate is refused");
    let n = dials.load(Ordering::SeqCst) - before;
    match &e {
        ClientError::RefusedByDispatcher { alert, .. } => {
            assert_eq!(*alert, AlertDescription::CertificateExpired, "{e}");
        }
        other => panic!("expected the dispatcher's refusal, got {other:?} ({n} dials)"),
    }
    assert!(!e.to_string().contains("may or may not"), "{e}");
    // One resumed dial refused, then the full handshake that says why.
    assert!(n <= 3, "{n} dials");
    c.close().await;
    cluster.stop().await;
}

/// `Client::close` fails the calls still in flight, as it says: an idempotent one is not sent
/// again on a connection of its own, which nothing would close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_fails_the_calls_in_flight_rather_than_sending_them_again() {
    let ours = pki(1);
    let cluster = start_cluster(&ours, 1, |_| {}).await;
    let c = cluster.client(&ours).await;
    let call = tokio::spawn({
        let c = c.clone();
        async move { c.call("sleep", b"1500").await }
    });
    let dispatcher = SpiffeId::dispatcher("securesrv").unwrap();
    let until = Instant::now() + WAIT;
    loop {
        let (_conn, pong) = ours.watchdog_ping(&dispatcher, cluster.addr).await;
        if pong.in_flight > 0 {
            break;
        }
        assert!(
            Instant::now() < until,
            "the call never reached the dispatcher"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.close().await;
    let r = tokio::time::timeout(WAIT, call)
        .await
        .expect("hang guard")
        .unwrap();
    assert!(
        matches!(r, Err(ClientError::ConnectionLost)),
        "the call in flight was sent again after close: {r:?}"
    );
    cluster.stop().await;
}
