//! The per-connection keep-alive loop: the request path, top to bottom (here), with the
//! head reading (`head`), the routing and choice of a real server (`route`) and the exchange
//! with it (`exchange`) in their own files.
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

mod exchange;
pub mod h2;
mod head;
pub mod l4;
mod route;

use exchange::*;
use head::*;
use route::*;

/// Responses with a body this small go out in the same write as their head.
const COALESCE_BODY: usize = 16 * 1024;
/// Plain-to-plain response bodies at least this long (beyond what came with the head) move
/// by splice: below it, the pipe's two system calls per round cost more than the copy.
const SPLICE_MIN: u64 = 256 * 1024;
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
            self.f.vs_slot,
            self.f.bridged,
            server.map(|s| s.0),
            status,
            (bytes_in, bytes_out),
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
                protocol: if self.f.bridged { "HTTP/2" } else { "HTTP/1.1" },
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
pub async fn serve(mut shard: Rc<Shard>, client: Client) {
    let Client {
        mut stream,
        mut facts,
        guard,
    } = client;
    // Serving one last request with the configuration the connection was accepted under
    // (its service left this address in a reload): then it closes.
    let mut last_on_old = false;
    loop {
        if !Rc::ptr_eq(&facts.origin, &shard) {
            // A reload since its last request: the same service on the same address in the
            // new configuration, which must still let this client in.
            let same = shard.config.services.iter().position(|v| {
                v.slot == facts.vs_slot
                    && v.listen == facts.listen
                    && v.tls.is_some() == facts.tls.is_some()
                    && v.mode == crate::config::Mode::Http
            });
            let end = match same {
                Some(i) => {
                    let svc = &shard.config.services[i];
                    if svc
                        .access
                        .as_ref()
                        .is_some_and(|a| !a.permits(facts.peer.ip()))
                    {
                        // an address the new configuration refuses: cut at once
                        shard.access_refused(i, facts.peer);
                        Some("access")
                    } else {
                        facts.vs_idx = i;
                        facts.origin = shard.clone();
                        None
                    }
                }
                None if !last_on_old => {
                    shard = facts.origin.clone();
                    last_on_old = true;
                    None
                }
                None => Some("reload"),
            };
            if let Some(reason) = end {
                let client = Client {
                    stream,
                    facts,
                    guard,
                };
                return crate::client::close(&shard, client, reason).await;
            }
        }
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
            let end =
                serve_requests(&mut conn, &mut stream, sni.as_deref(), &mut ws, last_on_old).await;
            ws.meta = std::mem::take(&mut conn.meta);
            end
        };
        shard.give_workspace(ws);
        facts.sni = sni;
        let idle_timeout = vs.idle_timeout;
        if let Ended::Reload = end {
            shard = shard.current();
            continue;
        }
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
                    .park(ticket, client, Instant::now() + idle_timeout)
                {
                    tracing::error!(client = %client.facts.peer, "parking lot place lost (bug): closing");
                    crate::client::close(&shard, client, "error").await;
                }
            }
            Ended::Closed(reason) => crate::client::close(&shard, client, reason).await,
            Ended::H2c(read) => h2::serve_after(shard, client, read).await,
            Ended::Reload => {}
        }
        return;
    }
}

