//! Unit tests for minting and verifying tokens: every refusal the design promises.

use super::*;
use crate::identity::{DEFAULT_TRUST_DOMAIN, SpiffeId};

fn worker(id: u32) -> SpiffeId {
    SpiffeId::worker(DEFAULT_TRUST_DOMAIN, id).unwrap()
}

struct Fixture {
    master: KeyFile,
    minter: Minter,
    verifier: Verifier,
}

fn fixture() -> Fixture {
    let master = KeyFile::single(1, SecretKey::from_bytes([42; 32]));
    let minter = Minter::new(master.current(), &[worker(1), worker(2)], 5_000);
    let w1_keys = master.map_keys(|k| k.derive_for(&worker(1)));
    let verifier = Verifier::new(&worker(1), &w1_keys, VerifierLimits::default());
    Fixture {
        master,
        minter,
        verifier,
    }
}

fn mint_for(f: &Fixture, audience: &SpiffeId, op: &str, payload: &[u8], now: u64) -> Vec<u8> {
    f.minter
        .mint(
            MintRequest {
                audience,
                client: "spiffe://securesrv/client/default",
                op,
                payload,
            },
            now,
        )
        .unwrap()
        .0
}

#[test]
fn a_fresh_token_verifies_once() {
    let f = fixture();
    let t = mint_for(&f, &worker(1), "echo", b"hi", 1_000);
    let claims = f.verifier.verify(&t, "echo", b"hi", 1_001).unwrap();
    assert_eq!(claims.client, "spiffe://securesrv/client/default");
    assert_eq!(claims.audience, "spiffe://securesrv/worker/1");
    assert_eq!(claims.expires_at_ms, 6_000);
    assert_eq!(
        f.verifier.verify(&t, "echo", b"hi", 1_002),
        Err(TokenError::Replayed)
    );
}

#[test]
fn refusals() {
    let f = fixture();
    let now = 10_000;
    let good = || mint_for(&f, &worker(1), "echo", b"pay", now);

    let mut flipped = good();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    assert_eq!(
        f.verifier.verify(&flipped, "echo", b"pay", now),
        Err(TokenError::BadTag)
    );

    // Altering a claim (the op byte) breaks the tag too.
    let mut altered = good();
    let op_pos = FIXED_LEN + 1 + "spiffe://securesrv/client/default".len() + 1;
    altered[op_pos] = b'x';
    assert_eq!(
        f.verifier.verify(&altered, "xcho", b"pay", now),
        Err(TokenError::BadTag)
    );

    // Made for worker 2: signed with worker 2's key, so worker 1 cannot even verify the tag.
    let for_w2 = mint_for(&f, &worker(2), "echo", b"pay", now);
    assert_eq!(
        f.verifier.verify(&for_w2, "echo", b"pay", now),
        Err(TokenError::BadTag)
    );

    // Audience re-targeted by someone holding worker 1's key: refused on the audience.
    let w1_key = f.master.current().key.derive_for(&worker(1));
    let mut claims = parse(&good()).unwrap().claims;
    claims.audience = worker(2).to_string();
    claims.request_id = [1; 16];
    let mut retarget = Vec::new();
    claims.encode(&mut retarget).unwrap();
    let tag = hmac::sign(&w1_key.hmac_key(), &retarget);
    retarget.extend_from_slice(tag.as_ref());
    assert!(matches!(
        f.verifier.verify(&retarget, "echo", b"pay", now),
        Err(TokenError::WrongAudience { .. })
    ));

    assert_eq!(
        f.verifier.verify(&good(), "echo", b"pay", now + 5_001),
        Err(TokenError::Expired(1))
    );
    assert_eq!(
        f.verifier.verify(&good(), "echo", b"pay", now - 2_000),
        Err(TokenError::NotYetValid(2_000))
    );
    assert!(matches!(
        f.verifier.verify(&good(), "sha256", b"pay", now),
        Err(TokenError::OpMismatch { .. })
    ));
    assert_eq!(
        f.verifier.verify(&good(), "echo", b"other", now),
        Err(TokenError::PayloadMismatch)
    );

    // A different master key (another deployment) cannot produce an accepted token.
    let other = Minter::new(
        &KeyEntry {
            id: 1,
            key: SecretKey::from_bytes([1; 32]),
            not_after_ms: None,
        },
        &[worker(1)],
        5_000,
    );
    let (t, _) = other
        .mint(
            MintRequest {
                audience: &worker(1),
                client: "c",
                op: "echo",
                payload: b"",
            },
            now,
        )
        .unwrap();
    assert_eq!(
        f.verifier.verify(&t, "echo", b"", now),
        Err(TokenError::BadTag)
    );

    // The refusals above did not poison the replay cache: a good token still works.
    assert!(f.verifier.verify(&good(), "echo", b"pay", now).is_ok());
}

