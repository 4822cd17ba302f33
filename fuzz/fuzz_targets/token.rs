//! Fuzzes request tokens: `securesrv::token::parse`, `Claims::encode` and `Verifier::verify`.
//!
//! Properties:
//! - `parse` never panics; when it succeeds, `Claims::encode` gives back exactly the signed bytes
//!   and the tag is the last 32 bytes of the input;
//! - the raw input, checked by a verifier built once from a fixed key, is accepted only if its
//!   tag really is the HMAC of its signed bytes under that key (recomputed here with ring) and
//!   every claim holds; every refusal is the one the documented check order gives;
//! - the same claims re-signed here with the right key (so the checks after the tag are reached)
//!   get the documented answer at several instants, and are accepted at most once (replay);
//! - the client and audience strings, when they parse as SPIFFE IDs, display unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ring::hmac;
use securesrv::identity::{DEFAULT_TRUST_DOMAIN, SpiffeId};
use securesrv::token::{
    self, Claims, KeyEntry, KeyFile, SecretKey, TAG_LEN, TokenError, Verifier, VerifierLimits,
};
use std::sync::OnceLock;

/// The master key the seed tokens in corpus/token were minted with (key id 1).
const MASTER: [u8; 32] = [42; 32];
/// A second, retired key (id 2): tokens naming it are refused at `NOW`.
const RETIRED: [u8; 32] = [7; 32];
/// The instant the verifier is asked at; the seeds were minted one second before it.
const NOW: u64 = 1_800_000_000_000;
/// The op and payload the seeds were minted for.
const OP: &str = "echo";
const PAYLOAD: &[u8] = b"hello";

const LIMITS: VerifierLimits = VerifierLimits {
    max_lifetime_ms: token::DEFAULT_LIFETIME_MS,
    skew_ms: token::DEFAULT_CLOCK_SKEW_MS,
    replay_capacity: 1 << 16,
};

struct Fixture {
    me: SpiffeId,
    /// The worker's key file: derived key 1 (current), derived key 2 retired at NOW - 1.
    keys: KeyFile,
    /// (key id, HMAC key, retire-after) as the reference model sees them.
    model_keys: Vec<(u32, hmac::Key, Option<u64>)>,
    verifier: Verifier,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let me = SpiffeId::worker(DEFAULT_TRUST_DOMAIN, 1).expect("worker id");
        let k1 = SecretKey::from_bytes(MASTER).derive_for(&me);
        let k2 = SecretKey::from_bytes(RETIRED).derive_for(&me);
        let model_keys = vec![
            (1, hmac::Key::new(hmac::HMAC_SHA256, k1.expose()), None),
            (
                2,
                hmac::Key::new(hmac::HMAC_SHA256, k2.expose()),
                Some(NOW - 1),
            ),
        ];
        let keys = KeyFile::from_entries(vec![
            KeyEntry {
                id: 1,
                key: k1,
                not_after_ms: None,
            },
            KeyEntry {
                id: 2,
                key: k2,
                not_after_ms: Some(NOW - 1),
            },
        ])
        .expect("key file");
        let verifier = Verifier::new(&me, &keys, LIMITS);
        Fixture {
            me,
            keys,
            model_keys,
            verifier,
        }
    })
}

/// What `verify` must answer according to the documented check order, replay cache aside:
/// `Ok(())` means "accept unless the request id was already used".
fn expected(
    f: &Fixture,
    token: &[u8],
    op: &str,
    payload: &[u8],
    now: u64,
) -> Result<(), TokenError> {
    let p = token::parse(token)?;
    let c = &p.claims;
    let (_, key, _) = f
        .model_keys
        .iter()
        .find(|(id, _, until)| *id == c.key_id && until.is_none_or(|u| now <= u))
        .ok_or(TokenError::UnknownKey(c.key_id))?;
    if hmac::sign(key, p.signed).as_ref() != p.tag {
        return Err(TokenError::BadTag);
    }
    if c.audience != f.me.to_string() {
        return Err(TokenError::WrongAudience {
            expected: f.me.to_string(),
            found: c.audience.clone(),
        });
    }
    if now > c.expires_at_ms {
        return Err(TokenError::Expired(now - c.expires_at_ms));
    }
    if c.issued_at_ms > now.saturating_add(LIMITS.skew_ms) {
        return Err(TokenError::NotYetValid(c.issued_at_ms - now));
    }
    let lifetime = c.expires_at_ms.saturating_sub(c.issued_at_ms);
    if lifetime > LIMITS.max_lifetime_ms {
        return Err(TokenError::LifetimeTooLong(lifetime));
    }
    if c.op != op {
        return Err(TokenError::OpMismatch {
            signed: c.op.clone(),
            requested: op.to_string(),
        });
    }
    if token::payload_digest(payload) != c.payload_sha256 {
        return Err(TokenError::PayloadMismatch);
    }
    Ok(())
}

