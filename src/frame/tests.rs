//! Unit tests for frames: the size cap before allocation, every malformed input refused, the
//! message envelope, round trips (proptest), spliced payloads equal to the plain encoding.

use super::*;
use crate::message::{ErrorCode, ErrorReply, Message, Ping, Reply, Request};
use proptest::prelude::*;

fn request(op: &str, payload: &[u8]) -> Message {
    Message::Request(Request {
        id: 7,
        op: op.to_string(),
        payload: payload.to_vec().into(),
        timeout_ms: Some(1500),
    })
}

#[test]
fn round_trip_request() {
    let msg = request("echo", b"hello");
    let bytes = encode_to_vec(&msg, DEFAULT_MAX_FRAME).unwrap();
    let decoded: Decoded<Message> = decode(&bytes, DEFAULT_MAX_FRAME).unwrap();
    assert_eq!(
        decoded,
        Decoded::Complete {
            value: msg,
            consumed: bytes.len()
        }
    );
}

#[test]
fn shared_decode_slices_the_payload_out_of_the_frame() {
    let msg = request("echo", &[5u8; 4000]);
    let frame = bytes::Bytes::from(encode_to_vec(&msg, DEFAULT_MAX_FRAME).unwrap());
    let Ok(Message::Request(r)) = decode_shared::<Message>(&frame) else {
        panic!("not a request");
    };
    assert_eq!(Message::Request(r.clone()), msg);
    let (start, end) = (
        frame.as_ptr() as usize,
        frame.as_ptr() as usize + frame.len(),
    );
    let p = r.payload.as_ptr() as usize;
    assert!(
        start < p && p + r.payload.len() <= end,
        "payload was copied"
    );
    // The copying decoder gives the same value in memory of its own.
    let Ok(Message::Request(copied)) = decode_body::<Message>(&frame[HEADER_LEN..]) else {
        panic!("not a request");
    };
    assert_eq!(copied, r);
    let q = copied.payload.as_ptr() as usize;
    assert!(q + copied.payload.len() <= start || q >= end);
}

#[test]
fn every_strict_prefix_is_incomplete() {
    let bytes = encode_to_vec(&request("sha256", &[9u8; 300]), DEFAULT_MAX_FRAME).unwrap();
    for cut in 0..bytes.len() {
        match decode::<Message>(&bytes[..cut], DEFAULT_MAX_FRAME) {
            Ok(Decoded::Incomplete { frame_len }) => {
                if cut >= HEADER_LEN {
                    assert_eq!(frame_len, Some(bytes.len()), "cut at {cut}");
                } else {
                    assert_eq!(frame_len, None, "cut at {cut}");
                }
            }
            other => panic!("prefix of {cut} bytes gave {other:?}"),
        }
    }
}

#[test]
fn oversize_length_is_refused_from_the_header_alone() {
    // A declared 4 GiB - 1 body with only the header present: refused at once, without
    // waiting for (or allocating) the body.
    let header = u32::MAX.to_be_bytes();
    assert_eq!(
        decode::<Message>(&header, DEFAULT_MAX_FRAME),
        Err(FrameError::TooLarge {
            declared: u32::MAX as u64,
            max: DEFAULT_MAX_FRAME
        })
    );
    let just_over = ((DEFAULT_MAX_FRAME + 1) as u32).to_be_bytes();
    assert!(matches!(
        check_header(&just_over, DEFAULT_MAX_FRAME),
        Err(FrameError::TooLarge { .. })
    ));
    let at_cap = (DEFAULT_MAX_FRAME as u32).to_be_bytes();
    assert_eq!(
        check_header(&at_cap, DEFAULT_MAX_FRAME),
        Ok(Some(DEFAULT_MAX_FRAME + HEADER_LEN))
    );
}

#[test]
fn sender_refuses_to_build_an_oversize_frame() {
    let mut out = vec![1, 2, 3];
    let err = encode(&request("echo", &[0u8; 2048]), 1024, &mut out).unwrap_err();
    assert!(matches!(err, FrameError::TooLarge { max: 1024, .. }));
    assert_eq!(
        out,
        vec![1, 2, 3],
        "a failed encode leaves the buffer alone"
    );
}

