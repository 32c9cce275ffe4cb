//! HTTP/2 on the client side (ALPN `h2` on TLS services), with the `h2` crate over the
//! shard's own TLS stream (its I/O traits adapted below; no tokio runtime runs).
//!
//! Each stream becomes one HTTP/1.1 request on an in-process link (`net::link`), served by the
//! very same request path as an HTTP/1.1 connection: routing, ESP, access lists and limits,
//! header rules, persistence, retries, timeouts and the logs never differ by protocol. This
//! side only translates: the request's pseudo-headers to a request line and Host, DATA to a
//! body (chunked when the client gave no length), and the HTTP/1.1 response back to HEADERS
//! and DATA under HTTP/2 flow control.

use super::h2flood::{Abuse, Meter};
use crate::client::{Client, ClientStream, ConnFacts};
use crate::http::chunked::ChunkedDecoder;
use crate::http::parse::{parse_response, Method as H1Method};
use crate::http::{BodyKind, Buf};
use crate::net::link;
use crate::shard::accept::ClientGuard;
use crate::shard::Shard;
use bytes::Bytes;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use std::cell::{Cell, RefCell};
use std::io;
use std::io::Write as _;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Streams a client may have open at once (RFC 9113 suggests at least 100).
const MAX_STREAMS: u32 = 100;
/// Flow-control windows: a stream's, and the connection's (what a client may send unread).
const STREAM_WINDOW: u32 = 256 * 1024;
const CONN_WINDOW: u32 = 1024 * 1024;
/// Response bytes buffered per stream before waiting for the client's window.
const SEND_BUFFER: usize = 256 * 1024;
/// Response head buffer (the request path's own head limits apply to requests).
const RESPONSE_BUF: usize = 32 * 1024;
/// Client-reset streams on one connection from which, if they are most of its streams, the
/// connection is cut (ENHANCE_YOUR_CALM).
const RESET_ABUSE: u64 = 200;
/// How long streams in flight get to finish after an idle connection's GOAWAY.
const GOAWAY_GRACE: Duration = Duration::from_secs(10);

