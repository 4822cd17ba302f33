//! Mutual TLS for every link: rustls with the `ring` provider, TLS 1.3 only, client certificates
//! required, ALPN `securesrv/1` required, and a deadline on every handshake.
//!
//! Identity is checked in two steps (as linkerd's meshtls does): rustls/webpki verifies the
//! chain to our CA, then [`PeerPolicy`] checks the single SPIFFE URI SAN against what this
//! endpoint allows — inside the verifier, so a refused peer gets a TLS alert, and once more after
//! the handshake, because a resumed session skips the verifier. Server certificates are matched
//! on their SPIFFE ID, not on DNS names: a dialler names the identity it expects.
//!
//! This module knows roles only as far as [`PeerPolicy`] needs them; it knows nothing of ops,
//! tokens or frames.

use crate::certs::{self, CertError, NamedBy};
use crate::identity::{IdentityError, PeerPolicy, Role, SpiffeId};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError};
use rustls::{RootCertStore, SignatureScheme};
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The one application protocol both sides must agree on.
pub const ALPN: &[u8] = b"securesrv/1";
/// Default deadline for a TLS handshake (and for the TCP connect before it).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

mod tickets;
mod transport;
pub use tickets::TicketStore;
pub use transport::{READ_AHEAD, Transport};

/// A TLS stream accepted by a listener.
pub type ServerStream = tokio_rustls::server::TlsStream<Transport>;
/// A TLS stream opened by a dialler.
pub type ClientStream = tokio_rustls::client::TlsStream<Transport>;

/// Whether `stream`'s handshake resumed a session. A server refuses such a session after the
/// handshake (its identity's certificate has expired since the ticket was issued) with a bare
/// `close_notify`, where a full handshake would carry an alert that says why.
pub fn is_resumed(stream: &ClientStream) -> bool {
    stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
}

/// Why a handshake did not produce an authorised peer.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The peer did not finish within the handshake deadline.
    #[error("handshake not finished within {0:?}")]
    Timeout(Duration),
    /// TCP or TLS I/O failed (including the peer closing mid-handshake).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// rustls refused the handshake (bad chain, expired certificate, no certificate, ...).
    #[error("TLS: {0}")]
    Tls(rustls::Error),
    /// The peer's identity is not acceptable here.
    #[error("identity refused: {0}")]
    Identity(IdentityError),
    /// The peer did not negotiate ALPN `securesrv/1`.
    #[error("peer did not negotiate ALPN securesrv/1")]
    NoAlpn,
    /// The peer presented no certificate (cannot happen with client auth required; checked
    /// anyway).
    #[error("peer presented no certificate")]
    NoCertificate,
}

impl HandshakeError {
    /// Unwraps the rustls and identity errors that tokio-rustls hides inside `io::Error`.
    fn from_io(e: std::io::Error) -> Self {
        let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
            return HandshakeError::Io(e);
        };
        if let rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(other))) = inner
        {
            if let Some(id_err) = other.downcast_ref::<IdentityError>() {
                return HandshakeError::Identity(id_err.clone());
            }
        }
        HandshakeError::Tls(inner.clone())
    }

    /// Whether trying again cannot help: the peer ended the handshake with an alert (it refused
    /// our certificate, say), or we refused the peer (its certificate, its identity, no ALPN).
    /// Network trouble — nothing listening, a reset, the deadline — may pass and is not a
    /// refusal.
    pub fn is_refusal(&self) -> bool {
        !matches!(self, HandshakeError::Io(_) | HandshakeError::Timeout(_))
    }
}

/// The alert the peer ended the session with, if `e` (from reading or writing a TLS stream)
/// carries one. In TLS 1.3 a client finishes its side of the handshake before the server has
/// judged the client's certificate, so a server's refusal reaches the client as the error of
/// its first read, not of `connect`.
pub fn alert_received(e: &std::io::Error) -> Option<rustls::AlertDescription> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

