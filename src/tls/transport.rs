//! The TCP stream under every TLS connection, reading ahead what rustls would fetch in pieces.
//!
//! rustls asks its transport for at most about 4 KiB at a time, so a 16 KiB request costs
//! five `recv` calls. [`Transport`] takes everything the socket has ready (up to
//! [`READ_AHEAD`]) in one call and hands it to rustls from memory.
//!
//! Memory: an idle connection holds no buffer. One is allocated only once the socket is
//! readable and is freed as soon as all of it has been handed on, which rustls does at once
//! unless decrypted data is already waiting for the connection's task. So a connection holds
//! one [`READ_AHEAD`] allocation at most, and only while its task is busy elsewhere — at the
//! longest while it waits, up to `limits.write_timeout_ms`, for a peer that does not take its
//! answers. Those bytes would otherwise wait in the kernel's socket buffer. Freed buffers are
//! kept for reuse, up to [`SPARE_PER_THREAD`] on each thread, so that a busy connection does not
//! allocate and free 32 KiB for every message.

use bytes::{Buf, BytesMut};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::io::poll_read_buf;

/// The most one read from the socket takes.
pub const READ_AHEAD: usize = 32 * 1024;

/// Empty read-ahead buffers kept for reuse on each thread.
pub const SPARE_PER_THREAD: usize = 8;

thread_local! {
    static SPARE: std::cell::RefCell<Vec<BytesMut>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An empty buffer with room for [`READ_AHEAD`] bytes, reused if one is spare.
fn take_buffer() -> BytesMut {
    let mut b = SPARE
        .try_with(|s| s.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_default();
    // A spare buffer has been read to its end; with nothing in it, this only rewinds it.
    b.clear();
    b.reserve(READ_AHEAD);
    b
}

/// Keeps `b` (emptied) for reuse, or frees it if enough are kept already.
fn give_back(mut b: BytesMut) {
    b.clear();
    let _ = SPARE.try_with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < SPARE_PER_THREAD {
            s.push(b);
        }
    });
}

/// A [`TcpStream`] that reads ahead (see the module documentation). Writes go straight through.
#[derive(Debug)]
pub struct Transport {
    tcp: TcpStream,
    /// Bytes read from the socket and not yet handed on. Empty, without an allocation, when
    /// there are none.
    ahead: BytesMut,
}

impl Transport {
    /// Wraps a connected socket.
    pub fn new(tcp: TcpStream) -> Self {
        Transport {
            tcp,
            ahead: BytesMut::new(),
        }
    }

