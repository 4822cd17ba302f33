//! The wire frame: a 4-byte big-endian length, then a MessagePack body of exactly that length.
//!
//! Everything here is pure: bytes in, a value or an error out. No I/O, no TLS, no identities.
//! [`decode`] tells "need more bytes" ([`Decoded::Incomplete`]) apart from "these bytes can never
//! be a frame" ([`FrameError`]), checks the declared length against the cap *before* anything is
//! allocated for the body, refuses trailing bytes inside a frame and any body that is not shaped
//! like a message (docs/PROTOCOL.md §3), and never panics, whatever the input (fuzzed by
//! `fuzz/fuzz_targets/frame.rs`).

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Bytes in the length prefix.
pub const HEADER_LEN: usize = 4;

/// Default cap on a frame body (1 MiB). Configurable with `limits.max_frame_bytes`.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// Hard ceiling for the configurable cap: a length prefix is a `u32`, and 64 MiB is already far
/// beyond what a request-dispatch service should buffer per connection.
pub const MAX_FRAME_CEILING: usize = 64 << 20;

/// Extra room on dispatcher-to-worker links: a forward carries the client's request plus a
/// token, so a request that fits the client-facing cap still fits the link.
pub const LINK_HEADROOM: usize = 4096;
/// Room a reply's envelope takes in a frame besides its payload (33 bytes with the largest
/// id, rounded up): a payload of at most `max_frame - REPLY_OVERHEAD` bytes always fits.
pub const REPLY_OVERHEAD: usize = 64;

/// The exact body length of the frame of a reply to request `id` carrying `payload_len`
/// bytes (`{"reply": {"id": id, "payload": bin}}`), without encoding it.
pub fn reply_body_len(id: u64, payload_len: usize) -> usize {
    let id_len = match id {
        0..=0x7f => 1,
        0x80..=0xff => 2,
        0x100..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    };
    let bin_header = bin_header_len(payload_len);
    // fixmap, "reply", fixmap, "id", id, "payload", bin header, payload
    1 + 6 + 1 + 3 + id_len + 8 + bin_header + payload_len
}

/// The fewest bytes a `request` body of `op` and a payload of `payload_len` bytes can take
/// (its id and `timeout_ms` each in one byte): a request longer than a frame even so is refused
/// before anything is dialled.
pub fn request_body_min_len(op_len: usize, payload_len: usize) -> usize {
    let str_header = match op_len {
        0..=31 => 1,
        32..=0xff => 2,
        0x100..=0xffff => 3,
        _ => 5,
    };
    let bin_header = bin_header_len(payload_len);
    // fixmap, "request", fixmap, "id", id, "op", op, "payload", payload, "timeout_ms", timeout
    1 + 8 + 1 + 3 + 1 + 3 + str_header + op_len + 8 + bin_header + payload_len + 11 + 1
}

/// The length of the MessagePack header of a `bin` of `len` bytes.
fn bin_header_len(len: usize) -> usize {
    match len {
        0..=0xff => 2,
        0x100..=0xffff => 3,
        _ => 5,
    }
}

/// MessagePack nesting bound: at most `MAX_DEPTH - 1` nested maps/arrays. Our messages nest
/// two; anything much deeper is hostile and is refused before the decoder recurses into it.
pub const MAX_DEPTH: usize = 16;

/// Why bytes can never become a frame. Each variant ends the connection that sent them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix declares more than the configured cap.
    #[error("frame of {declared} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// What the peer declared (or what we tried to send).
        declared: u64,
        /// The configured cap.
        max: usize,
    },
    /// A frame must carry a body; an empty one is a protocol violation.
    #[error("empty frame")]
    Empty,
    /// The body is not valid MessagePack of the expected shape.
    #[error("malformed frame body: {0}")]
    Malformed(String),
    /// The body holds a complete value followed by extra bytes.
    #[error("{0} unexpected bytes after the message inside the frame")]
    TrailingBytes(usize),
    /// A value could not be serialized (only on the sending side).
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// The result of a successful call to [`decode`].
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded<T> {
    /// A whole frame was present: the value and how many bytes of the input it used.
    Complete {
        /// The decoded message.
        value: T,
        /// Header plus body length; the caller advances its buffer by this much.
        consumed: usize,
    },
    /// The input is a valid prefix of a frame; read more bytes and call again.
    Incomplete {
        /// The total number of bytes the frame needs, once the header is known.
        frame_len: Option<usize>,
    },
}

