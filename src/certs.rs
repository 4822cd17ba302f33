//! The project's own PKI: a CA, one leaf certificate per identity, and the token key files.
//!
//! `securesrv certs init` and `certs issue` call into [`init`] and [`issue`]. Every private key
//! and token key is written with mode 0600 into a 0700 directory, and every secret read back goes
//! through [`read_secret_file`], which refuses a file readable by group or others (as ssh does)
//! and holds the bytes in a zeroizing buffer. Certificates made by other tools (openssl, step,
//! cfssl) load the same way as ours. No network code here.

use crate::identity::{IdentityError, Role, SpiffeId};
use crate::token::{KeyFile, KeyFileError, SecretKey};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

/// CA certificate file name.
pub const CA_CERT: &str = "ca.crt";
/// CA private key file name.
pub const CA_KEY: &str = "ca.key";
/// The dispatcher's master token key file name.
pub const MASTER_TOKEN_KEY: &str = "token.key";
/// Default validity of leaf certificates, in days.
pub const DEFAULT_DAYS: u32 = 365;
/// Validity of the CA certificate, in days.
pub const CA_DAYS: u32 = 3650;

/// What can go wrong with certificate and key files. Messages name the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A signal (Ctrl-C) came before any file of the change was put in place: nothing changed.
    #[error("interrupted by {0} before any file was put in place: nothing was changed")]
    Interrupted(&'static str),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A certificate or key to be loaded does not exist.
    #[error(
        "{path}: no such file{}; {remedy}, or say where they are ({named_by})",
        working_dir_note(.working_dir.as_deref())
    )]
    Missing {
        /// The file.
        path: PathBuf,
        /// The working directory, when `path` is relative: a relative `certs_dir` is not
        /// resolved against the configuration file's directory, and the message must say
        /// against which.
        working_dir: Option<PathBuf>,
        /// The command that makes it: `certs init` where no CA is beside it, else the one that
        /// adds it to that CA (`certs issue`, `certs token-keys`).
        remedy: String,
        /// The flags of the command that loads it.
        named_by: NamedBy,
    },
    /// A secret file is readable by group or others.
    #[error(
        "{path} is accessible by group or others (mode {mode:04o}); private keys must be \
         readable by their owner only: run `chmod 600 {path}`"
    )]
    KeyTooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The directory of a secret file can be written by others, who could replace the key,
    /// or the CA certificate beside it.
    #[error(
        "{dir} can be written by others, or by a group that is not its owner's own (mode \
         {mode:04o}): anyone who can write there can replace the keys and the CA certificate in \
         it; run `chmod go-w {dir}`"
    )]
    DirTooOpen {
        /// The directory.
        dir: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A secret file is owned by another user (not root either), who could replace it.
    #[error(
        "{path} is owned by uid {owner}, not by this user (uid {me}) or root: its owner could \
         replace the key. Run the command as its owner (`sudo -u '#{owner}' ...`: the files \
         are that user's), or, if they should be this user's, `chown {me} {path}`"
    )]
    KeyNotOwned {
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our effective uid.
        me: u32,
    },
    /// A secret file this process may not read (another user's, mode 0600).
    #[error(
        "{path}: permission denied: it belongs to uid {owner}, and this process runs as uid \
         {me}; {advice}"
    )]
    KeyNotReadable {
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our effective uid.
        me: u32,
        /// What to do, for whose file it is.
        advice: String,
    },
    /// A file given as a private key holds a certificate (and no key).
    #[error("{0} holds a certificate, not a private key")]
    CertificateNotKey(PathBuf),
    /// A private key file is encrypted: no component could ask for its passphrase.
    #[error(
        "{0} is an encrypted private key, which is not supported (nothing could ask for its \
         passphrase at start): decrypt it with `openssl pkey -in {0} -out {0}.plain` and use \
         that file, mode 0600"
    )]
    EncryptedKey(PathBuf),
    /// A secret file too large to be a key: not a key file.
    #[error("{0} is larger than 1 MiB; not a key file")]
    KeyFileTooLarge(PathBuf),
    /// Refusing to replace an existing file.
    #[error("{0} already exists; pass --force to replace it{1}")]
    Exists(PathBuf, &'static str),
    /// `ca.crt` is not a CA certificate: what `certs issue` or `certs revoke` signed under it
    /// would be refused by every peer.
    #[error(
        "{cert} is not a CA certificate (its basicConstraints are not CA:TRUE), so certificates \
         and revocation lists signed with {key} under it would be refused everywhere; put the \
         CA's certificate back as {cert}, or make a new CA with `securesrv certs init --force` \
         (it invalidates every certificate the old one signed)"
    )]
    NotCa {
        /// The CA certificate file.
        cert: PathBuf,
        /// The CA key file.
        key: PathBuf,
    },
    /// `ca.key` is not the key of `ca.crt` (another CA's, copied in): what it signed would not
    /// verify against `ca.crt`.
    #[error(
        "{key} is not the key of {cert} (its public key is not the certificate's), so \
         certificates and revocation lists signed with it would not verify; put back the key \
         made with {cert}, or make a new CA with `securesrv certs init --force` (it invalidates \
         every certificate the old one signed)"
    )]
    CaKeyMismatch {
        /// The CA certificate file.
        cert: PathBuf,
        /// The CA key file, which does not match it.
        key: PathBuf,
    },
    /// `certs init` without `--force` would replace files that are there (with no CA beside
    /// them: made by another tool, or left from an earlier set).
    #[error(
        "{} already exist{}; `certs init` makes a new CA and every file beside it: pass \
         --force to replace them, or choose another --dir",
        list_paths(.0),
        if .0.len() == 1 { "s" } else { "" }
    )]
    InitWouldReplace(Vec<PathBuf>),
    /// rcgen cannot write the CA's name back as it is in `ca.crt` (it keeps one value per
    /// attribute type, `DC=com, DC=example` becoming `DC=example`): what it signed would name
    /// another issuer, and peers match certificates and revocation lists to their CA by that
    /// name, byte for byte.
    #[error(
        "the name of the CA in {cert} ({subject}) cannot be written back as it is (this tool \
         keeps one value per attribute type, and its own string types), so certificates and \
         revocation lists signed with it here would name another issuer: peers would not match \
         them to this CA, and a revocation list would revoke nothing. Issue and revoke with the \
         tool that made this CA (openssl: `openssl ca -revoke` then `openssl ca -gencrl`), or \
         make a CA whose name has each attribute once"
    )]
    CaNameNotKept {
        /// The CA certificate file.
        cert: PathBuf,
        /// Its subject, made printable.
        subject: String,
    },
    /// The CA key is a PKCS#1 or SEC1 key (`BEGIN RSA PRIVATE KEY`, `BEGIN EC PRIVATE KEY`,
    /// as openssl's `genrsa -traditional` and `ecparam -genkey` write them), which rcgen
    /// cannot sign with; leaf keys in those forms load.
    #[error(
        "{0} is a {1} key, and the CA key must be PKCS#8 (BEGIN PRIVATE KEY) to sign with: \
         convert it with `openssl pkcs8 -topk8 -nocrypt -in {0} -out {pk8}` and put {pk8} in \
         its place (`mv {pk8} {0}`)",
        pk8 = .0.with_file_name("ca.pk8.key").display()
    )]
    CaKeyNotPkcs8(PathBuf, &'static str),
    /// A file holds no PEM object of the expected kind.
    #[error("{path}: {what}")]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// rcgen could not build a certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// The system clock reads a time no certificate made now could name.
    #[error(
        "the system clock reads a time outside the years 0 to 9999 that a certificate's \
         validity can name (for {0} days from now): is this machine's clock right?"
    )]
    Clock(u32),
    /// A bad identity was requested.
    #[error("{0}")]
    Identity(#[from] IdentityError),
    /// A token key file is malformed.
    #[error("{path}: {source}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// What was wrong (never key bytes).
        source: KeyFileError,
    },
    /// Token key generation failed.
    #[error("cannot generate a token key: {0}")]
    Token(#[from] crate::token::TokenError),
    /// A worker's token key file was not derived from the master key for the workers' trust
    /// domain.
    #[error(
        "{path} was not derived from token.key for trust domain {trust_domain}; pass the \
         workers' trust domain with --trust-domain (or --config), or, if that is right (a \
         rotation cut short leaves the workers' files ahead of token.key), remake the keys \
         with `securesrv certs token-keys --force` and restart every component"
    )]
    TokenKeysDiffer {
        /// The worker's token key file.
        path: PathBuf,
        /// The trust domain it was checked against.
        trust_domain: String,
    },
    /// A host name for the certificate is not valid.
    #[error(
        "invalid --host {0:?}: give an IP address or a DNS name (letters, digits, hyphens, underscores, dots)"
    )]
    BadHost(String),
    /// More `--host` names than a certificate peers accept can carry.
    #[error(
        "{0} --host names of {1} bytes in all: at most {MAX_HOSTS} names and {MAX_HOSTS_BYTES} \
         bytes fit a certificate that peers accept (the session tickets a component sends carry \
         its peer's certificate, and a TLS handshake message holds at most 64 KiB)"
    )]
    TooManyHosts(usize, usize),
    /// A worker's name given to `certs issue` is not a worker number as `worker --id` takes it.
    #[error(
        "invalid worker name {0:?}: a worker's name is its number, 1 or more, without leading \
         zeros"
    )]
    BadWorkerName(String),
    /// A name other than `main` given to `certs issue` for the dispatcher: the dispatcher
    /// loads only `dispatcher.crt`, and clients accept `.../dispatcher/main` unless told
    /// otherwise. (A watchdog may have other names: a probe's identity, for `ping`.)
    #[error(
        "invalid dispatcher name {0:?}: the dispatcher's identity is .../dispatcher/main, the \
         only one it loads (dispatcher.crt) and the one clients expect; issue it with --name \
         main (--force replaces dispatcher.crt and its key)"
    )]
    DispatcherName(String),
    /// A number given on the command line is outside what can be issued.
    #[error("{0}")]
    OutOfRange(String),
}

