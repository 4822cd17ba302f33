//! An independent client, written in Python from docs/PROTOCOL.md alone (it never read this
//! crate's source), runs its conformance suite against a real dispatcher. Skipped, with a
//! message, where python3 is not installed.

mod common;

use common::{pki, start_cluster};
use std::path::Path;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_written_from_the_spec_conforms() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("SKIPPED: python3 is not installed");
        return;
    }
    let pki = pki(1);
    let cluster = start_cluster(&pki, 1, |_| {}).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/independent/client.py");
    let dir = pki.dir.clone();
    let addr = cluster.addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .args(["--ca", dir.join("ca.crt").to_str().unwrap()])
            .args(["--cert", dir.join("client.crt").to_str().unwrap()])
            .args(["--key", dir.join("client.key").to_str().unwrap()])
            .args(["--connect", &addr, "conformance"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(
        out.status.success(),
        "conformance failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.lines().filter(|l| l.starts_with("PASS")).count() >= 25,
        "{stdout}"
    );
    assert!(!stdout.contains("FAIL"), "{stdout}");
    // The service is unharmed by the suite's hostile checks.
    let c = cluster.client(&pki).await;
    assert_eq!(c.call("echo", b"after").await.unwrap(), b"after");
    cluster.stop().await;
}