/// Checks the header at the start of `buf` against `max`.
///
/// Returns `Ok(Some(total))` when the header is present (total = header + body length, which is
/// within the cap), `Ok(None)` when fewer than [`HEADER_LEN`] bytes are there.
pub fn check_header(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let mut len_bytes = [0u8; HEADER_LEN];
    len_bytes.copy_from_slice(header);
    let declared = u32::from_be_bytes(len_bytes);
    if declared as u64 > max as u64 {
        return Err(FrameError::TooLarge {
            declared: declared.into(),
            max,
        });
    }
    if declared == 0 {
        return Err(FrameError::Empty);
    }
    Ok(Some(HEADER_LEN + declared as usize))
}

/// Decodes one frame from the start of `buf`.
///
/// Never allocates for a body before its declared length has passed the cap, never panics.
pub fn decode<T: DeserializeOwned>(buf: &[u8], max: usize) -> Result<Decoded<T>, FrameError> {
    let Some(total) = check_header(buf, max)? else {
        return Ok(Decoded::Incomplete { frame_len: None });
    };
    let Some(body) = buf.get(HEADER_LEN..total) else {
        return Ok(Decoded::Incomplete {
            frame_len: Some(total),
        });
    };
    let value = decode_body(body)?;
    Ok(Decoded::Complete {
        value,
        consumed: total,
    })
}

/// Decodes one complete frame (header included) held in a shared buffer: the payloads of the
/// message are slices of `frame` rather than copies. The header must already have been checked
/// ([`check_header`]) and `frame` must be exactly that long.
pub fn decode_shared<T: DeserializeOwned>(frame: &bytes::Bytes) -> Result<T, FrameError> {
    let body = frame.get(HEADER_LEN..).unwrap_or_default();
    crate::message::strict::shared_bin::decode_sharing(frame, || decode_body(body))
}

/// Decodes a frame body (no header) that must hold exactly one message, in the one shape
/// docs/PROTOCOL.md §3 allows (see `Shape::Message` in this module).
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    // A structural pass first: the exact extent of the value (so trailing bytes are caught),
    // its depth and its envelope, without allocating. Then serde decodes from the borrowed
    // slice.
    let len = scan(body, Shape::Message)?;
    if len != body.len() {
        return Err(FrameError::TrailingBytes(body.len() - len));
    }
    let mut de = rmp_serde::Deserializer::from_read_ref(body);
    de.set_max_depth(MAX_DEPTH);
    T::deserialize(&mut de).map_err(|e| FrameError::Malformed(without_fields(&e.to_string())))
}

/// serde's message quotes the peer's bytes (an unknown field or kind), and it is logged and
/// sent back: cut short, stripped of control characters, and with no `=` or `"` left, so that
/// the peer's text cannot pose as fields of the log line (`key=value`, a quoted value).
fn without_fields(text: &str) -> String {
    crate::identity::printable_within(text, 160)
        .chars()
        .map(|c| match c {
            '=' => '?',
            '"' => '\'',
            c => c,
        })
        .collect()
}

/// The length in bytes of the one MessagePack value at the start of `buf`, refusing nesting
/// deeper than [`MAX_DEPTH`], the reserved marker 0xc1 and truncated values. Every step
/// consumes at least one byte, so the work is bounded by `buf.len()` whatever the headers
/// declare.
pub fn value_len(buf: &[u8]) -> Result<usize, FrameError> {
    scan(buf, Shape::Any)
}

/// What [`scan`] checks besides the extent and depth of a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Any MessagePack value.
    Any,
    /// A message (docs/PROTOCOL.md §3): a map of exactly one entry whose key, the kind, is a
    /// str and whose value is a map of fields whose keys are all str. serde's derived decoding
    /// alone would also take the kind as a variant index, the fields as an array and field
    /// names as indexes or bin; the protocol allows none of these, so they are refused here,
    /// before serde runs. Field values are left to the message types.
    Message,
}

