//! Handshakes over real sockets on 127.0.0.1: who is let in, who is refused and why, and that
//! the listener keeps serving good peers after each refusal.

use super::*;
use crate::certs::{CertAuthority, InitOptions, LeafSpec};
use crate::identity::DEFAULT_TRUST_DOMAIN;
use rustls::AlertDescription;
use std::path::PathBuf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const TD: &str = DEFAULT_TRUST_DOMAIN;
const WAIT: Duration = Duration::from_secs(10);

struct Pki {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    other_dir: PathBuf,
}

fn pki() -> Pki {
    let tmp = crate::files::private_tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let other_dir = tmp.path().join("other");
    let opts = InitOptions {
        trust_domain: TD.into(),
        workers: vec![1, 2],
        days: 30,
        hosts: vec![],
        force: false,
    };
    crate::certs::init(&dir, &opts).unwrap();
    crate::certs::init(&other_dir, &opts).unwrap();
    Pki {
        _tmp: tmp,
        dir,
        other_dir,
    }
}

fn material(dir: &Path, stem: &str) -> TlsMaterial {
    TlsMaterial::load(
        &dir.join("ca.crt"),
        &dir.join(format!("{stem}.crt")),
        &dir.join(format!("{stem}.key")),
    )
    .unwrap()
}

/// Writes a custom leaf signed by the CA in `dir`, returns its stem.
fn custom_leaf(dir: &Path, stem: &str, spec: LeafSpec) -> String {
    let ca = CertAuthority::load(dir).unwrap();
    let leaf = ca.issue(&spec).unwrap();
    crate::certs::write_file(
        &dir.join(format!("{stem}.key")),
        leaf.key_pem.as_bytes(),
        0o600,
        true,
    )
    .unwrap();
    crate::certs::write_file(
        &dir.join(format!("{stem}.crt")),
        leaf.cert_pem.as_bytes(),
        0o644,
        true,
    )
    .unwrap();
    stem.to_string()
}

fn client_spec(uris: &[&str]) -> LeafSpec {
    let id = SpiffeId::new(TD, Role::Client, "x").unwrap();
    let mut spec = LeafSpec::for_identity(&id, 1, &[]).unwrap();
    spec.uris = uris.iter().map(|s| s.to_string()).collect();
    spec
}

