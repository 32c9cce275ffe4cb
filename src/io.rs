//! Small I/O helpers shared by the data path: deadlines on any socket future, reading into a
//! `Buf`, and a lingering close so an error response is not destroyed by a reset.

use crate::http::Buf;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Future};
use glommio::timer::Timer;
use std::io;
use std::time::{Duration, Instant};

pub fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "timed out")
}

/// Run `fut`, failing with `TimedOut` after `dur`. Most socket operations complete at once;
/// the timer is armed only for one that has to wait.
pub async fn timeout<T>(dur: Duration, fut: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    let mut fut = std::pin::pin!(fut);
    if let Some(r) = futures_lite::future::poll_once(fut.as_mut()).await {
        return r;
    }
    futures_lite::future::or(fut, async {
        Timer::new(dur).await;
        Err(timed_out())
    })
    .await
}

/// Run `fut` unless `deadline` passes first.
pub async fn until<T>(
    deadline: Instant,
    fut: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(timed_out());
    }
    timeout(left, fut).await
}

/// Read once into the buffer's spare room; Ok(0) is EOF (or a full buffer).
pub async fn fill<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Buf) -> io::Result<usize> {
    let spare = buf.spare();
    if spare.is_empty() {
        return Ok(0);
    }
    let n = s.read(spare).await?;
    buf.advance(n);
    Ok(n)
}

/// Write all of `data`, each write taking some of it within `dur` (as nginx's send_timeout:
/// a slow reader that keeps reading is never cut, one that stops is).
pub async fn write_all<S: AsyncWrite + Unpin>(
    s: &mut S,
    mut data: &[u8],
    dur: Duration,
) -> io::Result<()> {
    while !data.is_empty() {
        let n = timeout(dur, s.write(data)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        data = &data[n..];
    }
    Ok(())
}

/// Send a final response, then half-close and drain what the peer still sends for a short
/// while: closing with unread input would reset the connection and could destroy the
/// response before the client reads it.
pub async fn respond_and_close<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, response: &[u8]) {
    if write_all(s, response, Duration::from_secs(5))
        .await
        .is_err()
    {
        return;
    }
    linger(s).await;
}

/// Close our side, then read and drop what the peer is still sending (bounded): closing with
/// unread data makes the kernel send a reset, which can destroy our last words in flight.
pub async fn linger<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    let _ = timeout(Duration::from_secs(1), s.close()).await;
    let deadline = Instant::now() + Duration::from_millis(500);
    // on the heap: this rare path must not grow every connection's task
    let mut scratch = vec![0u8; 4096];
    let mut drained = 0usize;
    while drained < 256 * 1024 {
        match until(deadline, s.read(&mut scratch)).await {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}