/// Errors while building TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// A certificate or key file could not be loaded.
    #[error("{0}")]
    Files(#[from] CertError),
    /// rustls refused the configuration (e.g. key does not match certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The CA file holds no usable trust anchor.
    #[error("{0}: no usable CA certificate")]
    NoRoots(String),
    /// Our own certificate does not carry a valid identity.
    #[error("own certificate {path}: {err}")]
    OwnIdentity {
        /// The certificate file.
        path: String,
        /// Why its identity is unusable.
        err: IdentityError,
    },
    /// Our own certificate names another identity than the one this component is.
    #[error(
        "own certificate {path} is {found}, not {expected}: check `trust_domain` in the \
         configuration, or issue the certificate again (`securesrv certs issue`)"
    )]
    NotOwnIdentity {
        /// The certificate file.
        path: String,
        /// The identity this component is.
        expected: String,
        /// The identity the certificate names.
        found: String,
    },
    /// A certificate is outside its validity period: every peer would refuse it.
    #[error("{path}: certificate {why}; {remedy}")]
    NotValidNow {
        /// The certificate file.
        path: String,
        /// "expired on ..." or "not valid before ...".
        why: String,
        /// What to do: the `certs issue` command for its identity (and, for a component, a restart).
        remedy: String,
    },
    /// Our own certificate does not lead to the CA file's certificate, or its extended key
    /// usage does not fit its role: every peer would refuse it.
    #[error(
        "{path}: certificate does not verify against {ca} ({why}), so every peer would refuse it; {remedy}"
    )]
    NotFromCa {
        /// The certificate file.
        path: String,
        /// The CA file.
        ca: String,
        /// What webpki found.
        why: String,
        /// What to do: the `certs issue` command for its identity (and, for a component, a restart).
        remedy: String,
    },
    /// Our own certificate is on the revocation list beside the CA: every peer would refuse it.
    #[error("{path}: certificate revoked (listed in {crl}); {remedy}")]
    Revoked {
        /// The certificate file.
        path: String,
        /// The revocation list.
        crl: String,
        /// What to do: the `certs issue` command for its identity (and, for a component, a restart).
        remedy: String,
    },
    /// Building the client certificate verifier failed.
    #[error("client verifier: {0}")]
    Verifier(String),
    /// The private key is not the one of the certificate (or not usable for TLS).
    #[error("{key} is not the private key of {cert} ({why})")]
    KeyMismatch {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
        /// What rustls said.
        why: String,
    },
}

/// The `ring` provider, restricted to TLS 1.3 suites, `TLS13_AES_128_GCM_SHA256` preferred.
///
/// All three TLS 1.3 suites stay enabled; a peer that prefers another gets it. Ours prefer
/// AES-128-GCM because its key schedule runs on SHA-256, which `ring` computes with the CPU's
/// SHA instructions where it has them; there are none for SHA-384 (the AES-256 suite's), and
/// it made every new connection measurably dearer, for no security a 128-bit key lacks here.
///
/// Key exchange: X25519 (preferred) and P-256, not P-384. A server computes the key exchange
/// the client chose as soon as its hello arrives, before any certificate is seen: P-384 cost
/// the dispatcher 1.03 ms per hello against 0.17 ms for the others. A peer without any
/// certificate held 4,090 connections, each with a P-384 hello but its last byte, and sent
/// the last bytes together: 4.2 s of work queued ahead of everything else on the dispatcher's
/// thread, the watchdog's heartbeat included, which then restarted a healthy dispatcher every
/// 13–15 s until it gave up. With the cheaper groups the same burst is 0.7 s.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .retain(|s| matches!(s, rustls::SupportedCipherSuite::Tls13(_)));
    // Stable: the others keep ring's order after it.
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    p.kx_groups.retain(|g| KX_GROUPS.contains(&g.name()));
    Arc::new(p)
}

/// The key exchange groups offered and accepted (see [`provider`]).
pub const KX_GROUPS: [rustls::NamedGroup; 2] =
    [rustls::NamedGroup::X25519, rustls::NamedGroup::secp256r1];

/// Everything one endpoint needs for mTLS: the CA to trust and its own certificate and key.
/// The key is held only as `ring` parsed it, once: no copy of its encoded form outlives
/// [`TlsMaterial::load`] unzeroized.
pub struct TlsMaterial {
    roots: Arc<RootCertStore>,
    certified: Arc<CertifiedKey>,
    own_id: SpiffeId,
    provider: Arc<CryptoProvider>,
    revocations: Revocations,
}

/// The certificate revocation lists loaded beside the CA file (`ca.crl`, made by `securesrv
/// certs revoke`): as rustls's client verifier takes them, and parsed for our server verifier.
/// Only a peer's own certificate is looked up (our CA signs leaves directly), and a peer whose
/// issuer has no list here is not refused for it.
#[derive(Clone, Default, Debug)]
struct Revocations {
    der: Vec<CertificateRevocationListDer<'static>>,
    parsed: Arc<Vec<webpki::CertRevocationList<'static>>>,
}