/// A worker-role listener: reports each handshake result, answers "ok" to good peers.
async fn start_worker_listener(
    m: &TlsMaterial,
    handshake_timeout: Duration,
) -> (
    SocketAddr,
    mpsc::UnboundedReceiver<Result<SpiffeId, HandshakeError>>,
) {
    let acceptor = m.acceptor(Role::Worker, handshake_timeout).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Ok((mut s, id)) => {
                        let _ = tx.send(Ok(id));
                        let _ = s.write_all(b"ok").await;
                        let _ = s.flush().await;
                        let mut sink = [0u8; 16];
                        let _ = tokio::time::timeout(WAIT, s.read(&mut sink)).await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// A worker-1 listener, and the dispatcher's material and connector to it.
struct ToWorker1 {
    addr: SocketAddr,
    rx: mpsc::UnboundedReceiver<Result<SpiffeId, HandshakeError>>,
    dispatcher: TlsMaterial,
    w1: SpiffeId,
    connector: Connector,
}

async fn to_worker_1(pki: &Pki) -> ToWorker1 {
    let worker = material(&pki.dir, "worker-1");
    let (addr, rx) = start_worker_listener(&worker, WAIT).await;
    let dispatcher = material(&pki.dir, "dispatcher");
    let w1 = SpiffeId::worker(TD, 1).unwrap();
    let connector = dispatcher.connector(&w1, WAIT).unwrap();
    ToWorker1 {
        addr,
        rx,
        dispatcher,
        w1,
        connector,
    }
}

async fn next(
    rx: &mut mpsc::UnboundedReceiver<Result<SpiffeId, HandshakeError>>,
) -> Result<SpiffeId, HandshakeError> {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("listener reported within the wait")
        .expect("listener alive")
}

/// Connects with `m` expecting worker 1 and reads the server's "ok".
async fn good_peer_is_served(
    addr: SocketAddr,
    m: &TlsMaterial,
    rx: &mut mpsc::UnboundedReceiver<Result<SpiffeId, HandshakeError>>,
) {
    served_by_worker(addr, m, rx, 1).await;
}

/// Connects with `m` expecting worker `n` and reads the server's "ok".
async fn served_by_worker(
    addr: SocketAddr,
    m: &TlsMaterial,
    rx: &mut mpsc::UnboundedReceiver<Result<SpiffeId, HandshakeError>>,
    n: u32,
) {
    let worker = SpiffeId::worker(TD, n).unwrap();
    let (mut s, id) = m
        .connector(&worker, WAIT)
        .unwrap()
        .connect(addr)
        .await
        .unwrap();
    assert_eq!(id, worker);
    let mut buf = [0u8; 2];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ok");
    let server_saw = next(rx).await.unwrap();
    assert_eq!(server_saw, *m.own_id());
}

/// Connects with a raw rustls client config and returns what the first read brings.
async fn raw_attempt(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> std::io::Result<usize> {
    let tcp = TcpStream::connect(addr).await?;
    let mut s = tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await?;
    let mut buf = [0u8; 8];
    tokio::time::timeout(WAIT, s.read(&mut buf)).await?
}

#[tokio::test]
async fn allowed_role_with_the_right_ca_is_accepted() {
    let pki = pki();
    let worker = material(&pki.dir, "worker-1");
    let (addr, mut rx) = start_worker_listener(&worker, WAIT).await;
    good_peer_is_served(addr, &material(&pki.dir, "dispatcher"), &mut rx).await;
    good_peer_is_served(addr, &material(&pki.dir, "watchdog"), &mut rx).await;
}

#[tokio::test]
async fn refusals_with_reasons_and_service_continues() {
    let pki = pki();
    let worker = material(&pki.dir, "worker-1");
    let dispatcher = material(&pki.dir, "dispatcher");
    let (addr, mut rx) = start_worker_listener(&worker, WAIT).await;
    let w1 = SpiffeId::worker(TD, 1).unwrap();

    // 1. A client certificate presented to a worker: wrong role.
    let client = material(&pki.dir, "client");
    let err = client.connector(&w1, WAIT).unwrap().connect(addr).await;
    // TLS 1.3: the client may finish before the server judges it; either way no session.
    if let Ok((mut s, _)) = err {
        let mut b = [0u8; 1];
        assert!(
            s.read(&mut b).await.is_err(),
            "refused client must not read data"
        );
    }
    match next(&mut rx).await {
        Err(HandshakeError::Identity(IdentityError::RoleNotAllowed { role, endpoint, .. })) => {
            assert_eq!((role, endpoint), (Role::Client, Role::Worker));
        }
        other => panic!("expected role refusal, got {other:?}"),
    }
    good_peer_is_served(addr, &dispatcher, &mut rx).await;

    // 2. No client certificate at all.
    let no_cert = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(IdentityServerVerifier {
            roots: dispatcher.roots.clone(),
            policy: PeerPolicy::Exactly(w1.clone()),
            algs: provider().signature_verification_algorithms,
            revocations: Revocations::default(),
        }))
        .with_no_client_auth();
    let mut no_cert = no_cert;
    no_cert.alpn_protocols = vec![ALPN.to_vec()];
    let e = raw_attempt(addr, Arc::new(no_cert)).await.unwrap_err();
    assert_eq!(
        alert_received(&e),
        Some(AlertDescription::CertificateRequired),
        "{e}"
    );
    assert!(matches!(
        next(&mut rx).await,
        Err(HandshakeError::Tls(rustls::Error::NoCertificatesPresented))
    ));
    good_peer_is_served(addr, &dispatcher, &mut rx).await;

    // 3. A dispatcher certificate from another CA.
    let foreign = material(&pki.other_dir, "dispatcher");
    let e = foreign.connector(&w1, WAIT).unwrap().connect(addr).await;
    assert!(
        e.is_err(),
        "foreign client must not trust our worker either"
    );
    assert!(matches!(
        next(&mut rx).await,
        Err(HandshakeError::Tls(rustls::Error::AlertReceived(
            AlertDescription::UnknownCA
        )))
    ));
    let mut foreign_trusting_us = material(&pki.other_dir, "dispatcher");
    foreign_trusting_us.roots = dispatcher.roots.clone();
    let res = foreign_trusting_us
        .connector(&w1, WAIT)
        .unwrap()
        .connect(addr)
        .await;
    if let Ok((mut s, _)) = res {
        let mut b = [0u8; 1];
        let e = s.read(&mut b).await.unwrap_err();
        assert_eq!(alert_received(&e), Some(AlertDescription::UnknownCA), "{e}");
    }
    match next(&mut rx).await {
        Err(HandshakeError::Tls(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ))) => {}
        other => panic!("expected unknown issuer, got {other:?}"),
    }
    good_peer_is_served(addr, &dispatcher, &mut rx).await;

    // 4. An expired dispatcher certificate from our CA.
    let did = SpiffeId::dispatcher(TD).unwrap();
    let mut spec = LeafSpec::for_identity(&did, 1, &[]).unwrap();
    spec.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(10);
    spec.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let stem = custom_leaf(&pki.dir, "expired", spec);
    let dir = &pki.dir;
    let leaf = (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    );
    // Our own loader refuses it (below); a peer is not bound to.
    let expired = TlsMaterial::load_even_if_expired(&dir.join("ca.crt"), &leaf.0, &leaf.1).unwrap();
    if let Ok((mut s, _)) = expired.connector(&w1, WAIT).unwrap().connect(addr).await {
        let mut b = [0u8; 1];
        let e = s.read(&mut b).await.unwrap_err();
        assert_eq!(
            alert_received(&e),
            Some(AlertDescription::CertificateExpired),
            "{e}"
        );
    }
    match next(&mut rx).await {
        Err(HandshakeError::Tls(rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ))) => {}
        other => panic!("expected expired, got {other:?}"),
    }
    good_peer_is_served(addr, &dispatcher, &mut rx).await;

    // 5. The dispatcher dials worker 2's identity but worker 1 answers.
    let w2 = SpiffeId::worker(TD, 2).unwrap();
    match dispatcher.connector(&w2, WAIT).unwrap().connect(addr).await {
        Err(HandshakeError::Identity(IdentityError::UnexpectedPeer { expected, found })) => {
            assert_eq!(expected, w2.to_string());
            assert_eq!(found, w1.to_string());
        }
        other => panic!(
            "expected unexpected-peer refusal, got {:?}",
            other.map(|x| x.1)
        ),
    }
    assert!(
        next(&mut rx).await.is_err(),
        "server sees the client's alert"
    );
    good_peer_is_served(addr, &dispatcher, &mut rx).await;

    // 6. No ALPN offered.
    let mut no_alpn = (*dispatcher.client_config(&w1).unwrap()).clone();
    no_alpn.alpn_protocols.clear();
    let r = raw_attempt(addr, Arc::new(no_alpn)).await;
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "no data for a peer without ALPN: {r:?}"
    );
    assert!(matches!(next(&mut rx).await, Err(HandshakeError::NoAlpn)));
    // ... and a wrong ALPN is refused by rustls itself.
    let mut wrong_alpn = (*dispatcher.client_config(&w1).unwrap()).clone();
    wrong_alpn.alpn_protocols = vec![b"http/1.1".to_vec()];
    let e = raw_attempt(addr, Arc::new(wrong_alpn)).await.unwrap_err();
    assert_eq!(
        alert_received(&e),
        Some(AlertDescription::NoApplicationProtocol),
        "{e}"
    );
    assert!(next(&mut rx).await.is_err());
    good_peer_is_served(addr, &dispatcher, &mut rx).await;
}

