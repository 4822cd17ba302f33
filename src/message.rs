//! The messages that travel inside frames, and the error codes a peer may receive.
//!
//! A message is a MessagePack map with exactly one key, the message kind in snake_case
//! (`request`, `forward`, `reply`, `error`, `ping`, `pong`), whose value is a map of named
//! fields. Unknown fields and unknown kinds are refused: docs/PROTOCOL.md is the contract.
//! No I/O and no cryptography happen here.

pub use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Every message of the protocol, on every link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Message {
    /// client -> dispatcher: run `op` on some worker.
    Request(Request),
    /// dispatcher -> worker: a client's request with the dispatcher's signed token.
    Forward(Forward),
    /// answer to a `request` or `forward` with the same id.
    Reply(Reply),
    /// refusal or failure of the request with this id (id 0: the connection itself).
    Error(ErrorReply),
    /// liveness probe (watchdog -> any component, dispatcher -> worker).
    Ping(Ping),
    /// answer to a `ping`, echoing its nonce.
    Pong(Pong),
}

/// A client's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Chosen by the client, unique among its requests in flight on this connection; the
    /// answer carries the same id.
    pub id: u64,
    /// The operation, e.g. `echo`, `sha256`, `sleep` or a configured job.
    #[serde(with = "strict::str")]
    pub op: String,
    /// Opaque input for the operation (MessagePack `bin`).
    #[serde(with = "strict::shared_bin")]
    pub payload: Bytes,
    /// Deadline the client wants, in milliseconds; the dispatcher caps it at its own maximum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u32>,
}

/// A request forwarded by the dispatcher to a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forward {
    /// Dispatcher-chosen id, unique on this dispatcher-to-worker connection.
    pub id: u64,
    /// The operation; must equal the op inside the token.
    #[serde(with = "strict::str")]
    pub op: String,
    /// The client's payload; its SHA-256 must equal the digest inside the token.
    #[serde(with = "strict::shared_bin")]
    pub payload: Bytes,
    /// The request token (layout in docs/PROTOCOL.md and `token.rs`).
    #[serde(with = "strict::bin")]
    pub token: Vec<u8>,
    /// Time left before the dispatcher gives up on this request, in milliseconds.
    pub timeout_ms: u32,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reply {
    /// The id of the request or forward this answers.
    pub id: u64,
    /// The operation's output (MessagePack `bin`).
    #[serde(with = "strict::shared_bin")]
    pub payload: Bytes,
}

/// A failed or refused request, or (id 0) a reason the connection is being closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorReply {
    /// The id of the request this answers; 0 for a connection-level error.
    pub id: u64,
    /// Machine-readable cause.
    pub code: ErrorCode,
    /// Human-readable detail, safe to show to the peer (never internal state or secrets).
    #[serde(with = "strict::str")]
    pub message: String,
}

/// A liveness probe carrying a fresh random nonce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ping {
    /// 16 to 64 random bytes; the pong must echo them.
    #[serde(with = "strict::bin")]
    pub nonce: Vec<u8>,
}

/// The answer to a ping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pong {
    /// The ping's nonce, unchanged.
    #[serde(with = "strict::bin")]
    pub nonce: Vec<u8>,
    /// Requests in progress in the answering component.
    pub in_flight: u32,
    /// For a dispatcher: how many workers are available right now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers_available: Option<u32>,
}

/// A borrowed `forward` message: encodes exactly like [`Message::Forward`] without copying the
/// payload, so the dispatcher can keep the payload for a retry.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ForwardRef<'a> {
    /// See [`Forward`].
    Forward {
        /// See [`Forward::id`].
        id: u64,
        /// See [`Forward::op`].
        op: &'a str,
        /// See [`Forward::payload`].
        #[serde(with = "serde_bytes")]
        payload: &'a [u8],
        /// See [`Forward::token`].
        #[serde(with = "serde_bytes")]
        token: &'a [u8],
        /// See [`Forward::timeout_ms`].
        timeout_ms: u32,
    },
}

/// Field codecs that accept exactly the MessagePack type the protocol names: `bin` fields refuse
/// `str` and arrays of integers, `str` fields refuse `bin` (serde's defaults accept either).
pub(crate) mod strict {
    /// MessagePack `bin` only.
    pub mod bin {
        use serde::{Deserializer, Serializer, de};
        use std::fmt;

        pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(v)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
            struct V;
            impl<'de> de::Visitor<'de> for V {
                type Value = Vec<u8>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("MessagePack bin")
                }
                fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                    Ok(v.to_vec())
                }
                fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                    Ok(v)
                }
            }
            d.deserialize_byte_buf(V)
        }
    }

    /// MessagePack `str` only.
    /// A payload: MessagePack bin, decoded as a slice of the frame it arrived in when that
    /// frame is shared (see [`decode_sharing`]), otherwise copied.
    pub mod shared_bin {
        use bytes::Bytes;
        use serde::{Deserializer, Serializer, de};
        use std::cell::RefCell;
        use std::fmt;

        thread_local! {
            static SOURCE: RefCell<Option<Bytes>> = const { RefCell::new(None) };
        }

        /// Runs `decode` with `source` as the buffer that borrowed payloads may be sliced from.
        pub fn decode_sharing<R>(source: &Bytes, decode: impl FnOnce() -> R) -> R {
            struct Reset(Option<Bytes>);
            impl Drop for Reset {
                fn drop(&mut self) {
                    let previous = self.0.take();
                    SOURCE.with(|s| *s.borrow_mut() = previous);
                }
            }
            let previous = SOURCE.with(|s| s.borrow_mut().replace(source.clone()));
            let _reset = Reset(previous);
            decode()
        }

        /// `v` as a slice of the current source when it lies inside it, else a copy.
        fn share(v: &[u8]) -> Bytes {
            SOURCE
                .with(|s| {
                    let s = s.borrow();
                    let src = s.as_ref()?;
                    let start = (v.as_ptr() as usize).checked_sub(src.as_ptr() as usize)?;
                    let end = start.checked_add(v.len())?;
                    (end <= src.len()).then(|| src.slice(start..end))
                })
                .unwrap_or_else(|| Bytes::copy_from_slice(v))
        }

        pub fn serialize<S: Serializer>(v: &Bytes, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(v)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
            struct V;
            impl<'de> de::Visitor<'de> for V {
                type Value = Bytes;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("MessagePack bin")
                }
                fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Bytes, E> {
                    Ok(share(v))
                }
                fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
                    Ok(Bytes::copy_from_slice(v))
                }
                fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
                    Ok(Bytes::from(v))
                }
            }
            d.deserialize_byte_buf(V)
        }
    }

    pub mod str {
        use serde::{Deserializer, Serializer, de};
        use std::fmt;

        pub fn serialize<S: Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(v)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
            struct V;
            impl<'de> de::Visitor<'de> for V {
                type Value = String;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("MessagePack str")
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
                    Ok(v.to_string())
                }
                fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
                    Ok(v)
                }
            }
            d.deserialize_string(V)
        }
    }
}

/// Smallest nonce a ping may carry.
pub const MIN_NONCE_LEN: usize = 16;
/// Largest nonce a ping may carry.
pub const MAX_NONCE_LEN: usize = 64;

/// Why a request failed, as the peer sees it. On the wire a MessagePack str, nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The message was malformed or broke the protocol.
    BadRequest,
    /// No such operation.
    UnknownOp,
    /// The caller's identity may not call this operation.
    Denied,
    /// No worker could take the request within the wait bound.
    Unavailable,
    /// The request's deadline passed.
    Timeout,
    /// A frame or payload is over a size limit.
    TooLarge,
    /// A limit on connections or requests in flight was reached.
    Overloaded,
    /// The worker went away while running a non-idempotent request; it may or may not have run.
    WorkerLost,
    /// The operation ran and failed (for a job: a non-zero exit status).
    OpFailed,
    /// The worker refused the dispatcher's token.
    InvalidToken,
    /// The component is shutting down.
    ShuttingDown,
    /// Something went wrong inside the component; details are in its log only.
    Internal,
    /// A code this version does not know (sent by a newer peer).
    Unknown,
}

impl<'de> Deserialize<'de> for ErrorCode {
    /// Only a str: serde's derived form would also take an integer index or a bin, which
    /// PROTOCOL.md does not allow. A str this version does not know is [`ErrorCode::Unknown`].
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ErrorCode;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an error code (MessagePack str)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ErrorCode, E> {
                Ok(ErrorCode::from_wire(v))
            }
        }
        d.deserialize_str(V)
    }
}

impl ErrorCode {
    /// Every code but [`ErrorCode::Unknown`].
    pub const KNOWN: [ErrorCode; 12] = [
        ErrorCode::BadRequest,
        ErrorCode::UnknownOp,
        ErrorCode::Denied,
        ErrorCode::Unavailable,
        ErrorCode::Timeout,
        ErrorCode::TooLarge,
        ErrorCode::Overloaded,
        ErrorCode::WorkerLost,
        ErrorCode::OpFailed,
        ErrorCode::InvalidToken,
        ErrorCode::ShuttingDown,
        ErrorCode::Internal,
    ];