impl Revocations {
    fn new(der: Vec<CertificateRevocationListDer<'static>>) -> Result<Self, webpki::Error> {
        let parsed = (der.iter())
            .map(|crl| webpki::OwnedCertRevocationList::from_der(crl).map(Into::into))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Revocations {
            der,
            parsed: Arc::new(parsed),
        })
    }

    /// Refuses `end_entity`, whose chain to `roots` is already verified, if a list names it.
    fn check_server(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        roots: &RootCertStore,
        now: UnixTime,
        algs: &WebPkiSupportedAlgorithms,
    ) -> Result<(), rustls::Error> {
        if self.parsed.is_empty() {
            return Ok(());
        }
        let crls: Vec<&webpki::CertRevocationList<'_>> = self.parsed.iter().collect();
        let options = webpki::RevocationOptionsBuilder::new(&crls)
            .map_err(|_| certificate_refusal(RevocationCheck("no lists".into())))?
            .with_depth(webpki::RevocationCheckDepth::EndEntity)
            .with_status_policy(webpki::UnknownStatusPolicy::Allow)
            .build();
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| certificate_refusal(RevocationCheck(e.to_string())))?;
        match cert.verify_for_usage(
            algs.all,
            &roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            Some(options),
            None,
        ) {
            Ok(_) => Ok(()),
            Err(webpki::Error::CertRevoked) => {
                Err(rustls::Error::InvalidCertificate(CertificateError::Revoked))
            }
            Err(e) => Err(certificate_refusal(RevocationCheck(e.to_string()))),
        }
    }
}

/// A revocation list could not be applied to a server's certificate (a list not signed by
/// its issuer, for one).
#[derive(Debug, thiserror::Error)]
#[error("the revocation list beside the CA file (ca.crl) could not be applied: {0}")]
struct RevocationCheck(String);

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("own_id", &self.own_id)
            .field("chain_len", &self.certified.cert.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// PKCS#8 `version` and `privateKeyAlgorithm` for ECDSA keys on P-256 and on P-384: what a
/// SEC1 key needs in front of it to be PKCS#8.
const PKCS8_PREFIXES_EC: [&[u8]; 2] = [
    b"\x02\x01\x00\x30\x13\x06\x07\x2a\x86\x48\xce\x3d\x02\x01\x06\x08\x2a\x86\x48\xce\x3d\x03\x01\x07",
    b"\x02\x01\x00\x30\x10\x06\x07\x2a\x86\x48\xce\x3d\x02\x01\x06\x05\x2b\x81\x04\x00\x22",
];

/// `ring`'s signing key for `key`. `ring` reads PKCS#8 and PKCS#1 keys where they lie; a SEC1
/// key (`BEGIN EC PRIVATE KEY`, as `openssl ecparam -genkey` writes them) it takes only as
/// PKCS#8, and rustls would wrap it in buffers of its own that it frees unzeroized. So it is
/// wrapped here, in a zeroizing buffer, for each curve in turn.
fn signing_key(
    key: &PrivateKeyDer<'_>,
) -> Result<Arc<dyn rustls::sign::SigningKey>, rustls::Error> {
    let PrivateKeyDer::Sec1(sec1) = key else {
        return rustls::crypto::ring::sign::any_supported_type(key);
    };
    let sec1 = sec1.secret_sec1_der();
    for prefix in PKCS8_PREFIXES_EC {
        // SEQUENCE { prefix, OCTET STRING { sec1 } }, in one buffer sized up front (growing it
        // would leave copies behind).
        let inner = 1 + der_length(sec1.len(), None) + sec1.len();
        let body = prefix.len() + inner;
        let mut pkcs8 =
            zeroize::Zeroizing::new(Vec::with_capacity(1 + der_length(body, None) + body));
        pkcs8.push(0x30);
        der_length(body, Some(&mut pkcs8));
        pkcs8.extend_from_slice(prefix);
        pkcs8.push(0x04);
        der_length(sec1.len(), Some(&mut pkcs8));
        pkcs8.extend_from_slice(sec1);
        let der = PrivateKeyDer::Pkcs8(rustls_pki_types::PrivatePkcs8KeyDer::from(&pkcs8[..]));
        if let Ok(signing) = rustls::crypto::ring::sign::any_ecdsa_type(&der) {
            return Ok(signing);
        }
    }
    Err(rustls::Error::General(
        "failed to parse ECDSA private key as SEC1".into(),
    ))
}

/// The size of a DER length field for `len`; with `out`, also appends it.
fn der_length(len: usize, out: Option<&mut Vec<u8>>) -> usize {
    let bytes = len.to_be_bytes();
    let skip = bytes.iter().take_while(|&&b| b == 0).count();
    let field: &[u8] = &bytes[skip..];
    let size = if len < 0x80 { 1 } else { 1 + field.len() };
    if let Some(out) = out {
        if len < 0x80 {
            out.push(len as u8);
        } else {
            out.push(0x80 | field.len() as u8);
            out.extend_from_slice(field);
        }
    }
    size
}

/// `chain` with the signing key parsed from `key`, checked to belong to its first certificate.
/// The key is read from where it lies (rustls's own loader takes an owned copy and drops it
/// unzeroized).
fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKeyDer<'_>,
) -> Result<Arc<CertifiedKey>, rustls::Error> {
    let signing = signing_key(key)?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        // `Unknown`: the key cannot tell its public half; rustls checks no further either.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(Arc::new(certified))
        }
        Err(e) => Err(e),
    }
}

