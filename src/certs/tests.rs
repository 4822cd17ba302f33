//! Unit tests for certificate issuance and secret file handling.

use super::*;
use crate::identity::DEFAULT_TRUST_DOMAIN;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::UnixTime;
use std::sync::Arc;
use x509_parser::extensions::{GeneralName, ParsedExtension};

fn opts(workers: u32) -> InitOptions {
    InitOptions {
        trust_domain: DEFAULT_TRUST_DOMAIN.into(),
        workers: numbered_workers(workers),
        days: 30,
        hosts: vec!["svc.example".into()],
        force: false,
    }
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

struct Parsed {
    uris: Vec<String>,
    dns: Vec<String>,
    ips: usize,
    server_auth: bool,
    client_auth: bool,
    is_ca: bool,
    cert_sign: bool,
    crl_sign: bool,
    digital_signature: bool,
}

fn parse_cert(path: &Path) -> Parsed {
    let der = load_certs(path).unwrap().remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let mut p = Parsed {
        uris: vec![],
        dns: vec![],
        ips: 0,
        server_auth: false,
        client_auth: false,
        is_ca: false,
        cert_sign: false,
        crl_sign: false,
        digital_signature: false,
    };
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for n in &san.general_names {
                    match n {
                        GeneralName::URI(u) => p.uris.push(u.to_string()),
                        GeneralName::DNSName(d) => p.dns.push(d.to_string()),
                        GeneralName::IPAddress(_) => p.ips += 1,
                        _ => {}
                    }
                }
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                p.server_auth = eku.server_auth;
                p.client_auth = eku.client_auth;
            }
            ParsedExtension::BasicConstraints(bc) => p.is_ca = bc.ca,
            ParsedExtension::KeyUsage(ku) => {
                p.cert_sign = ku.key_cert_sign();
                p.crl_sign = ku.crl_sign();
                p.digital_signature = ku.digital_signature();
            }
            _ => {}
        }
    }
    p
}

#[test]
fn init_writes_every_file_with_the_right_modes() {
    let tmp = crate::files::private_tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let written = init(&dir, &opts(3)).unwrap();
    assert_eq!(mode(&dir), 0o700);
    let mut expected = vec!["ca.crt", "ca.key", "token.key"];
    for stem in [
        "dispatcher",
        "watchdog",
        "client",
        "worker-1",
        "worker-2",
        "worker-3",
    ] {
        expected.push(Box::leak(format!("{stem}.crt").into_boxed_str()));
        expected.push(Box::leak(format!("{stem}.key").into_boxed_str()));
    }
    for n in 1..=3 {
        expected.push(Box::leak(format!("worker-{n}.token").into_boxed_str()));
    }
    assert_eq!(written.len(), expected.len());
    for name in expected {
        let p = dir.join(name);
        assert!(p.exists(), "{name} missing");
        let want = if name.ends_with(".crt") { 0o644 } else { 0o600 };
        assert_eq!(mode(&p), want, "{name}");
    }
}

#[test]
fn identities_sans_and_key_usages() {
    let tmp = crate::files::private_tempdir().unwrap();
    init(tmp.path(), &opts(2)).unwrap();
    let ca = parse_cert(&tmp.path().join("ca.crt"));
    assert!(ca.is_ca && ca.cert_sign && ca.crl_sign);
    assert_eq!(ca.uris, vec!["spiffe://securesrv"]);

    let cases = [
        (
            "dispatcher.crt",
            "spiffe://securesrv/dispatcher/main",
            true,
            true,
        ),
        ("worker-1.crt", "spiffe://securesrv/worker/1", true, false),
        ("worker-2.crt", "spiffe://securesrv/worker/2", true, false),
        (
            "watchdog.crt",
            "spiffe://securesrv/watchdog/main",
            false,
            true,
        ),
        (
            "client.crt",
            "spiffe://securesrv/client/default",
            false,
            true,
        ),
    ];
    for (file, uri, server, client) in cases {
        let p = parse_cert(&tmp.path().join(file));
        assert_eq!(p.uris, vec![uri.to_string()], "{file}");
        assert_eq!(p.server_auth, server, "{file} serverAuth");
        assert_eq!(p.client_auth, client, "{file} clientAuth");
        assert!(!p.is_ca && !p.cert_sign && p.digital_signature, "{file}");
        if server {
            assert!(p.dns.contains(&"localhost".to_string()), "{file}");
            assert!(p.dns.contains(&"svc.example".to_string()), "{file}");
            assert_eq!(p.ips, 1, "{file}");
        } else {
            assert!(p.dns.is_empty() && p.ips == 0, "{file}");
        }
        let id = SpiffeId::from_certificate_der(&load_certs(&tmp.path().join(file)).unwrap()[0])
            .unwrap();
        assert_eq!(id.to_string(), uri);
    }
}

#[test]
fn init_refuses_to_replace_a_ca_without_force() {
    let tmp = crate::files::private_tempdir().unwrap();
    init(tmp.path(), &opts(1)).unwrap();
    let before = fs::read(tmp.path().join("ca.crt")).unwrap();
    let err = init(tmp.path(), &opts(1)).unwrap_err();
    assert!(matches!(err, CertError::Exists(..)), "{err}");
    assert!(err.to_string().contains("--force"));
    assert_eq!(fs::read(tmp.path().join("ca.crt")).unwrap(), before);
    let mut force = opts(1);
    force.force = true;
    init(tmp.path(), &force).unwrap();
    assert_ne!(fs::read(tmp.path().join("ca.crt")).unwrap(), before);
    assert_eq!(mode(&tmp.path().join("ca.key")), 0o600);
}

/// With no CA, files of another making (openssl-made dispatcher files, a `token.key` from
/// `certs token-keys`) are refused without `--force`, before anything is written: they were
/// replaced without a word.
#[test]
fn init_refuses_to_replace_any_file_without_force() {
    let tmp = crate::files::private_tempdir().unwrap();
    let dir = tmp.path();
    for name in ["dispatcher.key", "dispatcher.crt", "token.key"] {
        write_file(&dir.join(name), b"made elsewhere\n", 0o600, false).unwrap();
    }
    let before = contents(dir);
    let err = init(dir, &opts(1)).unwrap_err();
    assert!(matches!(err, CertError::InitWouldReplace(_)), "{err}");
    let text = err.to_string();
    let (key, crt, token) = (
        dir.join("dispatcher.key"),
        dir.join("dispatcher.crt"),
        dir.join("token.key"),
    );
    assert!(
        text.contains(&format!(
            "{}, {} and {} already exist",
            key.display(),
            crt.display(),
            token.display()
        )) && text.contains("pass --force to replace them"),
        "{text}"
    );
    assert_eq!(changed(dir, &before), Vec::<String>::new());
    // --force replaces them.
    init(
        dir,
        &InitOptions {
            force: true,
            ..opts(1)
        },
    )
    .unwrap();
    assert_ne!(fs::read(&token).unwrap(), b"made elsewhere\n");
    assert!(dir.join(CA_CERT).exists());
}