#[tokio::test]
async fn odd_identities_are_refused_with_a_readable_reason() {
    let pki = pki();
    let worker = material(&pki.dir, "worker-1");
    let (addr, mut rx) = start_worker_listener(&worker, WAIT).await;
    let w1 = SpiffeId::worker(TD, 1).unwrap();
    let cases: Vec<(&str, LeafSpec, &str)> = vec![
        (
            "no-uri",
            client_spec(&[]),
            "no URI subject alternative name",
        ),
        (
            "two-uris",
            client_spec(&[
                "spiffe://securesrv/dispatcher/main",
                "spiffe://securesrv/dispatcher/b",
            ]),
            "2 URI subject alternative names",
        ),
        (
            "other-td",
            client_spec(&["spiffe://elsewhere/dispatcher/main"]),
            "not in trust domain",
        ),
        (
            "odd-role",
            client_spec(&["spiffe://securesrv/admin/root"]),
            "unknown role",
        ),
    ];
    for (stem, spec, reason) in cases {
        let stem = custom_leaf(&pki.dir, stem, spec);
        let m = TlsMaterial {
            // TlsMaterial::load refuses a certificate without a valid identity for itself,
            // so build this hostile peer by hand.
            roots: material(&pki.dir, "dispatcher").roots.clone(),
            revocations: Revocations::default(),
            certified: certified_key(
                crate::certs::load_certs(&pki.dir.join(format!("{stem}.crt"))).unwrap(),
                &crate::certs::load_private_key(&pki.dir.join(format!("{stem}.key"))).unwrap(),
            )
            .unwrap(),
            own_id: SpiffeId::dispatcher(TD).unwrap(),
            provider: provider(),
        };
        if let Ok((mut s, _)) = m.connector(&w1, WAIT).unwrap().connect(addr).await {
            let mut b = [0u8; 1];
            assert!(s.read(&mut b).await.is_err(), "{stem}");
        }
        match next(&mut rx).await {
            Err(HandshakeError::Identity(e)) => {
                assert!(e.to_string().contains(reason), "{stem}: {e}");
            }
            other => panic!("{stem}: expected identity refusal, got {other:?}"),
        }
    }
    good_peer_is_served(addr, &material(&pki.dir, "dispatcher"), &mut rx).await;
}

