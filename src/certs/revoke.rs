//! `certs revoke`: a certificate revocation list (`ca.crl`) signed by the CA, which every
//! component and client loads beside its CA certificate at start.
//!
//! A private PKI has no server to publish a CRL on, so the certificates carry no distribution
//! point: the list travels as a file, like the CA certificate itself. Each run adds to the list
//! in place (entries already there are kept, with their dates) and raises its number.

use super::{CA_CERT, CA_DAYS, CertAuthority, CertError, NamedBy, Staged, load_certs};
use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// The revocation list's file name, beside [`CA_CERT`].
pub const CA_CRL: &str = "ca.crl";

/// Largest revocation list a component reads; far above any list this tool makes.
const MAX_CRL_BYTES: u64 = 16 << 20;

/// What `certs revoke` did.
#[derive(Debug)]
pub struct Revoked {
    /// The list written.
    pub crl: PathBuf,
    /// One line per certificate named: its file, identity and serial, and whether it was
    /// already on the list.
    pub entries: Vec<String>,
}

/// The revocation list for the CA file `ca`: `ca.crl` in the same directory.
pub fn crl_path_beside(ca: &Path) -> PathBuf {
    ca.with_file_name(CA_CRL)
}

/// Reads the revocation lists in `path`, if it exists. Each must be a well-formed CRL, and one
/// issued by a CA of `cas` (the CA file's certificates) must carry that CA's signature: a list
/// that does not verify would make every handshake with a certificate of that CA fail, each
/// blamed on the peer. A list of another issuer (an intermediate of another PKI) is checked
/// when a certificate of that issuer is judged against it.
pub fn load_crls(
    path: &Path,
    cas: &[CertificateDer<'_>],
) -> Result<Vec<CertificateRevocationListDer<'static>>, CertError> {
    let bad = |what: String| CertError::BadPem {
        path: path.to_path_buf(),
        what,
    };
    let data = match crate::files::read_regular(path, MAX_CRL_BYTES) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(super::io_err(path)(e)),
        Ok(data) => data,
    };
    let crls = CertificateRevocationListDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            bad(format!(
                "not a PEM revocation list: {}",
                super::pem_problem(&e)
            ))
        })?;
    if crls.is_empty() {
        return Err(bad(
            "no X509 CRL in file; make it with `securesrv certs revoke`, or remove it if no \
             certificate is revoked"
                .to_string(),
        ));
    }
    for (n, crl) in crls.iter().enumerate() {
        webpki::OwnedCertRevocationList::from_der(crl)
            .map_err(|e| bad(format!("list {}: unusable revocation list: {e}", n + 1)))?;
        if let Err(why) = check_signature(crl, cas) {
            return Err(bad(format!("list {}: {why}", n + 1)));
        }
    }
    Ok(crls)
}