fn client_verifier(dir: &Path) -> Arc<dyn ClientCertVerifier> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(&dir.join("ca.crt")).unwrap() {
        roots.add(c).unwrap();
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap()
}

#[test]
fn issue_adds_identities_signed_by_the_existing_ca() {
    let tmp = crate::files::private_tempdir().unwrap();
    init(tmp.path(), &opts(1)).unwrap();
    let alice = issue(
        tmp.path(),
        &IssueOptions {
            role: Role::Client,
            name: "alice".into(),
            trust_domain: None,
            days: 10,
            hosts: vec![],
            force: false,
        },
    )
    .unwrap();
    assert_eq!(
        alice,
        vec![
            tmp.path().join("client-alice.crt"),
            tmp.path().join("client-alice.key")
        ]
    );
    let der = load_certs(&alice[0]).unwrap().remove(0);
    client_verifier(tmp.path())
        .verify_client_cert(&der, &[], UnixTime::now())
        .expect("client-alice.crt verifies against ca.crt");
    assert_eq!(
        SpiffeId::from_certificate_der(&der).unwrap().to_string(),
        "spiffe://securesrv/client/alice"
    );

    // A certificate from another CA does not verify.
    let other = crate::files::private_tempdir().unwrap();
    init(other.path(), &opts(1)).unwrap();
    let foreign = load_certs(&other.path().join("client.crt"))
        .unwrap()
        .remove(0);
    assert!(
        client_verifier(tmp.path())
            .verify_client_cert(&foreign, &[], UnixTime::now())
            .is_err()
    );

    let w3 = issue(
        tmp.path(),
        &IssueOptions {
            role: Role::Worker,
            name: "3".into(),
            trust_domain: None,
            days: 10,
            hosts: vec![],
            force: false,
        },
    )
    .unwrap();
    assert!(w3.contains(&tmp.path().join("worker-3.token")));
    assert_eq!(mode(&tmp.path().join("worker-3.token")), 0o600);
    // The worker's token file is derived from the master key.
    let master = load_key_file(&tmp.path().join("token.key")).unwrap();
    let w3_keys = load_key_file(&tmp.path().join("worker-3.token")).unwrap();
    let w3_id = SpiffeId::worker(DEFAULT_TRUST_DOMAIN, 3).unwrap();
    assert_eq!(
        w3_keys.current().key.expose(),
        master.current().key.derive_for(&w3_id).expose()
    );

    let again = issue(
        tmp.path(),
        &IssueOptions {
            role: Role::Client,
            name: "alice".into(),
            trust_domain: None,
            days: 10,
            hosts: vec![],
            force: false,
        },
    );
    assert!(matches!(again, Err(CertError::Exists(..))));
    // A worker's name is its number as written by `worker --id N`: nothing else names one.
    for name in ["bob", "0", "03", "+3", "4294967296"] {
        let bad_worker = issue(
            tmp.path(),
            &IssueOptions {
                role: Role::Worker,
                name: name.into(),
                trust_domain: None,
                days: 10,
                hosts: vec![],
                force: false,
            },
        );
        assert!(
            matches!(bad_worker, Err(CertError::BadWorkerName(ref n)) if n == name),
            "worker name {name:?}: {bad_worker:?}"
        );
    }
    assert!(!tmp.path().join("worker-03.crt").exists());
    // The dispatcher has one identity, named `main`: another name would make files that it
    // never loads and that clients do not accept. A watchdog may be named otherwise (a
    // probe's identity for `ping`).
    let named = |role, name: &str| IssueOptions {
        role,
        name: name.into(),
        trust_domain: None,
        days: 10,
        hosts: vec![],
        force: true,
    };
    let other = issue(tmp.path(), &named(Role::Dispatcher, "other"));
    let Err(e @ CertError::DispatcherName(..)) = other else {
        panic!("dispatcher named other: {other:?}");
    };
    assert!(e.to_string().contains("--name main"), "{e}");
    assert!(!tmp.path().join("dispatcher-other.crt").exists());
    assert!(!tmp.path().join("dispatcher-other.key").exists());
    assert_eq!(
        issue(tmp.path(), &named(Role::Watchdog, "probe")).unwrap(),
        [
            tmp.path().join("watchdog-probe.crt"),
            tmp.path().join("watchdog-probe.key")
        ]
    );
    assert_eq!(
        issue(tmp.path(), &named(Role::Dispatcher, "main")).unwrap(),
        [
            tmp.path().join("dispatcher.crt"),
            tmp.path().join("dispatcher.key")
        ]
    );
}

