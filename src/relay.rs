//! Streaming bodies from one side to the other without buffering them whole, and the
//! bidirectional tunnel after a 101. Back-pressure is natural: we read only after writing.

use crate::http::chunked::{ChunkError, ChunkedDecoder};
use crate::http::{BodyKind, Buf};
use crate::io::{fill, timeout, write_all};
use futures_lite::{AsyncRead, AsyncWrite};
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

#[derive(Debug)]
pub enum RelayError {
    /// The sending side failed, timed out or closed before the body ended.
    Source(io::Error),
    /// The receiving side failed or timed out.
    Sink(io::Error),
    /// The chunked framing was invalid.
    Framing(ChunkError),
    /// The body exceeded the size limit.
    TooLarge,
}

/// Read more of a body that has not ended: EOF here is an error.
async fn refill<R: AsyncRead + Unpin>(
    src: &mut R,
    buf: &mut Buf,
    read_timeout: Duration,
) -> Result<(), RelayError> {
    let n = timeout(read_timeout, fill(src, buf))
        .await
        .map_err(RelayError::Source)?;
    if n == 0 {
        return Err(RelayError::Source(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(())
}

/// Time and size bounds of one body relay.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Longest wait for the next bytes from the sender.
    pub read_timeout: Duration,
    /// Longest wait for the receiver to take bytes.
    pub write_timeout: Duration,
    /// Most bytes relayed, chunk framing included (0: no limit).
    pub max: u64,
}

/// Forward one body of `kind` from `src` (whose already-read bytes are in `buf`) to `dst`.
/// With `dechunk`, a chunked body is sent as plain data (for HTTP/1.0 clients). Bytes after
/// the body stay in `buf`. Returns the bytes written, also kept in `sent` as they go (what a
/// relay that failed midway did write).
pub async fn relay_body<R, W>(
    src: &mut R,
    buf: &mut Buf,
    dst: &mut W,
    kind: BodyKind,
    dechunk: bool,
    bounds: Bounds,
    sent: &mut u64,
) -> Result<u64, RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Bounds {
        read_timeout,
        write_timeout,
        max,
    } = bounds;
    // `max` (0: none) bounds the bytes relayed, chunk framing included.
    let over = |n: u64| max > 0 && n > max;
    *sent = 0;
    match kind {
        BodyKind::None => {}
        BodyKind::Length(mut remaining) => {
            while remaining > 0 {
                if buf.is_empty() {
                    refill(src, buf, read_timeout).await?;
                }
                let take = (buf.len() as u64).min(remaining) as usize;
                write_all(dst, &buf.filled()[..take], write_timeout)
                    .await
                    .map_err(RelayError::Sink)?;
                buf.consume(take);
                remaining -= take as u64;
                *sent += take as u64;
            }
        }
        BodyKind::Chunked => {
            let mut dec = ChunkedDecoder::new();
            loop {
                if buf.is_empty() {
                    refill(src, buf, read_timeout).await?;
                }
                if dechunk {
                    let step = dec.step(buf.filled()).map_err(RelayError::Framing)?;
                    if let Some((off, len)) = step.data {
                        write_all(dst, &buf.filled()[off..off + len], write_timeout)
                            .await
                            .map_err(RelayError::Sink)?;
                        *sent += len as u64;
                    }
                    buf.consume(step.consumed);
                    if step.done {
                        break;
                    }
                } else {
                    let (n, done) = dec.advance(buf.filled()).map_err(RelayError::Framing)?;
                    if over(*sent + n as u64) {
                        return Err(RelayError::TooLarge);
                    }
                    write_all(dst, &buf.filled()[..n], write_timeout)
                        .await
                        .map_err(RelayError::Sink)?;
                    buf.consume(n);
                    *sent += n as u64;
                    if done {
                        break;
                    }
                }
            }
        }
        BodyKind::CloseDelimited => loop {
            if !buf.is_empty() {
                write_all(dst, buf.filled(), write_timeout)
                    .await
                    .map_err(RelayError::Sink)?;
                *sent += buf.len() as u64;
                buf.clear();
            }
            let n = timeout(read_timeout, fill(src, buf))
                .await
                .map_err(RelayError::Source)?;
            if n == 0 {
                break;
            }
        },
    }
    Ok(*sent)
}

/// One direction of a tunnel: bytes read from one side wait in `buf` until written.
struct Half<'a> {
    buf: &'a mut Buf,
    eof: bool,
    shut: bool,
    moved: u64,
}