/// How the command that loads a file was told where it is: the flags that a message about a
/// missing file names. Files are loaded as [`NamedBy::CertsDir`] unless the caller says
/// otherwise ([`CertError::named_by`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamedBy {
    /// A component's certificate directory: `--certs` or `certs_dir`.
    CertsDir,
    /// A `certs` command's directory: `--dir` or `certs_dir`.
    CertsCommand,
    /// Files named one by one, as `client` and `bench` take them: `--cert`, `--key`, `--ca`,
    /// by default in `certs_dir`.
    Files,
}

impl std::fmt::Display for NamedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NamedBy::CertsDir => "--certs or `certs_dir`",
            NamedBy::CertsCommand => "--dir or `certs_dir`",
            NamedBy::Files => "--cert, --key and --ca, or `certs_dir`",
        })
    }
}

impl CertError {
    /// The error, with a missing file's message naming the flags of `by`.
    pub fn named_by(mut self, by: NamedBy) -> Self {
        if let CertError::Missing { named_by, .. } = &mut self {
            *named_by = by;
        }
        self
    }
}

/// ` (relative to the working directory DIR)`, for a relative path's message.
fn working_dir_note(dir: Option<&Path>) -> String {
    dir.map_or_else(String::new, |d| {
        format!(" (relative to the working directory {})", d.display())
    })
}

