//! Who a peer is and what it may do.
//!
//! An identity is the single URI SAN of a verified certificate,
//! `spiffe://<trust-domain>/<role>/<name>`, parsed into a [`SpiffeId`]. [`PeerPolicy`] holds the
//! who-may-call-whom matrix: a dispatcher serves clients and the watchdog, a worker serves the
//! dispatcher and the watchdog, and a dialler accepts only the exact identity it meant to reach.
//! Chain verification is rustls's job (`tls.rs`); this module runs after it.

use std::fmt;
use std::str::FromStr;

/// Default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "securesrv";

/// The four roles of the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Accepts client requests and forwards them to workers.
    Dispatcher,
    /// Runs operations for the dispatcher.
    Worker,
    /// Starts and probes the other components.
    Watchdog,
    /// Sends requests.
    Client,
}

impl Role {
    /// The path segment used in SPIFFE IDs.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Dispatcher => "dispatcher",
            Role::Worker => "worker",
            Role::Watchdog => "watchdog",
            Role::Client => "client",
        }
    }

    /// The roles allowed to connect to a listener of this role.
    pub fn allowed_peers(self) -> &'static [Role] {
        match self {
            Role::Dispatcher => &[Role::Client, Role::Watchdog],
            Role::Worker => &[Role::Dispatcher, Role::Watchdog],
            Role::Watchdog | Role::Client => &[],
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "dispatcher" => Ok(Role::Dispatcher),
            "worker" => Ok(Role::Worker),
            "watchdog" => Ok(Role::Watchdog),
            "client" => Ok(Role::Client),
            other => Err(IdentityError::UnknownRole(truncate(other))),
        }
    }
}

/// A verified peer identity: `spiffe://<trust_domain>/<role>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    role: Role,
    name: String,
}

impl SpiffeId {
    /// Builds an identity after checking each part.
    pub fn new(trust_domain: &str, role: Role, name: &str) -> Result<Self, IdentityError> {
        validate_trust_domain(trust_domain)?;
        validate_name(name)?;
        Ok(SpiffeId {
            trust_domain: trust_domain.to_string(),
            role,
            name: name.to_string(),
        })
    }

    /// The dispatcher's identity in `trust_domain` (`.../dispatcher/main`).
    pub fn dispatcher(trust_domain: &str) -> Result<Self, IdentityError> {
        Self::new(trust_domain, Role::Dispatcher, "main")
    }

    /// Worker `id`'s identity (`.../worker/<id>`).
    pub fn worker(trust_domain: &str, id: u32) -> Result<Self, IdentityError> {
        Self::new(trust_domain, Role::Worker, &id.to_string())
    }

    /// The watchdog's identity (`.../watchdog/main`).
    pub fn watchdog(trust_domain: &str) -> Result<Self, IdentityError> {
        Self::new(trust_domain, Role::Watchdog, "main")
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The name within the role.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Parses the single URI SAN of a DER certificate. Does not verify the chain.
    pub fn from_certificate_der(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let mut uris = san.iter().flat_map(|ext| {
            ext.value.general_names.iter().filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                _ => None,
            })
        });
        let first = uris.next().ok_or(IdentityError::NoUriSan)?;
        let extra = uris.count();
        if extra > 0 {
            return Err(IdentityError::SeveralUriSans(extra + 1));
        }
        first.parse()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/{}/{}",
            self.trust_domain, self.role, self.name
        )
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::NotSpiffe(truncate(s)))?;
        let mut parts = rest.split('/');
        let (Some(td), Some(role), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(IdentityError::NotSpiffe(truncate(s)));
        };
        let role: Role = role.parse()?;
        SpiffeId::new(td, role, name)
    }
}