/// [`value_len`], also checking `shape` on the way.
fn scan(buf: &[u8], shape: Shape) -> Result<usize, FrameError> {
    let truncated = || FrameError::Malformed("truncated MessagePack value".into());
    // Items still expected at each open container level.
    let mut pending: [u64; MAX_DEPTH + 1] = [0; MAX_DEPTH + 1];
    let mut depth = 0usize;
    pending[0] = 1;
    let mut pos = 0usize;
    loop {
        while pending[depth] == 0 {
            if depth == 0 {
                return Ok(pos);
            }
            depth -= 1;
        }
        pending[depth] -= 1;
        let marker = *buf.get(pos).ok_or_else(truncated)?;
        pos += 1;
        let be = |n: usize, at: usize| -> Result<u64, FrameError> {
            let bytes = buf.get(at..at + n).ok_or_else(truncated)?;
            Ok(bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
        };
        let (skip, children): (u64, u64) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * u64::from(marker & 0x0f)),
            0x90..=0x9f => (0, u64::from(marker & 0x0f)),
            0xa0..=0xbf => (u64::from(marker & 0x1f), 0),
            0xc1 => {
                return Err(FrameError::Malformed(
                    "reserved MessagePack marker 0xc1".into(),
                ));
            }
            0xc4 | 0xd9 => (1 + be(1, pos)?, 0),
            0xc5 | 0xda => (2 + be(2, pos)?, 0),
            0xc6 | 0xdb => (4 + be(4, pos)?, 0),
            0xc7 => (1 + 1 + be(1, pos)?, 0),
            0xc8 => (2 + 1 + be(2, pos)?, 0),
            0xc9 => (4 + 1 + be(4, pos)?, 0),
            0xca => (4, 0),
            0xcb => (8, 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xce | 0xd2 => (4, 0),
            0xcf | 0xd3 => (8, 0),
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xdc => (2, be(2, pos)?),
            0xdd => (4, be(4, pos)?),
            0xde => (2, 2 * be(2, pos)?),
            0xdf => (4, 2 * be(4, pos)?),
        };
        // Levels 0 to 2 are the envelope: the message, its kind and fields, the field names
        // and values. In a map, the items still pending after a key are odd in number.
        if shape == Shape::Message && depth <= 2 {
            envelope_item(depth, pending[depth] % 2 == 1, marker, children)?;
        }
        let skip = usize::try_from(skip).map_err(|_| truncated())?;
        pos = pos
            .checked_add(skip)
            .filter(|p| *p <= buf.len())
            .ok_or_else(truncated)?;
        if matches!(marker, 0x80..=0x9f | 0xdc..=0xdf) {
            if depth + 1 >= MAX_DEPTH {
                return Err(FrameError::Malformed(format!(
                    "MessagePack nested more than {} levels deep",
                    MAX_DEPTH - 1
                )));
            }
            depth += 1;
            pending[depth] = children;
        }
    }
}

/// Checks one item of a message's envelope ([`Shape::Message`]): `level` 0 is the message,
/// 1 its kind and fields, 2 the field names and values; `key` says whether the item is a map
/// key; `children` is the number of items a map or array header declares.
fn envelope_item(level: usize, key: bool, marker: u8, children: u64) -> Result<(), FrameError> {
    let is_map = matches!(marker, 0x80..=0x8f | 0xde | 0xdf);
    let is_str = matches!(marker, 0xa0..=0xbf | 0xd9..=0xdb);
    let refusal = match level {
        0 if !(is_map && children == 2) => "a message must be a map of exactly one entry",
        1 if key && !is_str => "the message kind must be a MessagePack str",
        1 if !key && !is_map => "the message fields must be a map",
        2 if key && !is_str => "field names must be MessagePack str",
        _ => return Ok(()),
    };
    Err(FrameError::Malformed(refusal.into()))
}

/// Appends one frame holding `value` to `out`. Structs are encoded as maps with field names, so
/// that a peer written from docs/PROTOCOL.md can read them without knowing field order.
///
/// On error `out` is left as it was.
pub fn encode<T: Serialize>(value: &T, max: usize, out: &mut Vec<u8>) -> Result<(), FrameError> {
    encode_leaving_out(value, None, max, out).map(|_| ())
}

/// [`encode`], leaving out of `out` the one write of exactly `payload`, if any; returns where
/// it belongs. The length header counts it either way.
fn encode_leaving_out<T: Serialize>(
    value: &T,
    payload: Option<&bytes::Bytes>,
    max: usize,
    out: &mut Vec<u8>,
) -> Result<Option<usize>, FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    let written = match payload {
        // Straight into the vector: the encoder's many small writes stay cheap.
        None => rmp_serde::encode::write_named(out, value).map(|()| None),
        Some(payload) => {
            let mut w = Splicer {
                out,
                payload,
                at: None,
            };
            rmp_serde::encode::write_named(&mut w, value).map(|()| w.at)
        }
    };
    let at = match written {
        Ok(at) => at,
        Err(e) => {
            out.truncate(start);
            return Err(FrameError::Encode(e.to_string()));
        }
    };
    let left_out = match (at, payload) {
        (Some(_), Some(p)) => p.len(),
        _ => 0,
    };
    let body_len = out.len() - start - HEADER_LEN + left_out;
    if body_len > max || body_len > u32::MAX as usize {
        out.truncate(start);
        return Err(FrameError::TooLarge {
            declared: body_len as u64,
            max,
        });
    }
    let len = (body_len as u32).to_be_bytes();
    out[start..start + HEADER_LEN].copy_from_slice(&len);
    Ok(at)
}