/// `a`, `a and b`, `a, b and c`: files named in one message.
fn list_paths(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    match names.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// A PEM file's flaw in words: the parser's own message gives the marker or line at fault as
/// a list of byte values.
fn pem_problem(e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    let text = |bytes: &[u8]| {
        crate::identity::printable(String::from_utf8_lossy(bytes).trim_end()).into_owned()
    };
    match e {
        Error::MissingSectionEnd { end_marker } => {
            let label = text(end_marker);
            format!("cut short: the {label} block has no -----END {label}----- line")
        }
        Error::IllegalSectionStart { line } => format!("malformed PEM line {:?}", text(line)),
        other => other.to_string(),
    }
}

/// Longest validity `certs init` and `certs issue` give a certificate, in days (100 years).
pub const MAX_DAYS: u32 = 36_500;

/// Refuses a validity that cannot be written as a certificate date, before anything is written.
fn check_days(days: u32) -> Result<(), CertError> {
    if (1..=MAX_DAYS).contains(&days) {
        Ok(())
    } else {
        Err(CertError::OutOfRange(format!(
            "--days {days}: a certificate's validity must be between 1 and {MAX_DAYS} days"
        )))
    }
}

/// Refuses more workers than a configuration can have, before anything is written.
fn check_workers(workers: &[u32]) -> Result<(), CertError> {
    if workers.len() > crate::config::MAX_WORKERS as usize {
        Err(CertError::OutOfRange(format!(
            "{} workers: at most {}",
            workers.len(),
            crate::config::MAX_WORKERS
        )))
    } else {
        Ok(())
    }
}

/// Workers 1 to `n`, as `--workers N` or `workers = N` in a configuration name them.
pub fn numbered_workers(n: u32) -> Vec<u32> {
    (1..=n).collect()
}

/// Most `--host` names a certificate gets, and most bytes of them in all. A dispatcher
/// certificate of 3,500 names (70 KB) was written and loaded, and the watchdog said `ready`,
/// but every session ticket a worker sent the dispatcher carried it and was over rustls's
/// 64 KiB handshake message limit: the link failed after each handshake (`message buffer
/// full`) and every request ended `unavailable` (found by an input-hardening review).
pub const MAX_HOSTS: usize = 256;
/// See [`MAX_HOSTS`].
pub const MAX_HOSTS_BYTES: usize = 8192;

/// Refuses a `--host` that is neither an IP address nor a DNS name, and more of them than a
/// usable certificate can carry ([`MAX_HOSTS`]), before anything is written.
fn check_hosts(hosts: &[String]) -> Result<(), CertError> {
    let bytes: usize = hosts.iter().map(String::len).sum();
    if hosts.len() > MAX_HOSTS || bytes > MAX_HOSTS_BYTES {
        return Err(CertError::TooManyHosts(hosts.len(), bytes));
    }
    match hosts
        .iter()
        .find(|h| h.parse::<std::net::IpAddr>().is_err() && !valid_dns_name(h))
    {
        Some(bad) => Err(CertError::BadHost(bad.clone())),
        None => Ok(()),
    }
}

/// A DNS name a certificate may carry: dot-separated labels of 1 to 63 letters, digits,
/// underscores (rustls takes them) and hyphens (not at either end of a label), 253
/// characters at most; the first label may be `*` when others follow.
fn valid_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    let labels: Vec<&str> = name.split('.').collect();
    !name.is_empty()
        && name.len() <= 253
        && labels.iter().enumerate().all(|(i, label)| {
            (i == 0 && *label == "*" && labels.len() > 1)
                || (!label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        })
}

/// As [`io_err`], for a file being loaded: a missing one says how to make it.
/// Largest certificate file read (a chain of a few certificates is a few KiB).
const MAX_CERT_FILE: u64 = 1024 * 1024;

/// Reads a certificate file: a regular file of at most [`MAX_CERT_FILE`] bytes (see
/// [`crate::files::read_regular`]).
fn read_cert_file(path: &Path) -> Result<Vec<u8>, CertError> {
    crate::files::read_regular(path, MAX_CERT_FILE).map_err(load_err(path))
}

fn load_err(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| match source.kind() {
        std::io::ErrorKind::NotFound => CertError::Missing {
            path: path.to_path_buf(),
            working_dir: if path.is_relative() {
                std::env::current_dir().ok()
            } else {
                None
            },
            remedy: remedy_for(path),
            named_by: NamedBy::CertsDir,
        },
        _ => io_err(path)(source),
    }
}

/// The command that makes the missing file `path`: `certs init` where no CA is beside it
/// (nothing was made yet), else the one that adds it to that CA, as `init` would refuse to
/// replace the CA: `certs issue` for an identity's certificate, key or token key, `certs
/// token-keys` for token keys.
fn remedy_for(path: &Path) -> String {
    const INIT: &str =
        "make certificates and keys with `securesrv certs init` (or scripts/gen-certs.sh)";
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Some(file) = path.file_name().and_then(|n| n.to_str()) else {
        return INIT.into();
    };
    if file == CA_CERT || !dir.join(CA_CERT).exists() {
        return INIT.into();
    }
    let dir_flag = dir_flag(dir);
    let token_keys = format!("make the token keys with `securesrv certs token-keys{dir_flag}`");
    if file == CA_KEY {
        return "ca.crt is there without its key: restore ca.key, or make a new CA with \
                `securesrv certs init --force` (it invalidates every certificate the old one \
                signed)"
            .into();
    }
    if file == MASTER_TOKEN_KEY {
        return token_keys;
    }
    let identity = file
        .rsplit_once('.')
        .and_then(|(stem, ext)| Some((stem, ext, identity_of_stem(stem)?)))
        .filter(|(_, ext, (role, _))| {
            matches!(*ext, "crt" | "key") || (*ext == "token" && *role == Role::Worker)
        });
    let Some((stem, ext, (role, name))) = identity else {
        return format!(
            "issue it from the CA there with `securesrv certs issue --role ROLE --name \
             NAME{dir_flag}`"
        );
    };
    if ext == "token" && !dir.join(MASTER_TOKEN_KEY).exists() {
        return token_keys;
    }
    // `issue` refuses to replace the certificate that is there without `--force`.
    let force = if ext != "crt" && dir.join(format!("{stem}.crt")).exists() {
        " --force"
    } else {
        ""
    };
    format!(
        "issue it from the CA there with `securesrv certs issue --role {role} --name \
         {name}{dir_flag}{force}`"
    )
}

/// The `--dir` a `certs` command needs to act on the files in `dir` (none for `certs`, where
/// they look unless told), with its leading space.
pub(crate) fn dir_flag(dir: &Path) -> String {
    if dir == Path::new("certs") {
        String::new()
    } else {
        format!(
            " --dir {}",
            crate::identity::shell_word(&dir.display().to_string())
        )
    }
}

/// The identity whose files are named `stem`: the inverse of [`file_stem`].
fn identity_of_stem(stem: &str) -> Option<(Role, String)> {
    let (role, name) = match stem.split_once('-') {
        Some((role, name)) => (role.parse::<Role>().ok()?, name),
        None => match stem.parse::<Role>().ok()? {
            Role::Client => (Role::Client, "default"),
            Role::Worker => return None,
            role => (role, "main"),
        },
    };
    if role == Role::Worker && !canonical_worker_number(name) {
        return None;
    }
    let id = SpiffeId::new(crate::identity::DEFAULT_TRUST_DOMAIN, role, name).ok()?;
    (file_stem(&id) == stem).then(|| (role, name.to_string()))
}

/// A worker number as `worker --id` prints it: `03` or `+3` would name a certificate that no
/// worker id matches (worker 3 expects `.../worker/3`), and a key file the scans skip.
fn canonical_worker_number(s: &str) -> bool {
    s.parse::<u32>().is_ok_and(|n| n > 0 && n.to_string() == s)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The file stem for an identity's certificate and key: `dispatcher`, `worker-1`, `watchdog`,
/// `client` (for `client/default`), `client-alice`.
pub fn file_stem(id: &SpiffeId) -> String {
    match (id.role(), id.name()) {
        (Role::Dispatcher, "main") | (Role::Watchdog, "main") | (Role::Client, "default") => {
            id.role().as_str().to_string()
        }
        (role, name) => format!("{}-{}", role.as_str(), name),
    }
}

/// `(certificate, key)` paths of an identity in `dir`.
pub fn identity_paths(dir: &Path, id: &SpiffeId) -> (PathBuf, PathBuf) {
    let stem = file_stem(id);
    (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    )
}

/// Options of `certs init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Trust domain of every identity.
    pub trust_domain: String,
    /// The workers to issue certificates and token keys for, by number
    /// ([`numbered_workers`] for 1 to N).
    pub workers: Vec<u32>,
    /// Validity of leaf certificates.
    pub days: u32,
    /// Extra DNS names or IP addresses for the server certificates.
    pub hosts: Vec<String>,
    /// Replace an existing CA, and any file of the set that is there.
    pub force: bool,
}

/// What a leaf certificate should contain. Tests use the fields to build odd certificates.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// URI SANs (normally exactly one SPIFFE ID).
    pub uris: Vec<String>,
    /// DNS names and IP addresses.
    pub hosts: Vec<String>,
    /// Extended key usages.
    pub eku: Vec<ExtendedKeyUsagePurpose>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Subject common name.
    pub common_name: String,
}