#[test]
fn garbage_is_invalid_not_incomplete() {
    let cases: &[(&str, &[u8])] = &[
        ("empty body", &[0, 0, 0, 0]),
        ("not msgpack", &[0, 0, 0, 3, 0xc1, 0xc1, 0xc1]),
        ("a bare integer", &[0, 0, 0, 1, 0x05]),
        (
            "unknown message kind",
            &[0, 0, 0, 5, 0x81, 0xa3, b'f', b'o', b'o', 0xc0][..],
        ),
        ("truncated map inside a complete frame", &[0, 0, 0, 1, 0x81]),
    ];
    for (name, bytes) in cases {
        match decode::<Message>(bytes, DEFAULT_MAX_FRAME) {
            Err(FrameError::Empty | FrameError::Malformed(_)) => {}
            other => panic!("{name}: expected invalid, got {other:?}"),
        }
    }
}

/// `{"request": {"id": 1, "op": "echo", "payload": b"x"}}` with the kind's key, the fields
/// map's header and the field names as given (docs/PROTOCOL.md §3 allows only str keys and
/// a map of fields).
fn request_body(kind: &[u8], fields: &[u8], id: &[u8], op: &[u8], payload: &[u8]) -> Vec<u8> {
    [
        &[0x81][..],
        kind,
        fields,
        id,
        &[0x01],
        op,
        &[0xa4],
        b"echo",
        payload,
        &[0xc4, 0x01, b'x'],
    ]
    .concat()
}

const KIND: &[u8] = b"\xa7request";
const FIELDS: &[u8] = &[0x83];
const ID: &[u8] = b"\xa2id";
const OP: &[u8] = b"\xa2op";
const PAYLOAD: &[u8] = b"\xa7payload";

#[test]
fn only_the_documented_envelope_decodes() {
    let nonce = [&[0xc4, 16][..], &[7u8; 16]].concat();
    let ping = [&b"\x81\xa4ping\x81\xa5nonce"[..], &nonce].concat();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "the kind as a variant index",
            request_body(&[0x00], FIELDS, ID, OP, PAYLOAD),
        ),
        (
            "the kind as a uint 8 variant index",
            request_body(&[0xcc, 0x00], FIELDS, ID, OP, PAYLOAD),
        ),
        (
            "the kind as bin",
            request_body(b"\xc4\x07request", FIELDS, ID, OP, PAYLOAD),
        ),
        (
            "the fields as an array",
            [
                &[0x81][..],
                KIND,
                &[0x94, 0x01, 0xa4],
                b"echo",
                &[0xc4, 1, b'x', 0xc0],
            ]
            .concat(),
        ),
        (
            "the fields as an array 16",
            [
                &[0x81][..],
                KIND,
                &[0xdc, 0, 3, 0x01, 0xa4],
                b"echo",
                &[0xc4, 1, b'x'],
            ]
            .concat(),
        ),
        (
            "field names as indexes",
            request_body(KIND, FIELDS, &[0x00], &[0x01], &[0x02]),
        ),
        (
            "one field name as an index",
            request_body(KIND, FIELDS, ID, &[0x01], PAYLOAD),
        ),
        (
            "a field name as bin",
            request_body(KIND, FIELDS, b"\xc4\x02id", OP, PAYLOAD),
        ),
        (
            "a field name as nil",
            [&b"\x81\xa4ping\x81\xc0"[..], &nonce].concat(),
        ),
        ("a str key with nil", b"\x81\xa4ping\xc0".to_vec()),
        (
            "a str key with bin",
            [&b"\x81\xa4ping"[..], &nonce].concat(),
        ),
        (
            "two entries",
            [
                &[0x82][..],
                &ping[1..],
                &request_body(KIND, FIELDS, ID, OP, PAYLOAD)[1..],
            ]
            .concat(),
        ),
        ("no entry", vec![0x80]),
        (
            "an array of kind and fields",
            [&[0x92][..], &ping[1..]].concat(),
        ),
        ("a bare str", b"\xa4ping".to_vec()),
    ];
    let mut accepted = Vec::new();
    for (name, body) in &cases {
        // The structure itself is sound: only the shape is wrong.
        assert_eq!(value_len(body), Ok(body.len()), "{name}");
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(body);
        let refused = [
            decode_body::<Message>(body),
            decode::<Message>(&frame, DEFAULT_MAX_FRAME).map(|_| request("", b"")),
            decode_shared::<Message>(&frame.into()),
        ];
        if !refused
            .iter()
            .all(|r| matches!(r, Err(FrameError::Malformed(_))))
        {
            accepted.push((name, refused));
        }
    }
    assert!(accepted.is_empty(), "not refused: {accepted:#?}");
}