/// Payloads from this size on are not copied into an encoded frame: they are written to the
/// connection from the buffer they already live in (see [`encode_spliced`]). Below it, one
/// copy is cheaper than the extra pieces of a vectored write.
pub const SPLICE_FROM: usize = 4096;

/// A frame whose body is `bytes[..at]`, then a payload not copied, then `bytes[at..]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spliced {
    /// Offset in the encoded bytes where the payload belongs.
    pub at: usize,
    /// The payload itself.
    pub payload: bytes::Bytes,
}

/// One encoded frame, header included, possibly with its payload [`Spliced`] in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    bytes: Vec<u8>,
    spliced: Option<Spliced>,
}

impl Encoded {
    /// The frame as the three pieces to write in order (the middle one empty when nothing is
    /// spliced).
    pub fn parts(&self) -> [&[u8]; 3] {
        match &self.spliced {
            Some(s) => {
                let (before, after) = self.bytes.split_at(s.at.min(self.bytes.len()));
                [before, &s.payload[..], after]
            }
            None => [&self.bytes[..], &[], &[]],
        }
    }

    /// The encoded bytes other than a spliced payload, and the splice.
    pub fn pieces(&self) -> (&[u8], Option<&Spliced>) {
        (&self.bytes, self.spliced.as_ref())
    }

    /// Bytes on the wire.
    pub fn len(&self) -> usize {
        self.bytes.len() + self.spliced.as_ref().map_or(0, |s| s.payload.len())
    }

    /// Whether the frame is empty (never, for a frame made here).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole frame in one buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        self.parts().concat()
    }
}

/// Collects what the MessagePack encoder writes, except the one write that is exactly
/// `payload` (same memory, same length): that place is remembered instead.
struct Splicer<'a> {
    out: &'a mut Vec<u8>,
    payload: &'a bytes::Bytes,
    at: Option<usize>,
}

impl std::io::Write for Splicer<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.at.is_none()
            && buf.len() == self.payload.len()
            && std::ptr::eq(buf.as_ptr(), self.payload.as_ptr())
        {
            self.at = Some(self.out.len());
        } else {
            self.out.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Appends one frame holding `value` to `out`, like [`encode`], except that `payload` — the
/// bytes `value` serializes as a `bin` field, borrowed from this very buffer — is left out of
/// `out` when it is at least [`SPLICE_FROM`] long. Returns where it belongs, if so.
///
/// On error `out` is left as it was.
pub fn encode_splicing<T: Serialize>(
    value: &T,
    payload: &bytes::Bytes,
    max: usize,
    out: &mut Vec<u8>,
) -> Result<Option<Spliced>, FrameError> {
    let spliceable = (payload.len() >= SPLICE_FROM).then_some(payload);
    let at = encode_leaving_out(value, spliceable, max, out)?;
    Ok(at.map(|at| Spliced {
        at,
        payload: payload.clone(),
    }))
}

/// One frame holding `value`, with `payload` spliced in rather than copied (see
/// [`encode_splicing`]).
pub fn encode_spliced<T: Serialize>(
    value: &T,
    payload: &bytes::Bytes,
    max: usize,
) -> Result<Encoded, FrameError> {
    // Room for the header, the other fields and a token (~200 bytes); the payload too if it is
    // copied.
    let copied = if payload.len() < SPLICE_FROM {
        payload.len()
    } else {
        0
    };
    let mut bytes = Vec::with_capacity(copied + 1024);
    let spliced = encode_splicing(value, payload, max, &mut bytes)?;
    Ok(Encoded { bytes, spliced })
}

/// Encodes `value` into a fresh buffer holding one frame.
pub fn encode_to_vec<T: Serialize>(value: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    encode_with_capacity(value, max, 0)
}

/// Like [`encode_to_vec`], with room for `size_hint` bytes reserved up front, so that a large
/// payload is copied once instead of through a chain of reallocations.
pub fn encode_with_capacity<T: Serialize>(
    value: &T,
    max: usize,
    size_hint: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::with_capacity(size_hint.min(max + HEADER_LEN));
    encode(value, max, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests;