impl LeafSpec {
    /// The standard certificate for `id`: one URI SAN, EKUs by role, server names for listeners.
    pub fn for_identity(
        id: &SpiffeId,
        days: u32,
        extra_hosts: &[String],
    ) -> Result<Self, CertError> {
        let (eku, serves) = match id.role() {
            Role::Dispatcher => (
                vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ],
                true,
            ),
            Role::Worker => (vec![ExtendedKeyUsagePurpose::ServerAuth], true),
            Role::Watchdog | Role::Client => (vec![ExtendedKeyUsagePurpose::ClientAuth], false),
        };
        let mut hosts = Vec::new();
        if serves {
            hosts.push("localhost".to_string());
            hosts.push("127.0.0.1".to_string());
            hosts.extend(extra_hosts.iter().cloned());
        }
        let now = checked_now(days)?;
        Ok(LeafSpec {
            uris: vec![id.to_string()],
            hosts,
            eku,
            not_before: now - Duration::minutes(5),
            not_after: now + Duration::days(days.into()),
            common_name: format!("securesrv {} {}", id.role(), id.name()),
        })
    }
}

/// The time now, for a certificate or revocation list valid from five minutes ago to `days`
/// from now; [`CertError::Clock`] when the system clock reads a time outside what one can
/// name. `OffsetDateTime::now_utc()` and the arithmetic on it panicked after the year 9999,
/// and rcgen's DER encoder before the year 0 (found by an input-hardening review).
pub(crate) fn checked_now(days: u32) -> Result<OffsetDateTime, CertError> {
    checked_at(std::time::SystemTime::now(), days)
}

/// [`checked_now`] at the time `now`.
fn checked_at(now: std::time::SystemTime, days: u32) -> Result<OffsetDateTime, CertError> {
    let secs = match now.duration_since(std::time::UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).ok(),
        Err(before) => 0i64.checked_sub_unsigned(before.duration().as_secs()),
    };
    secs.and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .filter(|now| {
            let from = now.checked_sub(Duration::minutes(5));
            let to = now.checked_add(Duration::days(days.into()));
            from.is_some_and(|t| t.year() >= 0) && to.is_some_and(|t| t.year() <= 9999)
        })
        .ok_or(CertError::Clock(days))
}

/// A leaf certificate and its key, as PEM.
pub struct IssuedLeaf {
    /// The certificate.
    pub cert_pem: String,
    /// The PKCS#8 private key, zeroized on drop.
    pub key_pem: Zeroizing<String>,
}