    /// The code named `name` on the wire; [`ErrorCode::Unknown`] for a name this version does
    /// not know.
    pub fn from_wire(name: &str) -> ErrorCode {
        ErrorCode::KNOWN
            .into_iter()
            .find(|c| c.as_str() == name)
            .unwrap_or(ErrorCode::Unknown)
    }

    /// The snake_case wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::Denied => "denied",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Timeout => "timeout",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::WorkerLost => "worker_lost",
            ErrorCode::OpFailed => "op_failed",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Message {
    /// The payload, for the messages that carry one (request, forward, reply).
    pub fn payload(&self) -> Option<&Bytes> {
        match self {
            Message::Request(r) => Some(&r.payload),
            Message::Forward(f) => Some(&f.payload),
            Message::Reply(r) => Some(&r.payload),
            Message::Error(_) | Message::Ping(_) | Message::Pong(_) => None,
        }
    }

    /// A connection-level error (id 0), sent just before closing.
    pub fn connection_error(code: ErrorCode, message: impl Into<String>) -> Message {
        Message::Error(ErrorReply {
            id: 0,
            code,
            message: message.into(),
        })
    }

    /// The kind name as it appears on the wire, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Request(_) => "request",
            Message::Forward(_) => "forward",
            Message::Reply(_) => "reply",
            Message::Error(_) => "error",
            Message::Ping(_) => "ping",
            Message::Pong(_) => "pong",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_shape_is_a_single_key_map_of_named_fields() {
        let msg = Message::Reply(Reply {
            id: 1,
            payload: Bytes::from_static(b"hi"),
        });
        let bytes = rmp_serde::to_vec_named(&msg).unwrap();
        // fixmap(1) "reply" fixmap(2) "id" 1 "payload" bin8(2) "hi"
        let expected: Vec<u8> = [
            &[0x81, 0xa5][..],
            b"reply",
            &[0x82, 0xa2],
            b"id",
            &[0x01, 0xa7],
            b"payload",
            &[0xc4, 0x02],
            b"hi",
        ]
        .concat();
        assert_eq!(bytes, expected);
    }

    /// The example frames of docs/PROTOCOL.md §7, byte for byte.
    #[test]
    fn protocol_document_example() {
        let req = Message::Request(Request {
            id: 1,
            op: "echo".into(),
            payload: Bytes::from_static(b"hi"),
            timeout_ms: None,
        });
        let expected_req: Vec<u8> = [
            &[0, 0, 0, 0x22, 0x81, 0xa7][..],
            b"request",
            &[0x83, 0xa2],
            b"id",
            &[0x01, 0xa2],
            b"op",
            &[0xa4],
            b"echo",
            &[0xa7],
            b"payload",
            &[0xc4, 0x02],
            b"hi",
        ]
        .concat();
        assert_eq!(
            crate::frame::encode_to_vec(&req, 1024).unwrap(),
            expected_req
        );
        let reply = Message::Reply(Reply {
            id: 1,
            payload: Bytes::from_static(b"hi"),
        });
        let expected_reply: Vec<u8> = [
            &[0, 0, 0, 0x18, 0x81, 0xa5][..],
            b"reply",
            &[0x82, 0xa2],
            b"id",
            &[0x01, 0xa7],
            b"payload",
            &[0xc4, 0x02],
            b"hi",
        ]
        .concat();
        assert_eq!(
            crate::frame::encode_to_vec(&reply, 1024).unwrap(),
            expected_reply
        );
        // The decoder accepts the documented optional and nil forms.
        // The decoder accepts the documented optional and nil forms, in any field order and
        // any integer width.
        let with_nil: Vec<u8> = [
            &[0x81, 0xa7][..],
            b"request",
            &[0x84, 0xa2],
            b"op",
            &[0xa4],
            b"echo",
            &[0xa7],
            b"payload",
            &[0xc4, 0x00, 0xa2],
            b"id",
            &[0xcf, 0, 0, 0, 0, 0, 0, 0, 2, 0xaa],
            b"timeout_ms",
            &[0xc0],
        ]
        .concat();
        let decoded = crate::frame::decode_body::<Message>(&with_nil);
        assert!(matches!(
            decoded,
            Ok(Message::Request(Request {
                id: 2,
                timeout_ms: None,
                ..
            }))
        ));
    }

    /// docs/PROTOCOL.md §3.1: the largest `echo` payload under the default cap.
    #[test]
    fn documented_payload_envelope() {
        let req = |len: usize| {
            Message::Request(Request {
                id: 1,
                op: "echo".into(),
                payload: vec![0; len].into(),
                timeout_ms: None,
            })
        };
        let cap = crate::frame::DEFAULT_MAX_FRAME;
        let body = rmp_serde::to_vec_named(&req(1_048_541)).unwrap();
        assert_eq!(body.len(), cap);
        assert!(crate::frame::encode_to_vec(&req(1_048_541), cap).is_ok());
        assert!(crate::frame::encode_to_vec(&req(1_048_542), cap).is_err());
    }

    #[test]
    fn forward_ref_encodes_like_forward() {
        let owned = Message::Forward(Forward {
            id: 9,
            op: "echo".into(),
            payload: vec![1, 2, 3].into(),
            token: vec![4; 40],
            timeout_ms: 1234,
        });
        let borrowed = ForwardRef::Forward {
            id: 9,
            op: "echo",
            payload: &[1, 2, 3],
            token: &[4; 40],
            timeout_ms: 1234,
        };
        assert_eq!(
            rmp_serde::to_vec_named(&owned).unwrap(),
            rmp_serde::to_vec_named(&borrowed).unwrap()
        );
    }

    #[test]
    fn unknown_error_codes_from_newer_peers_decode() {
        let bytes = rmp_serde::to_vec_named(&serde_json::json!({
            "error": {"id": 4, "code": "quota_exceeded", "message": "later"}
        }))
        .unwrap();
        let msg: Message = rmp_serde::from_slice(&bytes).unwrap();
        assert!(matches!(
            msg,
            Message::Error(ErrorReply {
                code: ErrorCode::Unknown,
                ..
            })
        ));
    }

    #[test]
    fn field_types_are_strict() {
        // payload as str, op as bin, nonce as an array of integers: all refused.
        let payload_str = rmp_serde::to_vec_named(&serde_json::json!({
            "request": {"id": 1, "op": "echo", "payload": "text"}
        }))
        .unwrap();
        assert!(rmp_serde::from_slice::<Message>(&payload_str).is_err());
        let op_bin: Vec<u8> = [
            &[0x81, 0xa7][..],
            b"request",
            &[0x83, 0xa2],
            b"id",
            &[0x01, 0xa2],
            b"op",
            &[0xc4, 0x04],
            b"echo",
            &[0xa7],
            b"payload",
            &[0xc4, 0x00],
        ]
        .concat();
        assert!(rmp_serde::from_slice::<Message>(&op_bin).is_err());
        let nonce_array = rmp_serde::to_vec_named(&serde_json::json!({
            "ping": {"nonce": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]}
        }))
        .unwrap();
        assert!(rmp_serde::from_slice::<Message>(&nonce_array).is_err());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let bytes = rmp_serde::to_vec_named(&serde_json::json!({
            "ping": {"nonce": [1, 2], "admin": true}
        }))
        .unwrap();
        assert!(rmp_serde::from_slice::<Message>(&bytes).is_err());
    }

