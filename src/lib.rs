//! securesrv: a hardened request-dispatch service.
//!
//! A **client** sends a request to the **dispatcher**; the dispatcher checks the client's
//! identity against the ACL, picks the available **worker** with the fewest outstanding
//! requests and forwards the request with a signed **request token**; the worker checks the
//! token, runs the op and answers. A **watchdog** runs the dispatcher and the workers as child
//! processes and restarts whichever stops answering its authenticated heartbeat. Every link is
//! mutual TLS 1.3 with certificates from the project's own CA.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`frame`] | 4-byte length + MessagePack codec; pure, size cap checked before allocating |
//! | [`message`] | wire message types and error codes |
//! | [`connection`] | a framed stream with idle, per-frame and write deadlines |
//! | [`tls`] | rustls configurations (ring, TLS 1.3, client auth, ALPN), handshake deadline |
//! | [`identity`] | SPIFFE IDs from certificates and the who-may-call-whom matrix |
//! | [`certs`] | the project's PKI: issuance with rcgen, 0600 key files, key-mode checks |
//! | [`token`] | request tokens: HKDF per-worker keys, HMAC-SHA256, replay cache, rotation |
//! | [`config`] | the optional TOML configuration, defaults and validation |
//! | [`files`] | bounded reads of regular files (certificates, lists, the configuration) |
//! | [`server`], [`session`] | the accept loop with connection limits; the per-connection request loop |
//! | [`inflight`] | requests in flight on a multiplexed connection, matched by id |
//! | [`dispatcher`], [`worker`], [`watchdog`], [`client`] | one component each |
//! | [`shutdown`] | SIGINT/SIGTERM (and loss of the supervisor) to one cancellation token |
//! | [`stdio`] | lines on stdout and stderr that cannot panic when the stream fails |
//! | [`bench`](mod@bench) | the `securesrv bench` load generator and a reference echo backend |
//!
//! # Path of a request
//!
//! 1. [`client::Client::call`] encodes a `request` frame on its mTLS connection.
//! 2. The dispatcher's [`server::serve`] accepted that connection after the handshake
//!    ([`tls::Acceptor`]) proved a `client` identity; [`session::drive`] reads the frame and
//!    starts a task.
//! 3. [`dispatcher`] checks the op and the ACL ([`config::Config::acl_allows`]), picks a worker
//!    ([`dispatcher::pool::Pool`]), mints a token ([`token::Minter`]) and writes a `forward`
//!    frame on the persistent link to that worker.
//! 4. The worker's session hands the forward to [`worker`], which verifies the token
//!    ([`token::Verifier`]), re-checks the ACL for the client named in it, runs the op
//!    ([`worker::ops`]) under the deadline and answers with `reply` or `error`.
//! 5. The dispatcher matches the answer by id, writes one audit line and answers the client.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// A failed `println!` or `eprintln!` panics (a full disk, a closed pipe): use `stdio`.
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]

pub mod audit;
pub mod bench;
pub mod certs;
pub mod client;
pub mod config;
pub mod connection;
pub mod dispatcher;
pub mod files;
pub mod frame;
pub mod identity;
pub mod inflight;
pub mod message;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod stdio;
mod throttle;
pub mod tls;
pub mod token;
pub mod watchdog;
pub mod worker;