/// A loaded CA that can issue leaves.
pub struct CertAuthority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl CertAuthority {
    /// A new self-signed CA for `trust_domain`.
    pub fn generate(trust_domain: &str) -> Result<Self, CertError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "securesrv");
        // A random suffix keeps two deployments' CAs apart: with equal subject names a
        // foreign certificate would be matched to our CA and fail on its signature instead of
        // being reported as coming from an unknown issuer.
        let serial = random_serial()?;
        let tag = hex::encode(&serial.to_bytes()[..4]);
        dn.push(
            DnType::CommonName,
            format!("securesrv CA {trust_domain} {tag}"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names =
            vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
        let now = checked_now(CA_DAYS)?;
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(CA_DAYS.into());
        params.serial_number = Some(serial);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(CertAuthority {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads `ca.crt` and `ca.key` from `dir` (the key must be mode 0600), refusing a pair
    /// that cannot sign for that CA: rcgen signs with whatever key it is given, and a
    /// certificate or revocation list signed with another CA's key, or under a certificate
    /// that is no CA, would be written, and then refused by every peer.
    pub fn load(dir: &Path) -> Result<Self, CertError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let cert_pem =
            String::from_utf8(read_cert_file(&cert_path)?).map_err(|_| CertError::BadPem {
                path: cert_path.clone(),
                what: "not a PEM file".into(),
            })?;
        let cert_der = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .next()
            .ok_or_else(|| CertError::BadPem {
                path: cert_path.clone(),
                what: "no CERTIFICATE in file".into(),
            })?
            .map_err(|e| CertError::BadPem {
                path: cert_path.clone(),
                what: format!("not a PEM certificate file: {}", pem_problem(&e)),
            })?;
        let (_, ca_cert) =
            x509_parser::parse_x509_certificate(&cert_der).map_err(|e| CertError::BadPem {
                path: cert_path.clone(),
                what: format!("cannot parse the CA certificate: {e}"),
            })?;
        if !ca_cert.is_ca() {
            return Err(CertError::NotCa {
                cert: cert_path,
                key: key_path,
            });
        }
        // rcgen signs only with a PKCS#8 key when built on ring, as here.
        let key = match &*load_private_key(&key_path)? {
            PrivateKeyDer::Pkcs8(pkcs8) => KeyPair::try_from(pkcs8),
            PrivateKeyDer::Pkcs1(_) => return Err(CertError::CaKeyNotPkcs8(key_path, "PKCS#1")),
            PrivateKeyDer::Sec1(_) => return Err(CertError::CaKeyNotPkcs8(key_path, "SEC1")),
            _ => Err(rcgen::Error::CouldNotParseKeyPair),
        }
        .map_err(|e| CertError::BadPem {
            path: key_path.clone(),
            what: format!("cannot load CA key: {e}"),
        })?;
        if key.public_key_raw() != &ca_cert.public_key().subject_public_key.data[..] {
            return Err(CertError::CaKeyMismatch {
                cert: cert_path,
                key: key_path,
            });
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| CertError::BadPem {
            path: cert_path.clone(),
            what: format!("cannot load CA certificate: {e}"),
        })?;
        // rcgen rebuilds the CA's name from its attributes, one value per type: a name that
        // repeats one (`DC=com, DC=example`, two `OU`s) comes out another. Whatever it signed
        // would then name an issuer no peer matches to this CA: certificates that do not
        // chain, and, silently, a revocation list that revokes nothing. The name it writes is
        // seen by having it sign a throw-away certificate (not a list: rcgen signs one only
        // for a CA whose key usage includes cRLSign, which `issue` does not need).
        if issuer_written(&issuer)? != ca_cert.subject().as_raw() {
            return Err(CertError::CaNameNotKept {
                subject: crate::identity::printable_within(&ca_cert.subject().to_string(), 200)
                    .into_owned(),
                cert: cert_path,
            });
        }
        Ok(CertAuthority { cert_pem, issuer })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM (zeroized on drop).
    pub fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.issuer.key().serialize_pem())
    }

    /// Issues a leaf certificate with a fresh P-256 key.
    pub fn issue(&self, spec: &LeafSpec) -> Result<IssuedLeaf, CertError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "securesrv");
        dn.push(DnType::CommonName, spec.common_name.clone());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = spec.eku.clone();
        params.use_authority_key_identifier_extension = true;
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.serial_number = Some(random_serial()?);
        let mut sans = Vec::new();
        for uri in &spec.uris {
            sans.push(SanType::URI(uri.clone().try_into()?));
        }
        for host in &spec.hosts {
            sans.push(match host.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                // rcgen takes any IA5 string; a client would never match a name with a space.
                Err(_) if !valid_dns_name(host) => return Err(CertError::BadHost(host.clone())),
                Err(_) => SanType::DnsName(
                    host.clone()
                        .try_into()
                        .map_err(|_| CertError::BadHost(host.clone()))?,
                ),
            });
        }
        params.subject_alt_names = sans;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedLeaf {
            cert_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
        })
    }
}

/// The issuer name that rcgen writes for `issuer`, as DER: that of a certificate it signs.
fn issuer_written(issuer: &Issuer<'_, KeyPair>) -> Result<Vec<u8>, CertError> {
    let probe = CertificateParams::default().signed_by(&KeyPair::generate()?, issuer)?;
    let (_, cert) = x509_parser::parse_x509_certificate(probe.der()).map_err(|e| {
        CertError::Generate(rcgen::Error::X509(format!(
            "cannot read back a certificate just made: {e}"
        )))
    })?;
    Ok(cert.issuer().as_raw().to_vec())
}

fn random_serial() -> Result<SerialNumber, CertError> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| crate::token::TokenError::Random)?;
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and no leading zero byte to strip
    Ok(SerialNumber::from_slice(&bytes))
}

/// Creates `dir` with mode 0700 if it does not exist. An existing directory keeps its mode:
/// it may be the working directory or a home (`--dir .`); the key files in it are 0600.
pub fn create_private_dir(dir: &Path) -> Result<(), CertError> {
    if dir.exists() {
        // Keys written there would be refused when loaded (see `check_dir_of_secret`): say so
        // now, before writing anything (a clone made under umask 002 has a 0775 `certs/`).
        return check_dir(dir);
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))
}

/// Writes `data` to `path` with `mode`, never through an existing file's permissions: an
/// existing file is refused unless `overwrite`, in which case it is replaced. Either way the
/// file appears whole or not at all (see [`Staged`]).
pub fn write_file(path: &Path, data: &[u8], mode: u32, overwrite: bool) -> Result<(), CertError> {
    Staged::write(path, data, mode)?.commit(overwrite)
}

