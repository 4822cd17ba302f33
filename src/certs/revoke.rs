//! `certs revoke`: a certificate revocation list (`ca.crl`) signed by the CA, which every
//! component and client loads beside its CA certificate at start.
//!
//! A private PKI has no server to publish a CRL on, so the certificates carry no distribution
//! point: the list travels as a file, like the CA certificate itself. Each run adds to the list
//! in place (entries already there are kept, with their dates) and raises its number.

use super::{CA_CERT, CA_DAYS, CertAuthority, CertError, NamedBy, Staged, load_certs};
use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
use rustls_pki_types::CertificateRevocationListDer;
use rustls_pki_types::pem::PemObject;
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

/// Reads the revocation lists in `path`, if it exists. Each must be a well-formed CRL; whether
/// it is signed by a trusted CA is checked when a certificate is judged against it.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, CertError> {
    let bad = |what: String| CertError::BadPem {
        path: path.to_path_buf(),
        what,
    };
    let data = match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(super::io_err(path)(e)),
        Ok(m) if m.len() > MAX_CRL_BYTES => {
            return Err(bad(format!(
                "larger than {} MiB; not a revocation list",
                MAX_CRL_BYTES >> 20
            )));
        }
        Ok(_) => std::fs::read(path).map_err(super::io_err(path))?,
    };
    let crls = CertificateRevocationListDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM revocation list: {e}")))?;
    if crls.is_empty() {
        return Err(bad(
            "no X509 CRL in file; make it with `securesrv certs revoke`, or remove it if no \
             certificate is revoked"
                .to_string(),
        ));
    }
    for crl in &crls {
        webpki::OwnedCertRevocationList::from_der(crl)
            .map_err(|e| bad(format!("unusable revocation list: {e}")))?;
    }
    Ok(crls)
}

/// Whether the certificate `der` is on one of `crls` (by serial number).
pub fn is_listed(crls: &[CertificateRevocationListDer<'_>], der: &[u8]) -> bool {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    crls.iter().any(|crl| {
        webpki::OwnedCertRevocationList::from_der(crl)
            .ok()
            .map(webpki::CertRevocationList::from)
            .is_some_and(|list| matches!(list.find_serial(cert.raw_serial()), Ok(Some(_))))
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
    let now = OffsetDateTime::now_utc();

    // The list as it is, if there is one: its entries are kept.
    let mut revoked = Vec::new();
    let mut number = 0u64;
    let existing = load_crls(&crl_path)?;
    for der in &existing {
        let (_, crl) = x509_parser::parse_x509_crl(der).map_err(|e| CertError::BadPem {
            path: crl_path.clone(),
            what: format!("cannot parse the revocation list: {e}"),
        })?;
        if crl.issuer().as_raw() != ca_cert.subject().as_raw() {
            return Err(CertError::BadPem {
                path: crl_path.clone(),
                what: format!(
                    "this revocation list was not issued by the CA in {}; move it away (it \
                     belongs to an earlier CA) and run `certs revoke` again",
                    ca_path.display()
                ),
            });
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
            revoked.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(entry.raw_serial()),
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
        let der = load_certs(path)?.remove(0);
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
        let already = revoked.iter().any(|r| r.serial_number == serial);
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
    Staged::write(&crl_path, crl.pem()?.as_bytes(), 0o644)?.commit(true)?;
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