/// Certificates expiring sooner than this are warned about when loaded.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// Refuses a certificate outside its validity period, which every peer would refuse at each
/// handshake (a component would start, then fail its heartbeats with no word of why). A
/// certificate x509-parser cannot read is left to the checks after this one.
/// What to do about an unusable certificate of our own (the file `path`): the `certs issue`
/// command for its identity and directory, and for a component (not a client, which reads it
/// anew each time) a restart.
fn reissue_remedy(path: &Path, der: &CertificateDer<'_>, component: bool) -> String {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let dir = certs::dir_flag(dir);
    let command = match SpiffeId::from_certificate_der(der) {
        Ok(id) => format!(
            "securesrv certs issue --force --role {} --name {}{dir}",
            id.role().as_str(),
            id.name()
        ),
        Err(_) => format!("securesrv certs issue --force{dir}"),
    };
    format!(
        "issue a new one (`{command}`, see docs/OPERATIONS.md){}",
        if component { " and restart" } else { "" }
    )
}

/// The time now as x509-parser takes it, or `None` when the system clock reads a time it
/// cannot hold (after the year 9999, say): its own `ASN1Time::now()` panics there, and with it
/// every component at start and every resumed handshake (found by an input-hardening review).
fn asn1_now() -> Option<x509_parser::time::ASN1Time> {
    asn1_at(std::time::SystemTime::now())
}

/// [`asn1_now`] at the time `now`.
fn asn1_at(now: std::time::SystemTime) -> Option<x509_parser::time::ASN1Time> {
    let secs = match now.duration_since(std::time::UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).ok()?,
        Err(before) => 0i64.checked_sub_unsigned(before.duration().as_secs())?,
    };
    x509_parser::time::ASN1Time::from_timestamp(secs).ok()
}

fn check_file_validity(
    path: &Path,
    der: &CertificateDer<'_>,
    component: bool,
) -> Result<(), TlsConfigError> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(der) else {
        return Ok(());
    };
    let validity = parsed.validity();
    let Some(now) = asn1_now() else {
        return Err(TlsConfigError::NotValidNow {
            path: path.display().to_string(),
            why: "cannot be checked: the system clock reads a time outside the years a \
                  certificate can name (is this machine's clock right?)"
                .into(),
            remedy: reissue_remedy(path, der, component),
        });
    };
    let why = if now > validity.not_after {
        format!("expired on {}", validity.not_after)
    } else if now < validity.not_before {
        format!(
            "is not valid before {} (is this machine's clock right?)",
            validity.not_before
        )
    } else {
        return Ok(());
    };
    Err(TlsConfigError::NotValidNow {
        path: path.display().to_string(),
        why,
        remedy: reissue_remedy(path, der, component),
    })
}

