//! Reading a request head: idle waits without a buffer, the request timeout once a head
//! has started, the size limits, and parking an idle connection in the shard's lot.

use super::*;

/// Index just past the blank line ending a head (CRLFCRLF, or a bare-LF variant that the
/// parser will then refuse), scanning from `from`.
pub(super) fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        if buf[i] == b'\n' {
            match (buf.get(i + 1), buf.get(i + 2)) {
                (Some(b'\n'), _) => return Some(i + 2),
                (Some(b'\r'), Some(b'\n')) => return Some(i + 3),
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// Read buffer size of a virtual service's client connections.
pub(super) fn buf_size(vs: &VirtualService) -> usize {
    vs.limits.max_header_size.max(crate::shard::BUF_SIZE)
}

/// Wait for an idle client without holding a buffer: the read lands in the shard's scratch
/// space (borrowed only while polling, never across a wait) and is copied into pooled
/// storage once there is something to keep.
pub(super) async fn idle_read<S: AsyncRead + Unpin>(
    shard: &Shard,
    vs: &VirtualService,
    client: &mut S,
    buf: &mut Buf,
) -> io::Result<usize> {
    let n = std::future::poll_fn(|cx| {
        let mut scratch = shard.scratch.borrow_mut();
        std::pin::Pin::new(&mut *client).poll_read(cx, &mut scratch[..])
    })
    .await?;
    if n > 0 {
        if buf.is_detached() {
            buf.attach(shard.take_storage(buf_size(vs)));
        }
        let scratch = shard.scratch.borrow();
        let spare = buf.spare();
        let k = n.min(spare.len()).min(scratch.len());
        spare[..k].copy_from_slice(&scratch[..k]);
        buf.advance(k);
    }
    Ok(n)
}

/// How reading the next request head ended.
pub(super) enum HeadRead {
    /// A complete head is in the buffer.
    Ready,
    /// The connection ends: why (client, idle_timeout, shutdown, error).
    Closed(&'static str),
    Refuse(ProxyError),
    /// Nothing arrived between requests: the socket now wakes this place in the lot.
    Idle(Ticket),
}

/// How long a connection accepted just before shutdown may take to send its first request.
const FIRST_REQUEST_AT_SHUTDOWN: Duration = Duration::from_secs(2);

/// Wait for a complete request head in `buf`, honouring the idle timeout between requests,
/// the request timeout once a head has started, the head size limits and shard shutdown.
pub(super) async fn read_head<S: AsyncRead + Unpin>(
    shard: &Shard,
    vs: &VirtualService,
    client: &mut S,
    buf: &mut Buf,
    fresh: bool,
) -> HeadRead {
    let mut scanned = 0;
    let mut deadline: Option<Instant> = None;
    loop {
        if head_end(buf.filled(), scanned).is_some() {
            return HeadRead::Ready;
        }
        scanned = buf.len().saturating_sub(2);
        // Limits on a head still incomplete: 414 for the request line, else 431.
        if !buf.is_empty() {
            let line = buf
                .filled()
                .iter()
                .position(|&b| b == b'\n')
                .unwrap_or(buf.len());
            if line > vs.limits.max_request_line {
                return HeadRead::Refuse(ProxyError::client(414, "request line too long"));
            }
            if buf.len() >= vs.limits.max_header_size || buf.is_full() {
                return HeadRead::Refuse(ProxyError::client(431, "request head too large"));
            }
        }
        let read = if buf.is_empty() && shard.is_closing() {
            if !fresh {
                return HeadRead::Closed("shutdown");
            }
            // A new connection at shutdown (or an upgrade's hand-over) has its first request
            // on the way: closing it would fail that request. It is waited for (bounded),
            // served, and the connection closed after it.
            let d = *deadline.get_or_insert_with(|| Instant::now() + FIRST_REQUEST_AT_SHUTDOWN);
            if buf.is_detached() {
                buf.attach(shard.take_storage(buf_size(vs)));
            }
            match until(d, fill(client, buf)).await {
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    Err(io::ErrorKind::Interrupted.into())
                }
                r => r,
            }
        } else if buf.is_empty() {
            // Between requests. A client with its next request already there keeps its
            // buffers; one that goes idle gives them back to the shard's pool until it speaks.
            if buf.is_detached() {
                buf.attach(shard.take_storage(buf_size(vs)));
            }
            if let Some(r) = futures_lite::future::poll_once(fill(client, buf)).await {
                match r {
                    Ok(0) => return HeadRead::Closed("client"),
                    Ok(_) => continue,
                    Err(_) => return HeadRead::Closed("error"),
                }
            }
            if let Some(storage) = buf.detach() {
                shard.give_storage(storage);
            }
            // Ask once more, with the lot's waker: if nothing is there, the socket now wakes
            // the lot and the connection parks without a task.
            let ticket = shard.lot.reserve();
            let waker = ParkingLot::waker(ticket);
            let mut cx = Context::from_waker(&waker);
            let read = std::pin::pin!(idle_read(shard, vs, client, buf)).poll(&mut cx);
            match read {
                Poll::Pending => return HeadRead::Idle(ticket),
                Poll::Ready(r) => {
                    shard.lot.cancel(ticket);
                    r
                }
            }
        } else {
            let d = *deadline.get_or_insert_with(|| Instant::now() + vs.request_timeout);
            match until(d, fill(client, buf)).await {
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return HeadRead::Refuse(ProxyError::client(
                        408,
                        "request head not received in time",
                    ))
                }
                r => r,
            }
        };
        match read {
            Ok(0) => return HeadRead::Closed("client"),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return HeadRead::Closed("idle_timeout")
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                return HeadRead::Closed("shutdown")
            }
            Err(_) => return HeadRead::Closed("error"),
            Ok(_) => {
                if deadline.is_none() {
                    deadline = Some(Instant::now() + vs.request_timeout);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::head_end;

    #[test]
    fn finds_head_end() {
        assert_eq!(
            head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nBODY", 0),
            Some(27)
        );
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n", 0), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\n", 0), Some(24));
        let b = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(head_end(b, 23), Some(27));
    }
}