/// Why a peer identity was refused. Printed in logs as the reason for a refusal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The certificate could not be parsed.
    #[error("certificate cannot be parsed: {0}")]
    BadCertificate(String),
    /// No URI SAN: not a securesrv identity.
    #[error("certificate has no URI subject alternative name (spiffe://...)")]
    NoUriSan,
    /// More than one URI SAN: ambiguous identity.
    #[error("certificate has {0} URI subject alternative names; exactly one is required")]
    SeveralUriSans(usize),
    /// The URI is not of the form `spiffe://td/role/name`.
    #[error("URI SAN {0:?} is not of the form spiffe://<trust-domain>/<role>/<name>")]
    NotSpiffe(String),
    /// The trust domain is malformed.
    #[error(
        "invalid trust domain {0:?} (1-{max} of {chars})",
        max = MAX_TRUST_DOMAIN_LEN,
        chars = TRUST_DOMAIN_CHARS
    )]
    BadTrustDomain(String),
    /// The name is malformed.
    #[error("invalid name {0:?} (1-64 of A-Z a-z 0-9 . _ -)")]
    BadName(String),
    /// The role segment is not one of ours.
    #[error("unknown role {0:?}")]
    UnknownRole(String),
    /// The peer belongs to another trust domain.
    #[error("peer {peer} is not in trust domain {expected:?}")]
    WrongTrustDomain {
        /// Our trust domain.
        expected: String,
        /// The peer's identity.
        peer: String,
    },
    /// The peer's role may not use this endpoint.
    #[error("role {role} may not connect to a {endpoint} (peer {peer})")]
    RoleNotAllowed {
        /// The peer's role.
        role: Role,
        /// The role of the endpoint refusing it.
        endpoint: Role,
        /// The peer's identity.
        peer: String,
    },
    /// We dialled one identity and another answered.
    #[error("expected peer {expected} but {found} answered")]
    UnexpectedPeer {
        /// Whom we meant to reach.
        expected: String,
        /// Who answered.
        found: String,
    },
}

/// Which peers an endpoint accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerPolicy {
    /// A listener of role `endpoint`: any identity of the trust domain whose role may call it.
    Serve {
        /// The trust domain peers must belong to.
        trust_domain: String,
        /// The listener's own role, which decides the allowed peer roles.
        endpoint: Role,
    },
    /// A dialler: exactly this identity.
    Exactly(SpiffeId),
}

impl PeerPolicy {
    /// Checks a parsed peer identity against the policy.
    pub fn check(&self, peer: &SpiffeId) -> Result<(), IdentityError> {
        match self {
            PeerPolicy::Serve {
                trust_domain,
                endpoint,
            } => {
                if peer.trust_domain != *trust_domain {
                    return Err(IdentityError::WrongTrustDomain {
                        expected: trust_domain.clone(),
                        peer: peer.to_string(),
                    });
                }
                if !endpoint.allowed_peers().contains(&peer.role) {
                    return Err(IdentityError::RoleNotAllowed {
                        role: peer.role,
                        endpoint: *endpoint,
                        peer: peer.to_string(),
                    });
                }
                Ok(())
            }
            PeerPolicy::Exactly(expected) => {
                if peer != expected {
                    return Err(IdentityError::UnexpectedPeer {
                        expected: expected.to_string(),
                        found: peer.to_string(),
                    });
                }
                Ok(())
            }
        }
    }

    /// Parses the leaf certificate's identity and checks it.
    pub fn check_certificate(&self, der: &[u8]) -> Result<SpiffeId, IdentityError> {
        let id = SpiffeId::from_certificate_der(der)?;
        self.check(&id)?;
        Ok(id)
    }
}

/// Longest trust domain: SPIFFE allows 255 bytes, but a request token carries the client's
/// identity in a claim of at most 255 bytes, and `spiffe://` + the domain + `/client/` + a
/// name of 64 must fit in it.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255 - "spiffe://".len() - "/client/".len() - 64;

/// The characters a trust domain may have, as messages state them.
pub const TRUST_DOMAIN_CHARS: &str = "a-z 0-9 . - _";

fn validate_trust_domain(td: &str) -> Result<(), IdentityError> {
    let ok = !td.is_empty()
        && td.len() <= MAX_TRUST_DOMAIN_LEN
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadTrustDomain(truncate(td)))
    }
}

fn validate_name(name: &str) -> Result<(), IdentityError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadName(truncate(name)))
    }
}

/// Keeps attacker-chosen strings short in error messages and logs.
fn truncate(s: &str) -> String {
    printable(s).into_owned()
}

/// A peer-supplied string made safe for one log line: at most 80 characters, control
/// characters, line and paragraph separators and bidirectional overrides replaced, so that
/// nobody can forge a log line with a newline or make one read differently than it is.
/// Borrowed (no allocation) when the string is already safe, as it is on the hot path.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    printable_within(s, 80)
}

