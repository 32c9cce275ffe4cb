//! The per-connection keep-alive loop: the request path, top to bottom.
//! read head → parse → pick real server → upstream checkout → send head and body →
//! read response head → send response head and body → pool the upstream → next request.

use crate::client::{Client, ClientStream, ConnFacts, ParkingLot, Ticket};
use crate::config::{
    ForwardedFor, LimitAction, PathNormalization, Persistence, Redirect, ServerId, VirtualService,
    MAX_HEADERS_CEILING,
};
use crate::error::{Fault, ProxyError};
use crate::http::canned::{error_response, CONTINUE_100};
use crate::http::parse::{parse_request, parse_response, ParsedRequest, Target};
use crate::http::write::{write_request_head, write_response_head, ClientFraming, Forwarded};
use crate::http::{BodyKind, Buf, RequestInfo, ResponseInfo};
use crate::io::{fill, respond_and_close, until, write_all};
use crate::log::{AccessRecord, SecurityRecord};
use crate::relay::{relay_body, tunnel, Bounds, RelayError};
use crate::shard::Shard;
use crate::upstream::{connect, ConnectError, UpstreamConn, UPSTREAM_BUF};
use futures_lite::{AsyncRead, AsyncWrite};
use std::future::Future;
use std::io;
use std::io::Write as _;
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Responses with a body this small go out in the same write as their head.
const COALESCE_BODY: usize = 16 * 1024;
/// How long a client that stopped reading may stall a write to it.
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Index just past the blank line ending a head (CRLFCRLF, or a bare-LF variant that the
/// parser will then refuse), scanning from `from`.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
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
fn buf_size(vs: &VirtualService) -> usize {
    vs.limits.max_header_size.max(crate::shard::BUF_SIZE)
}

/// Wait for an idle client without holding a buffer: the read lands in the shard's scratch
/// space (borrowed only while polling, never across a wait) and is copied into pooled
/// storage once there is something to keep.
async fn idle_read<S: AsyncRead + Unpin>(
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

/// A connection task's working memory: lent by the shard's pool for as long as the task
/// runs (a parked connection has none), so requests in steady state allocate nothing here.
#[derive(Default)]
pub struct Workspace {
    req_out: Vec<u8>,
    resp_out: Vec<u8>,
    /// A persistence cookie to set on the response, rebuilt per request when one is due.
    set_cookie: Vec<u8>,
    /// The normalised path, for ESP.
    path: Vec<u8>,
    /// The current request's host, method and path, for the logs.
    meta: Vec<u8>,
}

/// Workspace memory beyond this is not kept in the pool (one odd request must not pin it).
const WORKSPACE_KEEP: usize = 16 * 1024;

impl Workspace {
    /// Emptied for the next task, or None when it grew too large to keep.
    pub fn recycle(mut self) -> Option<Workspace> {
        let bufs = [
            &mut self.req_out,
            &mut self.resp_out,
            &mut self.set_cookie,
            &mut self.path,
            &mut self.meta,
        ];
        let held: usize = bufs.iter().map(|b| b.capacity()).sum();
        if held > WORKSPACE_KEEP {
            return None;
        }
        for b in bufs {
            b.clear();
        }
        Some(self)
    }
}

/// How reading the next request head ended.
enum HeadRead {
    /// A complete head is in the buffer.
    Ready,
    /// The connection ends: why (client, idle_timeout, shutdown, error).
    Closed(&'static str),
    Refuse(ProxyError),
    /// Nothing arrived between requests: the socket now wakes this place in the lot.
    Idle(Ticket),
}

/// Wait for a complete request head in `buf`, honouring the idle timeout between requests,
/// the request timeout once a head has started, the head size limits and shard shutdown.
async fn read_head<S: AsyncRead + Unpin>(
    shard: &Shard,
    vs: &VirtualService,
    client: &mut S,
    buf: &mut Buf,
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
        let read = if buf.is_empty() {
            if shard.is_closing() {
                return HeadRead::Closed("shutdown");
            }
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

/// One client connection's facts and counters, for the three logs and the metrics.
struct Conn<'a> {
    shard: &'a Shard,
    vs: &'a VirtualService,
    f: &'a mut ConnFacts,
    /// The current request: when its head was complete, and a copy of its host, method and
    /// path (the head buffer moves on before the request is logged).
    started: Instant,
    meta: Vec<u8>,
    meta_host: usize,
    meta_method: usize,
    sub_service: Option<usize>,
}

impl Conn<'_> {
    fn remember(&mut self, host: Option<&[u8]>, method: &[u8], target: &[u8]) {
        self.meta.clear();
        self.meta.extend_from_slice(host.unwrap_or(b""));
        self.meta_host = self.meta.len();
        self.meta.extend_from_slice(method);
        self.meta_method = self.meta.len();
        self.meta.extend_from_slice(target);
    }

    /// Forget the previous request (nothing known yet about the next one).
    fn forget(&mut self) {
        self.meta.clear();
        self.meta_host = 0;
        self.meta_method = 0;
        self.sub_service = None;
    }

    fn host(&self) -> &[u8] {
        self.meta.get(..self.meta_host).unwrap_or(b"")
    }

    fn method(&self) -> &[u8] {
        self.meta
            .get(self.meta_host..self.meta_method)
            .unwrap_or(b"")
    }

    fn path(&self) -> &[u8] {
        self.meta.get(self.meta_method..).unwrap_or(b"")
    }

    /// One request done: metrics and the user-access record.
    fn finish(&mut self, status: u16, server: Option<ServerId>, bytes_in: u64, bytes_out: u64) {
        self.f.requests += 1;
        self.f.bytes_in += bytes_in;
        self.f.bytes_out += bytes_out;
        let elapsed = self.started.elapsed();
        let m = &self.shard.metrics;
        m.request(
            self.f.vs_idx,
            server.map(|s| s.0),
            status,
            bytes_in,
            bytes_out,
            elapsed.as_micros() as u64,
        );
        if self.vs.logging.user_access {
            let sub = self
                .sub_service
                .and_then(|i| self.vs.sub_services.get(i))
                .map(|s| s.name.as_str());
            self.shard.log.access(&AccessRecord {
                client: self.f.peer,
                service: &self.vs.name,
                sub_service: sub,
                host: self.host(),
                method: self.method(),
                path: self.path(),
                status,
                bytes_in,
                bytes_out,
                real_server: server.map(|s| self.shard.server(s).name.as_str()),
                duration: elapsed,
                tls: self.f.tls,
            });
        }
    }
}

/// The one place a failure becomes a response to the client, a log line, a security record
/// (for refusals) and an access record.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    conn: &mut Conn<'_>,
    e: ProxyError,
    head_len: u64,
) {
    let vs = conn.vs;
    let server = e.server.map(|s| conn.shard.server(s).name.as_str());
    conn.shard.diag(e.reason, || match (e.fault, server) {
        (Fault::Client, _) => {
            tracing::info!(client = %conn.f.peer, service = %vs.name, status = e.status, "refused: {}", e.reason)
        }
        (_, Some(rs)) => {
            tracing::warn!(client = %conn.f.peer, service = %vs.name, real_server = rs, phase = e.phase.unwrap_or("-"), status = e.status, "failed: {}", e.reason)
        }
        (_, None) => {
            tracing::warn!(client = %conn.f.peer, service = %vs.name, status = e.status, "failed: {}", e.reason)
        }
    });
    if let (Some(event), true) = (e.event, vs.logging.security) {
        let has_meta = !conn.meta.is_empty();
        conn.shard.log.security(&SecurityRecord {
            client: conn.f.peer,
            service: &vs.name,
            event,
            reason: e.reason,
            status: Some(e.status),
            host: has_meta.then(|| conn.host()),
            path: has_meta.then(|| conn.path()),
        });
    }
    let resp = error_response(e.status);
    conn.finish(e.status, e.server, head_len, resp.len() as u64);
    respond_and_close(client, resp).await;
}

/// Serve a client connection's requests until it goes idle (then it is parked in the shard's
/// lot, with no task, until it speaks again) or ends (then it is closed gracefully: a TLS
/// close_notify, a FIN, the connection record).
pub async fn serve(shard: Rc<Shard>, client: Client) {
    let Client {
        mut stream,
        mut facts,
        guard,
    } = client;
    let vs = &shard.config.services[facts.vs_idx];
    let now = Instant::now();
    let sni = facts.sni.take();
    let mut ws = shard.take_workspace();
    let end = {
        let mut conn = Conn {
            shard: &shard,
            vs,
            f: &mut facts,
            started: now,
            meta: std::mem::take(&mut ws.meta),
            meta_host: 0,
            meta_method: 0,
            sub_service: None,
        };
        let end = serve_requests(&mut conn, &mut stream, sni.as_deref(), &mut ws).await;
        ws.meta = std::mem::take(&mut conn.meta);
        end
    };
    shard.give_workspace(ws);
    facts.sni = sni;
    let client = Client {
        stream,
        facts,
        guard,
    };
    match end {
        // the idle time counts from now, not from when this task began
        Ended::Idle(ticket) => {
            if let Some(client) = shard
                .lot
                .park(ticket, client, Instant::now() + vs.idle_timeout)
            {
                tracing::error!(client = %client.facts.peer, "parking lot place lost (bug): closing");
                crate::client::close(&shard, client, "error").await;
            }
        }
        Ended::Closed(reason) => crate::client::close(&shard, client, reason).await,
    }
}

/// How a connection's keep-alive loop ended.
enum Ended {
    /// Nothing to read: park it at this place (its socket will wake the lot).
    Idle(Ticket),
    /// Why the connection ends (client, idle_timeout, shutdown, error).
    Closed(&'static str),
}

/// The keep-alive loop; returns why the connection ends.
async fn serve_requests(
    conn: &mut Conn<'_>,
    client: &mut ClientStream,
    sni: Option<&str>,
    ws: &mut Workspace,
) -> Ended {
    let shard = conn.shard;
    let vs = conn.vs;
    let peer = conn.f.peer;
    let proto = conn.f.proto;
    let mut cbuf = Buf::detached();
    let ip = peer.ip().to_canonical();
    let fwd = Forwarded {
        client_ip: peer.ip(),
        proto,
        trusted: if vs.trusted_proxies.is_empty() {
            vs.forwarded_for == ForwardedFor::Append
        } else {
            vs.trusted_proxies.iter().any(|n| n.contains(&ip))
        },
        rfc7239: vs.forwarded_header,
    };
    loop {
        conn.forget();
        let head = read_head(shard, vs, client, &mut cbuf).await;
        let Workspace {
            req_out,
            resp_out,
            set_cookie,
            path: scratch,
            ..
        } = &mut *ws;
        match head {
            HeadRead::Ready => {}
            HeadRead::Closed(why) => return Ended::Closed(why),
            HeadRead::Idle(t) => return Ended::Idle(t),
            HeadRead::Refuse(e) => {
                conn.started = Instant::now();
                let n = cbuf.len() as u64;
                refuse(client, conn, e, n).await;
                return Ended::Closed("error");
            }
        }
        conn.started = Instant::now();
        if let Err((limit, action)) = shard.admit_request(conn.f.vs_idx, peer) {
            shard.limit_refused(conn.f.vs_idx, peer, limit);
            let status = match action {
                LimitAction::TooManyRequests => 429,
                LimitAction::Unavailable => 503,
                LimitAction::Drop => return Ended::Closed("error"),
            };
            let n = cbuf.len() as u64;
            refuse(client, conn, ProxyError::policy(status, limit.reason()), n).await;
            return Ended::Closed("error");
        }
        // Parse, choose the real server and write the upstream head while the head is
        // borrowed; nothing here awaits.
        let mut wait_deadline: Option<Instant> = None;
        let parsed = loop {
            let gen = shard.load.capacity_gen();
            let parsed: Result<Route, ProxyError> = (|| {
                let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS_CEILING];
                let req = match parse_request(
                    cbuf.filled(),
                    &mut hdrs[..vs.limits.max_headers],
                    &vs.limits,
                ) {
                    Ok(Some(r)) => r,
                    Ok(None) => return Err(ProxyError::client(400, "malformed request head")),
                    Err(e) => {
                        // The security log says what was refused: the request line's method
                        // and target as sent (bounded by max_request_line).
                        let line = cbuf.filled().split(|&b| b == b'\n').next().unwrap_or(b"");
                        let mut words = line.split(|&b| b == b' ');
                        let method = words.next().unwrap_or(b"");
                        let target = words.next().unwrap_or(b"");
                        conn.remember(None, method, target);
                        return Err(ProxyError::client(e.status, e.reason));
                    }
                };
                if let (BodyKind::Length(n), true) = (req.info.body, vs.max_body_size > 0) {
                    if n > vs.max_body_size {
                        return Err(ProxyError::client(413, "request body too large"));
                    }
                }
                if let Some(r) = vs.redirect {
                    resp_out.clear();
                    write_redirect(&req, r, resp_out)?;
                    return Ok(Route::Redirect(req.info));
                }
                let host = req.host.or(sni.map(str::as_bytes));
                let path = match req.target {
                    Target::Origin(p) => p,
                    Target::Asterisk => "*",
                };
                conn.remember(host, req.method.as_bytes(), path.as_bytes());
                // Routing, ESP and the real server all judge one path: the normalised one.
                let normal = crate::esp::normalise(path, scratch).map(|_| &scratch[..]);
                let by_path = vs.sub_services.iter().any(|s| !s.paths.is_empty());
                let route_path = match normal {
                    Ok(p) => p,
                    // Routing does not look at the path: ESP (if any) refuses it below.
                    Err(_) if !by_path => &b""[..],
                    Err(r) => return Err(esp_refusal(shard, conn.f.vs_idx, vs.esp.as_ref(), r)),
                };
                let own_empty = shard.config.pools[vs.pool].servers.is_empty();
                let (pool, sub) = route(vs, own_empty, host, route_path)
                    .ok_or(ProxyError::policy(404, "no sub-service matches"))?;
                conn.sub_service = sub;
                let sub = sub.map(|i| &vs.sub_services[i]);
                if let Some(acl) = sub.and_then(|s| s.access.as_ref()) {
                    if !acl.permits(peer.ip()) {
                        let c = &shard.metrics.services[conn.f.vs_idx].access_refusals;
                        c.set(c.get() + 1);
                        return Err(ProxyError::policy(403, "client address not allowed")
                            .with_event("access"));
                    }
                }
                // ESP: the sub-service's rules, else the service's.
                let esp = sub.and_then(|s| s.esp.as_ref()).or(vs.esp.as_ref());
                if let Some(esp) = esp {
                    if let Err(r) = crate::esp::check(esp, req.host, sni, normal) {
                        return Err(esp_refusal(shard, conn.f.vs_idx, Some(esp), r));
                    }
                }
                let raw_path = path.split('?').next().unwrap_or(path).as_bytes();
                let forward_path = match normal {
                    // normalisation changes letter case only in escapes' hex digits
                    Ok(p) if p.eq_ignore_ascii_case(raw_path) => None,
                    _ if vs.path_normalization == PathNormalization::Refuse => {
                        return Err(ProxyError::client(400, "path is not in normal form"))
                    }
                    Ok(p) => Some(p),
                    Err(_) => None,
                };
                let server = match choose(shard, pool, &req, peer, proto, set_cookie) {
                    Err(e) if e.status == 503 => {
                        let sched = &shard.schedulers[pool];
                        if sched.awaiting_ack(&shard.load) {
                            return Ok(Route::Wait(ACK_WAIT));
                        }
                        if !vs.queue_timeout.is_zero() && sched.any_usable(&shard.load) {
                            return Ok(Route::Wait(vs.queue_timeout));
                        }
                        return Err(e);
                    }
                    r => r?,
                };
                let rs = shard.server(server);
                req_out.clear();
                let default_host = write_request_head(
                    &req,
                    &fwd,
                    &rs.name,
                    req.info.expect_continue,
                    forward_path,
                    req_out,
                );
                Ok(Route::Forward(req.info, server, pool, default_host))
            })();
            if let Ok(Route::Wait(limit)) = parsed {
                let first = wait_deadline.is_none();
                let d = *wait_deadline.get_or_insert_with(|| Instant::now() + limit);
                if first && shard.queued.get() >= vs.queue_size {
                    break Err(ProxyError::policy(503, "connection limit queue is full"));
                }
                if Instant::now() < d {
                    // Wait for room: a release, a peer's snapshot or acknowledgement.
                    shard.queued.set(shard.queued.get() + 1);
                    let _ = until(d, async {
                        std::future::poll_fn(|cx| shard.load.poll_capacity(cx, gen)).await;
                        Ok(())
                    })
                    .await;
                    shard.queued.set(shard.queued.get() - 1);
                    continue;
                }
                break Err(ProxyError::policy(
                    503,
                    "every real server is at its connection limit",
                ));
            }
            break parsed;
        };
        let (info, server, retry) = match parsed {
            Ok(Route::Forward(info, server, pool, default_host)) => (
                info,
                server,
                Retry {
                    pool,
                    peer,
                    proto,
                    deadline: conn.started + vs.response_timeout,
                    default_host,
                },
            ),
            Ok(Route::Redirect(info)) => {
                // A request body is not read: the connection closes after the redirect.
                let keep = info.keep_alive && info.body == BodyKind::None && !shard.is_closing();
                if !keep {
                    resp_out.extend_from_slice(b"Connection: close\r\n");
                }
                resp_out.extend_from_slice(b"\r\n");
                cbuf.consume(info.head_len);
                let ok = write_all(client, resp_out, CLIENT_WRITE_TIMEOUT)
                    .await
                    .is_ok();
                let status = vs.redirect.map(|r| r.status).unwrap_or(301);
                conn.finish(status, None, info.head_len as u64, resp_out.len() as u64);
                if !ok {
                    return Ended::Closed("error");
                }
                if !keep {
                    return Ended::Closed("client");
                }
                continue;
            }
            Ok(Route::Wait(_)) => continue,
            Err(e) => {
                let n = cbuf.len() as u64;
                refuse(client, conn, e, n).await;
                return Ended::Closed("error");
            }
        };
        cbuf.consume(info.head_len);
        // The exchange's state is only needed while a request is in flight: boxed, it does not
        // weigh on every idle connection's task.
        match Box::pin(exchange(
            shard, vs, client, &mut cbuf, req_out, resp_out, set_cookie, info, server, retry,
        ))
        .await
        {
            Ok((done, server)) => {
                conn.finish(
                    done.status,
                    Some(server),
                    info.head_len as u64 + done.body_in,
                    done.bytes_out,
                );
                if !done.keep {
                    return Ended::Closed(if shard.is_closing() {
                        "shutdown"
                    } else {
                        "client"
                    });
                }
            }
            Err(e) => {
                refuse(client, conn, e, info.head_len as u64).await;
                return Ended::Closed("error");
            }
        }
    }
}

/// An ESP refusal, counted; without ESP rules, a path that cannot be normalised is a 400.
fn esp_refusal(
    shard: &Shard,
    vs_idx: usize,
    esp: Option<&crate::config::Esp>,
    r: crate::esp::Refusal,
) -> ProxyError {
    let Some(esp) = esp else {
        return ProxyError::client(400, r.reason());
    };
    let i = crate::esp::Refusal::ALL
        .iter()
        .position(|x| *x == r)
        .unwrap_or(0);
    let c = &shard.metrics.services[vs_idx].esp_refusals[i];
    c.set(c.get() + 1);
    let event = match r {
        crate::esp::Refusal::Host | crate::esp::Refusal::HostSniMismatch => "esp_host",
        _ => "esp_directory",
    };
    ProxyError::policy(esp.refusal_status, r.reason()).with_event(event)
}

/// The pool a request goes to: the first sub-service whose hosts (Host, else SNI; no port,
/// any case) and path prefixes match, else the service's own real servers. None: no pool
/// (a service with sub-services and no real servers of its own).
fn route(
    vs: &VirtualService,
    own_pool_empty: bool,
    host: Option<&[u8]>,
    path: &[u8],
) -> Option<(usize, Option<usize>)> {
    // As ESP and web servers read it: no port, no trailing dot, any case.
    let host = host.map(|h| {
        let h = crate::esp::host_only(h);
        h.strip_suffix(b".").unwrap_or(h)
    });
    let host_matches = |patterns: &[String]| {
        patterns.is_empty()
            || host.is_some_and(|h| {
                patterns.iter().any(|p| match p.strip_prefix("*.") {
                    Some(domain) => {
                        h.len() > domain.len() + 1
                            && h[h.len() - domain.len()..].eq_ignore_ascii_case(domain.as_bytes())
                            && h[h.len() - domain.len() - 1] == b'.'
                    }
                    None => h.eq_ignore_ascii_case(p.as_bytes()),
                })
            })
    };
    for (i, sub) in vs.sub_services.iter().enumerate() {
        // Any case, as IIS (and ESP's globs) read paths: /ADMIN is /admin.
        let path_ok = sub.paths.is_empty()
            || sub.paths.iter().any(|p| {
                path.len() >= p.len() && path[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            });
        if path_ok && host_matches(&sub.hosts) {
            return Some((sub.pool, Some(i)));
        }
    }
    if vs.sub_services.is_empty() || !own_pool_empty {
        Some((vs.pool, None))
    } else {
        None
    }
}

/// Pick the real server in `pool` for this request, honouring persistence, and prepare the
/// persistence cookie (sliding) for the response.
fn choose(
    shard: &Shard,
    pool_idx: usize,
    req: &ParsedRequest<'_, '_>,
    peer: SocketAddr,
    proto: &str,
    set_cookie: &mut Vec<u8>,
) -> Result<ServerId, ProxyError> {
    let pool = &shard.config.pools[pool_idx];
    let sched = &shard.schedulers[pool_idx];
    let persisted = match &pool.persistence {
        Persistence::None => None,
        Persistence::ActiveCookie { cookie, .. } => find_cookie(req, cookie).and_then(|v| {
            let address_of = |i: usize| {
                pool.servers
                    .get(i)
                    .map(|id| shard.server(*id).name.as_str())
            };
            shard
                .cookies
                .verify(&pool.name, v, unix_now(), address_of)
                .map(|i| pool.servers[i])
        }),
        Persistence::SourceIp { .. } => shard.source_tables[pool_idx]
            .as_ref()
            .and_then(|t| t.borrow().get(peer.ip(), Instant::now())),
    };
    // A persisted server that is down, in maintenance or at its limit is replaced (and
    // re-persisted). A new source-IP client's server comes from the rendezvous hash of its
    // address: the same on every shard and appliance.
    let server = match persisted {
        Some(id) if sched.accepts(id, &shard.load) => id,
        _ => pick_new(shard, pool_idx, peer, &[])
            .ok_or(ProxyError::policy(503, "no real server available"))?,
    };
    persist(shard, pool_idx, server, peer, proto, set_cookie);
    Ok(server)
}

/// A server for a client with no (usable) persisted one: by the pool's method, or, with
/// source-IP persistence, by the rendezvous hash of the client's address.
fn pick_new(
    shard: &Shard,
    pool_idx: usize,
    peer: SocketAddr,
    exclude: &[ServerId],
) -> Option<ServerId> {
    let sched = &shard.schedulers[pool_idx];
    match shard.config.pools[pool_idx].persistence {
        Persistence::SourceIp { .. } => {
            sched.pick_hashed(&shard.load, crate::balance::client_key(peer.ip()), exclude)
        }
        _ => sched.pick(&shard.load, exclude, Instant::now()),
    }
}

/// Record `server` as this client's choice in `pool_idx`: the cookie to set on the response
/// (rewritten in `set_cookie`), or the source-IP table entry.
fn persist(
    shard: &Shard,
    pool_idx: usize,
    server: ServerId,
    peer: SocketAddr,
    proto: &str,
    set_cookie: &mut Vec<u8>,
) {
    let pool = &shard.config.pools[pool_idx];
    set_cookie.clear();
    match &pool.persistence {
        Persistence::None => {}
        Persistence::ActiveCookie { cookie, timeout } => {
            let index = pool
                .servers
                .iter()
                .position(|&id| id == server)
                .unwrap_or(0);
            let value = shard.cookies.issue(
                &pool.name,
                &shard.server(server).name,
                index,
                unix_now() + timeout.as_secs(),
            );
            let _ = write!(set_cookie, "Set-Cookie: {cookie}={value}; Path=/; HttpOnly");
            if proto == "https" {
                set_cookie.extend_from_slice(b"; Secure");
            }
            set_cookie.extend_from_slice(b"\r\n");
        }
        Persistence::SourceIp { timeout, .. } => {
            if let Some(t) = &shard.source_tables[pool_idx] {
                t.borrow_mut()
                    .put(peer.ip(), server, Instant::now(), *timeout);
            }
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The value of cookie `name` in the request's Cookie fields.
fn find_cookie<'b>(req: &ParsedRequest<'_, 'b>, name: &str) -> Option<&'b str> {
    for h in req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
    {
        let v = std::str::from_utf8(h.value).ok()?;
        for pair in v.split(';') {
            if let Some((k, val)) = pair.trim().split_once('=') {
                if k == name {
                    return Some(val.trim_matches('"'));
                }
            }
        }
    }
    None
}

/// Where a parsed request goes.
enum Route {
    /// To this real server of this pool; the range is the Host value naming the server in
    /// the upstream head, if the client sent none.
    Forward(RequestInfo, ServerId, usize, Option<std::ops::Range<usize>>),
    Redirect(RequestInfo),
    /// Every candidate is at its connection limit (or held back by an admission awaiting the
    /// peers' acknowledgement): wait up to this long for room.
    Wait(Duration),
}

/// How long a request may wait for connection-limit acknowledgements before 503.
const ACK_WAIT: Duration = Duration::from_millis(100);

/// The head of a redirect to the same URL over HTTPS, without its final CRLF.
fn write_redirect(
    req: &ParsedRequest<'_, '_>,
    r: Redirect,
    out: &mut Vec<u8>,
) -> Result<(), ProxyError> {
    let host = req
        .host
        .ok_or(ProxyError::client(400, "no Host to redirect to"))?;
    // Drop any port: the HTTPS URL names its own.
    let host = if host.starts_with(b"[") {
        match host.iter().position(|&b| b == b']') {
            Some(i) => &host[..=i],
            None => return Err(ProxyError::client(400, "invalid Host")),
        }
    } else {
        host.split(|&b| b == b':').next().unwrap_or(host)
    };
    let reason = match r.status {
        301 => "Moved Permanently",
        302 => "Found",
        307 => "Temporary Redirect",
        _ => "Permanent Redirect",
    };
    let _ = write!(out, "HTTP/1.1 {} {reason}\r\nLocation: https://", r.status);
    out.extend_from_slice(host);
    if r.https_port != 443 {
        let _ = write!(out, ":{}", r.https_port);
    }
    match req.target {
        Target::Origin(p) => out.extend_from_slice(p.as_bytes()),
        Target::Asterisk => out.push(b'/'),
    }
    out.extend_from_slice(b"\r\nContent-Length: 0\r\n");
    Ok(())
}

/// How an exchange with a real server failed before the client saw any response byte.
enum Attempt {
    /// The connection closed or was reset before any response byte: a reused pooled one may
    /// be retried on a fresh connection, an idempotent request without a body on another
    /// server. `sent`: the request had been written whole (the server may have acted on it).
    Retry {
        sent: bool,
    },
    Fail(ProxyError),
}

/// What a request may be sent again with: the pool to choose another real server from, the
/// client (for persistence) and the time by which any retry must have started.
struct Retry {
    pool: usize,
    peer: SocketAddr,
    proto: &'static str,
    deadline: Instant,
    /// Where the upstream head carries the chosen server's name as its Host (an HTTP/1.0
    /// request without one): rewritten when another server is chosen.
    default_host: Option<std::ops::Range<usize>>,
}

/// Servers tried for one request, at most `retries` + 1 (config caps retries at 10).
struct Tried {
    ids: [ServerId; 11],
    len: usize,
}

impl Tried {
    fn new(first: ServerId) -> Tried {
        let mut ids = [ServerId(usize::MAX); 11];
        ids[0] = first;
        Tried { ids, len: 1 }
    }
    fn as_slice(&self) -> &[ServerId] {
        &self.ids[..self.len]
    }
}

/// After `failed` failed before sending anything the client could see: the next real server to
/// try (never one tried before), re-persisted, or None when the retries or the time are spent.
#[allow(clippy::too_many_arguments)]
fn next_server(
    shard: &Shard,
    vs: &VirtualService,
    retry: &mut Retry,
    tried: &mut Tried,
    failed: ServerId,
    req_out: &mut Vec<u8>,
    set_cookie: &mut Vec<u8>,
) -> Option<ServerId> {
    let now = Instant::now();
    if tried.len > vs.retries as usize || tried.len >= tried.ids.len() || now >= retry.deadline {
        return None;
    }
    let next = pick_new(shard, retry.pool, retry.peer, tried.as_slice())?;
    tried.ids[tried.len] = next;
    tried.len += 1;
    let c = &shard.metrics.servers[failed.0].retries;
    c.set(c.get() + 1);
    persist(shard, retry.pool, next, retry.peer, retry.proto, set_cookie);
    if let Some(r) = retry.default_host.clone() {
        let name = shard.server(next).name.as_bytes();
        req_out.splice(r.clone(), name.iter().copied());
        retry.default_host = Some(r.start..r.start + name.len());
    }
    Some(next)
}

/// The response a failed connect stands for.
fn connect_error(shard: &Shard, rs: &crate::config::RealServer, e: ConnectError) -> ProxyError {
    match e {
        ConnectError::TimedOut => {
            ProxyError::upstream(504, "real server connect timed out").in_phase("connect")
        }
        ConnectError::Refused(_) => {
            ProxyError::upstream(502, "real server refused the connection").in_phase("connect")
        }
        ConnectError::Tls(e) => {
            shard.diag("re-encryption to real server failed", || {
                tracing::warn!(real_server = %rs.name, "re-encryption to real server failed: {e}")
            });
            ProxyError::upstream(502, "real server certificate or TLS handshake failed")
                .in_phase("tls")
                .with_event("upstream_certificate")
        }
    }
}

/// Send one request upstream and relay its response; returns how it ended and the real server
/// that answered. A connect failure (nothing sent) moves the request to another real server,
/// up to the service's `retries`; so does a connection closed before any response byte for an
/// idempotent request without a body (a reused pooled connection first gets one fresh try on
/// the same server). An Err means the client has seen nothing yet and gets an error response.
#[allow(clippy::too_many_arguments)]
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    shard: &Shard,
    vs: &VirtualService,
    client: &mut S,
    cbuf: &mut Buf,
    req_out: &mut Vec<u8>,
    resp_out: &mut Vec<u8>,
    set_cookie: &mut Vec<u8>,
    info: RequestInfo,
    first: ServerId,
    mut retry: Retry,
) -> Result<(Done, ServerId), ProxyError> {
    // Only a request we can send again byte for byte, and may, is retried once sent.
    let replayable = info.body == BodyKind::None && info.method.is_idempotent() && !info.upgrade;
    let mut sent_continue = false;
    let mut fresh_only = false;
    let mut server = first;
    let mut tried = Tried::new(first);
    let mut resent = false;
    loop {
        let rs = shard.server(server);
        let _lease = shard.load.lease(server, rs.connection_limit);
        let pooled = if fresh_only {
            None
        } else {
            shard.pools.checkout(server, vs.pool_idle_timeout)
        };
        let mut up = match pooled {
            Some(c) => c,
            None => {
                let budget = retry
                    .deadline
                    .saturating_duration_since(Instant::now())
                    .min(vs.connect_timeout)
                    .max(Duration::from_millis(1));
                match connect(server, rs.address, budget, shard.upstream_tls(server)).await {
                    Ok(c) => c,
                    Err(e) => {
                        let c = &shard.metrics.servers[server.0].connect_errors;
                        c.set(c.get() + 1);
                        shard.upstream_failed(server);
                        let err = connect_error(shard, rs, e).at(server);
                        match next_server(
                            shard, vs, &mut retry, &mut tried, server, req_out, set_cookie,
                        ) {
                            Some(next) => {
                                shard.diag(err.reason, || {
                                    tracing::warn!(service = %vs.name, real_server = %rs.name, "{}: retrying on {}", err.reason, shard.server(next).name)
                                });
                                server = next;
                                fresh_only = false;
                                continue;
                            }
                            None => return Err(err),
                        }
                    }
                }
            }
        };
        if info.expect_continue && !sent_continue {
            // We stand in for the real server's 100 Continue (Expect is not forwarded).
            if write_all(client, CONTINUE_100, CLIENT_WRITE_TIMEOUT)
                .await
                .is_err()
            {
                return Ok((
                    Done {
                        keep: false,
                        status: 100,
                        bytes_out: 0,
                        body_in: 0,
                    },
                    server,
                ));
            }
            sent_continue = true;
        }
        let head = ClientHead {
            out: &mut *resp_out,
            set_cookie: &set_cookie[..],
            shard,
        };
        match send_and_receive(vs, client, cbuf, &mut up, req_out, info, head).await {
            Ok((resp, framing, body_in)) => {
                shard.upstream_ok(server);
                let mut done = respond(shard, vs, client, cbuf, up, resp_out, info, resp, framing)
                    .await
                    .map_err(|e| e.at(server))?;
                done.body_in += body_in;
                return Ok((done, server));
            }
            Err(Attempt::Retry { .. }) if replayable && up.reused => {
                // A pooled connection the server had closed: not the server's failure.
                fresh_only = true;
                continue;
            }
            Err(Attempt::Retry { sent }) => {
                let err =
                    ProxyError::upstream(502, "real server closed the connection before answering")
                        .in_phase("response_head")
                        .at(server);
                if up.reused {
                    return Err(err);
                }
                if !sent {
                    // reset while taking the request: the server is failing. A server that
                    // read it and closed is not counted: one "query of death" sent to every
                    // server in turn must not take the whole pool out.
                    shard.upstream_failed(server);
                }
                // After the request was sent, one other server at most is tried.
                if !replayable || (sent && std::mem::replace(&mut resent, true)) {
                    return Err(err);
                }
                match next_server(
                    shard, vs, &mut retry, &mut tried, server, req_out, set_cookie,
                ) {
                    Some(next) => {
                        server = next;
                        fresh_only = false;
                        continue;
                    }
                    None => return Err(err),
                }
            }
            Err(Attempt::Fail(e)) => return Err(e.at(server)),
        }
    }
}

/// Write the request head and body upstream, then read the response head (skipping 1xx
/// interim responses). On success the response head is parsed and `resp` describes it; the
/// head bytes are still at the front of `up.buf`.
async fn send_and_receive<S: AsyncRead + AsyncWrite + Unpin>(
    vs: &VirtualService,
    client: &mut S,
    cbuf: &mut Buf,
    up: &mut UpstreamConn,
    req_out: &[u8],
    info: RequestInfo,
    head: ClientHead<'_>,
) -> Result<(ResponseInfo, ClientFraming, u64), Attempt> {
    let upstream_gone = |e: &io::Error| {
        matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof
        )
    };
    let body_in;
    if let Err(e) = write_all(&mut up.stream, req_out, vs.response_timeout).await {
        return Err(if upstream_gone(&e) {
            Attempt::Retry { sent: false }
        } else {
            Attempt::Fail(
                ProxyError::upstream(502, "writing the request to the real server failed")
                    .in_phase("send"),
            )
        });
    }
    match relay_body(
        client,
        cbuf,
        &mut up.stream,
        info.body,
        false,
        Bounds {
            read_timeout: vs.client_body_timeout,
            write_timeout: vs.response_timeout,
            max: vs.max_body_size,
        },
    )
    .await
    {
        Ok(n) => body_in = n,
        Err(RelayError::TooLarge) => {
            return Err(Attempt::Fail(ProxyError::client(
                413,
                "request body too large",
            )))
        }
        Err(RelayError::Source(e)) if e.kind() == io::ErrorKind::TimedOut => {
            return Err(Attempt::Fail(ProxyError::client(
                408,
                "request body not received in time",
            )))
        }
        Err(RelayError::Source(_)) => {
            return Err(Attempt::Fail(ProxyError::client(
                400,
                "request body ended early",
            )))
        }
        Err(RelayError::Framing(c)) => {
            return Err(Attempt::Fail(ProxyError::client(400, c.reason())))
        }
        Err(RelayError::Sink(_)) => {
            return Err(Attempt::Fail(
                ProxyError::upstream(502, "real server stopped reading the request body")
                    .in_phase("send"),
            ))
        }
    }
    let deadline = Instant::now() + vs.response_timeout;
    let mut scanned = 0;
    loop {
        if let Some(_end) = head_end(up.buf.filled(), scanned) {
            let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS_CEILING];
            let parsed =
                match parse_response(up.buf.filled(), &mut hdrs, info.method, up.buf.capacity()) {
                    Ok(Some(r)) => r,
                    Ok(None) => {
                        return Err(Attempt::Fail(
                            ProxyError::upstream(502, "malformed response head")
                                .in_phase("response_head"),
                        ))
                    }
                    Err(reason) => {
                        return Err(Attempt::Fail(
                            ProxyError::upstream(502, reason).in_phase("response_head"),
                        ))
                    }
                };
            let resp = parsed.info;
            if resp.status >= 100 && resp.status < 200 && resp.status != 101 {
                // Interim responses: ours already stood in for 100; others need HTTP/1.1.
                // They are dropped rather than forwarded: clients must tolerate either.
                up.buf.consume(resp.head_len);
                scanned = 0;
                continue;
            }
            // Write the client's head from this one parse (the head is not parsed again).
            let framing = client_framing(info, resp, head.shard.is_closing());
            head.out.clear();
            write_response_head(&parsed, framing, head.set_cookie, head.out);
            return Ok((resp, framing, body_in));
        }
        scanned = up.buf.len().saturating_sub(2);
        if up.buf.is_full() {
            return Err(Attempt::Fail(
                ProxyError::upstream(502, "response head too large").in_phase("response_head"),
            ));
        }
        match until(deadline, fill(&mut up.stream, &mut up.buf)).await {
            Ok(0) if up.buf.is_empty() => return Err(Attempt::Retry { sent: true }),
            Ok(0) => {
                return Err(Attempt::Fail(
                    ProxyError::upstream(502, "real server closed mid response head")
                        .in_phase("response_head"),
                ))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(Attempt::Fail(
                    ProxyError::upstream(504, "real server did not answer in time")
                        .in_phase("response_head"),
                ))
            }
            Err(e) if up.buf.is_empty() && (e.kind() == io::ErrorKind::ConnectionReset) => {
                return Err(Attempt::Retry { sent: true })
            }
            Err(_) => {
                return Err(Attempt::Fail(
                    ProxyError::upstream(502, "reading the response failed")
                        .in_phase("response_head"),
                ))
            }
        }
    }
}

/// Relay the response whose head is at the front of `up.buf` to the client.
#[allow(clippy::too_many_arguments)]
async fn respond<S: AsyncRead + AsyncWrite + Unpin>(
    shard: &Shard,
    vs: &VirtualService,
    client: &mut S,
    cbuf: &mut Buf,
    mut up: UpstreamConn,
    resp_out: &mut Vec<u8>,
    info: RequestInfo,
    resp: ResponseInfo,
    framing: ClientFraming,
) -> Result<Done, ProxyError> {
    if resp.status == 101 && !info.upgrade {
        return Err(ProxyError::upstream(
            502,
            "101 Switching Protocols to a request that asked for no upgrade",
        )
        .in_phase("response_head"));
    }
    let ClientFraming {
        keep_alive,
        dechunk,
        ..
    } = framing;
    // resp_out already holds the client's head (written by send_and_receive).
    up.buf.consume(resp.head_len);
    // A small body already read goes out with the head in one write.
    let mut body = resp.body;
    if let BodyKind::Length(n) = body {
        if n as usize <= COALESCE_BODY && up.buf.len() as u64 >= n {
            resp_out.extend_from_slice(&up.buf.filled()[..n as usize]);
            up.buf.consume(n as usize);
            body = BodyKind::None;
        }
    }
    let mut done = Done {
        keep: false,
        status: resp.status,
        bytes_out: resp_out.len() as u64,
        body_in: 0,
    };
    if write_all(client, resp_out, CLIENT_WRITE_TIMEOUT)
        .await
        .is_err()
    {
        return Ok(done);
    }
    if resp.status == 101 {
        let (up_bytes, down_bytes) = tunnel(
            client,
            cbuf,
            &mut up.stream,
            &mut up.buf,
            vs.tunnel_idle_timeout,
        )
        .await;
        done.body_in += up_bytes;
        done.bytes_out += down_bytes;
        return Ok(done);
    }
    // A large response streams through a bulk buffer lent by the shard; the connection
    // gets its own buffer back (with any bytes beyond the body) when it is done.
    let large = match body {
        BodyKind::Length(n) => n > 4 * UPSTREAM_BUF as u64,
        BodyKind::CloseDelimited => true,
        _ => false,
    };
    let own = if large {
        shard.take_bulk().and_then(|b| match up.buf.exchange(b) {
            Ok(own) => Some(own),
            Err(b) => {
                shard.give_bulk(b);
                None
            }
        })
    } else {
        None
    };
    let relayed = relay_body(
        &mut up.stream,
        &mut up.buf,
        client,
        body,
        dechunk,
        Bounds {
            read_timeout: vs.upstream_body_timeout,
            write_timeout: CLIENT_WRITE_TIMEOUT,
            max: 0,
        },
    )
    .await;
    let mut in_step = true;
    if let Some(own) = own {
        match up.buf.exchange(own) {
            Ok(bulk) => shard.give_bulk(bulk),
            Err(_) => {
                // More bytes beyond the body than the connection's buffer holds: it is out
                // of step and must not be pooled.
                in_step = false;
                up.buf.clear();
                if let Some(bulk) = up.buf.detach() {
                    shard.give_bulk(bulk);
                }
            }
        }
    }
    match relayed {
        Ok(n) => done.bytes_out += n,
        Err(e) => {
            // The client has a partial response: all we can do is close (the truncation
            // tells it). The upstream connection is dropped, never pooled.
            shard.diag(
                "response relay failed",
                || tracing::warn!(service = %vs.name, "response relay failed: {e:?}"),
            );
            return Ok(done);
        }
    }
    if in_step && resp.reusable && !shard.is_closing() {
        shard.pools.checkin(up, vs.pool_size);
    }
    done.keep = keep_alive;
    Ok(done)
}

/// Where send_and_receive writes the client's response head.
struct ClientHead<'a> {
    out: &'a mut Vec<u8>,
    set_cookie: &'a [u8],
    /// Asked when the head is written: a shutdown meanwhile ends keep-alive.
    shard: &'a Shard,
}

/// How a response is framed for this client: kept alive or closed, de-chunked for HTTP/1.0.
fn client_framing(info: RequestInfo, resp: ResponseInfo, closing: bool) -> ClientFraming {
    let dechunk = resp.body == BodyKind::Chunked && info.minor == 0;
    let keep_alive = info.keep_alive
        && resp.status != 101
        && resp.body != BodyKind::CloseDelimited
        && !dechunk
        && !closing;
    ClientFraming {
        keep_alive,
        client_minor: info.minor,
        dechunk,
        interim: false,
    }
}

/// How a forwarded request ended (the client saw a response, whole or not).
#[derive(Debug, Clone, Copy)]
pub struct Done {
    /// The client connection stays open.
    keep: bool,
    status: u16,
    /// Bytes written to the client.
    bytes_out: u64,
    /// Request body bytes read from the client (and tunnel bytes upstream).
    body_in: u64,
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
