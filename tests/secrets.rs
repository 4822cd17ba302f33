//! Secrets in practice: a whole run of the watchdog, logging everything down to `trace`,
//! leaves no key material in its logs; and a token key rotation while the service runs
//! loses no request.

mod common;

use common::{Pki, Proc, WAIT, field, free_port_block, pki};
use nix::sys::signal::Signal;
use securesrv::client::{Client, ClientConfig};
use securesrv::identity::SpiffeId;
use std::path::Path;

fn watchdog(pki: &Pki, log: &str) -> (Proc, u16) {
    let base = free_port_block(2);
    let cfg = format!(
        "certs_dir = {:?}\nworkers = 2\n[dispatcher]\nlisten = \"127.0.0.1:{base}\"\nworker_ping_interval_ms = 200\n\
         [watchdog]\nheartbeat_interval_ms = 300\nheartbeat_timeout_ms = 300\nrestart_backoff_initial_ms = 50\n",
        pki.dir
    );
    std::fs::write(pki.tmp.path().join("securesrv.toml"), cfg).unwrap();
    let w = Proc::spawn(
        "watchdog",
        &["--config", "securesrv.toml", "--log", log, "watchdog"],
        pki.tmp.path(),
    );
    w.wait_for_n(false, &["securesrv ready"], 1, WAIT);
    (w, base)
}

async fn client(pki: &Pki, base: u16) -> Client {
    let m = pki.material("client");
    let addr = format!("127.0.0.1:{base}").parse().unwrap();
    Client::connect(
        ClientConfig::new(&m, addr, SpiffeId::dispatcher("securesrv").unwrap()).unwrap(),
    )
    .await
    .unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Every representation of the secrets in `dir` that could leak into a log.
fn secret_needles(dir: &Path) -> Vec<(String, String)> {
    let mut needles = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        if name.ends_with(".key") && text.contains("PRIVATE KEY") {
            // Each base64 line of the PEM body.
            for line in text
                .lines()
                .filter(|l| !l.starts_with("-----") && l.len() >= 16)
            {
                needles.push((name.clone(), line.to_string()));
            }
        } else if name == "token.key" || name.ends_with(".token") {
            for hex_key in text
                .lines()
                .filter(|l| l.starts_with("key "))
                .filter_map(|l| l.split_whitespace().nth(2))
            {
                needles.push((name.clone(), hex_key.to_string()));
                needles.push((name.clone(), hex_key.to_uppercase()));
                let bytes = hex::decode(hex_key).unwrap();
                // Also as Rust would print a byte array with {:?}.
                needles.push((name.clone(), format!("{:?}", &bytes[..8])));
            }
        }
    }
    assert!(
        needles.len() > 20,
        "found too few secrets to check: {}",
        needles.len()
    );
    needles
}

#[test]
fn no_key_material_in_the_logs_of_a_full_run() {
    let pki = pki(2);
    // rustls's lines are off unless the filter names it; an operator debugging may turn them on.
    let (mut w, base) = watchdog(&pki, "trace,rustls=trace");
    rt().block_on(async {
        let c = client(&pki, base).await;
        for i in 0..20 {
            let p = format!("payload {i}");
            assert_eq!(c.call("echo", p.as_bytes()).await.unwrap(), p.as_bytes());
        }
        assert!(c.call("nosuch", b"").await.is_err());
        c.close().await;
    });
    // A refused handshake and a restart are part of the run too.
    let pid = field(
        &w.wait_log(&["component started", "component=worker-2 "], WAIT),
        "pid",
    )
    .unwrap();
    w.signal_pid(pid.parse().unwrap(), Signal::SIGKILL);
    w.wait_for_n(true, &["component up", "component=worker-2 "], 2, WAIT);
    w.signal(Signal::SIGTERM);
    assert_eq!(w.wait_exit(WAIT).and_then(|s| s.code()), Some(0));
    let logs = format!("{}{}", w.stdout(), w.stderr());
    assert!(
        logs.lines().count() > 200,
        "trace logging was not on: {} lines",
        logs.lines().count()
    );
    assert!(logs.contains("securesrv::audit"));
    assert!(
        logs.contains("rustls::"),
        "rustls's trace lines were not on"
    );
    for (file, needle) in secret_needles(&pki.dir) {
        assert!(
            !logs.contains(&needle),
            "material of {file} appears in the logs"
        );
    }
}

#[test]
fn token_key_rotation_loses_no_request() {
    let pki = pki(2);
    let (w, base) = watchdog(&pki, "info");
    let bin = common::bin();
    rt().block_on(async {
        let c = client(&pki, base).await;
        assert_eq!(c.call("echo", b"before").await.unwrap(), b"before");
        let out = std::process::Command::new(bin)
            .args([
                "certs",
                "rotate-token-key",
                "--dir",
                pki.dir.to_str().unwrap(),
                "--keep-previous-secs",
                "60",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Workers first: they come back holding the new key and the previous one ...
        for worker in ["worker-1", "worker-2"] {
            let line = w.wait_log(
                &["component started", &format!("component={worker} ")],
                WAIT,
            );
            w.signal_pid(
                field(&line, "pid").unwrap().parse().unwrap(),
                Signal::SIGKILL,
            );
            tokio::task::block_in_place(|| {
                w.wait_for_n(
                    true,
                    &["component up", &format!("component={worker} ")],
                    2,
                    WAIT,
                );
            });
            // ... so the dispatcher's tokens, still made with the previous key, verify.
            assert_eq!(c.call("echo", b"between").await.unwrap(), b"between");
        }
        // Then the dispatcher, which now signs with the new key.
        let line = w.wait_log(&["component started", "component=dispatcher "], WAIT);
        w.signal_pid(
            field(&line, "pid").unwrap().parse().unwrap(),
            Signal::SIGKILL,
        );
        tokio::task::block_in_place(|| {
            w.wait_for_n(true, &["component up", "component=dispatcher "], 2, WAIT);
        });
        for i in 0..10 {
            let p = format!("after {i}");
            assert_eq!(c.call("echo", p.as_bytes()).await.unwrap(), p.as_bytes());
        }
    });
    assert!(!w.stderr().contains("token refused"), "{}", w.stderr());
}