#[test]
fn every_kind_and_every_width_of_the_envelope_decodes() {
    let kinds = [
        carrying(0, b"abc".to_vec().into()),
        carrying(1, b"abc".to_vec().into()),
        carrying(2, b"abc".to_vec().into()),
        Message::Error(ErrorReply {
            id: 0,
            code: ErrorCode::BadRequest,
            message: "no".into(),
        }),
        Message::Ping(Ping { nonce: vec![3; 16] }),
        Message::Pong(crate::message::Pong {
            nonce: vec![3; 16],
            in_flight: 2,
            workers_available: Some(1),
        }),
    ];
    for msg in &kinds {
        let frame = bytes::Bytes::from(encode_to_vec(msg, DEFAULT_MAX_FRAME).unwrap());
        assert_eq!(
            decode_body::<Message>(&frame[HEADER_LEN..]).as_ref(),
            Ok(msg)
        );
        assert_eq!(decode_shared::<Message>(&frame).as_ref(), Ok(msg));
    }
    // Maps and strs in their wider formats are the same values (§3: "any format").
    let wide = request_body(
        b"\xd9\x07request",
        &[0xde, 0, 3],
        b"\xda\x00\x02id",
        b"\xdb\x00\x00\x00\x02op",
        PAYLOAD,
    );
    let wide = [&[0xdf, 0, 0, 0, 1][..], &wide[1..]].concat();
    let narrow = request_body(KIND, FIELDS, ID, OP, PAYLOAD);
    assert_eq!(
        decode_body::<Message>(&wide),
        decode_body::<Message>(&narrow)
    );
    assert!(matches!(
        decode_body::<Message>(&narrow),
        Ok(Message::Request(Request { id: 1, .. }))
    ));
}

#[test]
fn trailing_bytes_inside_a_frame_are_refused() {
    let mut bytes = encode_to_vec(&Message::Ping(Ping { nonce: vec![1; 16] }), 1024).unwrap();
    bytes.push(0xc0); // a msgpack nil after the message
    let body_len = (bytes.len() - HEADER_LEN) as u32;
    bytes[..HEADER_LEN].copy_from_slice(&body_len.to_be_bytes());
    assert_eq!(
        decode::<Message>(&bytes, 1024),
        Err(FrameError::TrailingBytes(1))
    );
}

#[test]
fn deep_nesting_is_refused_without_recursing() {
    // 100_000 nested one-element arrays: must fail fast and not overflow the stack, bare
    // (not a message at all) or as the value of a field (refused for its depth).
    let depth = 100_000;
    let mut bare = vec![0x91u8; depth];
    bare.push(0xc0);
    let in_a_field = [&b"\x81\xa7request\x81\xa2id"[..], &bare].concat();
    for (body, why) in [
        (bare, "one entry"),
        (in_a_field, "nested more than 15 levels"),
    ] {
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        for result in [
            decode::<Message>(&frame, DEFAULT_MAX_FRAME).map(|_| ()),
            decode::<serde_json::Value>(&frame, DEFAULT_MAX_FRAME).map(|_| ()),
        ] {
            assert!(
                matches!(&result, Err(FrameError::Malformed(m)) if m.contains(why)),
                "{why}: {result:?}"
            );
        }
    }
}