/// Checks that `chain` (ours, leaf first) leads to one of `roots` and that its leaf may be
/// used as `role` connects and is connected to, as every peer will check it: a certificate of
/// another CA (left from before `certs init --force`, say) would otherwise start, listen, and
/// fail every handshake, each blamed on the peer.
fn check_chain(
    roots: &RootCertStore,
    chain: &[CertificateDer<'static>],
    role: Role,
) -> Result<(), String> {
    // Peers refuse a longer chain before building any path.
    check_chain_length(&chain[1..])
        .map_err(|_| TooManyIntermediates(chain.len() - 1).to_string())?;
    let leaf = webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| e.to_string())?;
    let usages = match role {
        Role::Dispatcher => &[
            webpki::KeyUsage::server_auth(),
            webpki::KeyUsage::client_auth(),
        ][..],
        Role::Worker => &[webpki::KeyUsage::server_auth()][..],
        Role::Client | Role::Watchdog => &[webpki::KeyUsage::client_auth()][..],
    };
    let algs = provider().signature_verification_algorithms.all;
    for usage in usages {
        leaf.verify_for_usage(
            algs,
            &roots.roots,
            &chain[1..],
            UnixTime::now(),
            *usage,
            None,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::UnknownIssuer => {
                "not issued by that CA, or an intermediate is missing from the file".to_string()
            }
            webpki::Error::RequiredEkuNotFoundContext(_) => {
                format!("its extended key usage does not allow a {role}'s use of it")
            }
            other => other.to_string(),
        })?;
    }
    Ok(())
}

/// Logs a warning for a component's certificate that expires within [`EXPIRY_WARNING`] (not
/// for a client's: the client command says one line per failure, nothing more).
fn warn_if_expiring(path: &Path, der: &CertificateDer<'_>) {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(der) else {
        return;
    };
    let validity = parsed.validity();
    let Some(now) = asn1_now() else {
        return;
    };
    if validity.is_valid_at(now)
        && (validity.not_after - now)
            .is_some_and(|left| left.whole_seconds() < EXPIRY_WARNING.as_secs() as i64)
    {
        tracing::warn!(
            path = %path.display(),
            expires = %validity.not_after,
            "certificate expires within 14 days; issue a new one and restart"
        );
    }
}

impl TlsMaterial {
    /// Loads the CA certificate(s), our certificate chain and our private key (mode 0600).
    /// The certificate is read before the CA: a caller that derives the CA's path from the
    /// certificate's (as `client` does without `--ca`) hears first of the file it named.
    /// A missing file's message names the flags that name files one by one (`--cert`, `--key`,
    /// `--ca`).
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsConfigError> {
        Self::load_checking(ca, cert, key, true, false).map_err(|e| match e {
            TlsConfigError::Files(e) => TlsConfigError::Files(e.named_by(NamedBy::Files)),
            other => other,
        })
    }

    /// [`load`](Self::load) without the validity check, for tests that need a peer with an
    /// expired certificate.
    #[cfg(test)]
    pub(crate) fn load_even_if_expired(
        ca: &Path,
        cert: &Path,
        key: &Path,
    ) -> Result<Self, TlsConfigError> {
        Self::load_checking(ca, cert, key, false, false)
    }

