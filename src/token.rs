//! Request tokens: what the dispatcher signs and a worker checks for every forwarded request.
//!
//! A token is a fixed binary layout (documented in docs/PROTOCOL.md and SECURITY.md) ending in an
//! HMAC-SHA256 tag under a key shared by the dispatcher and one worker only. Per-worker keys are
//! derived with HKDF-SHA256 from the dispatcher's master key and the worker's SPIFFE ID, so a
//! compromised worker cannot mint tokens another worker accepts. The worker checks, in order:
//! layout and version, key id, tag (constant time, `ring::hmac::verify`), audience, time window,
//! op, payload digest, and finally the request id against a bounded replay cache.
//!
//! Key bytes live in [`SecretKey`] (zeroized on drop, redacted in `Debug`) and are never logged.
//! This module knows nothing of sockets.

mod keyfile;
mod replay;

pub use keyfile::{KeyEntry, KeyFile, KeyFileError};
pub use replay::ReplayCache;

use crate::identity::SpiffeId;
use ring::{digest, hkdf, hmac};
use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};
use zeroize::Zeroizing;

/// The only token layout version.
pub const TOKEN_VERSION: u8 = 1;
/// Length of every secret key (master and derived).
pub const KEY_LEN: usize = 32;
/// Length of the HMAC-SHA256 tag at the end of a token.
pub const TAG_LEN: usize = 32;
/// Length of a request id.
pub const REQUEST_ID_LEN: usize = 16;
/// Bytes before the variable-length strings: version, key id, request id, times, digest.
pub const FIXED_LEN: usize = 1 + 4 + REQUEST_ID_LEN + 8 + 8 + 32;
/// Largest possible token: fixed part, three length-prefixed strings of at most 255 bytes, tag.
pub const MAX_TOKEN_LEN: usize = FIXED_LEN + 3 * (1 + 255) + TAG_LEN;
/// HKDF salt for per-worker key derivation (domain separation from any other use of the key).
pub const HKDF_SALT: &[u8] = b"securesrv/request-token/v1";
/// Default token lifetime.
pub const DEFAULT_LIFETIME_MS: u64 = 5_000;
/// Default tolerated clock difference between dispatcher and worker.
pub const DEFAULT_CLOCK_SKEW_MS: u64 = 1_000;
/// Default replay cache capacity (entries); see SECURITY.md for the sizing.
pub const DEFAULT_REPLAY_CAPACITY: usize = 1 << 20;

/// 32 secret bytes, zeroized when dropped; `Debug` never shows them.
#[derive(Clone)]
pub struct SecretKey(Zeroizing<[u8; KEY_LEN]>);

