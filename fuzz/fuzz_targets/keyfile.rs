//! Fuzzes the token key file parser (`securesrv::token::KeyFile::parse`) and what is done with
//! a parsed file: render, re-parse, rotate (as `securesrv certs` does for the master key file)
//! and derive a worker's file.
//!
//! Properties: never panics; render -> parse gives the same ids, keys and windows, and rendering
//! that again gives the same text; a rotation keeps the file valid and puts a new id first, or
//! refuses with `IdsExhausted` when the highest id is `u32::MAX`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use securesrv::identity::{DEFAULT_TRUST_DOMAIN, SpiffeId};
use securesrv::token::{KeyFile, KeyFileError, SecretKey};

fn same(a: &KeyFile, b: &KeyFile) -> bool {
    a.entries().len() == b.entries().len()
        && a.entries().iter().zip(b.entries()).all(|(x, y)| {
            x.id == y.id && x.key.expose() == y.key.expose() && x.not_after_ms == y.not_after_ms
        })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(file) = KeyFile::parse(&text) else {
        return;
    };
    assert!(!file.entries().is_empty());

    let rendered = file.render();
    let back = KeyFile::parse(&rendered).expect("a rendered key file must parse");
    assert!(same(&file, &back), "render -> parse changed the key file");
    assert_eq!(*back.render(), *rendered, "rendering is not stable");

    // Rotation at a time and window taken from the file itself, so both branches are reached.
    let now = file
        .entries()
        .iter()
        .filter_map(|e| e.not_after_ms)
        .min()
        .unwrap_or(1_000);
    let rotated = match file.rotated(
        SecretKey::from_bytes([9; 32]),
        now,
        now.saturating_add(60_000),
    ) {
        Ok(r) => r,
        // The one refusal allowed: no id is left after the highest one (regression seed
        // corpus/keyfile/rotate-id-max.txt: this overflowed before it was a typed error).
        Err(KeyFileError::IdsExhausted(id)) => {
            assert!(file.entries().iter().any(|e| e.id == u32::MAX) && id == u32::MAX);
            return;
        }
        Err(e) => panic!("rotation of a valid key file must give a valid key file: {e}"),
    };
    let new_id = rotated.current().id;
    assert!(
        file.entries().iter().all(|e| e.id != new_id),
        "rotation reused key id {new_id}"
    );
    assert_eq!(rotated.current().not_after_ms, None);
    assert!(
        rotated.entries()[1..]
            .iter()
            .all(|e| e.not_after_ms.is_some())
    );

    let w1 = SpiffeId::worker(DEFAULT_TRUST_DOMAIN, 1).expect("worker id");
    let derived = rotated.map_keys(|k| k.derive_for(&w1));
    let again = KeyFile::parse(&derived.render()).expect("a derived key file must parse");
    assert!(same(&derived, &again));
});