impl Half<'_> {
    /// Move bytes from `r` to `w`. Ready(true) if anything moved or state changed.
    fn poll_pump<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
    ) -> Poll<io::Result<bool>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut progress = false;
        loop {
            if !self.buf.is_empty() {
                match Pin::new(&mut *w).poll_write(cx, self.buf.filled()) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        self.buf.consume(n);
                        self.moved += n as u64;
                        progress = true;
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            if self.eof {
                if !self.shut {
                    match Pin::new(&mut *w).poll_close(cx) {
                        Poll::Ready(_) => {
                            self.shut = true;
                            progress = true;
                        }
                        Poll::Pending => {}
                    }
                }
                break;
            }
            match Pin::new(&mut *r).poll_read(cx, self.buf.spare()) {
                Poll::Ready(Ok(0)) => {
                    self.eof = true;
                    progress = true;
                }
                Poll::Ready(Ok(n)) => {
                    self.buf.advance(n);
                    progress = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        if progress {
            Poll::Ready(Ok(true))
        } else {
            Poll::Pending
        }
    }
}

/// Copy both ways until both sides have closed, an error, or `idle` passes with no traffic.
/// `a_buf`/`b_buf` may already hold bytes read from `a`/`b`. Returns (a→b, b→a) byte counts.
pub async fn tunnel<A, B>(
    a: &mut A,
    a_buf: &mut Buf,
    b: &mut B,
    b_buf: &mut Buf,
    idle: Duration,
) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (ab, ba, _) = tunnel_until(a, a_buf, b, b_buf, idle, std::future::pending()).await;
    (ab, ba)
}

/// How a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEnd {
    /// Both sides closed their half (each FIN passed on).
    Closed,
    /// Nothing moved for the idle timeout.
    Idle,
    /// A read or write failed (a reset, mostly).
    Error,
    /// `stop` came first (the appliance's drain ran out).
    Stopped,
}

/// `tunnel`, also saying how it ended; it ends at once when `stop` completes.
pub async fn tunnel_until<A, B>(
    a: &mut A,
    a_buf: &mut Buf,
    b: &mut B,
    b_buf: &mut Buf,
    idle: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> (u64, u64, TunnelEnd)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut ab = Half {
        buf: a_buf,
        eof: false,
        shut: false,
        moved: 0,
    };
    let mut ba = Half {
        buf: b_buf,
        eof: false,
        shut: false,
        moved: 0,
    };
    let mut stop = std::pin::pin!(stop);
    let mut stopped = false;
    let end = loop {
        if ab.shut && ba.shut {
            break TunnelEnd::Closed;
        }
        let step = timeout(
            idle,
            poll_fn(|cx| {
                if stop.as_mut().poll(cx).is_ready() {
                    stopped = true;
                    return Poll::Ready(Ok(()));
                }
                let p1 = if ab.shut {
                    Poll::Pending
                } else {
                    ab.poll_pump(cx, a, b)
                };
                let p2 = if ba.shut {
                    Poll::Pending
                } else {
                    ba.poll_pump(cx, b, a)
                };
                match (p1, p2) {
                    (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => Poll::Ready(Err(e)),
                    (Poll::Ready(Ok(_)), _) | (_, Poll::Ready(Ok(_))) => Poll::Ready(Ok(())),
                    _ => Poll::Pending,
                }
            }),
        )
        .await;
        match step {
            _ if stopped => break TunnelEnd::Stopped,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => break TunnelEnd::Idle,
            Err(_) => break TunnelEnd::Error,
            Ok(()) => {}
        }
    };
    (ab.moved, ba.moved, end)
}