    /// Loads the three files; `ca_first`: they are a component's certificate directory, whose
    /// CA file is read before the certificate (a missing directory is reported as its CA, the
    /// file that `certs init` makes first) and whose unusable certificate also needs a restart
    /// once issued anew.
    fn load_checking(
        ca: &Path,
        cert: &Path,
        key: &Path,
        validity: bool,
        ca_first: bool,
    ) -> Result<Self, TlsConfigError> {
        let load_roots = || {
            let mut roots = RootCertStore::empty();
            // Trust anchors are not checked for dates (webpki does not, and a bundle may hold
            // an old root beside the new one): only our own certificate.
            let (added, _ignored) = roots.add_parsable_certificates(certs::load_certs(ca)?);
            if added == 0 {
                return Err(TlsConfigError::NoRoots(ca.display().to_string()));
            }
            Ok(roots)
        };
        let (roots, chain) = if ca_first {
            let roots = load_roots()?;
            (roots, certs::load_certs(cert)?)
        } else {
            let chain = certs::load_certs(cert)?;
            (load_roots()?, chain)
        };
        if validity {
            check_file_validity(cert, &chain[0], ca_first)?;
        }
        let own_id = SpiffeId::from_certificate_der(&chain[0]).map_err(|err| {
            TlsConfigError::OwnIdentity {
                path: cert.display().to_string(),
                err,
            }
        })?;
        // A component's: its CA file is the one its peers verify it with. A client's `--ca`
        // need only verify the dispatcher, whose own CA file may trust more.
        if validity && ca_first {
            check_chain(&roots, &chain, own_id.role()).map_err(|why| {
                TlsConfigError::NotFromCa {
                    path: cert.display().to_string(),
                    ca: ca.display().to_string(),
                    why,
                    remedy: reissue_remedy(cert, &chain[0], ca_first),
                }
            })?;
        }
        let crl = certs::crl_path_beside(ca);
        let cas = certs::load_certs(ca)?;
        let crls = certs::load_crls(&crl, &cas)?;
        if certs::is_listed(&crls, &chain[0], &cas) {
            return Err(TlsConfigError::Revoked {
                path: cert.display().to_string(),
                crl: crl.display().to_string(),
                remedy: reissue_remedy(cert, &chain[0], ca_first),
            });
        }
        let revocations = Revocations::new(crls).map_err(|e| {
            TlsConfigError::Files(CertError::BadPem {
                path: crl.clone(),
                what: format!("unusable revocation list: {e}"),
            })
        })?;
        let key_der = certs::load_private_key(key)?;
        // Checked here, where the files are known: rustls would say only `KeyMismatch` when
        // the configuration is built.
        let certified =
            certified_key(chain, &key_der).map_err(|e| TlsConfigError::KeyMismatch {
                cert: cert.display().to_string(),
                key: key.display().to_string(),
                why: e.to_string(),
            })?;
        Ok(TlsMaterial {
            roots: Arc::new(roots),
            certified,
            own_id,
            provider: provider(),
            revocations,
        })
    }

    /// Loads identity `id`'s files (`dispatcher.crt`, `worker-1.crt`, ...) from a certs
    /// directory, refusing a certificate that names another identity: a component whose
    /// certificate is not its own would start and then be refused by every peer.
    pub fn load_from_dir(dir: &Path, id: &SpiffeId) -> Result<Self, TlsConfigError> {
        let (cert, key) = certs::identity_paths(dir, id);
        let material = Self::load_checking(&dir.join(certs::CA_CERT), &cert, &key, true, true)?;
        if material.own_id != *id {
            return Err(TlsConfigError::NotOwnIdentity {
                path: cert.display().to_string(),
                expected: id.to_string(),
                found: material.own_id.to_string(),
            });
        }
        if let Some(leaf) = material.certified.cert.first() {
            warn_if_expiring(&cert, leaf);
        }
        Ok(material)
    }

    /// The identity in our own certificate.
    pub fn own_id(&self) -> &SpiffeId {
        &self.own_id
    }

    /// A server configuration for a listener of role `endpoint`.
    pub fn server_config(
        &self,
        endpoint: Role,
    ) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
        let mut builder =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), self.provider.clone());
        if !self.revocations.der.is_empty() {
            builder = builder
                .with_crls(self.revocations.der.iter().cloned())
                .only_check_end_entity_revocation()
                .allow_unknown_revocation_status();
        }
        let inner = builder
            .build()
            .map_err(|e| TlsConfigError::Verifier(e.to_string()))?;
        let verifier = Arc::new(IdentityClientVerifier {
            inner,
            policy: PeerPolicy::Serve {
                trust_domain: self.own_id.trust_domain().to_string(),
                endpoint,
            },
        });
        let mut cfg = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(self.certified.clone())));
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        // Stateless, encrypted, rotating tickets: clients that reconnect resume without a full
        // handshake and the server keeps no per-session memory.
        cfg.ticketer = rustls::crypto::ring::Ticketer::new()?;
        Ok(Arc::new(cfg))
    }

    /// A client configuration that accepts only the server `expected`.
    pub fn client_config(
        &self,
        expected: &SpiffeId,
    ) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
        self.client_config_with_tickets(expected, Arc::new(TicketStore::new()))
    }

    /// [`TlsMaterial::client_config`], keeping its session tickets in `tickets`.
    fn client_config_with_tickets(
        &self,
        expected: &SpiffeId,
        tickets: Arc<TicketStore>,
    ) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
        let verifier = Arc::new(IdentityServerVerifier {
            roots: self.roots.clone(),
            policy: PeerPolicy::Exactly(expected.clone()),
            algs: self.provider.signature_verification_algorithms,
            revocations: self.revocations.clone(),
        });
        let mut cfg = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(self.certified.clone())));
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        // Room for a ticket per concurrent connection, so reconnects resume (see `tickets`).
        cfg.resumption = rustls::client::Resumption::store(tickets);
        Ok(Arc::new(cfg))
    }

    /// An acceptor for a listener of role `endpoint`.
    pub fn acceptor(
        &self,
        endpoint: Role,
        handshake_timeout: Duration,
    ) -> Result<Acceptor, TlsConfigError> {
        Ok(Acceptor::new(
            self.server_config(endpoint)?,
            PeerPolicy::Serve {
                trust_domain: self.own_id.trust_domain().to_string(),
                endpoint,
            },
            handshake_timeout,
        ))
    }

    /// A connector that reaches only `expected`.
    pub fn connector(
        &self,
        expected: &SpiffeId,
        handshake_timeout: Duration,
    ) -> Result<Connector, TlsConfigError> {
        let tickets = Arc::new(TicketStore::new());
        Ok(Connector {
            tls: tokio_rustls::TlsConnector::from(
                self.client_config_with_tickets(expected, tickets.clone())?,
            ),
            policy: PeerPolicy::Exactly(expected.clone()),
            handshake_timeout,
            tickets,
        })
    }
}