#[tokio::test]
async fn silent_peer_is_cut_off_at_the_handshake_deadline() {
    let pki = pki();
    let worker = material(&pki.dir, "worker-1");
    let deadline = Duration::from_millis(300);
    let (addr, mut rx) = start_worker_listener(&worker, deadline).await;
    let mut silent = TcpStream::connect(addr).await.unwrap();
    // Slow-drip: a few bytes of a ClientHello, then nothing.
    silent.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    match next(&mut rx).await {
        Err(HandshakeError::Timeout(d)) => assert_eq!(d, deadline),
        other => panic!("expected timeout, got {other:?}"),
    }
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(WAIT, silent.read(&mut b))
        .await
        .unwrap();
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "server closed the silent connection"
    );
    good_peer_is_served(addr, &material(&pki.dir, "dispatcher"), &mut rx).await;
}

#[tokio::test]
async fn resumed_sessions_still_carry_the_identity() {
    let pki = pki();
    let mut t = to_worker_1(&pki).await;
    for round in 0..3 {
        let (mut s, id) = t.connector.connect(t.addr).await.unwrap();
        assert_eq!(id, t.w1);
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).await.unwrap();
        let resumed = s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        assert_eq!(resumed, round > 0, "round {round}");
        assert_eq!(next(&mut t.rx).await.unwrap(), *t.dispatcher.own_id());
    }
}