/// rustls-over-glommio streams speak futures-io; the `h2` crate speaks tokio's I/O traits.
/// The bytes going by are shown to the flood meter. The stream is shared so that it outlives
/// the h2 connection for a lingering close.
///
/// Writes are gathered until the h2 layer flushes: it writes each frame header and payload
/// separately, and each write into the TLS stream would otherwise be a TLS record and a
/// send(2) of its own.
struct Compat {
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
    fn new(io: Rc<RefCell<ClientStream>>, meter: Rc<Meter>, read_before: Vec<u8>) -> Compat {
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

/// Serve an HTTP/2 connection: accept its streams until the client goes away, the connection
/// has been idle for the service's `idle_timeout`, or the shard stops (then GOAWAY, and the
/// streams in flight finish).
pub async fn serve(shard: Rc<Shard>, client: Client) {
    serve_after(shard, client, Vec::new()).await
}

/// `serve`, on a connection of which `read_before` was already read (h2c: the preface).
pub async fn serve_after(shard: Rc<Shard>, client: Client, read_before: Vec<u8>) {
    let Client {
        stream,
        mut facts,
        guard,
    } = client;
    let vs = &shard.config.services[facts.vs_idx];
    let (idle, head_limit) = (vs.idle_timeout, vs.limits.max_header_size);
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(MAX_STREAMS)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_send_buffer_size(SEND_BUFFER)
        .max_header_list_size(head_limit as u32);
    let meter = Rc::new(Meter::new());
    let io = Rc::new(RefCell::new(stream));
    if let Some(c) = shard.metrics.services.get(facts.vs_slot) {
        c.h2_connections.set(c.h2_connections.get() + 1);
    }
    let handshake = crate::io::timeout(vs.request_timeout, async {
        builder
            .handshake::<_, Bytes>(Compat::new(io.clone(), meter.clone(), read_before))
            .await
            .map_err(io::Error::other)
    });
    let mut conn = match handshake.await {
        Ok(c) => c,
        Err(_) => {
            crate::client::closed(&shard, &facts, "error");
            drop(guard);
            return;
        }
    };
    let active = Rc::new(Cell::new(0usize));
    let malformed_logged = Cell::new(0u32);
    let mut last_unsent = u32::MAX;
    let resets = Rc::new(Cell::new(0u64));
    let mut idle_since = Instant::now();
    // since when, and why, GOAWAY was sent
    let mut going_away: Option<(Instant, &'static str)> = None;
    let drain = shard.config.runtime.drain_timeout;
    let reason = loop {
        // once stopping, `closed()` stays ready: then only the timer paces this loop
        let stopping = shard.is_closing();
        let tick = async {
            if stopping || going_away.is_some() {
                glommio::timer::sleep(Duration::from_millis(500)).await;
            } else {
                futures_lite::future::or(
                    glommio::timer::sleep(Duration::from_millis(500)),
                    async { shard.closed().await },
                )
                .await;
            }
            None
        };
        let abuse = async {
            let a = std::future::poll_fn(|cx| meter.poll_tripped(cx)).await;
            Some(Err(a))
        };
        let next = futures_lite::future::or(
            async { Some(Ok(conn.accept().await)) },
            futures_lite::future::or(abuse, tick),
        )
        .await;
        match next {
            Some(Ok(Some(Ok((req, mut respond))))) => {
                facts.requests += 1;
                if active.get() >= MAX_STREAMS as usize {
                    // streams the client reset still hold their place until the request path
                    // lets go of them: no more than MAX_STREAMS at once, whatever it cancels
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                } else {
                    active.set(active.get() + 1);
                    let link = Link {
                        shard: shard.clone(),
                        facts: link_facts(&facts),
                        active: active.clone(),
                        resets: resets.clone(),
                    };
                    glommio::spawn_local(link.serve(req, respond)).detach();
                }
            }
            Some(Ok(Some(Err(e)))) => {
                shard.diag(
                    "HTTP/2 connection error",
                    || tracing::info!(client = %facts.peer, "HTTP/2 connection error: {e}"),
                );
                // the h2 layer found the client at fault and sent its GOAWAY itself
                if e.is_go_away() && !e.is_remote() {
                    let kind = match e.reason() {
                        Some(h2::Reason::ENHANCE_YOUR_CALM) => Some(meter.calm_cause()),
                        Some(h2::Reason::NO_ERROR) | None => None,
                        Some(_) => Some(Abuse::ProtocolError),
                    };
                    if let Some(kind) = kind {
                        record_abuse(&shard, &facts, kind);
                    }
                }
                break "error";
            }
            Some(Err(kind)) => {
                conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                // driven a little longer so that the GOAWAY goes out
                let _ = crate::io::timeout(Duration::from_secs(1), async {
                    while let Some(Ok((_, mut respond))) = conn.accept().await {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                    }
                    Ok(())
                })
                .await;
                record_abuse(&shard, &facts, kind);
                break "abuse";
            }
            Some(Ok(None)) => break going_away.map_or("client", |(_, why)| why),
            None => {}
        }
        record_malformed(&shard, &facts, &meter, &malformed_logged);
        // Rapid reset (CVE-2023-44487): streams opened and cancelled in bulk cost the request
        // path work each; a connection that cancels most of what it asks is cut.
        let r = resets.get();
        if r >= RESET_ABUSE && r * 2 >= facts.requests {
            meter.trip(Abuse::RapidReset);
            continue;
        }
        // a client that takes none of what is sent to it for client_write_timeout is cut,
        // as an HTTP/1.1 one is (its streams' windows may be open: it just does not read).
        // Taking some is the kernel's send queue shrinking: the socket says it is writable
        // again only once much of a large queue has gone.
        if meter.stalled_for().is_some() {
            let queued = unsent(&io.borrow());
            if queued < last_unsent {
                meter.writing(true);
                meter.writing(false);
            }
            last_unsent = queued;
        } else {
            last_unsent = u32::MAX;
        }
        if meter
            .stalled_for()
            .is_some_and(|d| d >= shard.config.services[facts.vs_idx].client_write_timeout)
        {
            break "write_timeout";
        }
        if active.get() > 0 {
            idle_since = Instant::now();
        }
        // a reload that took this service off its address: the streams in flight finish
        // under the configuration they came in with, and no new ones come
        let moved_away = || {
            let now = shard.current();
            !now.config.services.iter().any(|v| {
                v.slot == facts.vs_slot
                    && v.listen == facts.listen
                    && v.tls.is_some() == facts.tls.is_some()
                    && v.mode == crate::config::Mode::Http
            })
        };
        match going_away {
            None if shard.is_closing() || idle_since.elapsed() >= idle || moved_away() => {
                // GOAWAY: no new streams; those in flight finish, then accept() ends
                conn.graceful_shutdown();
                let why = if shard.is_closing() {
                    "shutdown"
                } else if idle_since.elapsed() >= idle {
                    "idle_timeout"
                } else {
                    "reload"
                };
                going_away = Some((Instant::now(), why));
            }
            // a client that never reads cannot take the GOAWAY: it does not hold the
            // connection beyond a grace (the drain's, when stopping)
            Some((t, why)) => {
                let grace = if shard.is_closing() {
                    drain.saturating_sub(Duration::from_millis(250))
                } else {
                    GOAWAY_GRACE
                };
                if t.elapsed() >= grace {
                    break if shard.is_closing() { "shutdown" } else { why };
                }
            }
            None => {}
        }
    };
    record_malformed(&shard, &facts, &meter, &malformed_logged);
    (facts.bytes_in, facts.bytes_out) = meter.bytes();
    if reason == "write_timeout" {
        // what it never read goes nowhere: a reset frees it at once
        drop(conn);
        if let Ok(io) = Rc::try_unwrap(io) {
            super::l4::reset_on_close(&io.into_inner());
        }
    } else if reason == "abuse" || reason == "error" {
        // frames still in flight from the client would turn our close into a reset that
        // overtakes the GOAWAY
        drop(conn);
        if let Ok(io) = Rc::try_unwrap(io) {
            crate::io::linger(&mut io.into_inner()).await;
        }
    }
    crate::client::closed(&shard, &facts, reason);
    drop(guard);
}

/// Bytes the kernel still holds to send on the client's socket (u32::MAX if unknown).
fn unsent(stream: &ClientStream) -> u32 {
    use std::os::unix::io::AsRawFd;
    let fd = match stream {
        ClientStream::Plain(s) => s.as_raw_fd(),
        ClientStream::Tls(t) => t.get_ref().0.as_raw_fd(),
        ClientStream::Link(_) => return u32::MAX,
    };
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) on our own socket writes one int we own.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) } == 0 {
        n as u32
    } else {
        u32::MAX
    }
}