/// A file written and synced beside its destination under a temporary name, not yet in place.
/// [`Staged::commit`] renames it into place, so that a reader (a restarting component) sees
/// the old file or the new one, never a part; dropped uncommitted, it is removed. Staging
/// every file of a change before committing any keeps a full disk or an unwritable file from
/// leaving the change half done.
pub struct Staged {
    tmp: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl Staged {
    /// Writes `data` with `mode` to a fresh temporary file next to `path`, and syncs it.
    pub fn write(path: &Path, data: &[u8], mode: u32) -> Result<Staged, CertError> {
        let name = path.file_name().map_or_else(
            || std::ffi::OsString::from("file"),
            std::ffi::OsStr::to_os_string,
        );
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(&name);
        tmp_name.push(format!(".{}.tmp", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        // Left by a run of the same pid that was killed: never written through.
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err(path))?;
        let staged = Staged {
            tmp,
            path: path.to_path_buf(),
            committed: false,
        };
        f.write_all(data).map_err(io_err(path))?;
        f.sync_all().map_err(io_err(path))?;
        Ok(staged)
    }

    /// Where the file goes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Puts the file in place: renamed over `path` if `overwrite`, else linked to it, which
    /// fails if it exists (no check-then-write window); then the directory is synced, so that
    /// the change survives a crash.
    pub fn commit(mut self, overwrite: bool) -> Result<(), CertError> {
        if overwrite {
            fs::rename(&self.tmp, &self.path).map_err(io_err(&self.path))?;
            self.committed = true;
        } else {
            match fs::hard_link(&self.tmp, &self.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(CertError::Exists(self.path.clone(), ""));
                }
                // A file system without hard links (vfat, some network and FUSE mounts):
                // look, then rename.
                Err(_) if fs::symlink_metadata(&self.path).is_ok() => {
                    return Err(CertError::Exists(self.path.clone(), ""));
                }
                Err(_) => {
                    fs::rename(&self.tmp, &self.path).map_err(io_err(&self.path))?;
                }
            }
            // Linked: the temporary name must go, or a second name of the key stays behind.
            self.committed = true;
            match fs::remove_file(&self.tmp) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io_err(&self.tmp)(e));
                }
                _ => {}
            }
        }
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Reads a secret (private key or token key), refusing it unless only its owner can read it
/// and its owner is us or root, as ssh does. The checks look at the file opened, not at
/// the path again (which could be swapped in between); a symbolic link is followed, as
/// Kubernetes mounts secrets through them.
pub fn read_secret_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, CertError> {
    read_secret(path, Ok)
}

/// [`read_secret_file`] with the contents parsed by `parse` before the file's mode and owner
/// are judged: a file that is not the secret asked for (a certificate given as the key) is
/// reported as such, not as a key to `chmod`. Parsing first exposes nothing: what `parse`
/// makes of the bytes is dropped if the file is then refused.
fn read_secret<T>(
    path: &Path,
    parse: impl FnOnce(Zeroizing<Vec<u8>>) -> Result<T, CertError>,
) -> Result<T, CertError> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    const MAX_KEY_FILE: u64 = 1024 * 1024;
    // A regular file only, looked at before opening, and opened without blocking: opening a
    // FIFO put in a key's place (even between the look and the open) would hang the process.
    // Then the file opened must be the one looked at.
    let seen = fs::metadata(path).map_err(load_err(path))?;
    let not_a_key = |why: &str| CertError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(why.to_string()),
    };
    if !seen.is_file() {
        return Err(not_a_key("not a regular file"));
    }
    let mut f = std::os::unix::fs::OpenOptionsExt::custom_flags(
        fs::OpenOptions::new().read(true),
        nix::fcntl::OFlag::O_NONBLOCK.bits(),
    )
    .open(path)
    .map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => {
            let (owner, me) = (seen.uid(), nix::unistd::geteuid().as_raw());
            let shown = path.display();
            let advice = if owner == me {
                format!(
                    "its mode ({:o}) does not let its owner read it, or a security module \
                     refuses: `chmod 600 {shown}`",
                    seen.mode() & 0o7777
                )
            } else if owner == 0 {
                format!(
                    "it is root's (a `certs` command run as root makes root's files): give it \
                     to this user (`chown {me} {shown}`), and run the `certs` commands as this \
                     user"
                )
            } else {
                format!(
                    "run this as uid {owner}, the user the files were made for, or give the file \
                     to this user (`chown {me} {shown}`)"
                )
            };
            CertError::KeyNotReadable {
                path: path.to_path_buf(),
                owner,
                me,
                advice,
            }
        }
        _ => load_err(path)(e),
    })?;
    let meta = f.metadata().map_err(io_err(path))?;
    if (meta.dev(), meta.ino()) != (seen.dev(), seen.ino()) {
        return Err(not_a_key("replaced while being opened"));
    }
    if meta.len() > MAX_KEY_FILE {
        return Err(CertError::KeyFileTooLarge(path.to_path_buf()));
    }
    // Room for all of it at once: a buffer that grows frees its old copy without zeroing it.
    // A file that grew since it was looked at is not read beyond that room.
    let room = meta.len() as usize + 1;
    let mut data = Zeroizing::new(Vec::with_capacity(room));
    Read::by_ref(&mut f)
        .take(room as u64)
        .read_to_end(&mut data)
        .map_err(io_err(path))?;
    if data.len() == room {
        return Err(CertError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other("changed while being read"),
        });
    }
    let parsed = parse(data)?;
    check_dir_of_secret(path)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(CertError::KeyTooOpen {
            path: path.to_path_buf(),
            mode,
        });
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(CertError::KeyNotOwned {
            path: path.to_path_buf(),
            owner: meta.uid(),
            me,
        });
    }
    Ok(parsed)
}

/// Refuses a secret whose directory others can write to, as ssh refuses such a directory for
/// `authorized_keys`: whoever can write there can put another key, or another CA certificate,
/// in place of ours (the file checks cannot see a rename to come). A directory with the
/// sticky bit (`/tmp`) lets others add files but not replace ours.
fn check_dir_of_secret(path: &Path) -> Result<(), CertError> {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => check_dir(d),
        _ => check_dir(Path::new(".")),
    }
}