/// `s` as one word of a shell command in advice the user may paste: printable, and in single
/// quotes unless it is plain (letters, digits, `/ . _ - +`), so that a path with a space or a
/// `$` stays one argument.
pub fn shell_word(s: &str) -> String {
    let text = printable_within(s, usize::MAX).into_owned();
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-' | '+');
    if !text.is_empty() && text.chars().all(plain) {
        text
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

/// As [`printable`], cut to `max` characters instead of 80.
pub fn printable_within(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max && !s.chars().any(unsafe_in_log) {
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(
        s.chars()
            .take(max)
            .map(|c| if unsafe_in_log(c) { '\u{fffd}' } else { c })
            .collect(),
    )
}

/// Text for a terminal, to be read there rather than obeyed: the characters
/// [`printable_within`] replaces, but the line break and the tab, written as escapes (`\x1b`,
/// `\u{202e}`). An answer cannot then drive the terminal (set its title, clear it, fake a
/// prompt) and what it held can still be seen.
pub fn controls_visible(s: &str) -> std::borrow::Cow<'_, str> {
    let escaped = |c: char| unsafe_in_log(c) && !matches!(c, '\n' | '\t');
    if !s.chars().any(escaped) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if !escaped(c) {
            out.push(c);
        } else if c.is_ascii() {
            out += &format!("\\x{:02x}", u32::from(c));
        } else {
            out += &format!("\\u{{{:x}}}", u32::from(c));
        }
    }
    std::borrow::Cow::Owned(out)
}

fn unsafe_in_log(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// Peer-supplied text as a log field's value: [`printable_within`] `max` characters, in
/// double quotes, with `"` and `\` escaped. Unquoted, a space and a `=` in the text could pose
/// as further fields of the line (`reason=x outcome=ok`) to anyone who parses it.
pub fn quoted(s: &str, max: usize) -> Quoted<'_> {
    Quoted(printable_within(s, max))
}

/// See [`quoted`].
pub struct Quoted<'a>(std::borrow::Cow<'a, str>);

impl std::fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        f.write_char('"')?;
        for part in self.0.split_inclusive(['"', '\\']) {
            match part.strip_suffix(['"', '\\']) {
                Some(head) => {
                    f.write_str(head)?;
                    f.write_char('\\')?;
                    f.write_str(&part[head.len()..])?;
                }
                None => f.write_str(part)?,
            }
        }
        f.write_char('"')
    }
}