/// More connections at once than rustls's stock store keeps tickets for (8): once each has
/// received its tickets, every one of the next burst resumes instead of signing again.
#[tokio::test]
async fn a_burst_of_reconnects_all_resume() {
    const BURST: usize = 32;
    let pki = pki();
    let mut t = to_worker_1(&pki).await;
    for round in 0..2 {
        // All connected before any reads, as a load generator's burst of reconnects is.
        let mut streams = Vec::new();
        for _ in 0..BURST {
            let (s, id) = t.connector.connect(t.addr).await.unwrap();
            assert_eq!(id, t.w1);
            streams.push(s);
        }
        let mut resumed = 0;
        for s in &mut streams {
            // Reading the server's first bytes also takes in its tickets.
            let mut buf = [0u8; 2];
            tokio::time::timeout(WAIT, s.read_exact(&mut buf))
                .await
                .unwrap()
                .unwrap();
            if s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                resumed += 1;
            }
            assert_eq!(next(&mut t.rx).await.unwrap(), *t.dispatcher.own_id());
        }
        let expected = if round == 0 { 0 } else { BURST };
        assert_eq!(resumed, expected, "round {round}: resumed handshakes");
    }
}

#[test]
fn the_ticket_store_forgets_the_oldest_server_first() {
    use rustls::client::ClientSessionStore;
    let store = TicketStore::new();
    let name = |i: usize| ServerName::try_from(format!("s{i}.example")).unwrap();
    for i in 0..=tickets::SERVERS {
        store.set_kx_hint(name(i), rustls::NamedGroup::X25519);
    }
    assert_eq!(store.kx_hint(&name(0)), None, "oldest forgotten");
    for i in 1..=tickets::SERVERS {
        assert_eq!(
            store.kx_hint(&name(i)),
            Some(rustls::NamedGroup::X25519),
            "s{i} kept"
        );
    }
    assert_eq!(store.servers(), tickets::SERVERS);
    assert_eq!(store.tickets(&name(1)), 0);
}

#[tokio::test]
async fn our_peers_agree_on_aes_128_gcm_and_the_other_suites_stay_enabled() {
    let suites: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
    assert_eq!(
        suites,
        [
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        ]
    );
    let pki = pki();
    let mut t = to_worker_1(&pki).await;
    let (s, _) = t.connector.connect(t.addr).await.unwrap();
    let suite = s.get_ref().1.negotiated_cipher_suite().map(|s| s.suite());
    assert_eq!(suite, Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
    assert_eq!(next(&mut t.rx).await.unwrap(), *t.dispatcher.own_id());
}

#[test]
fn a_key_that_is_not_the_certificates_is_refused_naming_both_files() {
    let pki = pki();
    let ca = pki.dir.join(crate::certs::CA_CERT);
    let cert = pki.dir.join("dispatcher.crt");
    // Another identity's key, and the same identity's key from another PKI.
    for key in [
        pki.dir.join("worker-1.key"),
        pki.other_dir.join("dispatcher.key"),
    ] {
        let err = TlsMaterial::load(&ca, &cert, &key).expect_err("mismatched key");
        let text = err.to_string();
        assert!(matches!(err, TlsConfigError::KeyMismatch { .. }), "{text}");
        assert!(
            text.contains(&*key.to_string_lossy()) && text.contains(&*cert.to_string_lossy()),
            "{text}"
        );
    }
    assert!(TlsMaterial::load(&ca, &cert, &pki.dir.join("dispatcher.key")).is_ok());
}

#[test]
fn der_lengths_are_encoded_in_their_shortest_form() {
    for (len, expected) in [
        (0usize, &[0x00][..]),
        (0x7f, &[0x7f]),
        (0x80, &[0x81, 0x80]),
        (0xff, &[0x81, 0xff]),
        (0x100, &[0x82, 0x01, 0x00]),
        (0x1_0000, &[0x83, 0x01, 0x00, 0x00]),
    ] {
        let mut out = Vec::new();
        assert_eq!(der_length(len, Some(&mut out)), expected.len(), "{len}");
        assert_eq!(der_length(len, None), expected.len(), "{len}");
        assert_eq!(out, expected, "{len}");
    }
}

#[test]
fn a_certificate_outside_its_validity_is_refused_when_loaded() {
    // It loaded, and the component then failed every handshake (its heartbeats too) with
    // no word of why in its own log.
    let pki = pki();
    let did = SpiffeId::dispatcher(TD).unwrap();
    let now = time::OffsetDateTime::now_utc();
    for (stem, from, to, says) in [
        (
            "old",
            now - time::Duration::days(10),
            now - time::Duration::days(1),
            "expired on",
        ),
        (
            "future",
            now + time::Duration::days(1),
            now + time::Duration::days(10),
            "not valid before",
        ),
    ] {
        let mut spec = LeafSpec::for_identity(&did, 1, &[]).unwrap();
        spec.not_before = from;
        spec.not_after = to;
        custom_leaf(&pki.dir, stem, spec);
        let cert = pki.dir.join(format!("{stem}.crt"));
        let Err(err) = TlsMaterial::load(
            &pki.dir.join("ca.crt"),
            &cert,
            &pki.dir.join(format!("{stem}.key")),
        ) else {
            panic!("accepted");
        };
        let text = err.to_string();
        assert!(matches!(err, TlsConfigError::NotValidNow { .. }), "{text}");
        assert!(
            text.contains(says) && text.contains(&*cert.to_string_lossy()),
            "{text}"
        );
    }
}

/// A root, an intermediate it signs, and a client leaf (`spiffe://securesrv/client/x`) the
/// intermediate signs: a PKI of another tool's shape.
struct TwoLevelPki {
    root: CertificateDer<'static>,
    intermediate: CertificateDer<'static>,
    leaf: CertificateDer<'static>,
}

fn two_level_pki() -> TwoLevelPki {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        SanType,
    };
    let ca_params = |cn: &str, is_ca: IsCa| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.is_ca = is_ca;
        p
    };
    let root_key = KeyPair::generate().unwrap();
    let root_params = ca_params("root", IsCa::Ca(BasicConstraints::Constrained(1)));
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, root_key);
    let mid_key = KeyPair::generate().unwrap();
    let mid_params = ca_params("intermediate", IsCa::Ca(BasicConstraints::Constrained(0)));
    let mid = mid_params.signed_by(&mid_key, &root_issuer).unwrap();
    let mid_issuer = Issuer::new(mid_params, mid_key);
    let mut leaf_params = ca_params("x", IsCa::ExplicitNoCa);
    leaf_params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{TD}/client/x").try_into().unwrap(),
    )];
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let leaf = leaf_params
        .signed_by(&KeyPair::generate().unwrap(), &mid_issuer)
        .unwrap();
    TwoLevelPki {
        root: root.der().clone(),
        intermediate: mid.der().clone(),
        leaf: leaf.der().clone(),
    }
}