/// An abusive connection: counted, and a security record.
fn record_abuse(shard: &Shard, facts: &ConnFacts, kind: Abuse) {
    if let Some(c) = shard.metrics.services.get(facts.vs_slot) {
        let n = &c.h2_abuse[kind.index()];
        n.set(n.get() + 1);
    }
    let vs = &shard.config.services[facts.vs_idx];
    if vs.logging.security {
        shard.log.security(&crate::log::SecurityRecord {
            client: facts.peer,
            service: &vs.name,
            event: kind.event(),
            reason: kind.reason(),
            status: None,
            host: None,
            path: None,
        });
    }
}

/// Malformed requests of one connection recorded one by one; beyond, only counted (a flood
/// of them is cut by the meter, with a record of its own).
const MALFORMED_RECORDS: u32 = 10;

/// Streams the h2 layer refused as malformed requests (they never became a request): counted,
/// and a security record each (the first few per connection), as the request path's own
/// refusals have.
fn record_malformed(shard: &Shard, facts: &ConnFacts, meter: &Meter, logged: &Cell<u32>) {
    let mut n = meter.take_malformed();
    if n == 0 {
        return;
    }
    if let Some(c) = shard.metrics.services.get(facts.vs_slot) {
        c.h2_malformed.set(c.h2_malformed.get() + n as u64);
    }
    n = n.min(MALFORMED_RECORDS.saturating_sub(logged.get()));
    logged.set(logged.get() + n);
    let vs = &shard.config.services[facts.vs_idx];
    if vs.logging.security {
        for _ in 0..n {
            shard.log.security(&crate::log::SecurityRecord {
                client: facts.peer,
                service: &vs.name,
                event: "h2_malformed_request",
                reason: "malformed HTTP/2 request (pseudo-headers, connection-specific or TE fields, field syntax): stream reset PROTOCOL_ERROR",
                status: None,
                host: None,
                path: None,
            });
        }
    }
}