#[test]
fn key_files_of_another_user_or_too_large_are_refused() {
    let tmp = crate::files::private_tempdir().unwrap();
    init(tmp.path(), &opts(1)).unwrap();
    let key = tmp.path().join("client.key");
    // Through a symbolic link (as Kubernetes mounts secrets): followed, and judged by the file.
    let link = tmp.path().join("link.key");
    std::os::unix::fs::symlink(&key, &link).unwrap();
    assert!(load_private_key(&link).is_ok());
    // A FIFO in a key's place is refused at once, not waited on.
    let fifo = tmp.path().join("fifo.key");
    let made = std::process::Command::new("mkfifo")
        .arg("-m")
        .arg("600")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let (tx, rx) = std::sync::mpsc::channel();
    let f = fifo.clone();
    std::thread::spawn(move || tx.send(read_secret_file(&f).is_err()));
    assert_eq!(
        rx.recv_timeout(std::time::Duration::from_secs(10)),
        Ok(true),
        "a FIFO was waited on or accepted"
    );
    let big = tmp.path().join("big.key");
    write_file(&big, &vec![b'A'; 1024 * 1024 + 1], 0o600, false).unwrap();
    assert!(matches!(
        read_secret_file(&big),
        Err(CertError::KeyFileTooLarge(_))
    ));
    if nix::unistd::geteuid().is_root() {
        // Root reads a file another user owns: that user could swap the key.
        std::os::unix::fs::chown(&key, Some(4242), None).unwrap();
        let err = load_private_key(&key).unwrap_err();
        assert!(
            matches!(
                err,
                CertError::KeyNotOwned {
                    owner: 4242,
                    me: 0,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("chown 0"), "{err}");
        // Whose the files are is said first: `chown 0` would take them from the service
        // user the operator made them for.
        assert!(
            err.to_string()
                .contains("Run the command as its owner (`sudo -u '#4242' ...`"),
            "{err}"
        );
        std::os::unix::fs::chown(&key, Some(0), None).unwrap();
    } else {
        // Not root: files owned by others cannot be made here; ours are accepted.
        assert_eq!(
            std::os::unix::fs::MetadataExt::uid(&fs::metadata(&key).unwrap()),
            nix::unistd::geteuid().as_raw()
        );
    }
    assert!(load_private_key(&key).is_ok());
}

#[test]
fn readable_key_files_are_refused_with_the_fix() {
    let tmp = crate::files::private_tempdir().unwrap();
    init(tmp.path(), &opts(1)).unwrap();
    let key = tmp.path().join("client.key");
    assert!(load_private_key(&key).is_ok());
    for bad in [0o640, 0o604, 0o644, 0o666] {
        fs::set_permissions(&key, fs::Permissions::from_mode(bad)).unwrap();
        let err = load_private_key(&key).unwrap_err().to_string();
        assert!(err.contains(&key.display().to_string()), "{err}");
        assert!(err.contains("chmod 600"), "{err}");
    }
    let token = tmp.path().join("worker-1.token");
    fs::set_permissions(&token, fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(
        load_key_file(&token),
        Err(CertError::KeyTooOpen { .. })
    ));
}

/// A file given as a private key is judged by what it holds before its mode: a certificate
/// or some other file is no key, and `chmod 600` would not make it one.
#[test]
fn a_file_that_is_no_key_is_called_so_whatever_its_mode() {
    let tmp = crate::files::private_tempdir().unwrap();
    init(tmp.path(), &opts(1)).unwrap();
    let cert = tmp.path().join("client.crt");
    let other = tmp.path().join("notes.txt");
    fs::write(&other, "not a key\n").unwrap();
    for mode in [0o644, 0o600] {
        fs::set_permissions(&cert, fs::Permissions::from_mode(mode)).unwrap();
        let err = load_private_key(&cert).unwrap_err();
        assert!(matches!(err, CertError::CertificateNotKey(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("{} holds a certificate, not a private key", cert.display())
        );
        fs::set_permissions(&other, fs::Permissions::from_mode(mode)).unwrap();
        let err = load_private_key(&other).unwrap_err().to_string();
        assert!(err.contains("no private key"), "{err}");
    }
}

/// A missing file is advised the command that makes it: `certs init` only where no CA is
/// beside it (it refuses to replace one), else `certs issue` for that identity (`--force`
/// when its certificate is there) or `certs token-keys`.
#[test]
fn a_missing_file_is_advised_the_command_that_makes_it() {
    let tmp = crate::files::private_tempdir().unwrap();
    let dir = tmp.path().join("pki");
    init(&dir, &opts(1)).unwrap();
    let d = dir.display().to_string();
    let missing = |file: &str| match load_certs(&dir.join(file)) {
        Err(CertError::Missing { remedy, .. }) => remedy,
        other => panic!("{file}: {other:?}"),
    };
    for file in [
        "client.key",
        "worker-1.token",
        "dispatcher.crt",
        "watchdog.key",
        "ca.key",
    ] {
        fs::remove_file(dir.join(file)).unwrap();
    }
    let issue = |args: &str| format!("`securesrv certs issue {args} --dir {d}");
    for (file, advice) in [
        ("worker-5.crt", issue("--role worker --name 5")),
        ("worker-5.key", issue("--role worker --name 5")),
        ("worker-1.token", issue("--role worker --name 1")),
        ("client.key", issue("--role client --name default")),
        ("client-alice.crt", issue("--role client --name alice")),
        ("dispatcher.crt", issue("--role dispatcher --name main")),
        ("watchdog.key", issue("--role watchdog --name main")),
        ("alice.pem", issue("--role ROLE --name NAME")),
        ("worker-05.crt", issue("--role ROLE --name NAME")),
    ] {
        let remedy = missing(file);
        assert!(remedy.contains(&advice), "{file}: {remedy}");
    }
    // `issue` replaces a certificate that is there only with --force.
    assert!(missing("client.key").ends_with("--force`"));
    assert!(missing("worker-1.token").ends_with("--force`"));
    assert!(!missing("worker-5.key").contains("--force"));
    assert!(missing("ca.key").contains("restore ca.key"));
    // Without token.key, a worker's token key comes from `certs token-keys`.
    fs::remove_file(dir.join("token.key")).unwrap();
    let token_keys = format!("`securesrv certs token-keys --dir {d}`");
    assert!(missing("worker-1.token").contains(&token_keys));
    assert!(missing("token.key").contains(&token_keys));
    // Nothing made yet: `certs init`, whatever the file.
    for file in ["worker-5.crt", "token.key", "ca.key", "ca.crt"] {
        let remedy = match load_certs(&tmp.path().join("none").join(file)) {
            Err(CertError::Missing { remedy, .. }) => remedy,
            other => panic!("{file}: {other:?}"),
        };
        assert!(
            remedy.contains("`securesrv certs init`"),
            "{file}: {remedy}"
        );
    }
}

/// Puts a directory where `path`'s staged copy would be written, so that staging it fails.
fn block_staging(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap().to_str().unwrap();
    let blocker = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    fs::create_dir(&blocker).unwrap();
    blocker
}

/// The names of the files that differ between `dir` now and `before` (changed, new or gone),
/// without their contents (keys) in the message.
fn changed(dir: &Path, before: &std::collections::BTreeMap<String, Vec<u8>>) -> Vec<String> {
    let now = contents(dir);
    let names: std::collections::BTreeSet<&String> = now
        .keys()
        .chain(before.keys())
        .filter(|n| now.get(*n) != before.get(*n))
        .collect();
    names.into_iter().cloned().collect()
}

/// Every file in `dir` and its bytes.
fn contents(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                fs::read(&p).unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_file_is_replaced_whole_or_not_at_all() {
    let tmp = crate::files::private_tempdir().unwrap();
    let path = tmp.path().join("a.key");
    write_file(&path, b"old", 0o600, false).unwrap();
    let blocker = block_staging(&path);
    assert!(write_file(&path, b"new", 0o600, true).is_err());
    assert_eq!(fs::read(&path).unwrap(), b"old", "the old file is kept");
    fs::remove_dir(&blocker).unwrap();
    assert!(matches!(
        write_file(&path, b"new", 0o600, false),
        Err(CertError::Exists(..))
    ));
    write_file(&path, b"new", 0o600, true).unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"new");
    assert_eq!(mode(&path), 0o600);
    // Nothing is left beside it.
    assert_eq!(contents(tmp.path()).len(), 1);
}

/// `issue --force` replaces an identity's key and certificate together or not at all. With
/// the certificate's rename refused (a directory in its place here), the key used to be
/// replaced all the same, beside the old certificate: the component then refused to start and
/// the old key was lost. Found by a file-handling review.
#[test]
fn issue_replaces_a_key_and_its_certificate_together_or_not_at_all() {
    let tmp = crate::files::private_tempdir().unwrap();
    init(tmp.path(), &opts(1)).unwrap();
    let crt = tmp.path().join("worker-1.crt");
    fs::remove_file(&crt).unwrap();
    fs::create_dir(&crt).unwrap();
    fs::write(crt.join("x"), b"x").unwrap();
    let before = contents(tmp.path());
    let forced = IssueOptions {
        force: true,
        ..worker_issue("1", 10)
    };
    assert!(issue(tmp.path(), &forced).is_err());
    assert_eq!(changed(tmp.path(), &before), Vec::<String>::new());
    // So does `init --force`, for the whole set: the new CA key used to be in place before a
    // later file failed, beside the old CA certificate, and the old CA key was lost.
    let forced = InitOptions {
        force: true,
        ..opts(1)
    };
    assert!(init(tmp.path(), &forced).is_err());
    assert_eq!(changed(tmp.path(), &before), Vec::<String>::new());
    fs::remove_dir_all(&crt).unwrap();
    init(tmp.path(), &forced).unwrap();
    assert!(changed(tmp.path(), &before).contains(&CA_KEY.to_string()));
    // Nothing is left beside the files.
    assert!(
        !contents(tmp.path()).keys().any(|n| n.starts_with('.')),
        "{:?}",
        contents(tmp.path()).keys()
    );
}

/// A rotation cut short between its renames (killed, say) leaves the workers' files ahead of
/// `token.key`: the next rotation refuses, and says that this is a cause and what to do.
#[test]
fn a_rotation_cut_short_is_named_as_a_cause_when_the_next_refuses() {
    let tmp = crate::files::private_tempdir().unwrap();
    init(tmp.path(), &opts(1)).unwrap();
    let master = tmp.path().join("token.key");
    let old = fs::read(&master).unwrap();
    rotate_token_key(tmp.path(), None, 60_000).unwrap();
    // As if killed after the workers' files were in place, before token.key.
    write_file(&master, &old, 0o600, true).unwrap();
    let err = rotate_token_key(tmp.path(), None, 60_000).unwrap_err();
    assert!(matches!(err, CertError::TokenKeysDiffer { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("a rotation cut short"), "{msg}");
    assert!(msg.contains("certs token-keys --force"), "{msg}");
}

#[test]
fn a_rotation_that_cannot_write_every_file_changes_none() {
    let tmp = crate::files::private_tempdir().unwrap();
    init(tmp.path(), &opts(2)).unwrap();
    let before = contents(tmp.path());
    // The last file a rotation writes is token.key.
    let blocker = block_staging(&tmp.path().join("token.key"));
    assert!(rotate_token_key(tmp.path(), None, 60_000).is_err());
    fs::remove_dir(&blocker).unwrap();
    assert_eq!(changed(tmp.path(), &before), Vec::<String>::new());
    // And it can be done again once the cause is gone.
    rotate_token_key(tmp.path(), None, 60_000).unwrap();
    assert_eq!(
        load_key_file(&tmp.path().join("token.key"))
            .unwrap()
            .current()
            .id,
        2
    );
}

#[test]
fn a_rotation_that_cannot_put_every_file_in_place_changes_none() {
    // Staging succeeds; putting worker-2's file in place is refused (an immutable file, as a
    // read-only mount would). worker-1's file, already replaced, must get its old key back.
    let tmp = crate::files::private_tempdir().unwrap();
    init(tmp.path(), &opts(2)).unwrap();
    let before = contents(tmp.path());
    let locked = tmp.path().join("worker-2.token");
    let chattr = |flag: &str| {
        std::process::Command::new("chattr")
            .arg(flag)
            .arg(&locked)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !chattr("+i") {
        // Not root, or a file system without the attribute: nothing here can refuse a
        // rename of a file in a directory we own.
        eprintln!("chattr +i not available; skipping the rename failure");
        return;
    }
    let result = rotate_token_key(tmp.path(), None, 60_000);
    assert!(chattr("-i"), "could not clear the immutable flag");
    assert!(
        result.is_err(),
        "the rotation went through an immutable file"
    );
    assert_eq!(changed(tmp.path(), &before), Vec::<String>::new());
    // Once the cause is gone it can be done.
    rotate_token_key(tmp.path(), None, 60_000).unwrap();
}

#[test]
fn an_existing_directory_keeps_its_mode() {
    // `--dir .` must not make the working directory private.
    let tmp = crate::files::private_tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    init(tmp.path(), &opts(1)).unwrap();
    assert_eq!(mode(tmp.path()), 0o755);
}

#[test]
fn rotation_rederives_every_worker_file() {
    let tmp = crate::files::private_tempdir().unwrap();
    init(tmp.path(), &opts(2)).unwrap();
    let before = load_key_file(&tmp.path().join("token.key")).unwrap();
    // Not a name we write: left alone (it was taken for worker 3's file).
    write_file(&tmp.path().join("worker-03.token"), b"junk", 0o600, false).unwrap();
    rotate_token_key(tmp.path(), None, 60_000).unwrap();
    let after = load_key_file(&tmp.path().join("token.key")).unwrap();
    assert_eq!(after.current().id, 2);
    assert_eq!(
        after.entries()[1].key.expose(),
        before.current().key.expose()
    );
    for n in 1..=2 {
        let w = load_key_file(&tmp.path().join(format!("worker-{n}.token"))).unwrap();
        let id = SpiffeId::worker(DEFAULT_TRUST_DOMAIN, n).unwrap();
        assert_eq!(w.current().id, 2);
        assert_eq!(
            w.current().key.expose(),
            after.current().key.derive_for(&id).expose()
        );
        assert_eq!(w.entries().len(), 2);
    }
}

#[test]
fn rotation_keeps_the_trust_domain_the_worker_keys_were_made_for() {
    // Made for example.org: re-derived for the default trust domain, every token would fail
    // to verify at the workers (it did, with the default taken when none was given).
    let tmp = crate::files::private_tempdir().unwrap();
    let mut o = opts(2);
    o.trust_domain = "example.org".into();
    init(tmp.path(), &o).unwrap();
    let worker_file =
        |n: u32| load_key_file(&tmp.path().join(format!("worker-{n}.token"))).unwrap();
    let before = worker_file(1).render();
    let err = rotate_token_key(tmp.path(), Some(DEFAULT_TRUST_DOMAIN), 60_000).unwrap_err();
    assert!(matches!(err, CertError::TokenKeysDiffer { .. }), "{err}");
    assert!(err.to_string().contains("--trust-domain"), "{err}");
    assert_eq!(
        *worker_file(1).render(),
        *before,
        "nothing written after a refusal"
    );
    // Keys derived for another trust domain than the CA's (as the rotation above used to
    // leave them) are refused, not carried on.
    let broken = crate::files::private_tempdir().unwrap();
    init(broken.path(), &o).unwrap();
    token_keys(broken.path(), Some(DEFAULT_TRUST_DOMAIN), &[1, 2], true).unwrap();
    let err = rotate_token_key(broken.path(), None, 60_000).unwrap_err();
    assert!(matches!(err, CertError::TokenKeysDiffer { .. }), "{err}");
    for td in [None, Some("example.org")] {
        rotate_token_key(tmp.path(), td, 60_000).unwrap();
        let master = load_key_file(&tmp.path().join("token.key")).unwrap();
        for n in 1..=2 {
            let id = SpiffeId::worker("example.org", n).unwrap();
            assert_eq!(
                worker_file(n).current().key.expose(),
                master.current().key.derive_for(&id).expose()
            );
        }
    }
}

#[test]
fn token_keys_alone_for_certificates_made_elsewhere() {
    let tmp = crate::files::private_tempdir().unwrap();
    let mut o = opts(1);
    o.trust_domain = "corp.example".into();
    init(tmp.path(), &o).unwrap();
    for f in ["token.key", "worker-1.token"] {
        fs::remove_file(tmp.path().join(f)).unwrap();
    }
    // The trust domain comes from ca.crt.
    let written = token_keys(tmp.path(), None, &[1, 2, 3], false).unwrap();
    assert_eq!(written.len(), 4, "{written:?}");
    let master = load_key_file(&tmp.path().join("token.key")).unwrap();
    let w3 = load_key_file(&tmp.path().join("worker-3.token")).unwrap();
    let id = SpiffeId::worker("corp.example", 3).unwrap();
    assert_eq!(
        w3.current().key.expose(),
        master.current().key.derive_for(&id).expose()
    );
    let mode = fs::metadata(tmp.path().join("worker-3.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // An existing master key is not replaced by accident.
    let err = token_keys(tmp.path(), None, &[1, 2, 3], false).unwrap_err();
    assert!(matches!(err, CertError::Exists(..)), "{err}");
    // Replaced for fewer workers than there are files: the others are derived afresh too
    // (left on the old key, the next rotation refused them, and its hint led back here).
    token_keys(tmp.path(), None, &[1], true).unwrap();
    let replaced = load_key_file(&tmp.path().join("token.key")).unwrap();
    assert_ne!(
        replaced.current().key.expose(),
        master.current().key.expose()
    );
    let w3 = load_key_file(&tmp.path().join("worker-3.token")).unwrap();
    assert_eq!(
        w3.current().key.expose(),
        replaced.current().key.derive_for(&id).expose()
    );
    rotate_token_key(tmp.path(), None, 60_000).unwrap();
}

/// `token-keys` makes a key for every worker whose certificate is in the directory, as its
/// help says, beside workers 1 to N. It looked only for `worker-N.token` files, so with
/// certificates made by another tool (what the command is for) `--workers 0` wrote no
/// worker key, and a `worker-3.crt` beside the default two got none. Found by an operator
/// review.
#[test]
fn token_keys_cover_every_worker_whose_certificate_is_there() {
    let made = crate::files::private_tempdir().unwrap();
    init(made.path(), &opts(3)).unwrap();
    for (workers, expect) in [(&[][..], &[1, 3][..]), (&[1, 2][..], &[1, 2, 3][..])] {
        let tmp = crate::files::private_tempdir().unwrap();
        for f in ["ca.crt", "worker-1.crt", "worker-3.crt"] {
            fs::copy(made.path().join(f), tmp.path().join(f)).unwrap();
        }
        let written = token_keys(tmp.path(), None, workers, false).unwrap();
        let mut names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut wanted: Vec<String> = expect.iter().map(|n| format!("worker-{n}.token")).collect();
        wanted.push("token.key".into());
        wanted.sort();
        assert_eq!(names, wanted, "--workers {workers:?}");
    }
}

#[test]
fn advice_names_the_directory_as_one_shell_word() {
    assert_eq!(dir_flag(Path::new("certs")), "");
    assert_eq!(
        dir_flag(Path::new("/etc/securesrv/certs")),
        " --dir /etc/securesrv/certs"
    );
    assert_eq!(dir_flag(Path::new("my certs")), " --dir 'my certs'");
}

#[test]
fn host_names_are_dns_names_or_addresses() {
    for good in [
        "svc.example",
        "a-b.c",
        "*.svc.example",
        "localhost",
        "x.",
        "my_svc.internal",
    ] {
        assert!(valid_dns_name(good), "{good}");
    }
    for bad in [
        "bad host",
        "",
        "-a.b",
        "a-.b",
        "a..b",
        "*",
        "a.*.b",
        "\u{e9}.example",
    ] {
        assert!(!valid_dns_name(bad), "{bad:?}");
    }
    let tmp = crate::files::private_tempdir().unwrap();
    let mut o = opts(1);
    o.hosts = vec!["bad host".into()];
    let dir = tmp.path().join("c");
    let err = init(&dir, &o).unwrap_err();
    assert!(matches!(err, CertError::BadHost(_)), "{err}");
    assert!(!dir.exists(), "nothing written");
    // More names than a certificate peers accept can carry: refused before anything is
    // written. As many as allowed are written.
    o.hosts = (0..=MAX_HOSTS).map(|i| format!("h{i}.example")).collect();
    let err = init(&dir, &o).unwrap_err();
    assert!(matches!(err, CertError::TooManyHosts(..)), "{err}");
    assert!(!dir.exists(), "nothing written");
    o.hosts.pop();
    init(&dir, &o).unwrap();
    // Few names, but more bytes of them than fit: refused too.
    let long = ["a".repeat(60), "b".repeat(60), "c".repeat(60)].join(".");
    o.hosts = (0..50).map(|i| format!("{long}.h{i}.example")).collect();
    assert!(o.hosts.iter().map(String::len).sum::<usize>() > MAX_HOSTS_BYTES);
    let dir = tmp.path().join("d");
    let err = init(&dir, &o).unwrap_err();
    assert!(matches!(err, CertError::TooManyHosts(..)), "{err}");
    assert!(!dir.exists(), "nothing written");
}

fn worker_issue(name: &str, days: u32) -> IssueOptions {
    IssueOptions {
        role: Role::Worker,
        name: name.into(),
        trust_domain: None,
        days,
        hosts: vec![],
        force: false,
    }
}

#[test]
fn out_of_range_days_and_workers_are_refused_before_anything_is_written() {
    let tmp = crate::files::private_tempdir().unwrap();
    let dir = tmp.path().join("certs");
    for (days, workers) in [(MAX_DAYS + 1, 1), (u32::MAX, 1), (0, 1), (30, 257)] {
        let o = InitOptions {
            days,
            ..opts(workers)
        };
        let err = init(&dir, &o).unwrap_err();
        assert!(matches!(err, CertError::OutOfRange(_)), "{err}");
        assert!(
            !dir.exists(),
            "days {days}, workers {workers}: wrote {dir:?}"
        );
    }
    let err = token_keys(&dir, None, &numbered_workers(257), false).unwrap_err();
    assert!(matches!(err, CertError::OutOfRange(_)), "{err}");
    assert!(!dir.exists());

    // The longest validity allowed is issued.
    let o = InitOptions {
        days: MAX_DAYS,
        ..opts(1)
    };
    init(&dir, &o).unwrap();
    let err = issue(&dir, &worker_issue("2", u32::MAX)).unwrap_err();
    assert!(matches!(err, CertError::OutOfRange(_)), "{err}");
    assert!(!dir.join("worker-2.crt").exists());
    issue(&dir, &worker_issue("2", MAX_DAYS)).unwrap();
}

#[test]
fn issuing_a_worker_whose_token_file_cannot_be_kept_writes_nothing() {
    let tmp = crate::files::private_tempdir().unwrap();
    init(tmp.path(), &opts(1)).unwrap();
    // A token file derived from token.key (as `certs token-keys` makes them) is kept as it is.
    let master = load_key_file(&tmp.path().join("token.key")).unwrap();
    let id2 = SpiffeId::worker(DEFAULT_TRUST_DOMAIN, 2).unwrap();
    let token2 = tmp.path().join("worker-2.token");
    let derived = master.map_keys(|k| k.derive_for(&id2)).render();
    write_file(&token2, derived.as_bytes(), 0o600, false).unwrap();
    let made = fs::read(&token2).unwrap();
    let written = issue(tmp.path(), &worker_issue("2", 10)).unwrap();
    assert!(!written.contains(&token2), "{written:?}");
    assert_eq!(fs::read(&token2).unwrap(), made);
    assert!(tmp.path().join("worker-2.crt").exists());

    // One that was not derived from token.key is refused before the certificate is written.
    let token3 = tmp.path().join("worker-3.token");
    fs::copy(tmp.path().join("worker-1.token"), &token3).unwrap();
    let err = issue(tmp.path(), &worker_issue("3", 10)).unwrap_err();
    assert!(matches!(err, CertError::Exists(..)), "{err}");
    assert!(!tmp.path().join("worker-3.crt").exists());
    assert!(!tmp.path().join("worker-3.key").exists());
    // --force replaces it with the derived one.
    let forced = IssueOptions {
        force: true,
        ..worker_issue("3", 10)
    };
    issue(tmp.path(), &forced).unwrap();
    let id = SpiffeId::worker(DEFAULT_TRUST_DOMAIN, 3).unwrap();
    assert_eq!(
        *load_key_file(&token3).unwrap().render(),
        *master.map_keys(|k| k.derive_for(&id)).render()
    );
}

/// The CA certificates of `dir`.
fn cas(dir: &Path) -> Vec<CertificateDer<'static>> {
    load_certs(&dir.join(CA_CERT)).unwrap()
}

/// The revoked serials and number of our CA's list in `dir`.
fn crl_entries(dir: &Path) -> (Vec<String>, u64) {
    let der = load_crls(&dir.join(CA_CRL), &cas(dir)).unwrap().remove(0);
    let (_, crl) = x509_parser::parse_x509_crl(&der).unwrap();
    let serials = crl
        .iter_revoked_certificates()
        .map(|r| hex::encode(r.raw_serial()))
        .collect();
    let number = crl.crl_number().unwrap().to_u64_digits()[0];
    (serials, number)
}

fn serial_of(path: &Path) -> String {
    let der = load_certs(path).unwrap().remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    hex::encode(cert.raw_serial())
}

fn listed(dir: &Path, stem: &str) -> bool {
    let crls = load_crls(&dir.join(CA_CRL), &cas(dir)).unwrap();
    is_listed(
        &crls,
        &load_certs(&dir.join(format!("{stem}.crt"))).unwrap()[0],
        &cas(dir),
    )
}

#[test]
fn revoke_adds_to_the_list_and_refuses_what_this_ca_did_not_issue() {
    let tmp = crate::files::private_tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let other = tmp.path().join("other");
    init(&dir, &opts(2)).unwrap();
    init(&other, &opts(1)).unwrap();
    assert!(
        load_crls(&dir.join(CA_CRL), &cas(&dir)).unwrap().is_empty(),
        "no list yet"
    );

    let done = revoke(&dir, &[dir.join("client.crt")]).unwrap();
    assert_eq!(done.crl, dir.join(CA_CRL));
    assert_eq!(mode(&done.crl), 0o644);
    assert!(done.entries[0].contains("spiffe://securesrv/client/default"));
    let client = serial_of(&dir.join("client.crt"));
    assert_eq!(crl_entries(&dir), (vec![client.clone()], 1));

    // A second run keeps the first entry, says what was already there, and numbers anew.
    let done = revoke(&dir, &[dir.join("client.crt"), dir.join("worker-2.crt")]).unwrap();
    assert!(
        done.entries[0].ends_with("already revoked"),
        "{:?}",
        done.entries
    );
    let (serials, number) = crl_entries(&dir);
    assert_eq!(serials, vec![client, serial_of(&dir.join("worker-2.crt"))]);
    assert_eq!(number, 2);
    assert!(listed(&dir, "worker-2"));
    assert!(!listed(&dir, "worker-1"));

    // Another CA's certificate, and the CA itself, are refused, and the list is unchanged.
    let before = fs::read(dir.join(CA_CRL)).unwrap();
    let err = revoke(&dir, &[other.join("client.crt")]).unwrap_err();
    assert!(err.to_string().contains("not issued by the CA"), "{err}");
    let err = revoke(&dir, &[dir.join(CA_CERT)]).unwrap_err();
    assert!(err.to_string().contains("a CA certificate"), "{err}");
    // A file that is not there: no advice to issue what is to be revoked.
    let err = revoke(&dir, &[dir.join("nosuch.crt")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("nosuch.crt: no such file"), "{err}");
    assert!(err.contains("name the certificate file to revoke"), "{err}");
    assert!(!err.contains("certs issue"), "{err}");
    assert_eq!(fs::read(dir.join(CA_CRL)).unwrap(), before);

    // Another issuer's list in the same file (another PKI's) is kept as it was, beside ours,
    // and does not count for our certificates even where serial numbers meet.
    fs::copy(dir.join(CA_CRL), other.join(CA_CRL)).unwrap();
    revoke(&other, &[other.join("worker-1.crt")]).unwrap();
    let text = fs::read_to_string(other.join(CA_CRL)).unwrap();
    assert_eq!(text.matches("BEGIN X509 CRL").count(), 2, "{text}");
    assert!(
        text.contains(std::str::from_utf8(&before).unwrap().trim()),
        "{text}"
    );
    assert!(listed(&other, "worker-1"));
    assert!(!listed(&other, "client"));

    // Another CA's list naming the serial of one of our certificates does not revoke it.
    let theirs = CertAuthority::load(&other).unwrap();
    let ours = hex::decode(serial_of(&dir.join("worker-1.crt"))).unwrap();
    let now = OffsetDateTime::now_utc();
    let foreign = rcgen::CertificateRevocationListParams {
        this_update: now,
        next_update: now + Duration::days(1),
        crl_number: SerialNumber::from_slice(&[1]),
        issuing_distribution_point: None,
        revoked_certs: vec![rcgen::RevokedCertParams {
            serial_number: SerialNumber::from_slice(&ours),
            revocation_time: now,
            reason_code: None,
            invalidity_date: None,
        }],
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(&theirs.issuer)
    .unwrap();
    let mut text = fs::read_to_string(dir.join(CA_CRL)).unwrap();
    text.push_str(&foreign.pem().unwrap());
    fs::write(dir.join(CA_CRL), text).unwrap();
    assert!(
        !listed(&dir, "worker-1"),
        "another CA's list revoked our certificate"
    );
    assert!(listed(&dir, "worker-2"));

    // A new CA takes the old list away.
    init(
        &dir,
        &InitOptions {
            force: true,
            ..opts(2)
        },
    )
    .unwrap();
    assert!(!dir.join(CA_CRL).exists());

    // A file that is no list, or no end, is named as such.
    fs::write(dir.join(CA_CRL), "not a list\n").unwrap();
    let err = load_crls(&dir.join(CA_CRL), &cas(&dir)).unwrap_err();
    assert!(err.to_string().contains("no X509 CRL"), "{err}");
    fs::remove_file(dir.join(CA_CRL)).unwrap();
    // Neither a device nor a FIFO is read (a FIFO would block the start for ever), nor a
    // file beyond 16 MiB.
    std::os::unix::fs::symlink("/dev/zero", dir.join(CA_CRL)).unwrap();
    let err = load_crls(&dir.join(CA_CRL), &cas(&dir)).unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
    fs::remove_file(dir.join(CA_CRL)).unwrap();
    nix::unistd::mkfifo(&dir.join(CA_CRL), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let err = load_crls(&dir.join(CA_CRL), &cas(&dir)).unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
    fs::remove_file(dir.join(CA_CRL)).unwrap();
    let big = fs::File::create(dir.join(CA_CRL)).unwrap();
    big.set_len((16 << 20) + 1).unwrap();
    let err = load_crls(&dir.join(CA_CRL), &cas(&dir)).unwrap_err();
    assert!(err.to_string().contains("larger than"), "{err}");
}

/// A list of our CA whose signature does not verify (a corrupted copy, or one signed by
/// another key under the CA's name) is refused when loaded, naming the file: used, it made
/// every handshake fail, each blamed on the peer.
#[test]
fn a_list_whose_signature_does_not_verify_is_refused_when_loaded() {
    let tmp = crate::files::private_tempdir().unwrap();
    let dir = tmp.path().join("certs");
    init(&dir, &opts(1)).unwrap();
    revoke(&dir, &[dir.join("client.crt")]).unwrap();
    let mut der = load_crls(&dir.join(CA_CRL), &cas(&dir))
        .unwrap()
        .remove(0)
        .to_vec();
    let last = der.len() - 1;
    der[last] ^= 1; // in the signature, the last field
    let pem = format!(
        "-----BEGIN X509 CRL-----\n{}\n-----END X509 CRL-----\n",
        base64_lines(&der)
    );
    fs::write(dir.join(CA_CRL), pem).unwrap();
    let err = load_crls(&dir.join(CA_CRL), &cas(&dir)).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("ca.crl: list 1: not signed by the CA it names"),
        "{text}"
    );
    assert!(text.contains("certs revoke"), "{text}");
}

/// `issue` and `revoke` refuse a `ca.key` that is not the key of `ca.crt`, and a `ca.crt` that
/// is no CA, before writing anything: they wrote a certificate whose signature did not verify
/// and a list that every component then refused at start.
#[test]
fn issue_and_revoke_refuse_a_ca_key_or_certificate_that_cannot_sign() {
    let tmp = crate::files::private_tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let other = tmp.path().join("other");
    init(&dir, &opts(1)).unwrap();
    init(&other, &opts(1)).unwrap();
    let bob = IssueOptions {
        role: Role::Client,
        name: "bob".into(),
        trust_domain: None,
        days: 10,
        hosts: vec![],
        force: false,
    };

    // Another CA's key copied in.
    fs::copy(other.join(CA_KEY), dir.join(CA_KEY)).unwrap();
    let before = contents(&dir);
    let err = issue(&dir, &bob).unwrap_err();
    assert!(matches!(err, CertError::CaKeyMismatch { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&format!(
            "{} is not the key of {}",
            dir.join(CA_KEY).display(),
            dir.join(CA_CERT).display()
        )),
        "{text}"
    );
    let err = revoke(&dir, &[dir.join("client.crt")]).unwrap_err();
    assert!(matches!(err, CertError::CaKeyMismatch { .. }), "{err}");
    assert_eq!(changed(&dir, &before), Vec::<String>::new());

    // A leaf certificate as ca.crt, with its own key as ca.key.
    fs::copy(dir.join("dispatcher.crt"), dir.join(CA_CERT)).unwrap();
    fs::copy(dir.join("dispatcher.key"), dir.join(CA_KEY)).unwrap();
    let before = contents(&dir);
    let err = issue(&dir, &bob).unwrap_err();
    assert!(matches!(err, CertError::NotCa { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&format!(
            "{} is not a CA certificate",
            dir.join(CA_CERT).display()
        )) && text.contains(&dir.join(CA_KEY).display().to_string()),
        "{text}"
    );
    let err = revoke(&dir, &[dir.join("client.crt")]).unwrap_err();
    assert!(matches!(err, CertError::NotCa { .. }), "{err}");
    assert_eq!(changed(&dir, &before), Vec::<String>::new());

    // The CA's own pair still issues, and what it issues verifies.
    fs::copy(other.join(CA_CERT), dir.join(CA_CERT)).unwrap();
    fs::copy(other.join(CA_KEY), dir.join(CA_KEY)).unwrap();
    let written = issue(&dir, &bob).unwrap();
    let der = load_certs(&written[0]).unwrap().remove(0);
    client_verifier(&dir)
        .verify_client_cert(&der, &[], UnixTime::now())
        .expect("client-bob.crt verifies against ca.crt");
}

/// An encrypted key is called one, with the command that decrypts it (it was "no private key
/// in file"), and a PEM file cut short says so in words (its END marker was printed as a list
/// of byte values).
#[test]
fn an_encrypted_key_and_a_pem_file_cut_short_are_said_in_words() {
    let tmp = crate::files::private_tempdir().unwrap();
    let dir = tmp.path();
    init(dir, &opts(1)).unwrap();
    // The label says it is encrypted (as `openssl pkcs8 -topk8 -v2 aes-256-cbc` writes it);
    // what is under it is not looked at.
    let body = fs::read_to_string(dir.join("client.key")).unwrap();
    let enc = dir.join("enc.key");
    let pem = body.replace(" PRIVATE KEY-----", " ENCRYPTED PRIVATE KEY-----");
    write_file(&enc, pem.as_bytes(), 0o600, false).unwrap();
    let err = load_private_key(&enc).unwrap_err();
    assert!(matches!(err, CertError::EncryptedKey(_)), "{err}");
    let (text, p) = (err.to_string(), enc.display());
    assert!(
        text.contains(&format!(
            "{p} is an encrypted private key, which is not supported"
        )) && text.contains(&format!("`openssl pkey -in {p} -out {p}.plain`")),
        "{text}"
    );

    let cut = |name: &str| {
        let path = dir.join(name);
        let pem = fs::read(&path).unwrap();
        fs::write(&path, &pem[..pem.len() / 2]).unwrap();
        path
    };
    let crt = cut("client.crt");
    assert_eq!(
        load_certs(&crt).unwrap_err().to_string(),
        format!(
            "{}: not a PEM certificate file: cut short: the CERTIFICATE block has no \
             -----END CERTIFICATE----- line",
            crt.display()
        )
    );
    revoke(dir, &[dir.join("dispatcher.crt")]).unwrap();
    let crl = cut(CA_CRL);
    let text = load_crls(&crl, &cas(dir)).unwrap_err().to_string();
    assert!(
        text.contains("cut short: the X509 CRL block has no -----END X509 CRL----- line"),
        "{text}"
    );
    cut(CA_CERT);
    let text = revoke(dir, &[dir.join("dispatcher.crt")])
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("ca.crt: not a PEM certificate file: cut short: the CERTIFICATE block"),
        "{text}"
    );
}

/// Standard base64 of `data` in 64-column lines.
fn base64_lines(data: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, &b| n << 8 | u32::from(b)) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out.as_bytes()
        .chunks(64)
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A clock outside the years 0-9999 (or one that the validity would carry past 9999) is
/// refused as `CertError::Clock`, where the certificate dates' arithmetic panicked. Found by
/// an input-hardening review.
#[test]
fn a_clock_outside_the_years_a_certificate_can_hold_is_refused() {
    use std::time::{Duration as D, SystemTime, UNIX_EPOCH};
    assert!(checked_at(SystemTime::now(), 365).is_ok());
    // 9999-06-01: fine for a day, not for 36,500.
    let late = UNIX_EPOCH + D::from_secs(253_386_000_000);
    assert!(checked_at(late, 1).is_ok());
    assert!(matches!(
        checked_at(late, 36_500),
        Err(CertError::Clock(36_500))
    ));
    let year_10000 = UNIX_EPOCH + D::from_secs(253_402_400_000);
    assert!(matches!(
        checked_at(year_10000, 1),
        Err(CertError::Clock(1))
    ));
    let before_year_0 = UNIX_EPOCH - D::from_secs(99_999_999_999);
    assert!(matches!(
        checked_at(before_year_0, 1),
        Err(CertError::Clock(1))
    ));
}
