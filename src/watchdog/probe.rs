//! Authenticated heartbeats: an mTLS connection (kept between beats) to the exact identity a
//! component must have, a fresh random nonce, and a pong that echoes it within the deadline.
//! A process that squats the port without the component's certificate fails the handshake and
//! never counts as healthy.

use crate::connection::{Connection, IoLimits};
use crate::message::{ErrorCode, Message, Ping};
use crate::tls::{ClientStream, Connector};
use futures_util::FutureExt;
use std::net::SocketAddr;
use std::time::Duration;

/// Probes one component.
pub struct Prober {
    connector: Connector,
    addr: SocketAddr,
    io: IoLimits,
    conn: Option<Connection<ClientStream>>,
    /// Set once the current beat's ping is written: a beat that times out after that keeps
    /// the connection (its pong, if it comes, is skipped by its nonce), one that times out
    /// before does not (a half-written frame would garble the next).
    ping_sent: bool,
    rng: ring::rand::SystemRandom,
}

/// What a heartbeat heard.
#[derive(Debug, Clone, Copy)]
pub enum Heard {
    /// The component answered.
    Beat(Beat),
    /// The component is stopping by itself (it was told to by someone else): it closed our
    /// connection saying `shutting_down`, and will exit once its requests are done.
    Stopping,
}

/// What a successful heartbeat reports.
#[derive(Debug, Clone, Copy)]
pub struct Beat {
    /// Requests the component has in progress.
    pub in_flight: u32,
    /// For the dispatcher: workers it can use now.
    pub workers_available: Option<u32>,
}

impl Prober {
    /// A prober for the component at `addr` whose identity `connector` expects.
    pub fn new(connector: Connector, addr: SocketAddr, io: IoLimits) -> Self {
        Prober {
            connector,
            addr,
            io,
            conn: None,
            ping_sent: false,
            rng: ring::rand::SystemRandom::new(),
        }
    }

    /// Forgets the connection (after a restart the next beat dials afresh).
    pub fn reset(&mut self) {
        self.conn = None;
    }

    /// One heartbeat within `deadline`. When it fails the connection is dropped, except after
    /// a beat whose ping went out but whose answer was late: that connection is kept for the
    /// next beat. A component that stalls for a moment (a paused VM, a loaded machine) then
    /// answers on it as soon as it runs again, even while its listener is full (clients
    /// holding every connection slot would keep a new connection out).
    pub async fn beat(&mut self, deadline: Duration) -> Result<Heard, String> {
        self.ping_sent = false;
        match tokio::time::timeout(deadline, self.beat_inner()).await {
            Ok(Ok(b)) => Ok(b),
            Ok(Err(e)) => {
                self.conn = None;
                Err(e)
            }
            Err(_) => {
                if !self.ping_sent {
                    self.conn = None;
                }
                Err(format!("no answer within {} ms", deadline.as_millis()))
            }
        }
    }

    async fn beat_inner(&mut self) -> Result<Heard, String> {
        // What the component sent since the last beat: a stopping component says so when it
        // closes the connection, between our beats.
        if let Some(conn) = self.conn.as_mut() {
            while let Some(r) = conn.read_message().now_or_never() {
                match r {
                    Ok(Some(m)) if says_stopping(&m) => {
                        self.conn = None;
                        return Ok(Heard::Stopping);
                    }
                    // A late pong to an earlier beat.
                    Ok(Some(Message::Pong(_))) => {}
                    // Closed or broken: dial again.
                    _ => {
                        self.conn = None;
                        break;
                    }
                }
            }
        }
        if self.conn.is_none() {
            let (stream, _) = self
                .connector
                .connect(self.addr)
                .await
                .map_err(|e| e.to_string())?;
            self.conn = Some(Connection::new(stream, self.io));
        }
        let conn = self.conn.as_mut().ok_or("no connection")?;
        let mut nonce = vec![0u8; 32];
        ring::rand::SecureRandom::fill(&self.rng, &mut nonce)
            .map_err(|_| "random generator failed")?;
        conn.send(&Message::Ping(Ping {
            nonce: nonce.clone(),
        }))
        .await
        .map_err(|e| e.to_string())?;
        self.ping_sent = true;
        loop {
            match conn.read_message().await {
                Ok(Some(Message::Pong(p))) if p.nonce == nonce => {
                    return Ok(Heard::Beat(Beat {
                        in_flight: p.in_flight,
                        workers_available: p.workers_available,
                    }));
                }
                Ok(Some(m)) if says_stopping(&m) => {
                    self.conn = None;
                    return Ok(Heard::Stopping);
                }
                // A late pong to an earlier beat: skip it.
                Ok(Some(Message::Pong(_))) => continue,
                // The component's text, cut short; logged quoted.
                Ok(Some(Message::Error(e))) => {
                    return Err(format!(
                        "{}: {}",
                        e.code,
                        crate::identity::printable(&e.message)
                    ));
                }
                Ok(Some(other)) => return Err(format!("unexpected {} message", other.kind())),
                Ok(None) => return Err("connection closed".into()),
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

/// Whether `m` is a component's closing word that it is stopping by itself (PROTOCOL.md §5).
fn says_stopping(m: &Message) -> bool {
    matches!(m, Message::Error(e) if e.id == 0 && e.code == ErrorCode::ShuttingDown)
}