#[test]
fn value_len_matches_the_encoder() {
    let values = [
        serde_json::json!(null),
        serde_json::json!(-5),
        serde_json::json!(1u64 << 40),
        serde_json::json!(-1i64 << 40),
        serde_json::json!(1.5),
        serde_json::json!("x".repeat(40)),
        serde_json::json!("y".repeat(300)),
        serde_json::json!("z".repeat(70_000)),
        serde_json::json!([1, [2, [3, {"a": [true, false]}]]]),
        serde_json::json!({"k": (0..20).collect::<Vec<_>>()}),
        serde_json::json!((0..70_000).map(|i| i % 7).collect::<Vec<_>>()),
    ];
    for v in values {
        let bytes = rmp_serde::to_vec_named(&v).unwrap();
        assert_eq!(value_len(&bytes), Ok(bytes.len()), "{v}");
        assert!(
            value_len(&bytes[..bytes.len() - 1]).is_err(),
            "truncated {v}"
        );
    }
    let bin = rmp_serde::to_vec(&serde_bytes::Bytes::new(&[1u8; 300])).unwrap();
    assert_eq!(value_len(&bin), Ok(bin.len()));
    // A header declaring 4 billion elements in a short buffer fails fast.
    assert!(value_len(&[0xdd, 0xff, 0xff, 0xff, 0xff, 0x01]).is_err());
    assert!(value_len(&[0xc1]).is_err());
    // Depth: 15 nested arrays pass, 16 do not.
    let mut ok = vec![0x91u8; MAX_DEPTH - 1];
    ok.push(0xc0);
    assert_eq!(value_len(&ok), Ok(ok.len()));
    let mut deep = vec![0x91u8; MAX_DEPTH];
    deep.push(0xc0);
    assert!(value_len(&deep).is_err());
}

#[test]
fn two_frames_back_to_back_decode_one_at_a_time() {
    let a = request("echo", b"a");
    let b = Message::Error(ErrorReply {
        id: 3,
        code: ErrorCode::Denied,
        message: "no".into(),
    });
    let mut buf = Vec::new();
    encode(&a, 1024, &mut buf).unwrap();
    encode(&b, 1024, &mut buf).unwrap();
    let Decoded::Complete { value, consumed } = decode::<Message>(&buf, 1024).unwrap() else {
        panic!("first frame incomplete");
    };
    assert_eq!(value, a);
    let Decoded::Complete {
        value,
        consumed: c2,
    } = decode::<Message>(&buf[consumed..], 1024).unwrap()
    else {
        panic!("second frame incomplete");
    };
    assert_eq!(value, b);
    assert_eq!(consumed + c2, buf.len());
}

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            any::<u64>(),
            "[a-z0-9_]{0,12}",
            proptest::collection::vec(any::<u8>(), 0..512),
            proptest::option::of(any::<u32>())
        )
            .prop_map(|(id, op, payload, timeout_ms)| Message::Request(Request {
                id,
                op,
                payload: payload.into(),
                timeout_ms
            })),
        (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..512)).prop_map(|(id, payload)| {
            Message::Reply(Reply {
                id,
                payload: payload.into(),
            })
        }),
        (any::<u64>(), ".{0,40}").prop_map(|(id, message)| Message::Error(ErrorReply {
            id,
            code: ErrorCode::Timeout,
            message
        })),
        proptest::collection::vec(any::<u8>(), 0..64)
            .prop_map(|nonce| Message::Ping(Ping { nonce })),
    ]
}

/// A message carrying `payload` (kind 0: request, 1: reply, 2: forward).
fn carrying(kind: u8, payload: bytes::Bytes) -> Message {
    match kind % 3 {
        0 => Message::Request(Request {
            id: 1,
            op: "echo".into(),
            payload,
            timeout_ms: Some(9),
        }),
        1 => Message::Reply(Reply { id: 2, payload }),
        _ => Message::Forward(crate::message::Forward {
            id: 3,
            op: "sha256".into(),
            payload,
            token: vec![0xAB; 180],
            timeout_ms: 5000,
        }),
    }
}