impl SecretKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        SecretKey(Zeroizing::new(bytes))
    }

    /// A fresh random key from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, TokenError> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes[..])
            .map_err(|_| TokenError::Random)?;
        Ok(SecretKey(bytes))
    }

    /// The key bytes, for HMAC key setup and for writing the key file.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Derives the key shared by the dispatcher and the worker `audience` from this master key.
    pub fn derive_for(&self, audience: &SpiffeId) -> SecretKey {
        let audience = audience.to_string();
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(&self.0[..]);
        let mut out = Zeroizing::new([0u8; KEY_LEN]);
        let info = [audience.as_bytes()];
        // expand() fails only if the requested length exceeds 255 * 32 bytes; 32 never does.
        if let Ok(okm) = prk.expand(&info, hkdf::HKDF_SHA256) {
            let _ = okm.fill(&mut out[..]);
        }
        SecretKey(out)
    }

    fn hmac_key(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &self.0[..])
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// Why a token was refused (or could not be made). Logged by the worker; the dispatcher sees
/// only the `invalid_token` code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Too short, too long, bad lengths or trailing bytes.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// A layout version this worker does not speak.
    #[error("unsupported token version {0}")]
    UnsupportedVersion(u8),
    /// The key id is not one this worker holds (or its rotation window ended).
    #[error("unknown or retired token key id {0}")]
    UnknownKey(u32),
    /// The HMAC tag does not match: forged or altered.
    #[error("token tag does not verify")]
    BadTag,
    /// The token was made for another worker.
    #[error("token audience {found:?} is not this worker ({expected})")]
    WrongAudience {
        /// This worker.
        expected: String,
        /// The audience in the token.
        found: String,
    },
    /// The token's lifetime ended.
    #[error("token expired {0} ms ago")]
    Expired(u64),
    /// Issued in the future beyond the tolerated clock skew.
    #[error("token issued {0} ms in the future")]
    NotYetValid(u64),
    /// Claims a lifetime longer than the worker accepts.
    #[error("token lifetime of {0} ms exceeds the maximum")]
    LifetimeTooLong(u64),
    /// The forwarded op is not the op that was signed.
    #[error("token was issued for op {signed:?}, request is for {requested:?}")]
    OpMismatch {
        /// Op in the token.
        signed: String,
        /// Op in the forward message.
        requested: String,
    },
    /// The payload is not the one that was signed.
    #[error("payload digest does not match the token")]
    PayloadMismatch,
    /// This request id was already used.
    #[error("request id already seen (replay)")]
    Replayed,
    /// The replay cache is full of live entries; refusing is the only safe answer.
    #[error("replay cache full")]
    ReplayCacheFull,
    /// No key for the requested audience (dispatcher side).
    #[error("no token key for audience {0}")]
    NoKeyForAudience(String),
    /// A claim string is longer than 255 bytes (dispatcher side).
    #[error("token claim {0} is too long")]
    ClaimTooLong(&'static str),
    /// The operating system's random generator failed.
    #[error("random number generator failed")]
    Random,
}

/// The signed content of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// Layout version ([`TOKEN_VERSION`]).
    pub version: u8,
    /// Which key generation signed the token (for rotation).
    pub key_id: u32,
    /// Random, unique per request (see `RequestIds`); the replay cache key.
    pub request_id: [u8; REQUEST_ID_LEN],
    /// Milliseconds since the Unix epoch when minted.
    pub issued_at_ms: u64,
    /// Milliseconds since the Unix epoch after which the token is refused.
    pub expires_at_ms: u64,
    /// SHA-256 of the request payload.
    pub payload_sha256: [u8; 32],
    /// The verified identity of the client that sent the request.
    pub client: String,
    /// The operation the client asked for.
    pub op: String,
    /// The identity of the one worker this token is for.
    pub audience: String,
}

impl Claims {
    /// Appends the signed part (everything but the tag) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), TokenError> {
        SignedFields {
            version: self.version,
            key_id: self.key_id,
            request_id: &self.request_id,
            issued_at_ms: self.issued_at_ms,
            expires_at_ms: self.expires_at_ms,
            payload_sha256: &self.payload_sha256,
            client: &self.client,
            op: &self.op,
            audience: &self.audience,
        }
        .encode(out)
    }
}

/// [`Claims`] by reference: what the minter encodes without building owned claims first.
struct SignedFields<'a> {
    version: u8,
    key_id: u32,
    request_id: &'a [u8; REQUEST_ID_LEN],
    issued_at_ms: u64,
    expires_at_ms: u64,
    payload_sha256: &'a [u8; 32],
    client: &'a str,
    op: &'a str,
    audience: &'a str,
}

impl SignedFields<'_> {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), TokenError> {
        out.push(self.version);
        out.extend_from_slice(&self.key_id.to_be_bytes());
        out.extend_from_slice(self.request_id);
        out.extend_from_slice(&self.issued_at_ms.to_be_bytes());
        out.extend_from_slice(&self.expires_at_ms.to_be_bytes());
        out.extend_from_slice(self.payload_sha256);
        for (name, s) in [
            ("client", self.client),
            ("op", self.op),
            ("audience", self.audience),
        ] {
            let len = u8::try_from(s.len()).map_err(|_| TokenError::ClaimTooLong(name))?;
            out.push(len);
            out.extend_from_slice(s.as_bytes());
        }
        Ok(())
    }
}

/// A token split into its parts; nothing is verified yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToken<'a> {
    /// The decoded claims.
    pub claims: Claims,
    /// The bytes the tag covers.
    pub signed: &'a [u8],
    /// The tag.
    pub tag: &'a [u8],
}

