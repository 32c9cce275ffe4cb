//! HTTP/2 on the client side (ALPN `h2` on TLS services, h2c by prior knowledge on plain
//! ones), with the `h2` crate over the shard's own stream (its I/O traits adapted in
//! `compat`; no tokio runtime runs). Here: the connection's loop (streams accepted, GOAWAY,
//! abuse cut); `stream`: one stream through the request path; `flood`: the frame meter.
//!
//! Each stream becomes one HTTP/1.1 request on an in-process link (`net::link`), served by the
//! very same request path as an HTTP/1.1 connection: routing, ESP, access lists and limits,
//! header rules, persistence, retries, timeouts and the logs never differ by protocol. This
//! side only translates: the request's pseudo-headers to a request line and Host, DATA to a
//! body (chunked when the client gave no length), and the HTTP/1.1 response back to HEADERS
//! and DATA under HTTP/2 flow control.

mod compat;
pub mod flood;
mod stream;

use compat::Compat;
use flood::{Abuse, Meter};
use stream::{link_facts, Link};

use crate::client::{Client, ClientStream, ConnFacts};
use crate::shard::Shard;
use bytes::Bytes;
use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Streams a client may have open at once (RFC 9113 suggests at least 100).
const MAX_STREAMS: u32 = 100;
/// Flow-control windows: a stream's, and the connection's (what a client may send unread).
const STREAM_WINDOW: u32 = 256 * 1024;
const CONN_WINDOW: u32 = 1024 * 1024;
/// Response bytes buffered per stream before waiting for the client's window.
const SEND_BUFFER: usize = 256 * 1024;
/// Client-reset streams on one connection from which, if they are most of its streams, the
/// connection is cut (ENHANCE_YOUR_CALM).
const RESET_ABUSE: u64 = 200;
/// How long streams in flight get to finish after an idle connection's GOAWAY.
const GOAWAY_GRACE: Duration = Duration::from_secs(10);

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
            if shard.current_generation() == shard.generation {
                return false;
            }
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
    let Some(fd) = crate::client::socket_fd(stream) else {
        return u32::MAX;
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