/// Checks `crl`'s signature if one of `cas` issued it: `Ok(true)` if verified, `Ok(false)`
/// if none of them is its issuer. A list that one of them signed under another name is
/// refused: certificates are matched to a list by their issuer's name, byte for byte, so it
/// would revoke nothing, and revoked certificates would pass as not revoked.
fn check_signature(crl: &[u8], cas: &[CertificateDer<'_>]) -> Result<bool, String> {
    let (_, list) = x509_parser::parse_x509_crl(crl).map_err(|e| {
        format!(
            "cannot parse it: {e}; replace the file with a good copy, or make it again with \
             `securesrv certs revoke`"
        )
    })?;
    let cas: Vec<_> = cas
        .iter()
        .filter_map(|ca| x509_parser::parse_x509_certificate(ca).ok())
        .map(|(_, ca)| ca)
        .collect();
    for ca in &cas {
        if ca.subject().as_raw() == list.issuer().as_raw() {
            return list
                .verify_signature(ca.public_key())
                .map(|()| true)
                .map_err(|e| {
                    format!(
                        "not signed by the CA it names ({}): {e}; every handshake with a \
                     certificate of that CA would fail. Replace the file with a good copy, or \
                     make it again with `securesrv certs revoke`",
                        ca.subject()
                    )
                });
        }
    }
    if let Some(ca) = cas
        .iter()
        .find(|ca| list.verify_signature(ca.public_key()).is_ok())
    {
        let printable = |name: String| crate::identity::printable_within(&name, 200).into_owned();
        return Err(format!(
            "signed by the CA {} but naming another issuer, {}: certificates are matched to a \
             list by their issuer's name, byte for byte, so it would revoke none of them. Make \
             the list with the tool that made the CA (`securesrv certs revoke` cannot write \
             every name back as it is)",
            printable(ca.subject().to_string()),
            printable(list.issuer().to_string())
        ));
    }
    Ok(false)
}

/// Whether the certificate `der` is on a list of `crls` that its own issuer signed, one of
/// `cas` (lists of other issuers, whose signatures cannot be checked here, do not count).
pub fn is_listed(
    crls: &[CertificateRevocationListDer<'_>],
    der: &[u8],
    cas: &[CertificateDer<'_>],
) -> bool {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    crls.iter().any(|crl| {
        let Ok((_, list)) = x509_parser::parse_x509_crl(crl) else {
            return false;
        };
        list.issuer().as_raw() == cert.issuer().as_raw()
            && check_signature(crl, cas) == Ok(true)
            && list
                .iter_revoked_certificates()
                .any(|r| r.raw_serial() == cert.raw_serial())
    })
}

/// Adds the certificates in the files `certs` to the revocation list of the CA in `dir`.
pub fn revoke(dir: &Path, certs: &[PathBuf]) -> Result<Revoked, CertError> {
    revoke_files(dir, certs).map_err(|e| e.named_by(NamedBy::CertsCommand))
}

fn revoke_files(dir: &Path, certs: &[PathBuf]) -> Result<Revoked, CertError> {
    let ca = CertAuthority::load(dir)?;
    let ca_path = dir.join(CA_CERT);
    let ca_der = load_certs(&ca_path)?.remove(0);
    let (_, ca_cert) =
        x509_parser::parse_x509_certificate(&ca_der).map_err(|e| CertError::BadPem {
            path: ca_path.clone(),
            what: format!("cannot parse the CA certificate: {e}"),
        })?;
    let crl_path = dir.join(CA_CRL);
    let now = super::checked_now(CA_DAYS)?;

    // The list as it is, if there is one: its entries are kept, and lists of other issuers
    // in the same file (another PKI's) are written back as they were.
    let mut revoked = Vec::new();
    // The serials in `revoked`, looked up at each entry: scanning `revoked` instead took 34 s
    // for a list of 100,000 and grew with its square (found by an input-hardening review).
    let mut serials: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
    let mut others = Vec::new();
    let mut number = 0u64;
    // Checked first (size, form, our CA's signature), then taken block by block.
    load_crls(&crl_path, std::slice::from_ref(&ca_der))?;
    let text = match crate::files::read_regular(&crl_path, MAX_CRL_BYTES) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        other => String::from_utf8(other.map_err(super::io_err(&crl_path))?).map_err(|_| {
            CertError::BadPem {
                path: crl_path.clone(),
                what: "not a PEM revocation list: not text".into(),
            }
        })?,
    };
    for block in pem_blocks(&text) {
        let der = CertificateRevocationListDer::from_pem_slice(block.as_bytes()).map_err(|e| {
            CertError::BadPem {
                path: crl_path.clone(),
                what: format!("not a PEM revocation list: {}", super::pem_problem(&e)),
            }
        })?;
        let (_, crl) = x509_parser::parse_x509_crl(&der).map_err(|e| CertError::BadPem {
            path: crl_path.clone(),
            what: format!("cannot parse the revocation list: {e}"),
        })?;
        if crl.issuer().as_raw() != ca_cert.subject().as_raw() {
            others.push(block);
            continue;
        }
        if let Some(n) = crl.crl_number() {
            let digits = n.to_u64_digits();
            number = number.max(if digits.len() > 1 {
                u64::MAX
            } else {
                digits.first().copied().unwrap_or(0)
            });
        }
        for entry in crl.iter_revoked_certificates() {
            if !serials.insert(entry.raw_serial().to_vec()) {
                continue;
            }
            let serial = SerialNumber::from_slice(entry.raw_serial());
            revoked.push(RevokedCertParams {
                serial_number: serial,
                revocation_time: OffsetDateTime::from_unix_timestamp(
                    entry.revocation_date.timestamp(),
                )
                .unwrap_or(now),
                reason_code: None,
                invalidity_date: None,
            });
        }
    }

    let mut entries = Vec::new();
    for path in certs {
        // The certificate to revoke must be given as it was issued: the advice for a missing
        // certificate (issue it) would be the opposite of what is wanted here.
        let der = load_certs(path)
            .map_err(|e| match e {
                CertError::Missing { path, .. } => CertError::Io {
                    path,
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no such file; name the certificate file to revoke (its serial number \
                         is read from it)",
                    ),
                },
                e => e,
            })?
            .remove(0);
        let not_ours = |why: &str| CertError::BadPem {
            path: path.clone(),
            what: why.to_string(),
        };
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| not_ours(&format!("cannot parse the certificate: {e}")))?;
        if cert.issuer().as_raw() != ca_cert.subject().as_raw() {
            return Err(not_ours(&format!(
                "not issued by the CA in {}; only that CA's certificates can be revoked here",
                ca_path.display()
            )));
        }
        if cert.is_ca() || der.as_ref() == ca_der.as_ref() {
            return Err(not_ours(
                "a CA certificate; to stop trusting a CA, replace it (`certs init --force`)",
            ));
        }
        let serial = SerialNumber::from_slice(cert.raw_serial());
        let id = crate::identity::SpiffeId::from_certificate_der(&der)
            .map_or_else(|_| "no SPIFFE identity".to_string(), |id| id.to_string());
        let already = !serials.insert(cert.raw_serial().to_vec());
        entries.push(format!(
            "{} ({id}, serial {}){}",
            path.display(),
            cert.raw_serial_as_string(),
            if already { ": already revoked" } else { "" }
        ));
        if !already {
            revoked.push(RevokedCertParams {
                serial_number: serial,
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            });
        }
    }

    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + Duration::days(CA_DAYS.into()),
        crl_number: minimal_integer(number.saturating_add(1)),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&ca.issuer)?;
    let mut pem = crl.pem()?;
    for other in &others {
        pem.push_str(other);
        pem.push('\n');
    }
    let staged = Staged::write(&crl_path, pem.as_bytes(), 0o644)?;
    super::interrupt::check()?;
    staged.commit(true)?;
    Ok(Revoked {
        crl: crl_path,
        entries,
    })
}

/// `n` as a DER INTEGER's content: no leading zero bytes but one that keeps it positive.
fn minimal_integer(n: u64) -> SerialNumber {
    let bytes = n.to_be_bytes();
    let first = bytes
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(bytes.len() - 1);
    let mut out = Vec::with_capacity(9);
    if bytes[first] & 0x80 != 0 {
        out.push(0);
    }
    out.extend_from_slice(&bytes[first..]);
    SerialNumber::from_slice(&out)
}

/// The `X509 CRL` PEM blocks of `text`, markers included.
fn pem_blocks(text: &str) -> Vec<&str> {
    const BEGIN: &str = "-----BEGIN X509 CRL-----";
    const END: &str = "-----END X509 CRL-----";
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(b) = rest.find(BEGIN) {
        let Some(e) = rest[b..].find(END) else {
            break;
        };
        let end = b + e + END.len();
        blocks.push(&rest[b..end]);
        rest = &rest[end..];
    }
    blocks
}
