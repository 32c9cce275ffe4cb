//! The h2 crate's I/O: tokio's traits over the shard's own client stream, shown to the flood
//! meter, writes gathered until the h2 layer flushes.

use super::flood::Meter;
use crate::client::ClientStream;
use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

/// rustls-over-glommio streams speak futures-io; the `h2` crate speaks tokio's I/O traits.
/// The bytes going by are shown to the flood meter. The stream is shared so that it outlives
/// the h2 connection for a lingering close.
///
/// Writes are gathered until the h2 layer flushes: it writes each frame header and payload
/// separately, and each write into the TLS stream would otherwise be a TLS record and a
/// send(2) of its own.
pub(super) struct Compat {
    io: Rc<RefCell<ClientStream>>,
    meter: Rc<Meter>,
    /// Bytes read before the h2 layer took over (h2c: the request path read the preface).
    read_before: Vec<u8>,
    out: Vec<u8>,
    /// How much of `out` the TLS stream has taken.
    out_sent: usize,
}

/// Bytes gathered before they must go out, whether the h2 layer flushed or not.
const GATHER: usize = 64 * 1024;

impl Compat {
    pub(super) fn new(
        io: Rc<RefCell<ClientStream>>,
        meter: Rc<Meter>,
        read_before: Vec<u8>,
    ) -> Compat {
        Compat {
            io,
            meter,
            read_before,
            out: Vec::new(),
            out_sent: 0,
        }
    }

    /// Everything gathered into the TLS stream.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_sent < self.out.len() {
            let mut io = self.io.borrow_mut();
            match futures_lite::AsyncWrite::poll_write(
                Pin::new(&mut *io),
                cx,
                &self.out[self.out_sent..],
            ) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.out_sent += n;
                    self.meter.writing(true);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.meter.writing(false);
                    return Poll::Pending;
                }
            }
        }
        self.meter.writing(true);
        self.out.clear();
        self.out_sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Take what fits of `bufs` (after draining a full gather buffer).
    fn gather(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.out.len() >= GATHER {
            if let Poll::Ready(Err(e)) = self.drain(cx) {
                return Poll::Ready(Err(e));
            }
            if !self.out.is_empty() {
                return Poll::Pending;
            }
        }
        let mut taken = 0;
        for b in bufs {
            let n = b.len().min(GATHER.saturating_sub(self.out.len()));
            if n == 0 {
                break;
            }
            self.out.extend_from_slice(&b[..n]);
            self.meter.sent(&b[..n]);
            taken += n;
            if n < b.len() {
                break;
            }
        }
        Poll::Ready(Ok(taken))
    }
}

impl tokio::io::AsyncRead for Compat {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.meter.tripped().is_some() {
            // an abuser's further frames are not read: the connection is being closed
            return Poll::Pending;
        }
        if !this.read_before.is_empty() {
            let n = this.read_before.len().min(buf.remaining());
            this.meter.received(&this.read_before[..n]);
            buf.put_slice(&this.read_before[..n]);
            this.read_before.drain(..n);
            return Poll::Ready(Ok(()));
        }
        let dst = buf.initialize_unfilled();
        let mut io = this.io.borrow_mut();
        match futures_lite::AsyncRead::poll_read(Pin::new(&mut *io), cx, dst) {
            Poll::Ready(Ok(n)) => {
                this.meter.received(&dst[..n]);
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl tokio::io::AsyncWrite for Compat {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().gather(cx, &[io::IoSlice::new(buf)])
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().gather(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.drain(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        futures_lite::AsyncWrite::poll_flush(Pin::new(&mut *this.io.borrow_mut()), cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.drain(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        futures_lite::AsyncWrite::poll_close(Pin::new(&mut *this.io.borrow_mut()), cx)
    }
}
