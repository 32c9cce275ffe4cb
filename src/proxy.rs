//! The per-connection keep-alive loop: the request path, top to bottom.
//! read head → parse → pick real server → upstream checkout → send head and body →
//! read response head → send response head and body → pool the upstream → next request.

use crate::config::{Persistence, Redirect, ServerId, VirtualService, MAX_HEADERS_CEILING};
use crate::error::{Fault, ProxyError};
use crate::http::canned::{error_response, CONTINUE_100};
use crate::http::parse::{parse_request, parse_response, ParsedRequest, Target};
use crate::http::write::{write_request_head, write_response_head, ClientFraming, Forwarded};
use crate::http::{BodyKind, Buf, RequestInfo, ResponseInfo};
use crate::io::{fill, respond_and_close, timeout, until, write_all};
use crate::relay::{relay_body, tunnel, RelayError};
use crate::shard::Shard;
use crate::upstream::{connect, ConnectError, UpstreamConn};
use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt};
use std::io;
use std::io::Write as _;
use std::net::SocketAddr;
use std::rc::Rc;
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

/// How reading the next request head ended.
enum HeadRead {
    /// A complete head is in the buffer.
    Ready,
    /// The client closed, went idle past the timeout, or the shard is closing.
    Closed,
    Refuse(ProxyError),
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
                return HeadRead::Closed;
            }
            // Between requests: idle timeout, and give way to shutdown.
            let idle = timeout(vs.idle_timeout, fill(client, buf));
            futures_lite::future::or(idle, async {
                shard.closed().await;
                Err(io::Error::new(io::ErrorKind::Interrupted, "shutdown"))
            })
            .await
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
            Ok(0) | Err(_) => return HeadRead::Closed,
            Ok(_) => {
                if deadline.is_none() {
                    deadline = Some(Instant::now() + vs.request_timeout);
                }
            }
        }
    }
}

/// The one place a failure becomes a response to the client (and a log line).
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    peer: SocketAddr,
    vs: &VirtualService,
    e: ProxyError,
) {
    match e.fault {
        Fault::Client => {
            tracing::info!(client = %peer, service = %vs.name, status = e.status, "refused: {}", e.reason)
        }
        Fault::Upstream | Fault::Policy => {
            tracing::warn!(client = %peer, service = %vs.name, status = e.status, "failed: {}", e.reason)
        }
    }
    respond_and_close(client, error_response(e.status)).await;
}

/// Serve one client connection of virtual service `vs_idx` to its end, then close it
/// gracefully (a TLS close_notify, a FIN).
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    shard: Rc<Shard>,
    vs_idx: usize,
    mut client: S,
    peer: SocketAddr,
    proto: &'static str,
    sni: Option<String>,
) {
    serve_requests(shard, vs_idx, &mut client, peer, proto, sni.as_deref()).await;
    let _ = timeout(Duration::from_secs(1), client.close()).await;
}