/// `count` self-signed CA certificates that all bear the subject `CN=S`: forged
/// intermediates, each of which path building may try as the issuer of the others.
fn forged_intermediates(count: usize) -> Vec<CertificateDer<'static>> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    (0..count)
        .map(|_| {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name.push(rcgen::DnType::CommonName, "S");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.self_signed(&KeyPair::generate().unwrap())
                .unwrap()
                .der()
                .clone()
        })
        .collect()
}

fn too_many_intermediates(r: Result<(), rustls::Error>) -> Option<usize> {
    match r {
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(e)))) => {
            e.downcast_ref::<TooManyIntermediates>().map(|t| t.0)
        }
        _ => None,
    }
}

#[test]
fn a_chain_through_an_intermediate_is_accepted_and_a_long_one_refused_unexamined() {
    let pki = two_level_pki();
    let mut roots = RootCertStore::empty();
    roots.add(pki.root.clone()).unwrap();
    let roots = Arc::new(roots);
    let verifier = IdentityClientVerifier {
        inner: WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .unwrap(),
        policy: PeerPolicy::Serve {
            trust_domain: TD.into(),
            endpoint: Role::Dispatcher,
        },
    };
    let now = UnixTime::now();
    let client = |intermediates: &[CertificateDer<'static>]| {
        verifier
            .verify_client_cert(&pki.leaf, intermediates, now)
            .map(|_| ())
    };
    client(std::slice::from_ref(&pki.intermediate)).expect("leaf + one intermediate");
    let mut up_to_the_limit = vec![pki.intermediate.clone()];
    up_to_the_limit.extend(forged_intermediates(MAX_INTERMEDIATES - 1));
    client(&up_to_the_limit).expect("the right intermediate among forged ones, at the limit");
    let alone = client(&[]);
    assert!(
        alone.is_err() && too_many_intermediates(alone).is_none(),
        "a leaf without its intermediate is refused for its issuer, not its chain's length"
    );
    // A peer with no trusted certificate at all: forged intermediates by the hundred, which
    // webpki would try path after path. Refused for their number, before any is looked at.
    let mut forged = forged_intermediates(200);
    assert_eq!(too_many_intermediates(client(&forged)), Some(200));
    forged.truncate(MAX_INTERMEDIATES);
    forged.push(pki.intermediate.clone());
    assert_eq!(
        too_many_intermediates(client(&forged)),
        Some(MAX_INTERMEDIATES + 1),
        "one over the limit, even with the right intermediate among them"
    );
    // A server's chain likewise (a process squatting a component's port).
    let server = IdentityServerVerifier {
        roots,
        policy: PeerPolicy::Exactly(SpiffeId::new(TD, Role::Client, "x").unwrap()),
        algs: provider().signature_verification_algorithms,
        revocations: Revocations::default(),
    };
    let name = ServerName::try_from("localhost").unwrap();
    let serve = |intermediates: &[CertificateDer<'static>]| {
        server
            .verify_server_cert(&pki.leaf, intermediates, &name, &[], now)
            .map(|_| ())
    };
    assert_eq!(
        too_many_intermediates(serve(&forged_intermediates(MAX_INTERMEDIATES + 1))),
        Some(MAX_INTERMEDIATES + 1)
    );
}