/// How a connection's keep-alive loop ended.
enum Ended {
    /// Nothing to read: park it at this place (its socket will wake the lot).
    Idle(Ticket),
    /// Why the connection ends (client, idle_timeout, shutdown, error).
    Closed(&'static str),
    /// The configuration changed: go on with the current one.
    Reload,
    /// The client spoke HTTP/2 by prior knowledge: these bytes of it were read.
    H2c(Vec<u8>),
}

/// The keep-alive loop; returns why the connection ends.
async fn serve_requests(
    conn: &mut Conn<'_>,
    client: &mut ClientStream,
    sni: Option<&str>,
    ws: &mut Workspace,
    last_on_old: bool,
) -> Ended {
    let shard = conn.shard;
    let mut first = true;
    // An HTTP/2 stream the client cancels drops its end of the link: the request stops there
    // (a wait for room, the exchange: the real server's connection closed, its count
    // released), not when the real server is done.
    let cancelled = match &*client {
        ClientStream::Link(l) => Some(l.watch()),
        _ => None,
    };
    let vs = conn.vs;
    let peer = conn.f.peer;
    let proto = conn.f.proto;
    let mut cbuf = Buf::detached();
    let ip = peer.ip().to_canonical();
    // Header rules' ${client_addr}, made once per connection and only where rules exist.
    let has_rules = vs.headers.is_some() || vs.sub_services.iter().any(|s| s.headers.is_some());
    let client_addr = if has_rules {
        ip.to_string()
    } else {
        String::new()
    };
    let vars = crate::http::rules::Vars {
        client_addr: &client_addr,
        tls_version: conn.f.tls.unwrap_or(""),
        sni: sni.unwrap_or(""),
        service: &vs.name,
        real_server: "",
    };
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
        // Between requests (nothing pipelined waiting), take up a newer configuration.
        if cbuf.is_empty()
            && shard.current_generation() != shard.generation
            && !(first && last_on_old)
        {
            return Ended::Reload;
        }
        first = false;
        let head = read_head(shard, vs, client, &mut cbuf, conn.f.requests == 0).await;
        let Workspace {
            req_out,
            resp_out,
            set_cookie,
            path: scratch,
            ..
        } = &mut *ws;
        match head {
            // HTTP/2 by prior knowledge: the rest of the connection is the h2 layer's, with
            // what was read so far
            HeadRead::Ready
                if vs.h2c
                    && conn.f.requests == 0
                    && cbuf.filled().starts_with(b"PRI * HTTP/2.0\r\n\r\n") =>
            {
                return Ended::H2c(cbuf.filled().to_vec());
            }
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
                    Err(r) => return Err(esp_refusal(shard, vs.slot, vs.esp.as_ref(), r)),
                };
                let own_empty = shard.config.pools[vs.pool].servers.is_empty();
                let (pool, sub) = route(vs, own_empty, host, route_path)
                    .ok_or(ProxyError::policy(404, "no sub-service matches"))?;
                conn.sub_service = sub;
                let sub = sub.map(|i| &vs.sub_services[i]);
                if let Some(acl) = sub.and_then(|s| s.access.as_ref()) {
                    if !acl.permits(peer.ip()) {
                        let c = &shard.metrics.services[vs.slot].access_refusals;
                        c.set(c.get() + 1);
                        return Err(ProxyError::policy(403, "client address not allowed")
                            .with_event("access"));
                    }
                }
                // ESP: the sub-service's rules, else the service's.
                let esp = sub.and_then(|s| s.esp.as_ref()).or(vs.esp.as_ref());
                if let Some(esp) = esp {
                    if let Err(r) = crate::esp::check(esp, req.host, sni, normal) {
                        return Err(esp_refusal(shard, vs.slot, Some(esp), r));
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
                let rules = sub.and_then(|s| s.headers.as_ref()).or(vs.headers.as_ref());
                let vars = crate::http::rules::Vars {
                    real_server: &rs.name,
                    ..vars
                };
                let default_host = write_request_head(
                    &req,
                    &fwd,
                    &rs.name,
                    req.info.expect_continue,
                    forward_path,
                    rules.map(|r| (&r.request[..], &vars)),
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
                    let q = &shard.metrics.services[conn.f.vs_slot].queued;
                    q.set(q.get() + 1);
                    let _ = until(d, async {
                        let room = std::future::poll_fn(|cx| shard.load.poll_capacity(cx, gen));
                        match &cancelled {
                            Some(w) => futures_lite::future::or(room, w.gone()).await,
                            None => room.await,
                        }
                        Ok(())
                    })
                    .await;
                    q.set(q.get().saturating_sub(1));
                    shard.queued.set(shard.queued.get() - 1);
                    if cancelled.as_ref().is_some_and(|w| w.is_gone()) {
                        break Err(ProxyError::client(499, "the client cancelled the request"));
                    }
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
                let ok = write_all(client, resp_out, vs.client_write_timeout)
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
        let rules = conn
            .sub_service
            .and_then(|i| vs.sub_services[i].headers.as_ref())
            .or(vs.headers.as_ref())
            .map(|r| (r, vars));
        let exchanged = Box::pin(exchange(
            shard, vs, client, &mut cbuf, req_out, resp_out, set_cookie, info, server, retry, rules,
        ));
        let outcome = match &cancelled {
            None => exchanged.await,
            Some(w) => {
                let gone = async {
                    w.gone().await;
                    None
                };
                match futures_lite::future::or(gone, async { Some(exchanged.await) }).await {
                    Some(r) => r,
                    None => {
                        // nginx's 499: the client closed the request before its answer; the
                        // bytes are what crossed the link
                        let (sent_in, sent_out) = w.moved();
                        conn.finish(499, Some(server), sent_in, sent_out);
                        return Ended::Closed("client");
                    }
                }
            }
        };
        match outcome {
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
