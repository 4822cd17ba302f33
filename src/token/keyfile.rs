//! The token key file format, shared by `token.key` (the dispatcher's master keys) and
//! `worker-N.token` (one worker's derived keys).
//!
//! ```text
//! # securesrv token keys: keep secret (mode 0600)
//! key 2 <64 hex digits>
//! key 1 <64 hex digits> retire-after 1795000000000
//! ```
//!
//! The first `key` line is the current key: the dispatcher signs with it. Later lines are
//! previous keys, still accepted by workers until `retire-after` (Unix milliseconds), so that a
//! rotation never refuses a token minted a moment before it. The text is held in zeroizing
//! buffers while it is parsed or written.

use super::{KEY_LEN, SecretKey};
use std::fmt::Write as _;
use zeroize::Zeroizing;

/// One key of a key file.
#[derive(Debug, Clone)]
pub struct KeyEntry {
    /// Key generation; stamped into tokens so the worker picks the right key.
    pub id: u32,
    /// The secret.
    pub key: SecretKey,
    /// After this instant (Unix ms) the key is no longer accepted; `None` for the current key.
    pub not_after_ms: Option<u64>,
}

/// A parsed key file: the current key first, then previous keys.
#[derive(Debug, Clone)]
pub struct KeyFile {
    entries: Vec<KeyEntry>,
}

/// Why a key file was refused. Never contains key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    /// No `key` line at all.
    #[error("no key in token key file")]
    Empty,
    /// A line that is not a well-formed `key` line.
    #[error("line {0}: expected `key <id> <64 hex digits> [retire-after <unix-ms>]`")]
    BadLine(usize),
    /// Two keys with the same id.
    #[error("key id {0} appears twice")]
    DuplicateId(u32),
    /// The file is not text.
    #[error("not a text file (not UTF-8); expected `key <id> <64 hex digits>` lines")]
    NotText,
    /// The current key (the first line) has a `retire-after` time that has passed: every
    /// token signed or checked with it would be refused.
    #[error(
        "its current key (id {id}, the first `key` line) retired at {retired_at_ms} (Unix ms) and \
         every token would be refused: run `securesrv certs rotate-token-key` and restart every \
         component (docs/OPERATIONS.md, \"Token key rotation\")"
    )]
    CurrentRetired {
        /// The current key's id.
        id: u32,
        /// Its `retire-after`.
        retired_at_ms: u64,
    },
    /// The highest key id is already `u32::MAX`: there is no next id to rotate to.
    #[error("key id {0} is the last possible id; renumber the keys before rotating")]
    IdsExhausted(u32),
}

impl KeyFile {
    /// A key file with one current key.
    pub fn single(id: u32, key: SecretKey) -> Self {
        KeyFile {
            entries: vec![KeyEntry {
                id,
                key,
                not_after_ms: None,
            }],
        }
    }

    /// Builds a key file from entries, current first.
    pub fn from_entries(entries: Vec<KeyEntry>) -> Result<Self, KeyFileError> {
        if entries.is_empty() {
            return Err(KeyFileError::Empty);
        }
        for (i, e) in entries.iter().enumerate() {
            if entries[..i].iter().any(|o| o.id == e.id) {
                return Err(KeyFileError::DuplicateId(e.id));
            }
        }
        Ok(KeyFile { entries })
    }

    /// All keys, current first.
    pub fn entries(&self) -> &[KeyEntry] {
        &self.entries
    }

    /// The key the dispatcher signs with.
    pub fn current(&self) -> &KeyEntry {
        // from_entries and parse guarantee at least one entry.
        &self.entries[0]
    }

    /// Refuses a file whose current key has retired by `now_ms`: a component loading it
    /// would start and then refuse, or sign unacceptable, tokens.
    pub fn check_current_live(&self, now_ms: u64) -> Result<(), KeyFileError> {
        match self.current().not_after_ms {
            Some(t) if t < now_ms => Err(KeyFileError::CurrentRetired {
                id: self.current().id,
                retired_at_ms: t,
            }),
            _ => Ok(()),
        }
    }