/// A component's own chain is checked at start as its peers will check it: its issuer, its
/// extended key usage for its role, and the number of intermediates (a worker with four
/// started, listened and was refused by every peer; found by a review).
#[test]
fn a_components_own_chain_is_checked_as_its_peers_will() {
    let pki = two_level_pki();
    let mut roots = RootCertStore::empty();
    roots.add(pki.root.clone()).unwrap();
    let chain = vec![pki.leaf.clone(), pki.intermediate.clone()];
    assert_eq!(check_chain(&roots, &chain, Role::Client), Ok(()));
    let mut long = chain.clone();
    long.extend(forged_intermediates(MAX_INTERMEDIATES));
    let err = check_chain(&roots, &long, Role::Client).unwrap_err();
    assert!(
        err.contains("4 intermediate certificates presented"),
        "{err}"
    );
    let err = check_chain(&roots, &chain[..1], Role::Client).unwrap_err();
    assert!(err.contains("an intermediate is missing"), "{err}");
    // The leaf is for clientAuth only: no worker's.
    let err = check_chain(&roots, &chain, Role::Worker).unwrap_err();
    assert!(err.contains("extended key usage"), "{err}");
}

/// A client config as `m`'s own, expecting worker 1, offering only the key exchange `group`.
fn client_config_with_group(
    m: &TlsMaterial,
    group: &'static dyn rustls::crypto::SupportedKxGroup,
) -> Arc<rustls::ClientConfig> {
    let mut p = rustls::crypto::ring::default_provider();
    p.kx_groups = vec![group];
    let p = Arc::new(p);
    let verifier = Arc::new(IdentityServerVerifier {
        roots: m.roots.clone(),
        policy: PeerPolicy::Exactly(SpiffeId::worker(TD, 1).unwrap()),
        algs: p.signature_verification_algorithms,
        revocations: m.revocations.clone(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(m.certified.clone())));
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Arc::new(cfg)
}

#[tokio::test]
async fn key_exchange_is_x25519_or_p256_never_the_dearer_p384() {
    use rustls::crypto::ring::kx_group;
    let names: Vec<_> = provider().kx_groups.iter().map(|g| g.name()).collect();
    assert_eq!(names, KX_GROUPS, "X25519 preferred, then P-256");
    let pki = pki();
    let mut t = to_worker_1(&pki).await;
    for group in [kx_group::X25519, kx_group::SECP256R1] {
        let cfg = client_config_with_group(&t.dispatcher, group);
        let n = raw_attempt(t.addr, cfg).await;
        assert_eq!(n.ok(), Some(2), "{:?} refused", group.name());
        assert_eq!(next(&mut t.rx).await.unwrap(), *t.dispatcher.own_id());
    }
    // A hello offering only P-384 is refused before the server computes anything.
    let cfg = client_config_with_group(&t.dispatcher, kx_group::SECP384R1);
    let refused = raw_attempt(t.addr, cfg).await;
    assert!(refused.is_err(), "a P-384 handshake went through");
    assert!(next(&mut t.rx).await.is_err());
    // The listener serves others after it.
    good_peer_is_served(t.addr, &t.dispatcher, &mut t.rx).await;
}

/// A leaked key's certificate put on `ca.crl` (`certs revoke`) is refused by every peer that
/// read the list, as a client's and as a server's, while the others are served; and a
/// component whose own certificate is on it does not start.
#[tokio::test]
async fn a_revoked_certificate_is_refused_both_ways_and_cannot_be_loaded() {
    let pki = pki();
    // The holders of the leaked keys loaded theirs before the revocation.
    let leaked_worker = material(&pki.dir, "worker-1");
    let leaked_watchdog = material(&pki.dir, "watchdog");
    let revoked = crate::certs::revoke(
        &pki.dir,
        &[pki.dir.join("worker-1.crt"), pki.dir.join("watchdog.crt")],
    )
    .unwrap();
    assert_eq!(revoked.entries.len(), 2, "{:?}", revoked.entries);
    let w1 = SpiffeId::worker(TD, 1).unwrap();

    // As a server: a dispatcher that read the list refuses a worker 1 with the revoked key.
    let dispatcher = material(&pki.dir, "dispatcher");
    let (addr, mut rx) = start_worker_listener(&leaked_worker, WAIT).await;
    match dispatcher.connector(&w1, WAIT).unwrap().connect(addr).await {
        Err(HandshakeError::Tls(rustls::Error::InvalidCertificate(CertificateError::Revoked))) => {}
        other => panic!("expected the revoked server certificate refused, got {other:?}"),
    }
    assert!(matches!(
        next(&mut rx).await,
        Err(HandshakeError::Tls(rustls::Error::AlertReceived(
            AlertDescription::CertificateRevoked
        )))
    ));

    // As a client: a worker that read the list refuses the revoked watchdog, and keeps
    // serving the dispatcher.
    let worker_2 = material(&pki.dir, "worker-2");
    let (addr, mut rx) = start_worker_listener(&worker_2, WAIT).await;
    let w2 = SpiffeId::worker(TD, 2).unwrap();
    if let Ok((mut s, _)) = leaked_watchdog
        .connector(&w2, WAIT)
        .unwrap()
        .connect(addr)
        .await
    {
        let mut b = [0u8; 1];
        assert!(s.read(&mut b).await.is_err(), "a revoked client read data");
    }
    assert!(matches!(
        next(&mut rx).await,
        Err(HandshakeError::Tls(rustls::Error::InvalidCertificate(
            CertificateError::Revoked
        )))
    ));
    served_by_worker(addr, &dispatcher, &mut rx, 2).await;

    // Its own certificate revoked, a component refuses to start, and says what to do.
    let err = TlsMaterial::load_from_dir(&pki.dir, &w1).unwrap_err();
    assert!(matches!(err, TlsConfigError::Revoked { .. }), "{err}");
    assert!(err.to_string().contains("certs issue --force"), "{err}");
}

/// A clock outside the years 0-9999 gives no time to check certificates with, where
/// x509-parser's `ASN1Time::now()` panicked (and every component and client with it). Found by
/// an input-hardening review with an LD_PRELOAD clock.
#[test]
fn a_clock_outside_the_years_a_certificate_can_hold_gives_no_time() {
    use std::time::{Duration as D, UNIX_EPOCH};
    assert!(asn1_at(std::time::SystemTime::now()).is_some());
    let year_10000 = UNIX_EPOCH + D::from_secs(253_402_400_000);
    assert!(asn1_at(year_10000).is_none());
}