    #[test]
    fn error_code_names_match_serde() {
        for code in ErrorCode::KNOWN {
            let v = serde_json::to_value(code).unwrap();
            assert_eq!(v, serde_json::Value::String(code.as_str().into()));
            let wire = rmp_serde::to_vec_named(&code).unwrap();
            assert_eq!(rmp_serde::from_slice::<ErrorCode>(&wire).unwrap(), code);
        }
    }

    #[test]
    fn an_error_code_is_a_str_only() {
        // serde's derived enum form would take the variant index (6 = overloaded) or a bin.
        for code in [serde_json::json!(6), serde_json::json!([111, 118])] {
            let bytes = rmp_serde::to_vec_named(&serde_json::json!({
                "error": {"id": 4, "code": code, "message": "m"}
            }))
            .unwrap();
            assert!(
                rmp_serde::from_slice::<Message>(&bytes).is_err(),
                "code {code} accepted"
            );
        }
        let bin_code: Vec<u8> = [
            &[0x81, 0xa5][..],
            b"error",
            &[0x83, 0xa2],
            b"id",
            &[0x04, 0xa4],
            b"code",
            &[0xc4, 0x0a],
            b"overloaded",
            &[0xa7],
            b"message",
            &[0xa1],
            b"m",
        ]
        .concat();
        assert!(rmp_serde::from_slice::<Message>(&bin_code).is_err());
    }
}