    /// Parses the text of a key file.
    pub fn parse(text: &str) -> Result<Self, KeyFileError> {
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            entries.push(parse_line(line).ok_or(KeyFileError::BadLine(n + 1))?);
        }
        Self::from_entries(entries)
    }

    /// The text of the file, in a zeroizing buffer.
    pub fn render(&self) -> Zeroizing<String> {
        const HEADER: &str =
            "# securesrv token keys: keep secret (mode 0600). First line = current key.\n";
        // Sized once: a string that grows frees its old buffer, key text and all, without
        // zeroing it. A line is `key <u32> <64 hex> retire-after <u64>\n`: under 128 bytes.
        let mut out = Zeroizing::new(String::with_capacity(
            HEADER.len() + 128 * self.entries.len(),
        ));
        out.push_str(HEADER);
        for e in &self.entries {
            let hex = Zeroizing::new(hex::encode(e.key.expose()));
            let _ = write!(out, "key {} {}", e.id, hex.as_str());
            if let Some(t) = e.not_after_ms {
                let _ = write!(out, " retire-after {t}");
            }
            out.push('\n');
        }
        out
    }

    /// Rotation: a fresh current key with the next id; the old current key (and any previous
    /// key still in its window) stays accepted until `retire_after_ms`; expired ones are dropped.
    pub fn rotated(
        &self,
        new_key: SecretKey,
        now_ms: u64,
        retire_after_ms: u64,
    ) -> Result<Self, KeyFileError> {
        let highest = self.entries.iter().map(|e| e.id).max().unwrap_or(0);
        let next_id = highest
            .checked_add(1)
            .ok_or(KeyFileError::IdsExhausted(highest))?;
        let mut entries = vec![KeyEntry {
            id: next_id,
            key: new_key,
            not_after_ms: None,
        }];
        for e in &self.entries {
            let until = e.not_after_ms.unwrap_or(retire_after_ms);
            if until >= now_ms {
                entries.push(KeyEntry {
                    id: e.id,
                    key: e.key.clone(),
                    not_after_ms: Some(until.min(retire_after_ms)),
                });
            }
        }
        Self::from_entries(entries)
    }

    /// The same ids and windows, each key replaced by `f(key)` (used to derive worker files).
    pub fn map_keys(&self, f: impl Fn(&SecretKey) -> SecretKey) -> Self {
        KeyFile {
            entries: self
                .entries
                .iter()
                .map(|e| KeyEntry {
                    id: e.id,
                    key: f(&e.key),
                    not_after_ms: e.not_after_ms,
                })
                .collect(),
        }
    }
}

fn parse_line(line: &str) -> Option<KeyEntry> {
    let mut words = line.split_ascii_whitespace();
    if words.next()? != "key" {
        return None;
    }
    let id: u32 = words.next()?.parse().ok()?;
    let hex_key = words.next()?;
    if hex_key.len() != KEY_LEN * 2 {
        return None;
    }
    let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
    hex::decode_to_slice(hex_key, &mut bytes[..]).ok()?;
    let not_after_ms = match words.next() {
        None => None,
        Some("retire-after") => Some(words.next()?.parse().ok()?),
        Some(_) => return None,
    };
    if words.next().is_some() {
        return None;
    }
    Some(KeyEntry {
        id,
        key: SecretKey::from_bytes(*bytes),
        not_after_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_parse_round_trip() {
        let f = KeyFile::single(1, SecretKey::from_bytes([7; 32]));
        let rotated = f
            .rotated(SecretKey::from_bytes([9; 32]), 1_000, 5_000)
            .unwrap();
        let text = rotated.render();
        // Never grown (a grown buffer is freed unzeroed): the capacity it was given at first.
        let header = text.find('\n').unwrap() + 1;
        assert!(text.capacity() <= header + 128 * 2, "{}", text.capacity());
        let back = KeyFile::parse(&text).unwrap();
        assert_eq!(back.current().id, 2);
        assert_eq!(back.current().key.expose(), &[9; 32]);
        assert_eq!(back.entries()[1].id, 1);
        assert_eq!(back.entries()[1].not_after_ms, Some(5_000));
        // A second rotation after the first window ended drops key 1.
        let again = back
            .rotated(SecretKey::from_bytes([3; 32]), 6_000, 9_000)
            .unwrap();
        let ids: Vec<u32> = again.entries().iter().map(|e| e.id).collect();
        assert_eq!(ids, vec![3, 2]);
    }

    /// Found by the `keyfile` fuzz target: rotating past the last id overflowed.
    #[test]
    fn rotation_past_the_last_id_is_an_error_not_an_overflow() {
        let f = KeyFile::single(u32::MAX, SecretKey::from_bytes([1; 32]));
        assert_eq!(
            f.rotated(SecretKey::from_bytes([2; 32]), 0, 10).err(),
            Some(KeyFileError::IdsExhausted(u32::MAX))
        );
    }

    #[test]
    fn bad_files_are_refused_without_echoing_secrets() {
        let secret = "ab".repeat(32);
        let cases = [
            String::new(),
            "# only a comment\n".to_string(),
            format!("key x {secret}"),
            format!("key 1 {}", &secret[..62]),
            format!("key 1 {secret} retire-after"),
            format!("key 1 {secret} extra"),
            format!("key 1 {secret}\nkey 1 {secret}"),
            format!("key 1 {}zz", &secret[..62]),
        ];
        for text in cases {
            let err = KeyFile::parse(&text).unwrap_err().to_string();
            assert!(!err.contains("abab"), "{err}");
        }
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let f = KeyFile::single(1, SecretKey::from_bytes([0xab; 32]));
        let dbg = format!("{f:?}");
        assert!(
            !dbg.contains("171") && !dbg.to_lowercase().contains("abab"),
            "{dbg}"
        );
        assert!(dbg.contains("redacted"));
    }
}