/// Accepts TLS connections and returns them with the peer's verified, authorised identity.
#[derive(Clone)]
pub struct Acceptor {
    tls: tokio_rustls::TlsAcceptor,
    policy: PeerPolicy,
    handshake_timeout: Duration,
}

impl Acceptor {
    /// An acceptor from a prepared server configuration.
    pub fn new(
        cfg: Arc<rustls::ServerConfig>,
        policy: PeerPolicy,
        handshake_timeout: Duration,
    ) -> Self {
        Acceptor {
            tls: tokio_rustls::TlsAcceptor::from(cfg),
            policy,
            handshake_timeout,
        }
    }

    /// Runs the server side of the handshake under the deadline, then checks ALPN and identity.
    pub async fn accept(&self, tcp: TcpStream) -> Result<(ServerStream, SpiffeId), HandshakeError> {
        let _ = tcp.set_nodelay(true);
        let stream =
            tokio::time::timeout(self.handshake_timeout, self.tls.accept(Transport::new(tcp)))
                .await
                .map_err(|_| HandshakeError::Timeout(self.handshake_timeout))?
                .map_err(HandshakeError::from_io)?;
        let (_, conn) = stream.get_ref();
        match check_session(conn.alpn_protocol(), conn.peer_certificates(), &self.policy) {
            Ok(id) => Ok((stream, id)),
            Err(e) => {
                // Refused after the handshake (no ALPN, a resumed session whose certificate
                // has expired): say goodbye properly rather than just drop the socket.
                let mut stream = stream;
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
                Err(e)
            }
        }
    }
}

/// Opens TLS connections to one expected identity.
#[derive(Clone)]
pub struct Connector {
    tls: tokio_rustls::TlsConnector,
    policy: PeerPolicy,
    handshake_timeout: Duration,
    /// Its session tickets, shared by its clones, to forget after a refused resumption.
    tickets: Arc<TicketStore>,
}

impl Connector {
    /// Forgets the session tickets this connector (and its clones) holds: the next handshake
    /// is a full one, whose refusal, if any, comes as an alert that says why (see
    /// [`TicketStore::clear`]).
    pub fn forget_tickets(&self) {
        self.tickets.clear();
    }

    /// Connects to `addr` (TCP connect and handshake share the deadline) and checks that the
    /// server is the identity this connector expects.
    pub async fn connect(
        &self,
        addr: SocketAddr,
    ) -> Result<(ClientStream, SpiffeId), HandshakeError> {
        self.within_deadline(async {
            let tcp = TcpStream::connect(addr).await?;
            self.handshake(tcp, addr).await
        })
        .await
    }

    /// Like [`Connector::connect`], over a TCP connection the caller made (e.g. from a chosen
    /// source address).
    pub async fn connect_over(
        &self,
        tcp: TcpStream,
    ) -> Result<(ClientStream, SpiffeId), HandshakeError> {
        let addr = tcp.peer_addr()?;
        self.within_deadline(self.handshake(tcp, addr)).await
    }

