//! The request path end to end, in process over real sockets on 127.0.0.1: answers, limits,
//! concurrency, and every refusal the design promises — each followed by a good request to
//! show the service keeps serving.

mod common;

use common::{
    Pki, WAIT, alive, pki, start_cluster, start_cluster_per_worker, start_cluster_staged,
    wait_pid_file,
};
use securesrv::client::{CallOptions, ClientError};
use securesrv::config::JobConfig;
use securesrv::connection::{Connection, IoLimits};
use securesrv::identity::SpiffeId;
use securesrv::message::{Bytes, ErrorCode, Forward, Message, Ping};
use securesrv::token::{Claims, MintRequest, Minter, SecretKey};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

fn job(name: &str, program: &str, args: &[&str], timeout_ms: u64, idempotent: bool) -> JobConfig {
    JobConfig {
        name: name.into(),
        program: PathBuf::from(program),
        args: args.iter().map(|s| s.to_string()).collect(),
        timeout_ms,
        max_output_bytes: Some(64 * 1024),
        idempotent,
    }
}

fn code_of(r: Result<Vec<u8>, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Remote { code, .. }) => code,
        other => panic!("expected a remote error, got {other:?}"),
    }
}

fn call_options(idempotent: bool, timeout_s: u64) -> CallOptions {
    CallOptions {
        idempotent,
        timeout: Duration::from_secs(timeout_s),
    }
}

/// A cluster of `workers` whose token key is rotated `times` (10-minute windows) just before
/// worker `before` (the dispatcher for `None`) loads its keys: the ones loaded earlier are on
/// an old key.
async fn rotated_cluster(
    workers: u32,
    before: Option<u32>,
    times: usize,
) -> (Pki, common::Cluster) {
    let pki = pki(workers);
    let dir = pki.dir.clone();
    let cluster = start_cluster_staged(
        &pki,
        workers,
        |_| {},
        |next| {
            if next == before {
                for _ in 0..times {
                    securesrv::certs::rotate_token_key(&dir, Some("securesrv"), 600_000)
                        .expect("rotate");
                }
            }
        },
    )
    .await;
    (pki, cluster)
}

