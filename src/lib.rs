#![forbid(unsafe_code)]
pub mod certs;
pub mod config;
pub mod connection;
pub mod frame;
pub mod identity;
pub mod message;
pub mod tls;
pub mod token;