    async fn handshake(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
    ) -> Result<ClientStream, HandshakeError> {
        let _ = tcp.set_nodelay(true);
        // The name is used for SNI and the session cache only; the identity check is done on
        // the SPIFFE ID by our verifier.
        let name = ServerName::IpAddress(addr.ip().into());
        self.tls
            .connect(name, Transport::new(tcp))
            .await
            .map_err(HandshakeError::from_io)
    }

    /// Runs `fut` (TCP connect and/or handshake) under the handshake deadline, then checks
    /// that the server is the identity this connector expects.
    async fn within_deadline(
        &self,
        fut: impl std::future::Future<Output = Result<ClientStream, HandshakeError>>,
    ) -> Result<(ClientStream, SpiffeId), HandshakeError> {
        let stream = tokio::time::timeout(self.handshake_timeout, fut)
            .await
            .map_err(|_| HandshakeError::Timeout(self.handshake_timeout))??;
        let (_, conn) = stream.get_ref();
        let id = check_session(conn.alpn_protocol(), conn.peer_certificates(), &self.policy)?;
        Ok((stream, id))
    }
}

/// After the handshake (fresh or resumed): ALPN agreed, leaf present, still valid, allowed.
fn check_session(
    alpn: Option<&[u8]>,
    certs: Option<&[CertificateDer<'static>]>,
    policy: &PeerPolicy,
) -> Result<SpiffeId, HandshakeError> {
    if alpn != Some(ALPN) {
        return Err(HandshakeError::NoAlpn);
    }
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or(HandshakeError::NoCertificate)?;
    check_validity(leaf)?;
    policy
        .check_certificate(leaf)
        .map_err(HandshakeError::Identity)
}

/// A resumed session skips chain verification; refuse a leaf that has expired since.
fn check_validity(leaf: &CertificateDer<'_>) -> Result<(), HandshakeError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| HandshakeError::Identity(IdentityError::BadCertificate(e.to_string())))?;
    if !asn1_now().is_some_and(|now| cert.validity().is_valid_at(now)) {
        return Err(HandshakeError::Tls(rustls::Error::InvalidCertificate(
            CertificateError::Expired,
        )));
    }
    Ok(())
}

/// A certificate refused for a reason of ours (the peer gets `certificate_unknown`).
fn certificate_refusal(e: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// The most intermediate certificates a peer may present with its own. Our CA signs leaves
/// directly (`pathlen:0`); another tool's PKI may put one or two intermediates between its
/// root and the leaves. Every certificate presented multiplies the paths webpki may try, up to
/// its budget of signature checks and path-building calls: a peer holding no trusted
/// certificate at all made each refused handshake cost 10–45 ms of the listener's CPU with
/// 150–200 forged intermediates, enough to starve the heartbeat of a single-threaded
/// dispatcher. With at most this many, a refusal costs about what any other does.
pub const MAX_INTERMEDIATES: usize = 3;

/// A peer presented more than [`MAX_INTERMEDIATES`] intermediate certificates.
#[derive(Debug, thiserror::Error)]
#[error("{0} intermediate certificates presented; at most {MAX_INTERMEDIATES} are accepted")]
pub struct TooManyIntermediates(pub usize);

/// Refuses a chain with more than [`MAX_INTERMEDIATES`] intermediates, before any path is built.
fn check_chain_length(intermediates: &[CertificateDer<'_>]) -> Result<(), rustls::Error> {
    if intermediates.len() > MAX_INTERMEDIATES {
        return Err(certificate_refusal(TooManyIntermediates(
            intermediates.len(),
        )));
    }
    Ok(())
}

/// webpki's client verifier plus our role check.
#[derive(Debug)]
struct IdentityClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    policy: PeerPolicy,
}

impl ClientCertVerifier for IdentityClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        check_chain_length(intermediates)?;
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        self.policy
            .check_certificate(end_entity)
            .map_err(certificate_refusal)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Chain verification to our CA plus an exact SPIFFE ID match; DNS names are not consulted.
#[derive(Debug)]
struct IdentityServerVerifier {
    roots: Arc<RootCertStore>,
    policy: PeerPolicy,
    algs: WebPkiSupportedAlgorithms,
    revocations: Revocations,
}

impl ServerCertVerifier for IdentityServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        check_chain_length(intermediates)?;
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        (self.revocations).check_server(end_entity, intermediates, &self.roots, now, &self.algs)?;
        self.policy
            .check_certificate(end_entity)
            .map_err(certificate_refusal)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests;