async fn still_serving(c: &securesrv::client::Client) {
    assert_eq!(c.call("echo", b"still here").await.unwrap(), b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_sha256_and_a_job() {
    let pki = pki(2);
    let cluster = start_cluster(&pki, 2, |cfg| {
        cfg.jobs
            .push(job("upper", "/usr/bin/tr", &["a-z", "A-Z"], 5_000, true));
        cfg.acl.insert(
            "upper".into(),
            vec!["spiffe://securesrv/client/default".into()],
        );
    })
    .await;
    let c = cluster.client(&pki).await;
    assert_eq!(c.call("echo", b"hello").await.unwrap(), b"hello");
    assert_eq!(
        c.call("sha256", b"abc").await.unwrap(),
        b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(c.call("upper", b"shout").await.unwrap(), b"SHOUT");
    assert_eq!(c.call("sleep", b"10").await.unwrap(), b"slept 10 ms");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payload_near_the_frame_cap() {
    let pki = pki(1);
    let cluster = start_cluster(&pki, 1, |_| {}).await;
    let c = cluster.client(&pki).await;
    let cap = cluster.cfg.limits.max_frame_bytes;
    let big: Vec<u8> = (0..cap - 64).map(|i| (i % 251) as u8).collect();
    assert_eq!(c.call("echo", &big).await.unwrap(), big);
    let digest = c.call("sha256", &big).await.unwrap();
    assert_eq!(digest.len(), 64);
    // Over the cap: refused before anything is sent; the connection stays usable.
    let too_big = vec![0u8; cap + 1];
    assert!(matches!(
        c.call("echo", &too_big).await,
        Err(ClientError::TooLarge { .. })
    ));
    still_serving(&c).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_requests_each_get_their_own_answer() {
    let pki = pki(2);
    let cluster = start_cluster(&pki, 2, |_| {}).await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(cluster.client(&pki).await);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000u32 {
        let c = clients[i as usize % clients.len()].clone();
        tasks.spawn(async move {
            let payload = format!("request {i} {}", "x".repeat((i % 97) as usize));
            let op = if i % 3 == 0 { "sha256" } else { "echo" };
            let answer = c.call(op, payload.as_bytes()).await.expect("answer");
            let expected = if op == "sha256" {
                hex::encode(securesrv::token::payload_digest(payload.as_bytes())).into_bytes()
            } else {
                payload.into_bytes()
            };
            assert_eq!(answer, expected, "request {i} got another request's answer");
        });
    }
    let mut done = 0;
    while let Some(r) = tasks.join_next().await {
        r.expect("task");
        done += 1;
    }
    assert_eq!(done, 1000);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_requests_in_flight_both_ways_do_not_stall_the_links() {
    // Dozens of near-cap requests and their answers in flight at once, on one client
    // connection and on the dispatcher's link to its worker: far more in each direction than
    // the socket buffers hold. A link whose one task read only between writes deadlocked here
    // (both ends blocked writing, neither reading) until the write deadline cut it, failing
    // nearly every call with `timeout` and stalling other clients' requests meanwhile.
    let pki = pki(1);
    pki.add_client("bystander");
    let cluster = start_cluster(&pki, 1, |_| {}).await;
    let c = cluster.client(&pki).await;
    let bystander = cluster.client_as(&pki, "client-bystander").await;
    let size = cluster.cfg.limits.max_frame_bytes - 64;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..48u32 {
        let c = c.clone();
        tasks.spawn(async move {
            let payload: Vec<u8> = (0..size).map(|j| (j as u32 ^ i) as u8).collect();
            match c.call("echo", &payload).await {
                Ok(answer) if answer == payload => Ok(()),
                Ok(_) => Err(format!("request {i}: another answer")),
                Err(e) => Err(format!("request {i}: {e}")),
            }
        });
    }
    let others = tokio::spawn(async move {
        for k in 0..20 {
            let p = format!("bystander {k}");
            let answer = bystander.call("echo", p.as_bytes()).await;
            assert_eq!(answer.expect("bystander answered"), p.as_bytes());
        }
    });
    let mut failures = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r.expect("task") {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 48 failed: {failures:?}",
        failures.len()
    );
    others
        .await
        .expect("the other client was served throughout");
    still_serving(&c).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_and_unknown_op_refusals() {
    let pki = pki(1);
    pki.add_client("alice");
    pki.add_client("bob");
    let cluster = start_cluster(&pki, 1, |cfg| {
        cfg.jobs.push(job("report", "/bin/cat", &[], 5_000, false));
        cfg.acl.insert(
            "report".into(),
            vec!["spiffe://securesrv/client/alice".into()],
        );
        cfg.acl.insert(
            "sleep".into(),
            vec!["spiffe://securesrv/client/alice".into()],
        );
    })
    .await;
    let alice = cluster.client_as(&pki, "client-alice").await;
    let bob = cluster.client_as(&pki, "client-bob").await;
    assert_eq!(alice.call("report", b"r").await.unwrap(), b"r");
    assert_eq!(code_of(bob.call("report", b"r").await), ErrorCode::Denied);
    assert_eq!(code_of(bob.call("sleep", b"1").await), ErrorCode::Denied);
    assert_eq!(alice.call("sleep", b"1").await.unwrap(), b"slept 1 ms");
    assert_eq!(code_of(bob.call("rm-rf", b"/").await), ErrorCode::UnknownOp);
    assert_eq!(
        code_of(bob.call("sleep\nfake log line", b"1").await),
        ErrorCode::UnknownOp
    );
    still_serving(&bob).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_refused_by_a_worker() {
    let pki = pki(1);
    let cluster = start_cluster(&pki, 1, |_| {}).await;
    let client_m = pki.material("client");
    let w1 = SpiffeId::worker("securesrv", 1).unwrap();
    let r = client_m
        .connector(&w1, Duration::from_secs(5))
        .unwrap()
        .connect(cluster.worker_addrs[0])
        .await;
    if let Ok((stream, _)) = r {
        // TLS 1.3: the refusal arrives on the first read.
        let mut conn = Connection::new(stream, IoLimits::default());
        let _ = conn.send(&Message::Ping(Ping { nonce: vec![1; 16] })).await;
        assert!(
            conn.read_message().await.is_err(),
            "a client must not talk to a worker"
        );
    }
    let c = cluster.client(&pki).await;
    still_serving(&c).await;
    cluster.stop().await;
}

/// A peer holding the dispatcher's certificate talks to worker 1 directly.
struct RoguePeer {
    conn: Connection<securesrv::tls::ClientStream>,
    next: u64,
}

impl RoguePeer {
    async fn connect(pki: &Pki, addr: std::net::SocketAddr) -> Self {
        let m = pki.material("dispatcher");
        let w1 = SpiffeId::worker("securesrv", 1).unwrap();
        let (stream, _) = m
            .connector(&w1, Duration::from_secs(5))
            .unwrap()
            .connect(addr)
            .await
            .expect("dispatcher identity reaches the worker");
        RoguePeer {
            conn: Connection::new(stream, IoLimits::default()),
            next: 1,
        }
    }

    async fn forward(
        &mut self,
        op: &str,
        payload: &[u8],
        token: Vec<u8>,
    ) -> Result<Vec<u8>, (ErrorCode, String)> {
        let id = self.next;
        self.next += 1;
        self.conn
            .send(&Message::Forward(Forward {
                id,
                op: op.into(),
                payload: Bytes::copy_from_slice(payload),
                token,
                timeout_ms: 5_000,
            }))
            .await
            .expect("send");
        match tokio::time::timeout(WAIT, self.conn.read_message()).await {
            Ok(Ok(Some(Message::Reply(r)))) if r.id == id => Ok(r.payload.to_vec()),
            Ok(Ok(Some(Message::Error(e)))) if e.id == id => Err((e.code, e.message)),
            other => panic!("unexpected answer: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replayed_expired_and_retargeted_tokens_are_refused() {
    let pki = pki(2);
    let cluster = start_cluster(&pki, 2, |_| {}).await;
    let good_client = cluster.client(&pki).await;
    let master = securesrv::certs::load_key_file(&pki.dir.join("token.key")).unwrap();
    let w1 = SpiffeId::worker("securesrv", 1).unwrap();
    let w2 = SpiffeId::worker("securesrv", 2).unwrap();
    let minter = Minter::new(master.current(), &[w1.clone(), w2.clone()], 5_000);
    let client_id = "spiffe://securesrv/client/default";
    let mint = |aud: &SpiffeId, payload: &[u8], now: u64| {
        minter
            .mint(
                MintRequest {
                    audience: aud,
                    client: client_id,
                    op: "echo",
                    payload,
                },
                now,
            )
            .unwrap()
            .0
    };
    let now = securesrv::token::now_ms;
    let mut rogue = RoguePeer::connect(&pki, cluster.worker_addrs[0]).await;

    // The real key works, once (this is what the dispatcher does).
    let valid = mint(&w1, b"pay", now());
    assert_eq!(
        rogue.forward("echo", b"pay", valid.clone()).await.unwrap(),
        b"pay"
    );
    // Replay of the very same token.
    let (code, msg) = rogue.forward("echo", b"pay", valid).await.unwrap_err();
    assert_eq!(code, ErrorCode::InvalidToken);
    assert!(msg.contains("replay"), "{msg}");
    still_serving(&good_client).await;

    // Wrong tag.
    let mut forged = mint(&w1, b"pay", now());
    let last = forged.len() - 1;
    forged[last] ^= 0x01;
    let (code, msg) = rogue.forward("echo", b"pay", forged).await.unwrap_err();
    assert_eq!(code, ErrorCode::InvalidToken);
    assert!(msg.contains("tag"), "{msg}");

    // A token for worker 2 presented to worker 1.
    let (code, msg) = rogue
        .forward("echo", b"pay", mint(&w2, b"pay", now()))
        .await
        .unwrap_err();
    assert_eq!(code, ErrorCode::InvalidToken);
    assert!(msg.contains("tag"), "{msg}");

    // Re-targeted: signed with worker 1's key but naming worker 2 as audience.
    let w1_key = master.current().key.derive_for(&w1);
    let mut claims: Claims = securesrv::token::parse(&mint(&w1, b"pay", now()))
        .unwrap()
        .claims;
    claims.audience = w2.to_string();
    claims.request_id = [7; 16];
    let mut retargeted = Vec::new();
    claims.encode(&mut retargeted).unwrap();
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, w1_key.expose()),
        &retargeted,
    );
    retargeted.extend_from_slice(tag.as_ref());
    let (code, msg) = rogue.forward("echo", b"pay", retargeted).await.unwrap_err();
    assert_eq!(code, ErrorCode::InvalidToken);
    assert!(msg.contains("audience"), "{msg}");

    // Signed with worker 1's key (as only the dispatcher can) but naming a client of another
    // trust domain, which no handshake at the dispatcher lets in: the worker's own ACL check
    // refuses it, for a built-in open to every client too (before, it ran the request).
    let mut outsider = securesrv::token::parse(&mint(&w1, b"pay", now()))
        .unwrap()
        .claims;
    outsider.client = "spiffe://other/client/default".into();
    outsider.request_id = [8; 16];
    let mut foreign = Vec::new();
    outsider.encode(&mut foreign).unwrap();
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, w1_key.expose()),
        &foreign,
    );
    foreign.extend_from_slice(tag.as_ref());
    let (code, msg) = rogue.forward("echo", b"pay", foreign).await.unwrap_err();
    assert_eq!(code, ErrorCode::Denied, "{msg}");

    // Expired.
    let stale = mint(&w1, b"pay", now() - 60_000);
    let (code, msg) = rogue.forward("echo", b"pay", stale).await.unwrap_err();
    assert_eq!(code, ErrorCode::InvalidToken);
    assert!(msg.contains("expired"), "{msg}");

    // Payload swapped after signing.
    let (code, msg) = rogue
        .forward("echo", b"other", mint(&w1, b"pay", now()))
        .await
        .unwrap_err();
    assert_eq!(code, ErrorCode::InvalidToken);
    assert!(msg.contains("payload"), "{msg}");

    // A key that is not ours at all.
    let stranger = Minter::new(
        &securesrv::token::KeyEntry {
            id: 1,
            key: SecretKey::from_bytes([9; 32]),
            not_after_ms: None,
        },
        std::slice::from_ref(&w1),
        5_000,
    );
    let (t, _) = stranger
        .mint(
            MintRequest {
                audience: &w1,
                client: client_id,
                op: "echo",
                payload: b"pay",
            },
            now(),
        )
        .unwrap();
    let (code, _) = rogue.forward("echo", b"pay", t).await.unwrap_err();
    assert_eq!(code, ErrorCode::InvalidToken);

    // Garbage where the token should be.
    let (code, _) = rogue
        .forward("echo", b"pay", vec![1, 2, 3])
        .await
        .unwrap_err();
    assert_eq!(code, ErrorCode::InvalidToken);

    // The worker and the service are unharmed.
    assert_eq!(
        rogue
            .forward("echo", b"ok", mint(&w1, b"ok", now()))
            .await
            .unwrap(),
        b"ok"
    );
    still_serving(&good_client).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_left_on_an_old_token_key_costs_a_retry_not_a_refusal() {
    // The token key is rotated twice after worker 1 has loaded its key and before worker 2
    // and the dispatcher load theirs: worker 1 knows neither the current key nor the previous
    // one. It refuses every token; that is the dispatcher's problem, not the client's, and
    // the request did not run, so it goes to worker 2.
    let (pki, cluster) = rotated_cluster(2, Some(2), 2).await;
    let c = cluster.client(&pki).await;
    for i in 0..20 {
        let p = format!("request {i}");
        assert_eq!(
            c.call("echo", p.as_bytes())
                .await
                .expect("answered by worker 2"),
            p.as_bytes()
        );
    }
    // With worker 2 gone, no worker takes the request: once the wait for a worker is over, a
    // clear internal error, not `invalid_token` (which reads as the client's fault) nor a
    // plain `unavailable`.
    cluster.stop_worker(2);
    let started = std::time::Instant::now();
    let err = c
        .call("echo", b"x")
        .await
        .expect_err("no worker accepts our tokens");
    let ClientError::Remote { code, message } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(*code, ErrorCode::Internal, "{message}");
    assert!(message.contains("token"), "{message}");
    eprintln!(
        "refused everywhere after {:?}: {message}",
        started.elapsed()
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_restarted_before_a_worker_after_a_rotation_signs_with_the_previous_key() {
    // `certs rotate-token-key`, then the dispatcher restarted (a crash, a hang the watchdog
    // ended) before the workers: the dispatcher signs with the new key, which they do not
    // know, and every request was refused. The dispatcher now signs a refusing worker's tokens
    // with the previous key, which workers accept until its window ends.
    // Six workers: a request sent alone meets each of them switching in turn (ties rotate),
    // which used up its six attempts.
    let (pki, cluster) = rotated_cluster(6, None, 1).await;
    let c = cluster.client(&pki).await;
    let first = c.call_with("echo", b"first", call_options(false, 20)).await;
    assert_eq!(first.expect("the first request"), b"first");
    // At once: those sent before the worker's first refusal were signed with the new key too,
    // and are refused after the dispatcher has switched to the previous one.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..20 {
        let c = c.clone();
        calls.spawn(async move {
            let p = format!("request {i}");
            let answer = c
                .call_with("echo", p.as_bytes(), call_options(false, 20))
                .await;
            (p, answer)
        });
    }
    while let Some(done) = calls.join_next().await {
        let (p, answer) = done.expect("task");
        assert_eq!(answer.expect("answered"), p.as_bytes());
    }
    for i in 0..5 {
        let p = format!("then {i}");
        let answer = c.call("echo", p.as_bytes()).await.expect("answered");
        assert_eq!(answer, p.as_bytes());
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_worker_available_is_a_bounded_unavailable() {
    let pki = pki(2);
    let cluster = start_cluster(&pki, 2, |cfg| cfg.dispatcher.unavailable_wait_ms = 300).await;
    let c = cluster.client(&pki).await;
    still_serving(&c).await;
    cluster.stop_worker(1);
    cluster.stop_worker(2);
    assert!(
        cluster
            .dispatcher
            .pool()
            .wait_until(|available| available == 0, common::WAIT)
            .await,
        "the dispatcher noticed both workers are gone"
    );
    let started = std::time::Instant::now();
    let r = c
        .call_with("echo", b"anyone?", call_options(true, 20))
        .await;
    let took = started.elapsed();
    assert_eq!(code_of(r), ErrorCode::Unavailable);
    assert!(took < Duration::from_secs(10), "unavailable took {took:?}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_the_dispatcher_shortened_says_so() {
    let pki = pki(1);
    let cluster = start_cluster(&pki, 1, |cfg| {
        cfg.limits.max_request_timeout_ms = 1_000;
        cfg.limits.request_timeout_ms = 1_000;
        cfg.jobs.push(job("nap", "/bin/sleep", &["5"], 200, true));
        cfg.acl.insert("nap".into(), vec!["*".into()]);
    })
    .await;
    let c = cluster.client(&pki).await;
    let remote_timeout = |r: Result<Vec<u8>, ClientError>| match r {
        Err(ClientError::Remote { code, message }) => {
            assert_eq!(code, ErrorCode::Timeout, "{message}");
            message
        }
        other => panic!("expected a timeout, got {other:?}"),
    };
    // Asked for 20 s, given 1 s: the error says which limit cut it short.
    let message = remote_timeout(c.call_with("sleep", b"3000", call_options(true, 20)).await);
    assert!(
        message.contains("asked for")
            && message.contains("this dispatcher allows at most 1000 ms")
            && message.contains("limits.max_request_timeout_ms"),
        "{message}"
    );
    // Asked for 20 s, but a job killed at its own 200 ms timeout: not the dispatcher's limit,
    // and not said to be.
    let message = remote_timeout(c.call_with("nap", b"", call_options(true, 20)).await);
    assert!(message.contains("killed"), "{message}");
    assert!(!message.contains("allows at most"), "{message}");
    // Asked for the limit itself, and ran out: not shortened, nothing to say about the limit.
    // (A request of its own: the library's call would give up at that deadline itself.)
    let mut conn = raw_client(&pki, &cluster).await;
    conn.send(&request(7, "sleep", b"3000", Some(1_000)))
        .await
        .unwrap();
    match tokio::time::timeout(WAIT, conn.read_message()).await {
        Ok(Ok(Some(Message::Error(e)))) if e.id == 7 => {
            assert_eq!(e.code, ErrorCode::Timeout, "{}", e.message);
            assert!(!e.message.contains("allows at most"), "{}", e.message);
        }
        other => panic!("expected the timeout of request 7, got {other:?}"),
    }
    still_serving(&c).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_outlives_its_timeout_is_killed_and_reported() {
    let pki = pki(1);
    let cluster = start_cluster(&pki, 1, |cfg| {
        cfg.jobs
            .push(job("hang", "/bin/sleep", &["30"], 300, false));
        cfg.jobs
            .push(job("fail", "/bin/sh", &["-c", "exit 7"], 3_000, false));
        cfg.acl.insert("hang".into(), vec!["*".into()]);
        cfg.acl.insert("fail".into(), vec!["*".into()]);
    })
    .await;
    let c = cluster.client(&pki).await;
    let started = std::time::Instant::now();
    match c.call("hang", b"").await {
        Err(ClientError::Remote { code, message }) => {
            assert_eq!(code, ErrorCode::Timeout);
            assert!(message.contains("killed"), "{message}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    match c.call("fail", b"").await {
        Err(ClientError::Remote { code, message }) => {
            assert_eq!(code, ErrorCode::OpFailed);
            assert!(message.contains("status 7"), "{message}");
        }
        other => panic!("expected op_failed, got {other:?}"),
    }
    still_serving(&c).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_kills_the_jobs_still_running_after_its_drain() {
    let pki = pki(1);
    let pidfile = pki.tmp.path().join("grandchild.pid");
    let script = format!("sleep 120 & echo $! > '{}'; wait", pidfile.display());
    let cluster = start_cluster(&pki, 1, |cfg| {
        cfg.watchdog.stop_grace_ms = 1_000;
        cfg.jobs
            .push(job("spawn", "/bin/sh", &["-c", &script], 60_000, false));
        cfg.acl.insert("spawn".into(), vec!["*".into()]);
    })
    .await;
    let c = cluster.client(&pki).await;
    // The request would run for a minute: the worker's drain (0.8 s) does not wait for it.
    let call = tokio::spawn(async move {
        let opts = call_options(false, 60);
        c.call_with("spawn", b"", opts).await
    });
    let pid = tokio::task::spawn_blocking(move || wait_pid_file(&pidfile, WAIT))
        .await
        .unwrap();
    cluster.stop_worker(1);
    // Well before the request's own deadline would drop the job.
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    while alive(pid) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = alive(pid);
    if left {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    call.abort();
    cluster.stop().await;
    assert!(!left, "job process {pid} outlived its stopped worker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_identity_may_ping_but_not_send_requests() {
    let pki = pki(1);
    let cluster = start_cluster(&pki, 1, |_| {}).await;
    let (mut conn, pong) = pki
        .watchdog_ping(&SpiffeId::dispatcher("securesrv").unwrap(), cluster.addr)
        .await;
    assert_eq!(pong.workers_available, Some(1));
    conn.send(&Message::Request(securesrv::message::Request {
        id: 1,
        op: "echo".into(),
        payload: Bytes::from_static(b"x"),
        timeout_ms: None,
    }))
    .await
    .unwrap();
    match conn.read_message().await.unwrap() {
        Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::Denied),
        other => panic!("expected denied, got {other:?}"),
    }
    cluster.stop().await;
}

/// The largest echo a frame holds is answered: a reply's envelope is smaller than its
/// request's, so an echo always fits on the way back (a worst-case allowance for the reply's
/// envelope refused the last few bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_echo_a_frame_holds_is_answered() {
    let pki = pki(1);
    let cluster = start_cluster(&pki, 1, |_| {}).await;
    let c = cluster.client(&pki).await;
    let max = securesrv::frame::DEFAULT_MAX_FRAME;
    // The longest payload whose request (as the client sends it, with a large id) fits.
    let fits = |len: usize| {
        let m = Message::Request(securesrv::message::Request {
            id: u64::MAX,
            op: "echo".into(),
            payload: vec![0u8; len].into(),
            timeout_ms: Some(u32::MAX),
        });
        securesrv::frame::encode_to_vec(&m, max).is_ok()
    };
    let mut len = max - 64;
    while fits(len + 1) {
        len += 1;
    }
    assert!(max - len < 64, "{len}");
    let payload = vec![b'e'; len];
    assert_eq!(c.call("echo", &payload).await.expect("answered"), payload);
    cluster.stop().await;
}

/// An idle timeout of 1.5 s, with the pings that keep links up well inside it (as
/// validation requires).
fn idle_after_1_5_s(cfg: &mut securesrv::config::Config) {
    cfg.limits.idle_timeout_ms = 1_500;
    cfg.dispatcher.worker_ping_interval_ms = 200;
    cfg.watchdog.heartbeat_interval_ms = 500;
    cfg.watchdog.heartbeat_timeout_ms = 500;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_outlasts_the_idle_timeout_is_answered() {
    // A client waiting for a long request sends nothing meanwhile; that is not idleness. The
    // dispatcher used to close it at the idle timeout and drop the answer.
    let pki = pki(1);
    let cluster = start_cluster(&pki, 1, |cfg| {
        idle_after_1_5_s(cfg);
        // An idle connection closes after a drain of 4/5 of this: 0.4 s, not 4 s.
        cfg.watchdog.stop_grace_ms = 500;
    })
    .await;
    let c = cluster.client(&pki).await;
    let opts = call_options(false, 20);
    let answer = c.call_with("sleep", b"3500", opts).await;
    assert_eq!(answer.unwrap(), b"slept 3500 ms");
    still_serving(&c).await;
    cluster.stop().await;
}

/// A raw mTLS connection to the cluster's dispatcher with the default client's identity.
async fn raw_client(
    pki: &Pki,
    cluster: &common::Cluster,
) -> Connection<securesrv::tls::ClientStream> {
    let (stream, _) = pki
        .material("client")
        .connector(&SpiffeId::dispatcher("securesrv").unwrap(), WAIT)
        .unwrap()
        .connect(cluster.addr)
        .await
        .unwrap();
    Connection::new(stream, IoLimits::default())
}

/// A request message.
fn request(id: u64, op: &str, payload: &'static [u8], timeout_ms: Option<u32>) -> Message {
    Message::Request(securesrv::message::Request {
        id,
        op: op.into(),
        payload: Bytes::from_static(payload),
        timeout_ms,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_dispatcher_answers_refuses_then_says_it_read_nothing_more() {
    // Told to stop while a client's request runs: the request is answered, one sent meanwhile
    // is refused `shutting_down`, and the connection ends with an id-0 `shutting_down` (every
    // request read was answered; anything else was not read and may go elsewhere), then a
    // clean TLS close.
    let pki = pki(1);
    let cluster = start_cluster(&pki, 1, |_| {}).await;
    let mut conn = raw_client(&pki, &cluster).await;
    let request = |id, op: &str, payload: &'static [u8]| request(id, op, payload, None);
    conn.send(&request(1, "sleep", b"500")).await.unwrap();
    let until = std::time::Instant::now() + WAIT;
    while cluster.dispatcher.pool().slots()[0].outstanding() == 0 {
        assert!(std::time::Instant::now() < until, "the sleep never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cluster.stop_dispatcher();
    tokio::time::sleep(Duration::from_millis(100)).await;
    conn.send(&request(2, "echo", b"late")).await.unwrap();
    let mut heard = Vec::new();
    let end = loop {
        match tokio::time::timeout(WAIT, conn.read_message()).await {
            Ok(Ok(Some(m))) => heard.push(m),
            Ok(end) => break end,
            Err(_) => panic!("no end after {heard:?}"),
        }
    };
    assert!(
        matches!(end, Ok(None)),
        "not a clean close: {end:?} after {heard:?}"
    );
    assert!(
        heard.iter().any(
            |m| matches!(m, Message::Reply(r) if r.id == 1 && r.payload[..] == b"slept 500 ms"[..])
        ),
        "{heard:?}"
    );
    assert!(
        heard.iter().any(
            |m| matches!(m, Message::Error(e) if e.id == 2 && e.code == ErrorCode::ShuttingDown)
        ),
        "{heard:?}"
    );
    assert!(
        matches!(heard.last(), Some(Message::Error(e)) if e.id == 0 && e.code == ErrorCode::ShuttingDown),
        "{heard:?}"
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_never_sends_a_worker_more_than_it_runs() {
    // With the dispatcher's per-worker limit equal to what the worker runs at once, requests
    // picked at the same moment on several threads could all pass the limit check before any
    // was counted, and the worker refused the excess `overloaded`. They wait instead.
    let pki = pki(1);
    let cluster = start_cluster(&pki, 1, |cfg| {
        cfg.dispatcher.max_in_flight_per_worker = 2;
        cfg.limits.worker_max_concurrent = 2;
        cfg.limits.max_in_flight_per_identity = Some(1024);
        cfg.dispatcher.unavailable_wait_ms = 20_000;
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(cluster.client(&pki).await);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..400usize {
        let c = clients[i % clients.len()].clone();
        tasks.spawn(async move { c.call("echo", b"burst").await });
    }
    let mut refused = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r.expect("task") {
            Ok(answer) => assert_eq!(answer, b"burst"),
            Err(e) => refused.push(e.to_string()),
        }
    }
    assert!(
        refused.is_empty(),
        "{} refused: {:?}",
        refused.len(),
        refused.first()
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_refusing_overloaded_sends_the_request_elsewhere_or_back_at_once() {
    // Worker 1 runs one request at a time while the dispatcher believes it takes four (as
    // when requests whose client stopped waiting still run there). Its `overloaded` means the
    // request did not run, so it goes to worker 2, which has room, even when it is not
    // idempotent; the client saw `overloaded` before.
    let pki = pki(2);
    let cluster = start_cluster_per_worker(
        &pki,
        2,
        |cfg| {
            cfg.dispatcher.max_in_flight_per_worker = 4;
            cfg.limits.worker_max_concurrent = 4;
            cfg.limits.max_in_flight_per_identity = Some(1024);
            cfg.dispatcher.unavailable_wait_ms = 20_000;
        },
        |id, cfg| {
            if id == 1 {
                cfg.dispatcher.max_in_flight_per_worker = 1;
                cfg.limits.worker_max_concurrent = 1;
            }
        },
    )
    .await;
    let c = cluster.client(&pki).await;
    let not_idempotent = call_options(false, 20);
    // Four at once: least outstanding load sends two to each worker, and worker 1 refuses
    // one of its two.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let c = c.clone();
        let opts = not_idempotent;
        tasks.spawn(async move { c.call_with("sleep", b"2000", opts).await });
    }
    // While they run, worker 1 has one and worker 2 the other three: the one worker 1
    // refused went to worker 2.
    let pool = cluster.dispatcher.pool();
    common::until("1 and 3 outstanding", || {
        assert!(
            !tasks.is_empty() && tasks.try_join_next().is_none(),
            "a call ended early"
        );
        (pool.slots()[0].outstanding(), pool.slots()[1].outstanding()) == (1, 3)
    })
    .await;
    while let Some(r) = tasks.join_next().await {
        assert_eq!(r.expect("task").expect("answered"), b"slept 2000 ms");
    }
    // With worker 2 gone, worker 1's refusal comes back to the client at once, not after the
    // 20 s wait for a worker. (Before, it came back at once too, but was never retried.)
    cluster.stop_worker(2);
    assert!(
        cluster
            .dispatcher
            .pool()
            .wait_until(|available| available == 1, WAIT)
            .await,
        "the dispatcher noticed worker 2 is gone"
    );
    let give_up = std::time::Instant::now() + WAIT;
    let (code, message, took) = loop {
        assert!(
            std::time::Instant::now() < give_up,
            "worker 1 never refused while busy"
        );
        let busy = {
            let c = c.clone();
            tokio::spawn(async move { c.call_with("sleep", b"1000", not_idempotent).await })
        };
        let mut refused = None;
        while refused.is_none() && !busy.is_finished() {
            let asked = std::time::Instant::now();
            match c.call_with("echo", b"x", not_idempotent).await {
                Err(ClientError::Remote { code, message }) => {
                    refused = Some((code, message, asked.elapsed()))
                }
                Ok(_) => {} // worker 1 is not running the sleep (yet, or any more)
                Err(e) => panic!("{e:?}"),
            }
        }
        let slept = busy.await.expect("task");
        if let Some(refusal) = refused {
            assert_eq!(slept.expect("the sleep ran"), b"slept 1000 ms");
            break refusal;
        }
        // The sleep reached worker 1 while an echo ran there, and was refused itself.
        assert_eq!(code_of(slept), ErrorCode::Overloaded);
    };
    assert_eq!(code, ErrorCode::Overloaded, "{message}");
    assert!(
        took < Duration::from_secs(10),
        "the refusal waited {took:?}"
    );
    still_serving(&c).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_worker_down_one_identity_cannot_take_what_is_left() {
    // The default per-identity limit is half the capacity of every configured worker: 4 of
    // 2 x 4 here. With worker 2 down, that was all of worker 1, and one client holding it kept
    // every other client waiting. The share now follows the workers linked: 2 of 4.
    let pki = pki(2);
    pki.add_client("alice");
    let cluster = start_cluster(&pki, 2, |cfg| {
        cfg.dispatcher.max_in_flight_per_worker = 4;
        cfg.limits.worker_max_concurrent = 4;
        cfg.dispatcher.unavailable_wait_ms = 20_000;
    })
    .await;
    cluster.stop_worker(2);
    assert!(
        cluster
            .dispatcher
            .pool()
            .wait_until(|available| available == 1, WAIT)
            .await,
        "the dispatcher noticed worker 2 is gone"
    );
    let greedy = cluster.client(&pki).await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let c = greedy.clone();
        tasks.spawn(async move { c.call_with("sleep", b"3000", call_options(false, 20)).await });
    }
    // Wait until the greedy client's share is taken (each check is a request of its own).
    common::until("the sleeps start", || {
        cluster.dispatcher.pool().slots()[0].outstanding() >= 2
    })
    .await;
    let alice = cluster.client_as(&pki, "client-alice").await;
    let started = std::time::Instant::now();
    assert_eq!(alice.call("echo", b"me too").await.unwrap(), b"me too");
    let waited = started.elapsed();
    let mut refused = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r.expect("task") {
            Ok(answer) => assert_eq!(answer, b"slept 3000 ms"),
            Err(ClientError::Remote { code, message }) => refused.push((code, message)),
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(refused.len(), 2, "{refused:?}");
    for (code, message) in &refused {
        assert_eq!(*code, ErrorCode::Overloaded, "{message}");
        assert!(message.contains("workers are down"), "{message}");
    }
    assert!(waited < Duration::from_secs(2), "alice waited {waited:?}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_a_stopping_worker_refuses_goes_to_it_once_restarted() {
    // A single worker told to stop refuses new requests `shutting_down` while it drains; the
    // dispatcher kept that worker excluded for the rest of the request, so the request waited
    // out the whole wait for a worker and got `unavailable` although the worker was back
    // long before. It now excludes only that link, and the restarted worker takes it.
    let pki = pki(1);
    let mut cluster = start_cluster(&pki, 1, |cfg| {
        cfg.dispatcher.unavailable_wait_ms = 20_000;
    })
    .await;
    let c = cluster.client(&pki).await;
    // Keeps the stopping worker draining, its link up, for a while.
    let draining = {
        let c = c.clone();
        tokio::spawn(async move { c.call_with("sleep", b"1500", call_options(false, 20)).await })
    };
    common::until("the sleep starts", || {
        cluster.dispatcher.pool().slots()[0].outstanding() > 0
    })
    .await;
    cluster.stop_worker(1);
    // Its successor binds the port once the old worker has given it up, which it does as
    // it begins to stop.
    cluster.restart_worker(1).await;
    let started = std::time::Instant::now();
    let answer = c
        .call_with("echo", b"still here?", call_options(false, 30))
        .await;
    let took = started.elapsed();
    assert_eq!(
        answer.expect("answered by the restarted worker"),
        b"still here?"
    );
    assert!(took < Duration::from_secs(15), "waited {took:?}");
    assert_eq!(
        draining.await.expect("task").expect("drained"),
        b"slept 1500 ms"
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_refuses_the_dispatcher_after_the_handshake_is_dialled_with_backoff() {
    // In TLS 1.3 the dispatcher's side of the handshake ends before the worker has judged
    // its certificate. A worker refusing it (here: worker 1's certificate on a listener that
    // takes only clients) closed every link at once, and the dispatcher, counting the link as
    // made, dialled again every 50 ms. Links the worker never answered on now back off.
    use securesrv::identity::Role;
    let pki = pki(1);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = pki
        .material("worker-1")
        .acceptor(Role::Dispatcher, WAIT)
        .unwrap();
    let dials = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let fake = {
        let dials = dials.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                dials.lock().unwrap().push(std::time::Instant::now());
                let a = acceptor.clone();
                tokio::spawn(async move {
                    let refused = a.accept(tcp).await;
                    assert!(refused.is_err(), "the dispatcher was accepted");
                });
            }
        })
    };
    let mut cfg = securesrv::config::Config {
        certs_dir: pki.dir.clone(),
        ..Default::default()
    };
    cfg.worker.push(securesrv::config::WorkerEntry {
        id: 1,
        listen: addr,
    });
    cfg.dispatcher.listen = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    cfg.validate().unwrap();
    let (d, m) = securesrv::dispatcher::Dispatcher::load(std::sync::Arc::new(cfg)).unwrap();
    let links = tokio_util::sync::CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    d.start_links(&m, &links, &tracker).unwrap();
    common::until("5 dials", || dials.lock().unwrap().len() >= 5).await;
    links.cancel();
    fake.abort();
    let dials = dials.lock().unwrap().clone();
    // 50 + 100 + 200 + 400 ms of backoff at least between the first and the fifth.
    let span = dials[4] - dials[0];
    assert!(
        span >= Duration::from_millis(700),
        "5 dials within {span:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_long_request_the_client_gets_a_whole_idle_timeout() {
    // The idle clock restarted each time it ran out while the request ran, and not when the
    // request ended: a 2.9 s request with a 1.5 s idle timeout was answered at 2.9 s and the
    // connection closed as idle at 3.0 s. It now counts from the answer.
    let pki = pki(1);
    let cluster = start_cluster(&pki, 1, idle_after_1_5_s).await;
    let mut conn = raw_client(&pki, &cluster).await;
    let request = |id, op: &str, payload: &'static [u8]| request(id, op, payload, Some(20_000));
    conn.send(&request(1, "sleep", b"2900")).await.unwrap();
    let answer = tokio::time::timeout(WAIT, conn.read_message())
        .await
        .unwrap();
    assert!(
        matches!(&answer, Ok(Some(Message::Reply(r))) if r.id == 1),
        "{answer:?}"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    conn.send(&request(2, "echo", b"next")).await.unwrap();
    let answer = tokio::time::timeout(WAIT, conn.read_message())
        .await
        .unwrap();
    assert!(
        matches!(&answer, Ok(Some(Message::Reply(r))) if r.id == 2 && r.payload[..] == b"next"[..]),
        "{answer:?}"
    );
    cluster.stop().await;
}

/// A TCP relay in front of a worker whose direction towards the worker can be held: while
/// held, what the dispatcher writes to the worker backs up in the socket buffers and then in
/// the dispatcher's queue for the link. Returns the relay's address. (Not async: it is set up
/// from a configuration tweak, inside the runtime.)
fn holdable_relay(
    to: std::net::SocketAddr,
    held: tokio::sync::watch::Receiver<bool>,
) -> std::net::SocketAddr {
    holdable_counting_relay(to, held, Arc::default())
}

/// [`holdable_relay`], adding the bytes it passes on to the worker to `passed`.
fn holdable_counting_relay(
    to: std::net::SocketAddr,
    held: tokio::sync::watch::Receiver<bool>,
    passed: Arc<AtomicUsize>,
) -> std::net::SocketAddr {
    // A small receive buffer (inherited by accepted sockets): loopback's autotuning would let
    // the held direction take up to 32 MiB before the dispatcher's writes block.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(64).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = tokio::net::TcpStream::connect(to).await else {
                continue;
            };
            let (mut from_dispatcher, mut to_dispatcher) = inbound.into_split();
            let (mut from_worker, mut to_worker) = outbound.into_split();
            let (mut held, passed) = (held.clone(), passed.clone());
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    if held.wait_for(|h| !h).await.is_err() {
                        return;
                    }
                    match from_dispatcher.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if to_worker.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                            passed.fetch_add(n, Ordering::SeqCst);
                        }
                    }
                }
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut from_worker, &mut to_dispatcher).await;
            });
        }
    });
    addr
}

/// One identity's large requests do not hold up another's small one on the shared link to a
/// worker: identities take turns there. Written in the order they came, bob's echo waited
/// behind every 1 MB echo alice had queued before it (0.9 s behind 128 of them with
/// `securesrv bench`). The link is held (a relay stops passing it on) until all of alice's
/// requests and then bob's are queued for the worker; judged by order, not time: only the
/// few of alice's requests already in the socket buffers are answered before bob's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_take_turns_on_a_worker_link() {
    const ALICE: usize = 64;
    let pki = pki(1);
    pki.add_client("alice");
    pki.add_client("bob");
    let (hold, held) = tokio::sync::watch::channel(false);
    let cluster = start_cluster(&pki, 1, |cfg| {
        cfg.worker[0].listen = holdable_relay(cfg.worker[0].listen, held);
        // No ping goes through while the link is held: not a worker to give up on.
        cfg.dispatcher.worker_ping_interval_ms = 20_000;
    })
    .await;
    let slot = cluster.dispatcher.pool().slots()[0].clone();
    let alice = cluster.client_as(&pki, "client-alice").await;
    let bob = cluster.client_as(&pki, "client-bob").await;
    still_serving(&bob).await;

    hold.send_replace(true);
    let answered = Arc::new(AtomicUsize::new(0));
    let payload = Bytes::from(vec![5u8; 1_000_000]);
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..ALICE {
        let (alice, answered, payload) = (alice.clone(), answered.clone(), payload.clone());
        calls.spawn(async move {
            let answer = alice.call_bytes("echo", payload.clone(), call_options(true, 60));
            assert_eq!(answer.await.expect("alice's echo"), payload);
            answered.fetch_add(1, Ordering::SeqCst);
        });
    }
    common::until("alice's requests queued for the worker", || {
        slot.outstanding() == ALICE
    })
    .await;
    let bobs = tokio::spawn({
        let (bob, answered) = (bob.clone(), answered.clone());
        async move {
            assert_eq!(bob.call("echo", b"bob").await.expect("bob's echo"), b"bob");
            answered.load(Ordering::SeqCst)
        }
    });
    common::until("bob's request queued for the worker", || {
        slot.outstanding() == ALICE + 1
    })
    .await;
    hold.send_replace(false);
    let before_bob = bobs.await.expect("bob's call");
    while let Some(r) = calls.join_next().await {
        r.expect("alice's call");
    }
    eprintln!("alice's answers before bob's: {before_bob} of {ALICE}");
    assert!(
        before_bob < ALICE / 2,
        "bob's echo waited for {before_bob} of alice's {ALICE} 1 MB echoes"
    );
    still_serving(&bob).await;
    cluster.stop().await;
}

/// Makes `n` concurrent, non-idempotent echo calls of 1 MB with a 300 ms deadline, while
/// something holds them up, and checks that each times out: in the client, or also at the
/// dispatcher if `at_dispatcher_too`.
async fn calls_of_1_mb_that_time_out(
    client: &securesrv::client::Client,
    n: usize,
    at_dispatcher_too: bool,
) {
    let payload = Bytes::from(vec![5u8; 1_000_000]);
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (client, payload) = (client.clone(), payload.clone());
        calls.spawn(async move {
            let opts = CallOptions {
                idempotent: false,
                timeout: Duration::from_millis(300),
            };
            client.call_bytes("echo", payload, opts).await
        });
    }
    while let Some(r) = calls.join_next().await {
        match r.expect("call") {
            Err(ClientError::Remote {
                code: ErrorCode::Timeout,
                ..
            }) if at_dispatcher_too => {}
            Err(ClientError::Timeout(_)) => {}
            other => panic!("expected a timeout while held up, got {other:?}"),
        }
    }
}

/// A request whose deadline passed while its frame still waited for the worker link is not
/// sent to the worker: nobody waits for its answer. They used to be written anyway, each a
/// megabyte here, for the worker to run, while other clients' requests waited behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_their_deadline_are_not_sent_to_the_worker() {
    const ALICE: usize = 48;
    let pki = pki(1);
    pki.add_client("alice");
    let (hold, held) = tokio::sync::watch::channel(false);
    let passed = Arc::new(AtomicUsize::new(0));
    let cluster = start_cluster(&pki, 1, |cfg| {
        cfg.worker[0].listen = holdable_counting_relay(cfg.worker[0].listen, held, passed.clone());
        // No ping goes through while the link is held: not a worker to give up on.
        cfg.dispatcher.worker_ping_interval_ms = 20_000;
    })
    .await;
    let alice = cluster.client_as(&pki, "client-alice").await;
    still_serving(&alice).await;

    hold.send_replace(true);
    calls_of_1_mb_that_time_out(&alice, ALICE, true).await;
    // The client's deadline can pass before the dispatcher's, which counts from when it read
    // the request.
    let slot = cluster.dispatcher.pool().slots()[0].clone();
    common::until("the dispatcher's deadlines of alice's requests", || {
        slot.outstanding() == 0
    })
    .await;
    // Some frames were written before the link filled up; those reach the worker.
    let before = passed.load(Ordering::SeqCst);
    hold.send_replace(false);
    still_serving(&alice).await;
    let after = passed.load(Ordering::SeqCst) - before;
    eprintln!("passed to the worker once released: {after} bytes (before: {before})");
    assert!(
        after < ALICE * 1_000_000 / 2,
        "{after} bytes of requests past their deadline went to the worker"
    );
    cluster.stop().await;
}

/// The client library does not send a request whose call has already timed out: a request
/// still waiting for the connection's writer when its deadline passes is dropped. It used to
/// be written anyway, and the dispatcher, which counts the time left from when it reads the
/// request, then ran it for nobody. Here the client's direction to the dispatcher is held (a
/// relay stops passing it on) while 48 calls of 1 MB time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_does_not_send_requests_whose_call_timed_out() {
    const CALLS: usize = 48;
    let pki = pki(1);
    let cluster = start_cluster(&pki, 1, |_| {}).await;
    let (hold, held) = tokio::sync::watch::channel(false);
    let passed = Arc::new(AtomicUsize::new(0));
    let relay = holdable_counting_relay(cluster.addr, held, passed.clone());
    let cfg = securesrv::client::ClientConfig::new(
        &pki.material("client"),
        relay,
        SpiffeId::dispatcher("securesrv").unwrap(),
    )
    .unwrap();
    let client = securesrv::client::Client::connect(cfg).await.unwrap();
    still_serving(&client).await;

    hold.send_replace(true);
    calls_of_1_mb_that_time_out(&client, CALLS, false).await;
    // Some frames were written before the connection filled up; those reach the dispatcher.
    let before = passed.load(Ordering::SeqCst);
    hold.send_replace(false);
    still_serving(&client).await;
    let after = passed.load(Ordering::SeqCst) - before;
    eprintln!("passed to the dispatcher once released: {after} bytes (before: {before})");
    assert!(
        after < CALLS * 1_000_000 / 2,
        "{after} bytes of requests whose calls had timed out went to the dispatcher"
    );
    cluster.stop().await;
}
