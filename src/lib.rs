#![forbid(unsafe_code)]
pub mod certs;
pub mod frame;
pub mod identity;
pub mod message;
pub mod tls;
pub mod token;
