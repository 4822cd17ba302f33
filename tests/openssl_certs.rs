//! Certificates made by another tool (the `openssl` command) with the same SPIFFE SAN
//! convention load and work end to end: CA, dispatcher, worker and client, with keys in PKCS#8,
//! SEC1 and PKCS#1 (RSA) form.

mod common;

use common::{Pki, start_cluster};
use securesrv::token::{KeyFile, SecretKey};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn leaf(dir: &Path, stem: &str, key_args: &[&str], uri: &str, eku: &str, server: bool) {
    openssl(dir, key_args);
    let sans = if server {
        format!("subjectAltName=URI:{uri},DNS:localhost,IP:127.0.0.1")
    } else {
        format!("subjectAltName=URI:{uri}")
    };
    std::fs::write(
        dir.join(format!("{stem}.ext")),
        format!("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage={eku}\n{sans}\n"),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-key",
            &format!("{stem}.key"),
            "-subj",
            &format!("/O=openssl-made/CN={stem}"),
            "-out",
            &format!("{stem}.csr"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{stem}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-sha256",
            "-extfile",
            &format!("{stem}.ext"),
            "-out",
            &format!("{stem}.crt"),
        ],
    );
    std::fs::set_permissions(
        dir.join(format!("{stem}.key")),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_made_certificates_work() {
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("SKIPPED: the openssl command is not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    openssl(
        &dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "ca.key",
        ],
    );
    std::fs::write(
        dir.join("ca.ext"),
        "[req]\ndistinguished_name=dn\n[dn]\n[v3_ca]\nbasicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n",
    )
    .unwrap();
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-subj",
            "/O=openssl-made/CN=openssl test CA",
            "-days",
            "2",
            "-sha256",
            "-config",
            "ca.ext",
            "-extensions",
            "v3_ca",
            "-out",
            "ca.crt",
        ],
    );
    // dispatcher: PKCS#8 EC key; worker: SEC1 EC key; client: PKCS#1 RSA key.
    leaf(
        &dir,
        "dispatcher",
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "dispatcher.key",
        ],
        "spiffe://securesrv/dispatcher/main",
        "serverAuth,clientAuth",
        true,
    );
    leaf(
        &dir,
        "worker-1",
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "worker-1.key",
        ],
        "spiffe://securesrv/worker/1",
        "serverAuth",
        true,
    );
    leaf(
        &dir,
        "client",
        &["genrsa", "-traditional", "-out", "client.key", "2048"],
        "spiffe://securesrv/client/default",
        "clientAuth",
        false,
    );
    for (stem, marker) in [
        ("dispatcher", "BEGIN PRIVATE KEY"),
        ("worker-1", "BEGIN EC PRIVATE KEY"),
        ("client", "BEGIN RSA PRIVATE KEY"),
    ] {
        let pem = std::fs::read_to_string(dir.join(format!("{stem}.key"))).unwrap();
        assert!(pem.contains(marker), "{stem}.key is not {marker}");
    }
    // Token keys are not certificates: made by the library.
    let master = KeyFile::single(1, SecretKey::generate().unwrap());
    let w1 = securesrv::identity::SpiffeId::worker("securesrv", 1).unwrap();
    securesrv::certs::write_file(
        &dir.join("token.key"),
        master.render().as_bytes(),
        0o600,
        false,
    )
    .unwrap();
    let derived = master.map_keys(|k| k.derive_for(&w1));
    securesrv::certs::write_file(
        &dir.join("worker-1.token"),
        derived.render().as_bytes(),
        0o600,
        false,
    )
    .unwrap();

    let pki = Pki { tmp, dir };
    let cluster = start_cluster(&pki, 1, |_| {}).await;
    let c = cluster.client(&pki).await;
    assert_eq!(
        c.call("echo", b"made by openssl").await.unwrap(),
        b"made by openssl"
    );
    cluster.stop().await;
}