/// Splits a token into claims, signed bytes and tag. Pure; never panics.
pub fn parse(token: &[u8]) -> Result<ParsedToken<'_>, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed("too long"));
    }
    let body_len = token
        .len()
        .checked_sub(TAG_LEN)
        .ok_or(TokenError::Malformed("too short"))?;
    let (signed, tag) = token.split_at(body_len);
    let mut r = Reader(signed);
    let version = r.u8()?;
    if version != TOKEN_VERSION {
        return Err(TokenError::UnsupportedVersion(version));
    }
    let key_id = u32::from_be_bytes(r.array()?);
    let request_id = r.array()?;
    let issued_at_ms = u64::from_be_bytes(r.array()?);
    let expires_at_ms = u64::from_be_bytes(r.array()?);
    let payload_sha256 = r.array()?;
    let client = r.string()?;
    let op = r.string()?;
    let audience = r.string()?;
    if !r.0.is_empty() {
        return Err(TokenError::Malformed("trailing bytes"));
    }
    Ok(ParsedToken {
        claims: Claims {
            version,
            key_id,
            request_id,
            issued_at_ms,
            expires_at_ms,
            payload_sha256,
            client,
            op,
            audience,
        },
        signed,
        tag,
    })
}

/// A cursor over the token that cannot read past the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TokenError> {
        if self.0.len() < n {
            return Err(TokenError::Malformed("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, TokenError> {
        Ok(self.take(1)?[0])
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], TokenError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    fn string(&mut self) -> Result<String, TokenError> {
        let len = self.u8()? as usize;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| TokenError::Malformed("claim is not UTF-8"))
    }
}

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// SHA-256 of a payload.
pub fn payload_digest(payload: &[u8]) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, payload);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The dispatcher's side: mints tokens for the workers it knows.
pub struct Minter {
    /// Key id of the current master key; stamped into every token.
    key_id: u32,
    /// Per-audience HMAC keys, derived once at start-up, with the audience as text.
    keys: HashMap<SpiffeId, (String, hmac::Key)>,
    /// The newest previous master key, while workers still accept it: for a worker not yet
    /// restarted since `certs rotate-token-key`, which knows only that one.
    previous: Option<PreviousKey>,
    lifetime_ms: u64,
    ids: RequestIds,
}

/// A previous master key's per-audience keys, and when workers stop accepting it.
struct PreviousKey {
    key_id: u32,
    keys: HashMap<SpiffeId, hmac::Key>,
    not_after_ms: u64,
}

/// Random 128-bit request ids without a system call per request: AES-128 of a counter under a
/// key drawn from the operating system when the minter is made (a counter-mode generator, as
/// NIST's CTR_DRBG). The ids cannot be told from random or guessed without the key, never
/// repeat within a process (AES is a permutation of distinct inputs), and are unrelated after
/// a restart.
struct RequestIds {
    key: ring::aead::LessSafeKey,
    counter: std::sync::atomic::AtomicU64,
}

impl RequestIds {
    /// Keyed from the OS generator; should it fail (it does not on Linux), from the master
    /// key, the clock and the process id, so that the ids stay secret and differ per restart.
    fn new(master: &SecretKey) -> Self {
        let mut key = Zeroizing::new([0u8; 16]);
        if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key[..]).is_err() {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let mut ctx = hmac::Context::with_key(&master.hmac_key());
            ctx.update(b"securesrv/request-ids");
            ctx.update(&nanos.to_be_bytes());
            ctx.update(&std::process::id().to_be_bytes());
            key.copy_from_slice(&ctx.sign().as_ref()[..16]);
        }
        let key = ring::aead::UnboundKey::new(&ring::aead::AES_128_GCM, &key[..])
            .map(ring::aead::LessSafeKey::new);
        RequestIds {
            // AES-128-GCM takes any 16-byte key; this never fails.
            key: key.unwrap_or_else(|_| unreachable!("a 16-byte AES-128 key")),
            counter: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The next id: the cipher's block for this counter value (zeros sealed with the counter
    /// as the nonce, so each nonce is used once; the tag is not needed).
    fn next(&self) -> Result<[u8; REQUEST_ID_LEN], TokenError> {
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut nonce = [0u8; ring::aead::NONCE_LEN];
        nonce[4..].copy_from_slice(&n.to_be_bytes());
        let mut id = [0u8; REQUEST_ID_LEN];
        let _tag = self
            .key
            .seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::empty(),
                &mut id,
            )
            .map_err(|_| TokenError::Random)?;
        Ok(id)
    }
}