/// A stream's link facts: the connection's client, service and TLS, as a connection of its
/// own that logs no connection record.
fn link_facts(f: &ConnFacts) -> ConnFacts {
    ConnFacts {
        vs_idx: f.vs_idx,
        vs_slot: f.vs_slot,
        origin: f.origin.clone(),
        listen: f.listen,
        peer: f.peer,
        proto: f.proto,
        sni: f.sni.clone(),
        tls: f.tls,
        opened: Instant::now(),
        requests: 0,
        bytes_in: 0,
        bytes_out: 0,
        real_server: u32::MAX,
        bridged: true,
    }
}

struct Link {
    shard: Rc<Shard>,
    facts: ConnFacts,
    active: Rc<Cell<usize>>,
    /// Streams of this connection the client reset before their answer.
    resets: Rc<Cell<u64>>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.active.set(self.active.get().saturating_sub(1));
    }
}

/// Header fields that describe one HTTP/1.1 connection, never forwarded across protocols.
fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "upgrade" | "te"
    )
}

impl Link {
    async fn serve(
        self,
        req: http::Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
    ) {
        let (parts, mut body) = req.into_parts();
        if parts.method == http::Method::CONNECT {
            let _ = respond.send_response(status_only(405), true);
            return;
        }
        // The request as HTTP/1.1: the request path judges it as it judges any other.
        let mut head = Vec::with_capacity(512);
        let target = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let _ = write!(head, "{} {target} HTTP/1.1\r\n", parts.method);
        if let Some(a) = parts.uri.authority() {
            let _ = write!(head, "Host: {a}\r\n");
        }
        let has_length = parts.headers.contains_key(http::header::CONTENT_LENGTH);
        // HTTP/2 may split Cookie into several fields; HTTP/1.1 wants one (RFC 9113 8.2.3)
        let mut cookies = parts.headers.get_all(http::header::COOKIE).iter();
        if let Some(first) = cookies.next() {
            head.extend_from_slice(b"Cookie: ");
            head.extend_from_slice(first.as_bytes());
            for c in cookies {
                head.extend_from_slice(b"; ");
                head.extend_from_slice(c.as_bytes());
            }
            head.extend_from_slice(b"\r\n");
        }
        for (name, value) in &parts.headers {
            let n = name.as_str();
            // a Host naming what :authority names is said once; one naming another entity
            // (RFC 9113 8.3.1) goes on as a second Host, which the request path refuses
            let same_host = |a: &http::uri::Authority| {
                a.as_str().as_bytes().eq_ignore_ascii_case(value.as_bytes())
            };
            if hop_by_hop(n)
                || n == "cookie"
                || (n == "host" && parts.uri.authority().is_some_and(same_host))
            {
                continue;
            }
            head.extend_from_slice(n.as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        let chunked = !body.is_end_stream() && !has_length;
        if chunked {
            head.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
        }
        head.extend_from_slice(b"Connection: close\r\n\r\n");
        let head_only = parts.method == http::Method::HEAD;

        let (mine, theirs) = link::pair();
        // each stream takes the configuration current when it starts (a reload since the
        // connection opened applies to its next streams, as to an HTTP/1.1 connection's)
        let shard = self.shard.current();
        let guard = ClientGuard::uncounted(&shard, self.facts.vs_slot, self.facts.peer.ip());
        let link = Client {
            stream: ClientStream::Link(theirs),
            facts: link_facts(&self.facts),
            guard,
        };
        crate::shard::accept::spawn_connection(
            self.facts.peer,
            Box::pin(super::serve(shard.clone(), link)),
        );

        let send = async {
            let mut w = &mine;
            if w.write_all(&head).await.is_err() {
                return;
            }
            while let Some(chunk) = body.data().await {
                let Ok(data) = chunk else { return };
                let n = data.len();
                let ok = if chunked {
                    let mut size = Vec::with_capacity(12);
                    let _ = write!(size, "{n:x}\r\n");
                    w.write_all(&size).await.is_ok()
                        && w.write_all(&data).await.is_ok()
                        && w.write_all(b"\r\n").await.is_ok()
                } else {
                    w.write_all(&data).await.is_ok()
                };
                if !ok {
                    return;
                }
                let _ = body.flow_control().release_capacity(n);
            }
            if chunked {
                let _ = w.write_all(b"0\r\n\r\n").await;
            }
        };
        // The request body may still be coming when the answer is complete (an early 413):
        // the answer decides when this stream is done.
        let send = async {
            send.await;
            std::future::pending::<Result<(), &'static str>>().await
        };
        let window_wait = self.shard.config.services[self.facts.vs_idx].client_write_timeout;
        let answer = relay_response(&mine, &mut respond, head_only, window_wait);
        match futures_lite::future::or(send, answer).await {
            Ok(()) => {}
            Err(CLIENT_RESET) => {
                self.resets.set(self.resets.get() + 1);
                // dropping our end tells the request path, which stops at once (its real
                // server's connection closed); the stream keeps its place until it has
                let watch = mine.watch();
                drop(mine);
                let _ = crate::io::timeout(Duration::from_secs(60), async {
                    watch.gone().await;
                    Ok(())
                })
                .await;
            }
            Err(why) => {
                shard.diag("HTTP/2 stream failed", || {
                    tracing::info!(client = %self.facts.peer, "HTTP/2 stream ended early: {why}")
                });
                respond.send_reset(h2::Reason::INTERNAL_ERROR);
            }
        }
    }
}

/// Why a stream ended: the client reset it.
const CLIENT_RESET: &str = "client reset the stream";

fn status_only(status: u16) -> http::Response<()> {
    let mut r = http::Response::new(());
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY);
    r
}

/// Read the request path's HTTP/1.1 answer from the link and send it as HEADERS and DATA.
async fn relay_response(
    link: &link::End,
    respond: &mut h2::server::SendResponse<Bytes>,
    head_only: bool,
    window_wait: Duration,
) -> Result<(), &'static str> {
    let mut r = link;
    let mut buf = Buf::new(RESPONSE_BUF);
    let (response, framing, head_len) = loop {
        if buf.is_full() {
            return Err("response head too large");
        }
        // waiting for the request path's answer, a client's reset of the stream ends it
        let spare = buf.spare();
        let n = futures_lite::future::or(
            async { r.read(spare).await.map_err(|_| "link read failed") },
            async {
                let _ = std::future::poll_fn(|cx| respond.poll_reset(cx)).await;
                Err(CLIENT_RESET)
            },
        )
        .await?;
        if n == 0 {
            return Err("no response");
        }
        buf.advance(n);
        let mut hdrs = [httparse::EMPTY_HEADER; crate::config::MAX_HEADERS_CEILING];
        let method = if head_only {
            H1Method::Head
        } else {
            H1Method::Get
        };
        match parse_response(buf.filled(), &mut hdrs, method, RESPONSE_BUF) {
            Ok(None) => continue,
            Err(e) => return Err(e),
            Ok(Some(p)) if p.info.status < 200 => {
                // 1xx (the path sends none here: no Expect is forwarded): skip it
                let n = p.info.head_len;
                buf.consume(n);
                continue;
            }
            Ok(Some(p)) => {
                let mut resp = http::Response::new(());
                *resp.status_mut() =
                    http::StatusCode::from_u16(p.info.status).map_err(|_| "invalid status code")?;
                for h in p.headers {
                    let lower = h.name.to_ascii_lowercase();
                    // a 204 has no content, whatever its real server said (RFC 9110 8.6):
                    // HTTP/2 clients refuse the stream otherwise
                    let no_content_length = p.info.status == 204 && lower == "content-length";
                    if hop_by_hop(&lower) || p.connection.lists(&lower) || no_content_length {
                        continue;
                    }
                    let (Ok(name), Ok(value)) = (
                        http::header::HeaderName::from_bytes(lower.as_bytes()),
                        http::header::HeaderValue::from_bytes(h.value),
                    ) else {
                        continue;
                    };
                    resp.headers_mut().append(name, value);
                }
                break (resp, p.info.body, p.info.head_len);
            }
        }
    };
    buf.consume(head_len);
    let no_body = head_only || matches!(framing, BodyKind::None) || framing == BodyKind::Length(0);
    let mut tx = respond
        .send_response(response, no_body)
        .map_err(|_| "client reset the stream")?;
    if no_body {
        return Ok(());
    }
    let mut left = match framing {
        BodyKind::Length(n) => Some(n),
        _ => None,
    };
    let mut chunks = matches!(framing, BodyKind::Chunked).then(ChunkedDecoder::new);
    // a chunked body's framing since its last data: at its end, the last chunk and trailers
    let mut tail: Vec<u8> = Vec::new();
    loop {
        // what is buffered first, then more from the link
        while !buf.is_empty() {
            let filled = buf.filled();
            let (data, used, done) = match &mut chunks {
                Some(d) => {
                    let s = d.step(filled).map_err(|_| "bad chunked response")?;
                    match s.data {
                        Some(_) => tail.clear(),
                        // bounded: the decoder refuses trailer sections over 8 KiB
                        None => tail.extend_from_slice(&filled[..s.consumed]),
                    }
                    let data = s.data.map(|(o, l)| &filled[o..o + l]).unwrap_or(&[]);
                    (data, s.consumed, s.done)
                }
                None => {
                    let n = left.map_or(filled.len(), |l| (l as usize).min(filled.len()));
                    (&filled[..n], n, left == Some(n as u64))
                }
            };
            if !data.is_empty() {
                send_data(&mut tx, data, window_wait).await?;
            }
            if let Some(l) = left.as_mut() {
                *l -= data.len() as u64;
            }
            buf.consume(used);
            if done {
                let trailers = chunks.is_some().then(|| trailer_fields(&tail)).flatten();
                return match trailers {
                    Some(t) => tx.send_trailers(t),
                    None => tx.send_data(Bytes::new(), true),
                }
                .map_err(|_| "client reset the stream");
            }
            if used == 0 {
                break;
            }
        }
        let n = r.read(buf.spare()).await.map_err(|_| "link read failed")?;
        if n == 0 {
            return match (left, &chunks) {
                // a body delimited by the close: it is complete
                (None, None) => tx
                    .send_data(Bytes::new(), true)
                    .map_err(|_| "client reset the stream"),
                _ => Err("response cut short"),
            };
        }
        buf.advance(n);
    }
}

