//! A TCP stream that records when a byte last moved, for the idle timeout.
//!
//! What must hold: every successful read or write of at least one byte moves the
//! connection's last-activity time forward; nothing else does. Every read is also reported
//! to the connection's request phase (bytes read, or nothing waiting), and every write (went
//! through, or blocked on a full socket: the client does not take its answer).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::room::Conn;

/// `TcpStream` reporting its reads and writes to its connection's [`Activity`](super::activity::Activity).
pub(super) struct TrackedIo {
    inner: TcpStream,
    conn: Arc<Conn>,
}

impl TrackedIo {
    pub(super) fn new(inner: TcpStream, conn: Arc<Conn>) -> Self {
        TrackedIo { inner, conn }
    }

    fn wrote(&self, result: &Poll<io::Result<usize>>) {
        match result {
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.conn.activity.touch();
                self.conn.phase.write_flowed();
            }
            Poll::Pending => self.conn.phase.write_blocked(),
            _ => {}
        }
    }
}

impl AsyncRead for TrackedIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        match result {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.conn.phase.bytes_read();
                this.conn.activity.touch();
            }
            Poll::Pending => this.conn.phase.nothing_to_read(),
            _ => {}
        }
        result
    }
}

impl AsyncWrite for TrackedIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, data);
        this.wrote(&result);
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