/// Runs `verify` and compares it with the model. Returns whether the token was accepted.
fn judge(f: &Fixture, v: &Verifier, token: &[u8], op: &str, now: u64, used: bool) -> bool {
    let got = v.verify(token, op, PAYLOAD, now);
    match (expected(f, token, op, PAYLOAD, now), got) {
        (Ok(()), Ok(claims)) => {
            assert!(!used, "a token was accepted twice");
            assert_eq!(
                claims,
                token::parse(token).expect("accepted but unparsable").claims
            );
            true
        }
        (Ok(()), Err(TokenError::Replayed)) => {
            assert!(used, "a fresh request id was refused as a replay");
            false
        }
        (Ok(()), Err(TokenError::ReplayCacheFull)) => false,
        (Ok(()), Err(e)) => panic!("valid token refused at {now} with {e:?}"),
        (Err(want), Ok(claims)) => panic!("token accepted at {now}, expected {want:?}: {claims:?}"),
        (Err(want), Err(e)) => {
            assert_eq!(e, want, "refused for the wrong reason at {now}");
            false
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();

    // 1. The raw input against the long-lived verifier (its replay cache spans inputs, so
    //    only "accepted implies genuinely valid" is checked, not replay bookkeeping).
    let got = f.verifier.verify(data, OP, PAYLOAD, NOW);
    match (&got, expected(f, data, OP, PAYLOAD, NOW)) {
        (Ok(_), Err(want)) => panic!("raw input accepted, expected {want:?}"),
        (Err(e), Err(want)) => assert_eq!(*e, want, "raw input refused for the wrong reason"),
        (Err(e), Ok(())) => assert!(
            matches!(e, TokenError::Replayed | TokenError::ReplayCacheFull),
            "valid raw token refused with {e:?}"
        ),
        (Ok(_), Ok(())) => {}
    }

    let Ok(parsed) = token::parse(data) else {
        return;
    };

    // 2. Layout: encode(parse(x)) == signed part of x; tag = last 32 bytes.
    assert_eq!(parsed.signed.len() + TAG_LEN, data.len());
    assert_eq!(parsed.tag, &data[data.len() - TAG_LEN..]);
    let mut out = Vec::new();
    parsed
        .claims
        .encode(&mut out)
        .expect("parsed claims must encode");
    assert_eq!(
        out, parsed.signed,
        "Claims::encode differs from the parsed bytes"
    );
    let c: &Claims = &parsed.claims;

    for s in [&c.client, &c.audience] {
        if let Ok(id) = s.parse::<SpiffeId>() {
            assert_eq!(&id.to_string(), s, "SPIFFE ID does not display as parsed");
        }
    }

    // 3. The same claims with a genuine tag, against a fresh verifier (deterministic replay
    //    state): the documented answer at each instant, and at most one acceptance.
    let key = match f.model_keys.iter().find(|(id, _, _)| *id == c.key_id) {
        Some((_, k, _)) => k,
        None => &f.model_keys[0].1,
    };
    let mut signed = parsed.signed.to_vec();
    signed.extend_from_slice(hmac::sign(key, parsed.signed).as_ref());
    let fresh = Verifier::new(&f.me, &f.keys, LIMITS);
    let mut used = false;
    let skew = LIMITS.skew_ms;
    for now in [
        NOW,
        c.issued_at_ms,
        c.issued_at_ms.saturating_sub(skew),
        c.issued_at_ms.saturating_sub(skew + 1),
        c.expires_at_ms,
        c.expires_at_ms.saturating_add(1),
        0,
        u64::MAX,
    ] {
        for op in [OP, c.op.as_str()] {
            used |= judge(f, &fresh, &signed, op, now, used);
        }
    }
});
