//! An in-process byte link between two tasks of one shard: what an HTTP/2 stream and the
//! request path serving it speak over. A socket pair did the same job at the cost of a dozen
//! system calls per stream (create, register, read and write on both ends, shut down, close);
//! this is two bounded buffers and four wakers.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// Bytes one direction holds before its writer waits (a socket buffer's job).
const CAPACITY: usize = 64 * 1024;

#[derive(Default)]
struct Direction {
    buf: VecDeque<u8>,
    /// The writer closed its side (a FIN) or went away.
    closed: bool,
    /// The reader went away: writing is pointless.
    reader_gone: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
    /// Bytes ever put into this direction.
    total: u64,
}

impl Direction {
    fn wake_reader(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }
    fn wake_writer(&mut self) {
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }
}

/// One end: reads what the other end writes, and the other way round.
pub struct End {
    dirs: Rc<RefCell<[Direction; 2]>>,
    /// This end reads `dirs[side]` and writes `dirs[1 - side]`.
    side: usize,
}

/// A new link: two ends.
pub fn pair() -> (End, End) {
    let dirs = Rc::new(RefCell::new([Direction::default(), Direction::default()]));
    (
        End {
            dirs: dirs.clone(),
            side: 0,
        },
        End { dirs, side: 1 },
    )
}

impl End {
    fn poll_take(&self, cx: &mut Context<'_>, out: &mut [u8]) -> Poll<io::Result<usize>> {
        let mut dirs = self.dirs.borrow_mut();
        let d = &mut dirs[self.side];
        if d.buf.is_empty() {
            if d.closed || out.is_empty() {
                return Poll::Ready(Ok(0));
            }
            d.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = out.len().min(d.buf.len());
        let (a, b) = d.buf.as_slices();
        let from_a = n.min(a.len());
        out[..from_a].copy_from_slice(&a[..from_a]);
        out[from_a..n].copy_from_slice(&b[..n - from_a]);
        d.buf.drain(..n);
        d.wake_writer();
        Poll::Ready(Ok(n))
    }

    fn poll_put(&self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let mut dirs = self.dirs.borrow_mut();
        let d = &mut dirs[1 - self.side];
        if d.reader_gone || d.closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let room = CAPACITY.saturating_sub(d.buf.len());
        if room == 0 {
            d.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = room.min(data.len());
        d.buf.extend(&data[..n]);
        d.total += n as u64;
        d.wake_reader();
        Poll::Ready(Ok(n))
    }

    /// Our FIN: the other end reads what is left, then the end.
    fn shut_write(&self) {
        let mut dirs = self.dirs.borrow_mut();
        let d = &mut dirs[1 - self.side];
        d.closed = true;
        d.wake_reader();
    }
}

/// Tells when the other end of a link has gone (dropped): the client of a cancelled stream.
pub struct Watch {
    dirs: Rc<RefCell<[Direction; 2]>>,
    side: usize,
}

impl Watch {
    /// Ready once the other end has been dropped.
    pub fn poll_gone(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut dirs = self.dirs.borrow_mut();
        // the other end reads the direction this side writes; dropping it marks that
        let d = &mut dirs[1 - self.side];
        if d.reader_gone {
            return Poll::Ready(());
        }
        d.writer = Some(cx.waker().clone());
        Poll::Pending
    }

    pub async fn gone(&self) {
        std::future::poll_fn(|cx| self.poll_gone(cx)).await
    }

    pub fn is_gone(&self) -> bool {
        self.dirs.borrow()[1 - self.side].reader_gone
    }

    /// Bytes (sent to this end, sent by this end) so far.
    pub fn moved(&self) -> (u64, u64) {
        let dirs = self.dirs.borrow();
        (dirs[self.side].total, dirs[1 - self.side].total)
    }
}

impl End {
    /// A watch on the other end, usable while this end is borrowed elsewhere (or gone).
    pub fn watch(&self) -> Watch {
        Watch {
            dirs: self.dirs.clone(),
            side: self.side,
        }
    }
}

impl Drop for End {
    fn drop(&mut self) {
        self.shut_write();
        let mut dirs = self.dirs.borrow_mut();
        let d = &mut dirs[self.side];
        d.reader_gone = true;
        d.buf = VecDeque::new();
        d.wake_writer();
    }
}

impl futures_lite::AsyncRead for End {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_take(cx, buf)
    }
}

impl futures_lite::AsyncWrite for End {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_put(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shut_write();
        Poll::Ready(Ok(()))
    }
}

// Both directions of one end from two futures at once (a bridge pumping both ways), as
// `&Socket` allows: each direction keeps its own waker.
impl futures_lite::AsyncRead for &End {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_take(cx, buf)
    }
}

impl futures_lite::AsyncWrite for &End {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_put(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shut_write();
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::{future, AsyncReadExt, AsyncWriteExt};

    #[test]
    fn bytes_both_ways_backpressure_and_the_end() {
        future::block_on(async {
            let (mut a, mut b) = pair();
            let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
            let writer = async {
                a.write_all(&data).await.unwrap();
                a.close().await.unwrap();
                let mut back = Vec::new();
                a.read_to_end(&mut back).await.unwrap();
                back
            };
            let reader = async {
                let mut got = Vec::new();
                b.read_to_end(&mut got).await.unwrap();
                b.write_all(b"done").await.unwrap();
                drop(b);
                got
            };
            let (back, got) = future::zip(writer, reader).await;
            assert_eq!(got, data);
            assert_eq!(back, b"done");
        });
    }

    #[test]
    fn a_watch_sees_the_other_end_go() {
        future::block_on(async {
            let (a, b) = pair();
            let w = a.watch();
            assert!(future::poll_once(w.gone()).await.is_none());
            drop(a);
            assert!(future::poll_once(w.gone()).await.is_none(), "its own end");
            drop(b);
            w.gone().await;
        });
    }

    #[test]
    fn writing_to_a_dropped_end_fails() {
        future::block_on(async {
            let (mut a, b) = pair();
            drop(b);
            assert!(a.write_all(b"x").await.is_err());
            let mut buf = [0u8; 4];
            assert_eq!(a.read(&mut buf).await.unwrap(), 0);
        });
    }
}