impl fmt::Debug for Minter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Minter")
            .field("key_id", &self.key_id)
            .field(
                "audiences",
                &self.keys.values().map(|(a, _)| a).collect::<Vec<_>>(),
            )
            .field("lifetime_ms", &self.lifetime_ms)
            .finish_non_exhaustive()
    }
}

/// What the dispatcher asks a token for.
#[derive(Debug, Clone, Copy)]
pub struct MintRequest<'a> {
    /// The worker that will receive the request.
    pub audience: &'a SpiffeId,
    /// The client on whose behalf it is sent.
    pub client: &'a str,
    /// The operation.
    pub op: &'a str,
    /// The payload (hashed into the token).
    pub payload: &'a [u8],
}

impl Minter {
    /// Derives one key per audience from the current master key.
    pub fn new(master: &KeyEntry, audiences: &[SpiffeId], lifetime_ms: u64) -> Self {
        let keys = audiences
            .iter()
            .map(|a| {
                let key = master.key.derive_for(a).hmac_key();
                (a.clone(), (a.to_string(), key))
            })
            .collect();
        Minter {
            key_id: master.id,
            keys,
            previous: None,
            lifetime_ms,
            ids: RequestIds::new(&master.key),
        }
    }

    /// Also keeps `previous` (a key file's second key, if it has a retirement time), to sign
    /// for workers that refuse the current key because they still run on that one.
    pub fn with_previous(mut self, previous: Option<&KeyEntry>) -> Self {
        self.previous = previous.and_then(|p| {
            Some(PreviousKey {
                key_id: p.id,
                keys: self
                    .keys
                    .keys()
                    .map(|a| (a.clone(), p.key.derive_for(a).hmac_key()))
                    .collect(),
                not_after_ms: p.not_after_ms?,
            })
        });
        self
    }

    /// Whether a token minted now with the previous key would still be accepted until it
    /// expires.
    pub fn previous_usable(&self, now_ms: u64) -> bool {
        self.previous
            .as_ref()
            .is_some_and(|p| now_ms.saturating_add(self.lifetime_ms) <= p.not_after_ms)
    }

    /// How long a minted token is valid.
    pub fn lifetime(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.lifetime_ms)
    }

    /// Mints a token; returns it and its request id.
    pub fn mint(
        &self,
        req: MintRequest<'_>,
        now_ms: u64,
    ) -> Result<(Vec<u8>, [u8; REQUEST_ID_LEN]), TokenError> {
        self.mint_with(req, now_ms, false)
    }

    /// [`mint`](Self::mint), signed with the previous key if `previous` and
    /// [`previous_usable`](Self::previous_usable) (with the current key otherwise).
    pub fn mint_with(
        &self,
        req: MintRequest<'_>,
        now_ms: u64,
        previous: bool,
    ) -> Result<(Vec<u8>, [u8; REQUEST_ID_LEN]), TokenError> {
        let (audience, key) = self
            .keys
            .get(req.audience)
            .ok_or_else(|| TokenError::NoKeyForAudience(req.audience.to_string()))?;
        let (key_id, key) = match self.previous.as_ref() {
            Some(p) if previous && self.previous_usable(now_ms) => (
                p.key_id,
                p.keys
                    .get(req.audience)
                    .ok_or_else(|| TokenError::NoKeyForAudience(req.audience.to_string()))?,
            ),
            _ => (self.key_id, key),
        };
        let request_id = self.ids.next()?;
        // Encoded straight from the borrowed parts: the token is the one allocation.
        let fields = SignedFields {
            version: TOKEN_VERSION,
            key_id,
            request_id: &request_id,
            issued_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(self.lifetime_ms),
            payload_sha256: &payload_digest(req.payload),
            client: req.client,
            op: req.op,
            audience,
        };
        let mut out = Vec::with_capacity(
            FIXED_LEN + 3 + req.client.len() + req.op.len() + audience.len() + TAG_LEN,
        );
        fields.encode(&mut out)?;
        let tag = hmac::sign(key, &out);
        out.extend_from_slice(tag.as_ref());
        Ok((out, request_id))
    }
}