#[test]
fn a_large_payload_is_spliced_in_not_copied() {
    let payload = bytes::Bytes::from(vec![0x5A; 3 * SPLICE_FROM]);
    let msg = carrying(2, payload.clone());
    let e = encode_spliced(&msg, &payload, DEFAULT_MAX_FRAME).unwrap();
    let (copied, spliced) = e.pieces();
    assert!(copied.len() < 512, "payload copied: {} bytes", copied.len());
    let s = spliced.expect("spliced");
    assert_eq!(s.payload.as_ptr(), payload.as_ptr(), "the same buffer");
    assert_eq!(e.to_vec(), encode_to_vec(&msg, DEFAULT_MAX_FRAME).unwrap());
    assert_eq!(e.len(), e.to_vec().len());

    // Bytes equal to the payload but in another buffer are encoded, not spliced.
    let twin = bytes::Bytes::from(payload.to_vec());
    let e = encode_spliced(&msg, &twin, DEFAULT_MAX_FRAME).unwrap();
    assert!(e.pieces().1.is_none());
    assert_eq!(e.to_vec(), encode_to_vec(&msg, DEFAULT_MAX_FRAME).unwrap());
}

#[test]
fn the_size_cap_counts_the_spliced_payload() {
    let payload = bytes::Bytes::from(vec![1; 2 * SPLICE_FROM]);
    let msg = carrying(1, payload.clone());
    let body = encode_to_vec(&msg, DEFAULT_MAX_FRAME).unwrap().len() - HEADER_LEN;
    let mut out = b"queued".to_vec();
    let err = encode_splicing(&msg, &payload, body - 1, &mut out).unwrap_err();
    assert!(matches!(err, FrameError::TooLarge { declared, .. } if declared == body as u64));
    assert_eq!(out, b"queued", "left as it was");
    let s = encode_splicing(&msg, &payload, body, &mut out)
        .unwrap()
        .expect("spliced");
    assert!(
        s.at > b"queued".len(),
        "offset counts what was queued before"
    );
}

proptest! {
    #[test]
    fn prop_spliced_frames_are_the_plain_encoding(
        kind in any::<u8>(),
        len in prop_oneof![0usize..SPLICE_FROM, SPLICE_FROM..4 * SPLICE_FROM],
        fill in any::<u8>(),
    ) {
        let payload = bytes::Bytes::from(vec![fill; len]);
        let msg = carrying(kind, payload.clone());
        let e = encode_spliced(&msg, &payload, DEFAULT_MAX_FRAME).unwrap();
        prop_assert_eq!(e.pieces().1.is_some(), len >= SPLICE_FROM);
        prop_assert_eq!(e.to_vec(), encode_to_vec(&msg, DEFAULT_MAX_FRAME).unwrap());
    }

    #[test]
    fn prop_round_trip(msg in arb_message()) {
        let bytes = encode_to_vec(&msg, DEFAULT_MAX_FRAME).unwrap();
        let decoded = decode::<Message>(&bytes, DEFAULT_MAX_FRAME).unwrap();
        prop_assert_eq!(decoded, Decoded::Complete { value: msg, consumed: bytes.len() });
    }

    #[test]
    fn prop_shared_decode_agrees(msg in arb_message()) {
        let bytes = bytes::Bytes::from(encode_to_vec(&msg, DEFAULT_MAX_FRAME).unwrap());
        prop_assert_eq!(decode_shared::<Message>(&bytes).unwrap(), msg);
    }

    #[test]
    fn prop_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode::<Message>(&bytes, 128);
    }

    #[test]
    fn prop_split_anywhere_is_incomplete_then_complete(msg in arb_message(), cut in 0usize..600) {
        let bytes = encode_to_vec(&msg, DEFAULT_MAX_FRAME).unwrap();
        let cut = cut.min(bytes.len() - 1);
        let is_incomplete = matches!(
            decode::<Message>(&bytes[..cut], DEFAULT_MAX_FRAME),
            Ok(Decoded::Incomplete { .. })
        );
        prop_assert!(is_incomplete);
    }
}