#[test]
fn lifetime_longer_than_allowed_is_refused() {
    let f = fixture();
    let long = Minter::new(f.master.current(), &[worker(1)], 60_000);
    let (t, _) = long
        .mint(
            MintRequest {
                audience: &worker(1),
                client: "c",
                op: "echo",
                payload: b"",
            },
            100,
        )
        .unwrap();
    assert_eq!(
        f.verifier.verify(&t, "echo", b"", 100),
        Err(TokenError::LifetimeTooLong(60_000))
    );
}

#[test]
fn rotation_accepts_previous_key_until_its_window_ends() {
    let f = fixture();
    let now = 50_000;
    let rotated = f
        .master
        .rotated(SecretKey::from_bytes([77; 32]), now, now + 10_000)
        .unwrap();
    let w1_keys = rotated.map_keys(|k| k.derive_for(&worker(1)));
    let v = Verifier::new(&worker(1), &w1_keys, VerifierLimits::default());
    let new_minter = Minter::new(rotated.current(), &[worker(1)], 5_000);
    let mint = |m: &Minter, at: u64| {
        m.mint(
            MintRequest {
                audience: &worker(1),
                client: "c",
                op: "echo",
                payload: b"",
            },
            at,
        )
        .unwrap()
        .0
    };
    assert!(v.verify(&mint(&new_minter, now), "echo", b"", now).is_ok());
    assert!(v.verify(&mint(&f.minter, now), "echo", b"", now).is_ok());
    let late = now + 10_001;
    assert!(
        v.verify(&mint(&new_minter, late), "echo", b"", late)
            .is_ok()
    );
    assert_eq!(
        v.verify(&mint(&f.minter, late), "echo", b"", late),
        Err(TokenError::UnknownKey(1))
    );
}

#[test]
fn parser_refuses_bad_layouts() {
    let f = fixture();
    let good = mint_for(&f, &worker(1), "echo", b"", 1);
    assert_eq!(parse(&[]), Err(TokenError::Malformed("too short")));
    assert_eq!(parse(&good[..40]), Err(TokenError::Malformed("truncated")));
    let mut v2 = good.clone();
    v2[0] = 2;
    assert_eq!(parse(&v2), Err(TokenError::UnsupportedVersion(2)));
    let mut long = good.clone();
    long.insert(FIXED_LEN + 3, b'a');
    assert!(matches!(parse(&long), Err(TokenError::Malformed(_))));
    assert!(parse(&vec![1u8; MAX_TOKEN_LEN + 1]).is_err());
    let parsed = parse(&good).unwrap();
    assert_eq!(parsed.signed.len() + parsed.tag.len(), good.len());
}

#[test]
fn derived_keys_differ_per_worker_and_from_master() {
    let master = SecretKey::from_bytes([5; 32]);
    let a = master.derive_for(&worker(1));
    let b = master.derive_for(&worker(2));
    assert_ne!(a.expose(), b.expose());
    assert_ne!(a.expose(), master.expose());
    assert_eq!(a.expose(), master.derive_for(&worker(1)).expose());
}