async fn serve_requests<S: AsyncRead + AsyncWrite + Unpin>(
    shard: Rc<Shard>,
    vs_idx: usize,
    client: &mut S,
    peer: SocketAddr,
    proto: &'static str,
    sni: Option<&str>,
) {
    let vs = &shard.config.services[vs_idx];
    let mut cbuf = Buf::new(vs.limits.max_header_size.max(16 * 1024));
    let mut req_out: Vec<u8> = Vec::with_capacity(2048);
    let mut resp_out: Vec<u8> = Vec::with_capacity(2048);
    // A persistence cookie to set on the response, rebuilt per request when one is due.
    let mut set_cookie: Vec<u8> = Vec::new();
    let fwd = Forwarded {
        client_ip: peer.ip(),
        proto,
    };
    loop {
        match read_head(&shard, vs, client, &mut cbuf).await {
            HeadRead::Ready => {}
            HeadRead::Closed => return,
            HeadRead::Refuse(e) => return refuse(client, peer, vs, e).await,
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
                    Err(e) => return Err(ProxyError::client(e.status, e.reason)),
                };
                if let Some(r) = vs.redirect {
                    resp_out.clear();
                    write_redirect(&req, r, &mut resp_out)?;
                    return Ok(Route::Redirect(req.info));
                }
                let host = req.host.or(sni.map(str::as_bytes));
                let path = match req.target {
                    Target::Origin(p) => p,
                    Target::Asterisk => "*",
                };
                let own_empty = shard.config.pools[vs.pool].servers.is_empty();
                let pool = route(vs, own_empty, host, path)
                    .ok_or(ProxyError::policy(404, "no sub-service matches"))?;
                let server = match choose(&shard, pool, &req, peer, proto, &mut set_cookie) {
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
                write_request_head(&req, &fwd, &rs.name, req.info.expect_continue, &mut req_out);
                Ok(Route::Forward(req.info, server))
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
        let (info, server) = match parsed {
            Ok(Route::Forward(info, server)) => (info, server),
            Ok(Route::Redirect(info)) => {
                // A request body is not read: the connection closes after the redirect.
                let keep = info.keep_alive && info.body == BodyKind::None && !shard.is_closing();
                if !keep {
                    resp_out.extend_from_slice(b"Connection: close\r\n");
                }
                resp_out.extend_from_slice(b"\r\n");
                cbuf.consume(info.head_len);
                if write_all(client, &resp_out, CLIENT_WRITE_TIMEOUT)
                    .await
                    .is_err()
                    || !keep
                {
                    return;
                }
                continue;
            }
            Ok(Route::Wait(_)) => continue,
            Err(e) => return refuse(client, peer, vs, e).await,
        };
        cbuf.consume(info.head_len);
        match exchange(
            &shard,
            vs,
            client,
            &mut cbuf,
            &req_out,
            &mut resp_out,
            &set_cookie,
            info,
            server,
        )
        .await
        {
            Ok(true) => continue,
            Ok(false) => return,
            Err(e) => return refuse(client, peer, vs, e).await,
        }
    }
}

/// The pool a request goes to: the first sub-service whose hosts (Host, else SNI; no port,
/// any case) and path prefixes match, else the service's own real servers. None: no pool
/// (a service with sub-services and no real servers of its own).
fn route(
    vs: &VirtualService,
    own_pool_empty: bool,
    host: Option<&[u8]>,
    path: &str,
) -> Option<usize> {
    let host = host.map(|h| {
        if h.starts_with(b"[") {
            h
        } else {
            h.split(|&b| b == b':').next().unwrap_or(h)
        }
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
    let path = path.split('?').next().unwrap_or(path);
    for sub in &vs.sub_services {
        let path_ok =
            sub.paths.is_empty() || sub.paths.iter().any(|p| path.starts_with(p.as_str()));
        if path_ok && host_matches(&sub.hosts) {
            return Some(sub.pool);
        }
    }
    if vs.sub_services.is_empty() || !own_pool_empty {
        Some(vs.pool)
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
    set_cookie.clear();
    let unix_now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
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
    // A persisted server that is down, disabled or at its limit is replaced (and re-persisted).
    let server = match persisted {
        Some(id) if sched.accepts(id, &shard.load) => id,
        _ => sched
            .pick(&shard.load)
            .ok_or(ProxyError::policy(503, "no real server available"))?,
    };
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
    Ok(server)
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
    Forward(RequestInfo, ServerId),
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
    /// A reused pooled connection died before answering: safe to try once on a fresh one.
    Retry,
    Fail(ProxyError),
}

/// Send one request upstream and relay its response. Ok(keep the client connection open).
/// An Err means the client has seen nothing yet and gets an error response.
#[allow(clippy::too_many_arguments)]
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    shard: &Rc<Shard>,
    vs: &VirtualService,
    client: &mut S,
    cbuf: &mut Buf,
    req_out: &[u8],
    resp_out: &mut Vec<u8>,
    set_cookie: &[u8],
    info: RequestInfo,
    server: ServerId,
) -> Result<bool, ProxyError> {
    let rs = shard.server(server);
    // Only a request we can send again byte for byte, and may, is retried.
    let replayable = info.body == BodyKind::None && info.method.is_idempotent() && !info.upgrade;
    let mut sent_continue = false;
    let mut fresh_only = false;
    loop {
        let _lease = shard.load.lease(server, rs.connection_limit);
        let pooled = if fresh_only {
            None
        } else {
            shard.pools.checkout(server, vs.pool_idle_timeout)
        };
        let mut up = match pooled {
            Some(c) => c,
            None => match connect(
                server,
                rs.address,
                vs.connect_timeout,
                shard.upstream_tls(server),
            )
            .await
            {
                Ok(c) => c,
                Err(ConnectError::TimedOut) => {
                    return Err(ProxyError::upstream(504, "real server connect timed out"))
                }
                Err(ConnectError::Refused(_)) => {
                    return Err(ProxyError::upstream(
                        502,
                        "real server refused the connection",
                    ))
                }
                Err(ConnectError::Tls(e)) => {
                    tracing::warn!(service = %vs.name, real_server = %rs.name, "re-encryption to real server failed: {e}");
                    return Err(ProxyError::upstream(
                        502,
                        "real server TLS handshake failed",
                    ));
                }
            },
        };
        if info.expect_continue && !sent_continue {
            // We stand in for the real server's 100 Continue (Expect is not forwarded).
            if write_all(client, CONTINUE_100, CLIENT_WRITE_TIMEOUT)
                .await
                .is_err()
            {
                return Ok(false);
            }
            sent_continue = true;
        }
        match send_and_receive(vs, client, cbuf, &mut up, req_out, info).await {
            Ok(resp) => {
                return respond(
                    shard, vs, client, cbuf, up, resp_out, set_cookie, info, resp,
                )
                .await
            }
            Err(Attempt::Retry) if replayable && up.reused => {
                fresh_only = true;
                continue;
            }
            Err(Attempt::Retry) => {
                return Err(ProxyError::upstream(
                    502,
                    "real server closed the connection before answering",
                ))
            }
            Err(Attempt::Fail(e)) => return Err(e),
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
) -> Result<ResponseInfo, Attempt> {
    let upstream_gone = |e: &io::Error| {
        matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof
        )
    };
    if let Err(e) = write_all(&mut up.stream, req_out, vs.response_timeout).await {
        return Err(if upstream_gone(&e) {
            Attempt::Retry
        } else {
            Attempt::Fail(ProxyError::upstream(
                502,
                "writing the request to the real server failed",
            ))
        });
    }
    match relay_body(
        client,
        cbuf,
        &mut up.stream,
        info.body,
        false,
        vs.request_timeout,
        vs.response_timeout,
    )
    .await
    {
        Ok(_) => {}
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
            return Err(Attempt::Fail(ProxyError::upstream(
                502,
                "real server stopped reading the request body",
            )))
        }
    }
    let deadline = Instant::now() + vs.response_timeout;
    let mut scanned = 0;
    loop {
        if let Some(_end) = head_end(up.buf.filled(), scanned) {
            let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS_CEILING];
            let resp =
                match parse_response(up.buf.filled(), &mut hdrs, info.method, up.buf.capacity()) {
                    Ok(Some(r)) => r.info,
                    Ok(None) => {
                        return Err(Attempt::Fail(ProxyError::upstream(
                            502,
                            "malformed response head",
                        )))
                    }
                    Err(reason) => return Err(Attempt::Fail(ProxyError::upstream(502, reason))),
                };
            if resp.status >= 100 && resp.status < 200 && resp.status != 101 {
                // Interim responses: ours already stood in for 100; others need HTTP/1.1.
                // They are dropped rather than forwarded: clients must tolerate either.
                up.buf.consume(resp.head_len);
                scanned = 0;
                continue;
            }
            return Ok(resp);
        }
        scanned = up.buf.len().saturating_sub(2);
        if up.buf.is_full() {
            return Err(Attempt::Fail(ProxyError::upstream(
                502,
                "response head too large",
            )));
        }
        match until(deadline, fill(&mut up.stream, &mut up.buf)).await {
            Ok(0) if up.buf.is_empty() => return Err(Attempt::Retry),
            Ok(0) => {
                return Err(Attempt::Fail(ProxyError::upstream(
                    502,
                    "real server closed mid response head",
                )))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(Attempt::Fail(ProxyError::upstream(
                    504,
                    "real server did not answer in time",
                )))
            }
            Err(e) if up.buf.is_empty() && (e.kind() == io::ErrorKind::ConnectionReset) => {
                return Err(Attempt::Retry)
            }
            Err(_) => {
                return Err(Attempt::Fail(ProxyError::upstream(
                    502,
                    "reading the response failed",
                )))
            }
        }
    }
}

/// Relay the response whose head is at the front of `up.buf` to the client.
#[allow(clippy::too_many_arguments)]
async fn respond<S: AsyncRead + AsyncWrite + Unpin>(
    shard: &Rc<Shard>,
    vs: &VirtualService,
    client: &mut S,
    cbuf: &mut Buf,
    mut up: UpstreamConn,
    resp_out: &mut Vec<u8>,
    set_cookie: &[u8],
    info: RequestInfo,
    resp: ResponseInfo,
) -> Result<bool, ProxyError> {
    if resp.status == 101 && !info.upgrade {
        return Err(ProxyError::upstream(
            502,
            "101 Switching Protocols to a request that asked for no upgrade",
        ));
    }
    let dechunk = resp.body == BodyKind::Chunked && info.minor == 0;
    let keep_alive = info.keep_alive
        && resp.status != 101
        && resp.body != BodyKind::CloseDelimited
        && !dechunk
        && !shard.is_closing();
    resp_out.clear();
    {
        let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS_CEILING];
        match parse_response(up.buf.filled(), &mut hdrs, info.method, up.buf.capacity()) {
            Ok(Some(r)) => write_response_head(
                &r,
                ClientFraming {
                    keep_alive,
                    client_minor: info.minor,
                    dechunk,
                    interim: false,
                },
                set_cookie,
                resp_out,
            ),
            _ => return Err(ProxyError::upstream(502, "malformed response head")),
        }
    }
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
    if write_all(client, resp_out, CLIENT_WRITE_TIMEOUT)
        .await
        .is_err()
    {
        return Ok(false);
    }
    if resp.status == 101 {
        tunnel(client, cbuf, &mut up.stream, &mut up.buf, vs.idle_timeout).await;
        return Ok(false);
    }
    match relay_body(
        &mut up.stream,
        &mut up.buf,
        client,
        body,
        dechunk,
        vs.response_timeout,
        CLIENT_WRITE_TIMEOUT,
    )
    .await
    {
        Ok(_) => {}
        Err(e) => {
            // The client has a partial response: all we can do is close (the truncation
            // tells it). The upstream connection is dropped, never pooled.
            tracing::warn!(service = %vs.name, "response relay failed: {e:?}");
            return Ok(false);
        }
    }
    if resp.reusable && !shard.is_closing() {
        shard.pools.checkin(up, vs.pool_size);
    }
    Ok(keep_alive)
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