#[test]
fn peer_text_in_a_refusal_is_cut_short_and_has_no_control_characters() {
    // An unknown field whose name holds a forged log line, escapes and 100 KiB: serde quotes
    // the name in its message, which is logged and sent back to the peer.
    let name = format!(
        "zz\n2026-11-30T05:40:09Z  INFO securesrv::watchdog: FORGED\x1b[31m\u{202e}{}",
        "A".repeat(100_000)
    );
    let mut body = b"\x81\xa7request\x81".to_vec();
    body.push(0xdb);
    body.extend_from_slice(&(name.len() as u32).to_be_bytes());
    body.extend_from_slice(name.as_bytes());
    body.push(0x01);
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    let Err(FrameError::Malformed(m)) = decode::<Message>(&frame, DEFAULT_MAX_FRAME) else {
        panic!("an unknown field is refused");
    };
    assert!(m.contains("zz"), "{m}");
    assert!(m.chars().count() <= 160, "{} characters", m.chars().count());
    assert!(
        !m.chars().any(|c| c.is_control() || c == '\u{202e}'),
        "{m:?}"
    );
}

#[test]
fn a_reply_of_the_largest_payload_allowed_fits_its_frame() {
    let max = 4096;
    let m = Message::Reply(Reply {
        id: u64::MAX,
        payload: vec![0; max - REPLY_OVERHEAD].into(),
    });
    let f = encode_to_vec(&m, max).expect("fits");
    assert!(f.len() - HEADER_LEN <= max);
}

#[test]
fn reply_body_len_is_the_encoded_length() {
    for id in [
        1,
        127,
        128,
        255,
        256,
        65_535,
        65_536,
        u32::MAX as u64,
        u32::MAX as u64 + 1,
        u64::MAX,
    ] {
        for len in [0, 1, 255, 256, 65_535, 65_536, 100_000] {
            let m = Message::Reply(Reply {
                id,
                payload: vec![0; len].into(),
            });
            let f = encode_to_vec(&m, 1 << 20).unwrap();
            assert_eq!(
                reply_body_len(id, len),
                f.len() - HEADER_LEN,
                "id {id}, {len} B"
            );
        }
    }
}

#[test]
fn request_body_min_len_is_the_encoded_length_of_small_numbers() {
    for op_len in [1, 31, 32, 255, 256, 70_000] {
        for len in [0, 1, 255, 256, 65_535, 65_536, 100_000] {
            let m = Message::Request(Request {
                id: 1,
                op: "o".repeat(op_len),
                payload: vec![0; len].into(),
                timeout_ms: Some(1),
            });
            let f = encode_to_vec(&m, 1 << 20).unwrap();
            assert_eq!(
                request_body_min_len(op_len, len),
                f.len() - HEADER_LEN,
                "op of {op_len} B, {len} B"
            );
        }
    }
}

#[test]
fn a_peers_unknown_field_cannot_pose_as_log_fields() {
    // serde quotes an unknown kind in its message, which is logged: the peer's text once put
    // a whole forged audit record into an INFO line.
    let forged = " securesrv::audit: request client=spiffe://securesrv/client/alice op=cat \
                  outcome=ok reason=\"x\" ";
    let mut body = vec![0x81, 0xd9, forged.len() as u8];
    body.extend_from_slice(forged.as_bytes());
    body.push(0x80);
    let Err(FrameError::Malformed(text)) = decode_body::<Message>(&body) else {
        panic!("accepted");
    };
    assert!(text.contains("securesrv::audit: request client"), "{text}");
    assert!(!text.contains('=') && !text.contains('"'), "{text}");
}
