//! Fuzzes body decoding without the length header (`securesrv::frame::decode_body::<Message>`).
//!
//! Properties: never panics; a decoded message encodes, the encoding decodes to an equal value,
//! and the canonical encoding is a fixed point (encoding the decoded copy gives the same bytes);
//! a `forward` encodes byte for byte like its borrowed twin `ForwardRef::Forward`; decoding the
//! same bytes as a shared frame (payloads sliced, not copied) gives an equal value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use securesrv::frame::{self, FrameError};
use securesrv::message::{ForwardRef, Message};

fuzz_target!(|data: &[u8]| {
    let value = match frame::decode_body::<Message>(data) {
        Ok(value) => value,
        Err(FrameError::Malformed(_) | FrameError::TrailingBytes(_)) => return,
        Err(e) => panic!("unexpected error from decode_body: {e:?}"),
    };
    // The zero-copy path (big frames on a connection) agrees with the copying one.
    let mut whole = (data.len() as u32).to_be_bytes().to_vec();
    whole.extend_from_slice(data);
    let shared: Message = frame::decode_shared(&whole.into()).expect("decode_shared must agree");
    assert_eq!(shared, value, "decode_shared differs from decode_body");
    // The body as `frame::encode` writes it (named fields).
    let body = rmp_serde::to_vec_named(&value).expect("a decoded message must encode");
    let framed = frame::encode_to_vec(&value, frame::MAX_FRAME_CEILING).expect("encode");
    assert_eq!(
        &framed[frame::HEADER_LEN..],
        &body[..],
        "frame body differs from to_vec_named"
    );

    let again: Message = frame::decode_body(&body).expect("canonical encoding must decode");
    assert_eq!(again, value, "value changed across encode -> decode");
    let body2 = rmp_serde::to_vec_named(&again).expect("encode");
    assert_eq!(body2, body, "canonical encoding is not stable");

    if let Message::Forward(f) = &value {
        let borrowed = ForwardRef::Forward {
            id: f.id,
            op: &f.op,
            payload: &f.payload,
            token: &f.token,
            timeout_ms: f.timeout_ms,
        };
        let b = rmp_serde::to_vec_named(&borrowed).expect("encode ForwardRef");
        assert_eq!(b, body, "ForwardRef encodes differently from Forward");
    }
    // Every kind name is one of the documented six.
    assert!(["request", "forward", "reply", "error", "ping", "pong"].contains(&value.kind()));
});