/// The worker's side: checks tokens addressed to it.
pub struct Verifier {
    me: String,
    /// Accepted keys: (key id, HMAC key, retire-after in Unix ms).
    keys: Vec<(u32, hmac::Key, Option<u64>)>,
    max_lifetime_ms: u64,
    skew_ms: u64,
    replay: Mutex<ReplayCache>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("me", &self.me)
            .field(
                "key_ids",
                &self.keys.iter().map(|k| k.0).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// Limits a [`Verifier`] enforces.
#[derive(Debug, Clone, Copy)]
pub struct VerifierLimits {
    /// Longest `expires_at - issued_at` accepted.
    pub max_lifetime_ms: u64,
    /// Tolerated clock difference with the dispatcher.
    pub skew_ms: u64,
    /// Replay cache capacity in entries.
    pub replay_capacity: usize,
}

impl Default for VerifierLimits {
    fn default() -> Self {
        VerifierLimits {
            max_lifetime_ms: DEFAULT_LIFETIME_MS,
            skew_ms: DEFAULT_CLOCK_SKEW_MS,
            replay_capacity: DEFAULT_REPLAY_CAPACITY,
        }
    }
}

impl Verifier {
    /// A verifier for worker `me` holding the keys of its token file.
    pub fn new(me: &SpiffeId, keys: &KeyFile, limits: VerifierLimits) -> Self {
        Verifier {
            me: me.to_string(),
            keys: keys
                .entries()
                .iter()
                .map(|e| (e.id, e.key.hmac_key(), e.not_after_ms))
                .collect(),
            max_lifetime_ms: limits.max_lifetime_ms,
            skew_ms: limits.skew_ms,
            replay: Mutex::new(ReplayCache::new(limits.replay_capacity)),
        }
    }

    /// Checks everything about a forwarded request's token; on success the request id is
    /// recorded so the same token is refused next time.
    pub fn verify(
        &self,
        token: &[u8],
        op: &str,
        payload: &[u8],
        now_ms: u64,
    ) -> Result<Claims, TokenError> {
        let parsed = parse(token)?;
        let claims = parsed.claims;
        let key = self
            .keys
            .iter()
            .find(|(id, _, not_after)| {
                *id == claims.key_id && not_after.is_none_or(|limit| now_ms <= limit)
            })
            .ok_or(TokenError::UnknownKey(claims.key_id))?;
        hmac::verify(&key.1, parsed.signed, parsed.tag).map_err(|_| TokenError::BadTag)?;
        if claims.audience != self.me {
            return Err(TokenError::WrongAudience {
                expected: self.me.clone(),
                found: claims.audience,
            });
        }
        if now_ms > claims.expires_at_ms {
            return Err(TokenError::Expired(now_ms - claims.expires_at_ms));
        }
        if claims.issued_at_ms > now_ms.saturating_add(self.skew_ms) {
            return Err(TokenError::NotYetValid(claims.issued_at_ms - now_ms));
        }
        let lifetime = claims.expires_at_ms.saturating_sub(claims.issued_at_ms);
        if lifetime > self.max_lifetime_ms {
            return Err(TokenError::LifetimeTooLong(lifetime));
        }
        if claims.op != op {
            return Err(TokenError::OpMismatch {
                signed: claims.op,
                requested: op.to_string(),
            });
        }
        if payload_digest(payload) != claims.payload_sha256 {
            return Err(TokenError::PayloadMismatch);
        }
        let mut replay = self.replay.lock().unwrap_or_else(|p| p.into_inner());
        replay.insert(
            u128::from_be_bytes(claims.request_id),
            claims.expires_at_ms.saturating_add(self.skew_ms),
            now_ms,
        )?;
        Ok(claims)
    }
}

#[cfg(test)]
mod tests;