/// An op name as sent by a peer, for an audit line's `op=` field: unchanged when it is a
/// valid op name, otherwise every character outside `a-z 0-9 _ - .` replaced by `?` (so no
/// space, `=` or quote can start a forged field) and cut to 64 characters, the last of them
/// a `?` when something was cut (so that a name too long is not shown as a valid one).
pub fn op_for_log(op: &str) -> std::borrow::Cow<'_, str> {
    if crate::config::valid_op_name(op) {
        return std::borrow::Cow::Borrowed(op);
    }
    let cut = op.chars().nth(64).is_some();
    let mut out: String = op
        .chars()
        .take(if cut { 63 } else { 64 })
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '?'
            }
        })
        .collect();
    if out.is_empty() || cut {
        out.push('?');
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shell_word_stays_one_argument() {
        assert_eq!(shell_word("certs/a-b_c.d+1"), "certs/a-b_c.d+1");
        assert_eq!(shell_word("my certs"), "'my certs'");
        assert_eq!(shell_word("it's $HOME"), "'it'\\''s $HOME'");
        assert_eq!(shell_word(""), "''");
    }

    #[test]
    fn controls_are_made_visible_but_line_breaks_and_tabs() {
        for (text, shown) in [
            ("plain\ttext\n", "plain\ttext\n"),
            ("\u{1b}]0;pwned\u{7}\u{1b}[2J", "\\x1b]0;pwned\\x07\\x1b[2J"),
            ("a\rb\u{7f}", "a\\x0db\\x7f"),
            ("\u{9b}31m \u{202e}rtl", "\\u{9b}31m \\u{202e}rtl"),
            ("caf\u{e9} \u{fffd}", "caf\u{e9} \u{fffd}"),
        ] {
            assert_eq!(controls_visible(text), shown, "{text:?}");
        }
    }

    #[test]
    fn peer_strings_cannot_forge_or_disguise_log_fields() {
        assert_eq!(
            printable("a\u{2028}b\u{202e}c\nd"),
            "a\u{fffd}b\u{fffd}c\u{fffd}d"
        );
        assert!(matches!(
            printable("plain text"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert!(matches!(
            op_for_log("sha256"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(
            op_for_log("echo outcome=ok worker=x\u{2028}INFO"),
            "echo?outcome?ok?worker?x?????"
        );
        assert_eq!(op_for_log(""), "?");
        assert_eq!(op_for_log(&"x".repeat(100)).len(), 64);
        // One character too long: cut, and not shown as the valid name of 64 it starts with.
        let long = "a".repeat(65);
        assert_eq!(op_for_log(&long), format!("{}?", "a".repeat(63)));
        assert!(!crate::config::valid_op_name(&op_for_log(&long)));
        assert_eq!(op_for_log(&"a".repeat(64)), "a".repeat(64));
    }

    #[test]
    fn parse_and_display_round_trip() {
        for s in [
            "spiffe://securesrv/dispatcher/main",
            "spiffe://securesrv/worker/1",
            "spiffe://example.org/client/alice-2",
            "spiffe://securesrv/watchdog/main",
        ] {
            let id: SpiffeId = s.parse().unwrap();
            assert_eq!(id.to_string(), s);
        }
    }

    #[test]
    fn malformed_ids_are_refused_with_a_reason() {
        let cases = [
            ("https://securesrv/client/a", "not of the form"),
            ("spiffe://securesrv/client", "not of the form"),
            ("spiffe://securesrv/client/a/b", "not of the form"),
            ("spiffe://securesrv/admin/a", "unknown role"),
            ("spiffe://SecureSrv/client/a", "invalid trust domain"),
            ("spiffe:///client/a", "invalid trust domain"),
            ("spiffe://securesrv/client/", "invalid name"),
            ("spiffe://securesrv/client/..", "invalid name"),
            ("spiffe://securesrv/client/a b", "invalid name"),
        ];
        for (input, reason) in cases {
            let err = input.parse::<SpiffeId>().unwrap_err().to_string();
            assert!(err.contains(reason), "{input}: {err}");
        }
    }

    #[test]
    fn role_matrix() {
        let td = DEFAULT_TRUST_DOMAIN;
        let id = |role, name: &str| SpiffeId::new(td, role, name).unwrap();
        let serve = |endpoint| PeerPolicy::Serve {
            trust_domain: td.into(),
            endpoint,
        };
        let table = [
            (Role::Dispatcher, Role::Client, true),
            (Role::Dispatcher, Role::Watchdog, true),
            (Role::Dispatcher, Role::Worker, false),
            (Role::Dispatcher, Role::Dispatcher, false),
            (Role::Worker, Role::Dispatcher, true),
            (Role::Worker, Role::Watchdog, true),
            (Role::Worker, Role::Client, false),
            (Role::Worker, Role::Worker, false),
        ];
        for (endpoint, peer, allowed) in table {
            let res = serve(endpoint).check(&id(peer, "x"));
            assert_eq!(res.is_ok(), allowed, "{peer} -> {endpoint}: {res:?}");
        }
        let other_domain = SpiffeId::new("other", Role::Client, "x").unwrap();
        assert!(matches!(
            serve(Role::Dispatcher).check(&other_domain),
            Err(IdentityError::WrongTrustDomain { .. })
        ));
    }

    #[test]
    fn dialler_accepts_only_the_exact_identity() {
        let w1 = SpiffeId::worker(DEFAULT_TRUST_DOMAIN, 1).unwrap();
        let w2 = SpiffeId::worker(DEFAULT_TRUST_DOMAIN, 2).unwrap();
        let policy = PeerPolicy::Exactly(w1.clone());
        assert!(policy.check(&w1).is_ok());
        let err = policy.check(&w2).unwrap_err();
        assert!(
            err.to_string()
                .contains("expected peer spiffe://securesrv/worker/1")
        );
    }
}