    /// The socket.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.peer_addr()
    }

    /// Bytes read from the socket and not yet handed on.
    pub fn buffered(&self) -> usize {
        self.ahead.len()
    }

    /// Hands on what can be taken from `ahead`, letting go of the buffer once it is empty.
    fn hand_on(&mut self, out: &mut ReadBuf<'_>) {
        let n = out.remaining().min(self.ahead.len());
        out.put_slice(&self.ahead[..n]);
        self.ahead.advance(n);
        if self.ahead.is_empty() {
            give_back(std::mem::take(&mut self.ahead));
        }
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if !this.ahead.is_empty() {
            this.hand_on(out);
            return Poll::Ready(Ok(()));
        }
        if out.remaining() >= READ_AHEAD {
            return Pin::new(&mut this.tcp).poll_read(cx, out);
        }
        // Wait for readiness before allocating, so that idle connections hold nothing.
        ready!(this.tcp.poll_read_ready(cx))?;
        this.ahead = take_buffer();
        // The socket's own read, which also notes a short read as "drained", so the next
        // read waits for the peer instead of trying the socket in vain.
        match poll_read_buf(Pin::new(&mut this.tcp), cx, &mut this.ahead) {
            Poll::Ready(Ok(_)) => {
                // Zero bytes is end of stream, which the caller sees as an empty read.
                this.hand_on(out);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                give_back(std::mem::take(&mut this.ahead));
                Poll::Ready(Err(e))
            }
            // Readiness was stale: wait again, holding nothing.
            Poll::Pending => {
                give_back(std::mem::take(&mut this.ahead));
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (Transport, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (Transport::new(client.unwrap()), server.unwrap().0)
    }

    /// Waits (bounded) until the socket has `n` bytes queued, so that one read can see them.
    async fn wait_queued(t: &Transport, n: usize) {
        let mut probe = vec![0u8; n];
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while t.tcp().peek(&mut probe).await.unwrap() < n {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("data never arrived");
    }

    #[tokio::test]
    async fn small_reads_are_served_from_one_read_ahead_then_freed() {
        let (mut t, mut peer) = pair().await;
        let sent: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        peer.write_all(&sent).await.unwrap();
        wait_queued(&t, sent.len()).await;

        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        let n = t.read(&mut chunk).await.unwrap();
        got.extend_from_slice(&chunk[..n]);
        // The first 4 KiB read took everything the socket had; the rest waits here.
        assert_eq!(n, 4096);
        assert_eq!(t.buffered(), sent.len() - 4096);
        while got.len() < sent.len() {
            let n = t.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, sent);
        assert_eq!(t.buffered(), 0);
        assert_eq!(
            t.ahead.capacity(),
            0,
            "a drained read-ahead keeps no allocation"
        );

        // Drained: the next read waits for the peer, holding nothing meanwhile.
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(50), t.read(&mut chunk)).await;
        assert!(waiting.is_err());
        assert_eq!(t.ahead.capacity(), 0);
        peer.write_all(b"more").await.unwrap();
        assert_eq!(t.read(&mut chunk).await.unwrap(), 4);
        assert_eq!(&chunk[..4], b"more");
    }

    #[tokio::test]
    async fn a_drained_buffer_is_reused_not_reallocated() {
        let (mut t, mut peer) = pair().await;
        let spare = || SPARE.with(|s| s.borrow().len());
        let mut chunk = [0u8; 4096];
        peer.write_all(&[1; 100]).await.unwrap();
        assert_eq!(t.read(&mut chunk).await.unwrap(), 100);
        assert_eq!(t.ahead.capacity(), 0);
        let kept = spare();
        assert!(kept >= 1, "the drained buffer is kept for reuse");
        // The spare was read 100 bytes in; its allocation starts 100 bytes before.
        let start = SPARE.with(|s| s.borrow().last().map(|b| b.as_ptr() as usize - 100));

        peer.write_all(&[2; 6000]).await.unwrap();
        wait_queued(&t, 6000).await;
        assert_eq!(t.read(&mut chunk).await.unwrap(), 4096);
        assert_eq!(spare(), kept - 1, "taken from the spares");
        // Rewound to the start of the same allocation: no new 32 KiB buffer.
        assert_eq!(Some(t.ahead.as_ptr() as usize - 4096), start);
        assert_eq!(t.read(&mut chunk).await.unwrap(), 6000 - 4096);
        assert_eq!(&chunk[..6000 - 4096], &[2; 6000 - 4096][..]);
        assert_eq!(spare(), kept);

        // Never more than SPARE_PER_THREAD are kept.
        for _ in 0..2 * SPARE_PER_THREAD {
            give_back(BytesMut::with_capacity(READ_AHEAD));
        }
        assert_eq!(spare(), SPARE_PER_THREAD);
    }

    #[tokio::test]
    async fn end_of_stream_and_writes_pass_through() {
        let (mut t, mut peer) = pair().await;
        t.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        peer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        peer.write_all(b"pong").await.unwrap();
        drop(peer);
        let mut rest = Vec::new();
        t.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"pong");
        assert_eq!(t.ahead.capacity(), 0);
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_buffer_while_waiting() {
        let (mut t, mut peer) = pair().await;
        let mut buf = [0u8; 16];
        let pending =
            tokio::time::timeout(std::time::Duration::from_millis(50), t.read(&mut buf)).await;
        assert!(pending.is_err(), "nothing was sent, so the read must wait");
        assert_eq!(t.ahead.capacity(), 0);
        peer.write_all(b"x").await.unwrap();
        assert_eq!(t.read(&mut buf).await.unwrap(), 1);
    }
}