#[test]
fn a_minted_token_is_its_claims_encoded_and_signed() {
    let f = fixture();
    let t = mint_for(&f, &worker(2), "sha256", b"payload", 7_000);
    let parsed = parse(&t).unwrap();
    let mut again = Vec::new();
    parsed.claims.encode(&mut again).unwrap();
    assert_eq!(parsed.signed, &again[..]);
    assert_eq!(parsed.claims.op, "sha256");
    assert_eq!(parsed.claims.audience, "spiffe://securesrv/worker/2");
    assert_eq!(parsed.claims.payload_sha256, payload_digest(b"payload"));
    assert_eq!(parsed.claims.issued_at_ms, 7_000);
    let key = f.master.current().key.derive_for(&worker(2)).hmac_key();
    assert!(hmac::verify(&key, parsed.signed, parsed.tag).is_ok());
}

#[test]
fn no_token_for_a_worker_the_minter_does_not_know() {
    let f = fixture();
    let err = f
        .minter
        .mint(
            MintRequest {
                audience: &worker(3),
                client: "spiffe://securesrv/client/default",
                op: "echo",
                payload: b"",
            },
            1_000,
        )
        .unwrap_err();
    assert_eq!(
        err,
        TokenError::NoKeyForAudience("spiffe://securesrv/worker/3".into())
    );
}

/// DESIGN: a random 128-bit request id. The ids were a prefix drawn once per process and a
/// counter, so that one id told the next; now every bit of each looks random, none repeats,
/// and a second minter on the same key (a restarted dispatcher) shares none of them.
#[test]
fn request_ids_are_random_128_bit_values_that_never_repeat() {
    let f = fixture();
    let other = Minter::new(f.master.current(), &[worker(1)], 5_000);
    let id = |m: &Minter| {
        let r = MintRequest {
            audience: &worker(1),
            client: "spiffe://securesrv/client/default",
            op: "echo",
            payload: b"",
        };
        m.mint(r, 1_000).unwrap().1
    };
    let n = 20_000;
    let mut seen = std::collections::HashSet::new();
    // How often each of the 128 bits is set: about half the time for random ids.
    let mut ones = [0u32; 128];
    for _ in 0..n {
        let a = id(&f.minter);
        for (bit, count) in ones.iter_mut().enumerate() {
            *count += u32::from(a[bit / 8] >> (7 - bit % 8) & 1);
        }
        assert!(seen.insert(a), "repeated id");
        assert!(
            seen.insert(id(&other)),
            "an id of the other minter repeated one"
        );
    }
    // 10,000 ± 6 standard deviations (70) for each bit.
    for (bit, count) in ones.iter().enumerate() {
        assert!(
            (9_650..=10_350).contains(count),
            "bit {bit} set {count} times in {n}"
        );
    }
}

#[test]
fn the_previous_key_signs_for_a_worker_that_knows_only_it_until_its_window_ends() {
    // Key 1 rotated to key 2 at t=0 with a window to t=60000; worker 1 still runs on key 1.
    let old = KeyFile::single(1, SecretKey::from_bytes([42; 32]));
    let new = old
        .rotated(SecretKey::from_bytes([7; 32]), 0, 60_000)
        .unwrap();
    let minter =
        Minter::new(new.current(), &[worker(1)], 5_000).with_previous(new.entries().get(1));
    let stale = Verifier::new(
        &worker(1),
        &old.map_keys(|k| k.derive_for(&worker(1))),
        VerifierLimits::default(),
    );
    let req = MintRequest {
        audience: &worker(1),
        client: "spiffe://securesrv/client/default",
        op: "echo",
        payload: b"hi",
    };
    let now = 1_000;
    let (current, _) = minter.mint_with(req, now, false).unwrap();
    assert!(stale.verify(&current, "echo", b"hi", now).is_err());
    assert!(minter.previous_usable(now));
    let (previous, _) = minter.mint_with(req, now, true).unwrap();
    assert_eq!(
        stale.verify(&previous, "echo", b"hi", now).unwrap().key_id,
        1
    );
    // A token that would outlive the window is signed with the current key.
    assert!(!minter.previous_usable(55_001));
    let (late, _) = minter.mint_with(req, 55_001, true).unwrap();
    assert_eq!(parse(&late).unwrap().claims.key_id, 2);
    // Without a previous key, the current one.
    let single =
        Minter::new(old.current(), &[worker(1)], 5_000).with_previous(old.entries().get(1));
    assert!(!single.previous_usable(now));
}
