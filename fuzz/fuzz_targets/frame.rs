//! Fuzzes the frame decoder (`securesrv::frame::decode`) with `Message` bodies.
//!
//! Properties checked on every input, under a small cap (64 KiB) and the default cap (1 MiB):
//! - `decode` never panics, whatever the bytes;
//! - `Incomplete` is only ever said of input that is really too short, and names the right length;
//! - a `Complete` frame used at most the input (`consumed <= data.len()`), decodes the same from
//!   exactly `data[..consumed]`, is `Incomplete` one byte shorter, and its value survives
//!   encode -> decode unchanged (values are compared, not bytes: MessagePack has several encodings
//!   of one value, e.g. a map or str header in 1 to 5 bytes, an integer in 1 to 9 bytes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use securesrv::frame::{self, DEFAULT_MAX_FRAME, Decoded, FrameError, HEADER_LEN};
use securesrv::message::Message;

const SMALL_MAX: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let small = check(data, SMALL_MAX);
    let default = check(data, DEFAULT_MAX_FRAME);
    // A frame within the small cap is also within the default cap, and decodes the same way.
    if let Ok(Decoded::Complete { .. }) = &small {
        assert_eq!(small, default, "a larger cap changed the result");
    }
});

fn check(data: &[u8], max: usize) -> Result<Decoded<Message>, FrameError> {
    let result = frame::decode::<Message>(data, max);
    match &result {
        Ok(Decoded::Incomplete { frame_len: None }) => {
            assert!(
                data.len() < HEADER_LEN,
                "no header claimed on {} bytes",
                data.len()
            );
        }
        Ok(Decoded::Incomplete {
            frame_len: Some(total),
        }) => {
            assert!(data.len() >= HEADER_LEN);
            assert!(
                *total > data.len(),
                "incomplete, but {total} <= {} bytes",
                data.len()
            );
            assert!(
                *total <= max + HEADER_LEN,
                "frame_len {total} beyond the cap {max}"
            );
            assert_eq!(*total, HEADER_LEN + declared(data));
        }
        Ok(Decoded::Complete { value, consumed }) => {
            let consumed = *consumed;
            assert!(
                consumed <= data.len(),
                "consumed {consumed} of {} bytes",
                data.len()
            );
            assert!(consumed > HEADER_LEN && consumed <= max + HEADER_LEN);
            assert_eq!(consumed, HEADER_LEN + declared(data));
            // Bytes after the frame are not looked at.
            let exact = frame::decode::<Message>(&data[..consumed], max);
            assert_eq!(
                exact.as_ref(),
                Ok(&Decoded::Complete {
                    value: value.clone(),
                    consumed
                })
            );
            // One byte short is a valid prefix.
            assert_eq!(
                frame::decode::<Message>(&data[..consumed - 1], max),
                Ok(Decoded::Incomplete {
                    frame_len: Some(consumed)
                })
            );
            round_trip(value);
        }
        Err(FrameError::TooLarge {
            declared: d,
            max: m,
        }) => {
            assert_eq!(*m, max);
            assert!(*d > max as u64);
        }
        Err(FrameError::Empty) => assert_eq!(declared(data), 0),
        Err(FrameError::Malformed(_) | FrameError::TrailingBytes(_)) => {}
        Err(e @ FrameError::Encode(_)) => panic!("decoding reported an encoding error: {e}"),
    }
    result
}

/// The body length the header of `data` declares (`data` holds at least a header).
fn declared(data: &[u8]) -> usize {
    u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize
}

/// encode -> decode gives the same value. The canonical encoding (named fields, smallest
/// integers) is not what the peer sent byte for byte, so the encode uses the ceiling, not the
/// cap the input was decoded under.
fn round_trip(value: &Message) {
    let max = frame::MAX_FRAME_CEILING;
    let bytes = frame::encode_to_vec(value, max).expect("a decoded message must encode");
    match frame::decode::<Message>(&bytes, max) {
        Ok(Decoded::Complete {
            value: again,
            consumed,
        }) => {
            assert_eq!(consumed, bytes.len());
            assert_eq!(&again, value, "value changed across encode -> decode");
        }
        other => panic!("re-encoded frame does not decode: {other:?}"),
    }
}
