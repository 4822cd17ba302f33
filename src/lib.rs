#![forbid(unsafe_code)]
pub mod certs;
pub mod client;
pub mod config;
pub mod connection;
pub mod dispatcher;
pub mod frame;
pub mod identity;
pub mod message;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod tls;
pub mod token;
pub mod watchdog;
pub mod worker;