/// Refuses a directory others can write to, or its group unless that group is its owner's
/// own, unless it has the sticky bit. A group of the owner's own (a user private group:
/// named as the owner, with no other member) is where umask 002 is the default (Debian,
/// Ubuntu, Fedora), and adds no one; Debian's ssh accepts it for the same reason.
fn check_dir(dir: &Path) -> Result<(), CertError> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(dir).map_err(io_err(dir))?;
    let mode = meta.permissions().mode() & 0o7777;
    let others = mode & 0o002 != 0;
    let group = mode & 0o020 != 0 && !private_group(meta.uid(), meta.gid());
    if (others || group) && mode & 0o1000 == 0 {
        return Err(CertError::DirTooOpen {
            dir: dir.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Whether group `gid` is user `uid`'s own: named as the user, with no member but the user.
fn private_group(uid: u32, gid: u32) -> bool {
    use nix::unistd::{Gid, Group, Uid, User};
    let (Ok(Some(user)), Ok(Some(group))) = (
        User::from_uid(Uid::from_raw(uid)),
        Group::from_gid(Gid::from_raw(gid)),
    ) else {
        return false;
    };
    group.name == user.name && group.mem.iter().all(|m| *m == user.name)
}

/// Loads every certificate in a PEM file (leaf first, then any intermediates).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let data = read_cert_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::BadPem {
            path: path.to_path_buf(),
            what: format!("not a PEM certificate file: {}", pem_problem(&e)),
        })?;
    if certs.is_empty() {
        return Err(CertError::BadPem {
            path: path.to_path_buf(),
            what: "no CERTIFICATE in file".into(),
        });
    }
    Ok(certs)
}

/// Loads a private key (PKCS#8, PKCS#1 or SEC1 PEM), refusing a file others can read. The
/// key is zeroized when dropped, as the file's text is.
pub fn load_private_key(path: &Path) -> Result<Zeroizing<PrivateKeyDer<'static>>, CertError> {
    read_secret(path, |data| match PrivateKeyDer::from_pem_slice(&data) {
        Ok(key) => Ok(Zeroizing::new(key)),
        Err(_) if CertificateDer::pem_slice_iter(&data).any(|c| c.is_ok()) => {
            Err(CertError::CertificateNotKey(path.to_path_buf()))
        }
        // PKCS#8 encrypted, or an old-style PEM encryption header: "no key" would mislead.
        Err(_)
            if [
                &b"-----BEGIN ENCRYPTED PRIVATE KEY-----"[..],
                b"Proc-Type: 4,ENCRYPTED",
            ]
            .iter()
            .any(|marker| data.windows(marker.len()).any(|w| w == *marker)) =>
        {
            Err(CertError::EncryptedKey(path.to_path_buf()))
        }
        Err(_) => Err(CertError::BadPem {
            path: path.to_path_buf(),
            what: "no private key (PKCS#8, PKCS#1 or SEC1 PEM) in file".into(),
        }),
    })
}

fn write_leaf(
    dir: &Path,
    ca: &CertAuthority,
    id: &SpiffeId,
    days: u32,
    hosts: &[String],
    force: bool,
) -> Result<Vec<PathBuf>, CertError> {
    if !force {
        let (crt, key) = identity_paths(dir, id);
        for path in [key, crt] {
            if fs::symlink_metadata(&path).is_ok() {
                return Err(CertError::Exists(path, ""));
            }
        }
    }
    commit_staged(stage_leaf(dir, ca, id, days, hosts)?, force)?;
    let (crt, key) = identity_paths(dir, id);
    Ok(vec![crt, key])
}

/// `id`'s key and certificate, signed by `ca`, staged (not yet in place).
fn stage_leaf(
    dir: &Path,
    ca: &CertAuthority,
    id: &SpiffeId,
    days: u32,
    hosts: &[String],
) -> Result<Vec<Staged>, CertError> {
    let (crt, key) = identity_paths(dir, id);
    let leaf = ca.issue(&LeafSpec::for_identity(id, days, hosts)?)?;
    Ok(vec![
        Staged::write(&key, leaf.key_pem.as_bytes(), 0o600)?,
        Staged::write(&crt, leaf.cert_pem.as_bytes(), 0o644)?,
    ])
}

/// Puts `staged` in place together: replacing what is there, all or none (see
/// `token_keys::commit_all`), with `force`; else beside nothing, each refused if its file
/// exists (the caller has looked). A key put in place beside the old certificate (its rename
/// done, the certificate's refused) left a component that refused to start, and the old key
/// lost; a new CA key beside the old CA certificate signed certificates nothing verified.
fn commit_staged(staged: Vec<Staged>, force: bool) -> Result<(), CertError> {
    interrupt::check()?;
    if force {
        token_keys::commit_all(staged)?;
    } else {
        for file in staged {
            file.commit(false)?;
        }
    }
    Ok(())
}

