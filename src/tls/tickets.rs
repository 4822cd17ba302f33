//! The client's store of TLS 1.3 session tickets.
//!
//! rustls's own `ClientSessionMemoryCache` keeps at most 8 tickets per server, and a ticket is
//! used once. A client that opens more connections than that at once (a load generator, a
//! process with many callers, every client reconnecting after a dispatcher restart) finds the
//! store empty and pays for full handshakes: certificate signing and verification on both sides.
//! With 32 connections reconnecting in a closed loop, about half of the handshakes were full.
//! This store keeps up to [`TICKETS_PER_SERVER`] tickets per server, newest used first, oldest
//! dropped first, for up to [`SERVERS`] server names.

use rustls::NamedGroup;
use rustls::client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls_pki_types::ServerName;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Tickets kept per server name: more than the connections one client usually opens at once.
pub const TICKETS_PER_SERVER: usize = 128;
/// Server names remembered; the least recently added one is forgotten first. A client config
/// expects one identity and usually dials one address, so a few are plenty.
pub const SERVERS: usize = 8;

#[derive(Default)]
struct Server {
    kx_hint: Option<NamedGroup>,
    /// Oldest first.
    tickets: VecDeque<Tls13ClientSessionValue>,
}

#[derive(Default)]
struct Inner {
    servers: HashMap<ServerName<'static>, Server>,
    /// Names in the order they were first stored, for eviction.
    order: VecDeque<ServerName<'static>>,
}

impl Inner {
    fn server(&mut self, name: ServerName<'static>) -> &mut Server {
        if !self.servers.contains_key(&name) {
            while self.servers.len() >= SERVERS {
                match self.order.pop_front() {
                    Some(old) => {
                        self.servers.remove(&old);
                    }
                    None => break,
                }
            }
            self.order.push_back(name.clone());
        }
        self.servers.entry(name).or_default()
    }
}

/// A [`ClientSessionStore`] for TLS 1.3 tickets (TLS 1.2 is never negotiated here).
#[derive(Default)]
pub struct TicketStore {
    inner: Mutex<Inner>,
}

impl TicketStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters: at worst a ticket is lost and a handshake is full.
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut inner)
    }

    /// Tickets held for `name` (for tests and diagnostics).
    pub fn tickets(&self, name: &ServerName<'_>) -> usize {
        self.with(|i| i.servers.get(name).map_or(0, |s| s.tickets.len()))
    }

    /// Forgets every ticket (the key exchange hints stay): the next handshake is a full one.
    /// For a client whose resumed session was refused after the handshake (PROTOCOL.md §1:
    /// a bare `close_notify`, without the alert a full handshake would carry): offering its
    /// other tickets would be refused the same way, and each such handshake brings new ones.
    pub fn clear(&self) {
        self.with(|i| {
            for server in i.servers.values_mut() {
                server.tickets.clear();
            }
        });
    }

    /// Server names held.
    pub fn servers(&self) -> usize {
        self.with(|i| i.servers.len())
    }
}

impl std::fmt::Debug for TicketStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the tickets themselves: they carry resumption secrets.
        f.debug_struct("TicketStore")
            .field("servers", &self.servers())
            .finish_non_exhaustive()
    }
}

impl ClientSessionStore for TicketStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.with(|i| i.server(server_name).kx_hint = Some(group));
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.with(|i| i.servers.get(server_name).and_then(|s| s.kx_hint))
    }

    fn set_tls12_session(&self, _: ServerName<'static>, _: Tls12ClientSessionValue) {}

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        self.with(|i| {
            let tickets = &mut i.server(server_name).tickets;
            if tickets.len() >= TICKETS_PER_SERVER {
                tickets.pop_front();
            }
            tickets.push_back(value);
        });
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        self.with(|i| i.servers.get_mut(server_name)?.tickets.pop_back())
    }
}