/// The trailer fields at the end of a chunked body's framing (`\r\n0\r\nName: value\r\n\r\n`),
/// as HTTP/2 trailers; None when there are none. Fields that describe the framing or the
/// connection are not carried over.
fn trailer_fields(tail: &[u8]) -> Option<http::HeaderMap> {
    let mut lines = tail
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    // past the last chunk's size line (`0`, maybe with extensions)
    lines.find(|l| l.first() == Some(&b'0'))?;
    let mut map = http::HeaderMap::new();
    for line in lines.take_while(|l| !l.is_empty()) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = String::from_utf8_lossy(&line[..colon])
            .trim()
            .to_ascii_lowercase();
        if hop_by_hop(&name) || matches!(name.as_str(), "content-length" | "host" | "trailer") {
            continue;
        }
        let value = line[colon + 1..].trim_ascii();
        if let (Ok(n), Ok(v)) = (
            http::header::HeaderName::from_bytes(name.as_bytes()),
            http::header::HeaderValue::from_bytes(value),
        ) {
            map.append(n, v);
        }
    }
    (!map.is_empty()).then_some(map)
}

/// Send `data` within the client's flow-control window (waiting for it, bounded).
async fn send_data(
    tx: &mut h2::SendStream<Bytes>,
    mut data: &[u8],
    window_wait: Duration,
) -> Result<(), &'static str> {
    while !data.is_empty() {
        tx.reserve_capacity(data.len());
        let cap = crate::io::timeout(window_wait, async {
            Ok(std::future::poll_fn(|cx| tx.poll_capacity(cx)).await)
        })
        .await
        .map_err(|_| "client window stayed closed")?;
        let n = match cap {
            Some(Ok(n)) => n.min(data.len()),
            _ => return Err("client reset the stream"),
        };
        if n == 0 {
            continue;
        }
        tx.send_data(Bytes::copy_from_slice(&data[..n]), false)
            .map_err(|_| "client reset the stream")?;
        data = &data[n..];
    }
    Ok(())
}