/// `certs init`: a new CA, every component's certificate and key, and the token keys.
/// Returns the paths written. Without `force` it changes nothing if any of those files (or a
/// `ca.crl`) is there; with it, it replaces them.
pub fn init(dir: &Path, opts: &InitOptions) -> Result<Vec<PathBuf>, CertError> {
    let td = &opts.trust_domain;
    // Validate everything before touching the disk.
    check_days(opts.days)?;
    check_workers(&opts.workers)?;
    let dispatcher = SpiffeId::dispatcher(td)?;
    let watchdog = SpiffeId::watchdog(td)?;
    let client = SpiffeId::new(td, Role::Client, "default")?;
    let workers = (opts.workers.iter())
        .map(|&n| SpiffeId::worker(td, n))
        .collect::<Result<Vec<_>, _>>()?;
    check_hosts(&opts.hosts)?;
    create_private_dir(dir)?;
    for existing in [CA_CERT, CA_KEY] {
        let p = dir.join(existing);
        if p.exists() && !opts.force {
            return Err(CertError::Exists(
                p,
                " (a new CA invalidates every certificate the old one signed)",
            ));
        }
    }
    // With no CA there may still be files of another making (an openssl-made dispatcher.crt,
    // a token.key from `certs token-keys`): replaced, they would be lost without a word.
    if !opts.force {
        let mut names = vec![CA_KEY.to_string(), CA_CERT.to_string(), CA_CRL.to_string()];
        for id in [&dispatcher, &watchdog, &client]
            .into_iter()
            .chain(&workers)
        {
            let stem = file_stem(id);
            names.extend([format!("{stem}.key"), format!("{stem}.crt")]);
        }
        names.push(MASTER_TOKEN_KEY.to_string());
        names.extend(workers.iter().map(|id| format!("{}.token", file_stem(id))));
        let existing: Vec<PathBuf> = (names.iter().map(|n| dir.join(n)))
            .filter(|p| fs::symlink_metadata(p).is_ok())
            .collect();
        if !existing.is_empty() {
            return Err(CertError::InitWouldReplace(existing));
        }
    }
    // Every file is written before any is put in place, and then all are, or (with `force`)
    // none: a new CA key beside the old CA certificate, or new leaves beside an old CA, are
    // unusable, and the old set would be lost.
    let ca = CertAuthority::generate(td)?;
    let (ca_key, ca_cert) = (dir.join(CA_KEY), dir.join(CA_CERT));
    let mut staged = vec![
        Staged::write(&ca_key, ca.key_pem().as_bytes(), 0o600)?,
        Staged::write(&ca_cert, ca.cert_pem().as_bytes(), 0o644)?,
    ];
    let mut written = vec![ca_cert, ca_key];
    for id in [&dispatcher, &watchdog, &client]
        .into_iter()
        .chain(&workers)
    {
        staged.extend(stage_leaf(dir, &ca, id, opts.days, &opts.hosts)?);
        let (crt, key) = identity_paths(dir, id);
        written.extend([crt, key]);
    }
    let master = KeyFile::single(1, SecretKey::generate()?);
    let master_path = dir.join(MASTER_TOKEN_KEY);
    staged.push(Staged::write(
        &master_path,
        master.render().as_bytes(),
        0o600,
    )?);
    written.push(master_path);
    for id in &workers {
        let token = token_keys::stage_worker_token(dir, &master, id)?;
        written.push(token.path().to_path_buf());
        staged.push(token);
    }
    commit_staged(staged, opts.force)?;
    // The old CA's revocation list: everything it listed is untrusted now anyway, and the
    // next `certs revoke` would refuse a list from another CA.
    match fs::remove_file(dir.join(CA_CRL)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io_err(&dir.join(CA_CRL))(e));
        }
        _ => {}
    }
    Ok(written)
}

/// Options of `certs issue`.
#[derive(Debug, Clone)]
pub struct IssueOptions {
    /// Role of the new identity.
    pub role: Role,
    /// Name within the role (a worker's name is its number).
    pub name: String,
    /// Trust domain; `None` reads it from the CA certificate.
    pub trust_domain: Option<String>,
    /// Validity in days.
    pub days: u32,
    /// Extra DNS names or IPs (listeners only).
    pub hosts: Vec<String>,
    /// Replace existing files for this identity.
    pub force: bool,
}

/// `certs issue`: one more identity signed by the existing CA in `dir` (and, for a worker, its
/// token key derived from `token.key`).
pub fn issue(dir: &Path, opts: &IssueOptions) -> Result<Vec<PathBuf>, CertError> {
    issue_files(dir, opts).map_err(|e| e.named_by(NamedBy::CertsCommand))
}

fn issue_files(dir: &Path, opts: &IssueOptions) -> Result<Vec<PathBuf>, CertError> {
    check_hosts(&opts.hosts)?;
    check_days(opts.days)?;
    let ca = CertAuthority::load(dir)?;
    let td = match &opts.trust_domain {
        Some(td) => td.clone(),
        None => ca_trust_domain(ca.cert_pem())
            .unwrap_or_else(|| crate::identity::DEFAULT_TRUST_DOMAIN.to_string()),
    };
    if opts.role == Role::Worker && !canonical_worker_number(&opts.name) {
        return Err(CertError::BadWorkerName(
            crate::identity::printable(&opts.name).into_owned(),
        ));
    }
    if opts.role == Role::Dispatcher && opts.name != "main" {
        return Err(CertError::DispatcherName(
            crate::identity::printable(&opts.name).into_owned(),
        ));
    }
    let id = SpiffeId::new(&td, opts.role, &opts.name)?;
    let (crt, _) = identity_paths(dir, &id);
    if crt.exists() && !opts.force {
        return Err(CertError::Exists(crt, ""));
    }
    // A worker also needs its token key. Find out whether it can be made before the
    // certificate is written, so that a refusal leaves no half-made identity behind. One
    // already derived from token.key (by `certs token-keys`) is kept as it is.
    let master = match opts.role {
        Role::Worker => {
            let master = load_key_file(&dir.join(MASTER_TOKEN_KEY))?;
            let token = worker_token_path(dir, &id);
            if token.exists() && !opts.force {
                let derived = master.map_keys(|k| k.derive_for(&id)).render();
                if *load_key_file(&token)?.render() != *derived {
                    return Err(CertError::Exists(
                        token,
                        " (it was not derived from token.key)",
                    ));
                }
                None
            } else {
                Some(master)
            }
        }
        _ => None,
    };
    let mut written = write_leaf(dir, &ca, &id, opts.days, &opts.hosts, opts.force)?;
    if let Some(master) = &master {
        written.push(write_worker_token(dir, master, &id, opts.force)?);
    }
    Ok(written)
}

/// The trust domain named by a CA certificate's `spiffe://<td>` URI SAN, if any.
/// The trust domain that `dir`'s `ca.crt` names, if it can be read and names one.
pub fn ca_trust_domain_in(dir: &Path) -> Option<String> {
    let pem = crate::files::read_regular(&dir.join(CA_CERT), 1024 * 1024).ok()?;
    ca_trust_domain(std::str::from_utf8(&pem).ok()?)
}

pub(crate) fn ca_trust_domain(pem: &str) -> Option<String> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => u
            .strip_prefix("spiffe://")
            .filter(|td| !td.contains('/'))
            .map(str::to_string),
        _ => None,
    })
}

pub mod interrupt;
mod revoke;
pub use revoke::{CA_CRL, Revoked, crl_path_beside, is_listed, load_crls, revoke};
mod token_keys;
use token_keys::write_worker_token;
pub use token_keys::{
    load_key_file, load_live_key_file, rotate_token_key, token_keys, worker_token_path,
};

#[cfg(test)]
mod tests;
