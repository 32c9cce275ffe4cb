//! One request's exchange with a real server: connect (retrying on another), send, read the
//! response head, relay the response to the client, pool the connection.

use super::*;
use crate::http::rules::{HeaderRules, Vars};
use crate::http::write::ResponseRules;
use crate::net::AsPlain;

/// How an exchange with a real server failed before the client saw any response byte.
pub(super) enum Attempt {
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
pub(super) struct Retry {
    pub(super) pool: usize,
    pub(super) peer: SocketAddr,
    pub(super) proto: &'static str,
    pub(super) deadline: Instant,
    /// Where the upstream head carries the chosen server's name as its Host (an HTTP/1.0
    /// request without one): rewritten when another server is chosen.
    pub(super) default_host: Option<std::ops::Range<usize>>,
}

impl Retry {
    /// Time for the next connect: the connect timeout, within what is left for retries.
    pub(super) fn budget(&self, vs: &VirtualService) -> Duration {
        self.deadline
            .saturating_duration_since(Instant::now())
            .min(vs.connect_timeout)
            .max(Duration::from_millis(1))
    }
}

/// Servers tried for one request, at most `retries` + 1 (config caps retries at 10).
pub(super) struct Tried {
    ids: [ServerId; 11],
    len: usize,
}

impl Tried {
    pub(super) fn new(first: ServerId) -> Tried {
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
pub(super) fn next_server(
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

/// Connecting to `server` failed (nothing was sent): counted, passive health told; the next
/// real server to try (the retry logged), or the error the client gets when none is left.
#[allow(clippy::too_many_arguments)]
pub(super) fn connect_failed(
    shard: &Shard,
    vs: &VirtualService,
    retry: &mut Retry,
    tried: &mut Tried,
    server: ServerId,
    e: ConnectError,
    req_out: &mut Vec<u8>,
    set_cookie: &mut Vec<u8>,
) -> Result<ServerId, ProxyError> {
    let rs = shard.server(server);
    let c = &shard.metrics.servers[server.0].connect_errors;
    c.set(c.get() + 1);
    shard.upstream_failed(server);
    let err = connect_error(shard, rs, e).at(server);
    let next = next_server(shard, vs, retry, tried, server, req_out, set_cookie).ok_or(err)?;
    shard.diag(err.reason, || {
        tracing::warn!(service = %vs.name, real_server = %rs.name, "{}: retrying on {}", err.reason, shard.server(next).name)
    });
    Ok(next)
}

/// The response a failed connect stands for.
pub(super) fn connect_error(
    shard: &Shard,
    rs: &crate::config::RealServer,
    e: ConnectError,
) -> ProxyError {
    match e {
        ConnectError::TimedOut => {
            ProxyError::upstream(504, "real server connect timed out").in_phase("connect")
        }
        ConnectError::TlsTimedOut => {
            ProxyError::upstream(504, "real server TLS handshake timed out").in_phase("tls")
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
pub(super) async fn exchange<S: AsyncRead + AsyncWrite + Unpin + AsPlain>(
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
    rules: Option<(&HeaderRules, Vars<'_>)>,
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
                match connect(
                    server,
                    rs.address,
                    retry.budget(vs),
                    shard.upstream_tls(server),
                )
                .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        server = connect_failed(
                            shard, vs, &mut retry, &mut tried, server, e, req_out, set_cookie,
                        )?;
                        fresh_only = false;
                        continue;
                    }
                }
            }
        };
        if info.expect_continue && !sent_continue {
            // We stand in for the real server's 100 Continue (Expect is not forwarded).
            if write_all(client, CONTINUE_100, vs.client_write_timeout)
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
            rules: rules.map(|(r, vars)| ResponseRules {
                rules: &r.response,
                // HSTS means something only over HTTPS
                hsts: r.hsts.as_deref().filter(|_| retry.proto == "https"),
                vars: Vars {
                    real_server: &rs.name,
                    ..vars
                },
            }),
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
pub(super) async fn send_and_receive<S: AsyncRead + AsyncWrite + Unpin + AsPlain>(
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
        &mut 0,
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
            write_response_head(
                &parsed,
                framing,
                head.set_cookie,
                head.rules.as_ref(),
                head.out,
            );
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
pub(super) async fn respond<S: AsyncRead + AsyncWrite + Unpin + AsPlain>(
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
    if write_all(client, resp_out, vs.client_write_timeout)
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
    // A large body between two plain sockets may move socket → pipe → socket (splice): its
    // bytes never come up to user space.
    let splice = match (body, dechunk, vs.splice_response) {
        (BodyKind::Length(n), false, true)
            if n - (up.buf.len() as u64).min(n) >= SPLICE_MIN
                && up.stream.as_plain().is_some()
                && client.as_plain().is_some() =>
        {
            crate::net::splice::Pipe::take().ok().map(|pipe| (n, pipe))
        }
        _ => None,
    };
    let mut written = 0;
    let mut own = None;
    let relayed = match (splice, up.stream.as_plain(), client.as_plain()) {
        (Some((n, pipe)), Some(from), Some(to)) => {
            // what came with the head first, then the rest without a copy
            let head = (up.buf.len() as u64).min(n) as usize;
            let mut w = to;
            match write_all(&mut w, &up.buf.filled()[..head], vs.client_write_timeout).await {
                Err(e) => Err(RelayError::Sink(e)),
                Ok(()) => {
                    up.buf.consume(head);
                    written = head as u64;
                    let mut spliced = 0;
                    let r = crate::net::splice::relay(
                        from,
                        to,
                        pipe,
                        n - head as u64,
                        vs.upstream_body_timeout,
                        vs.client_write_timeout,
                        &mut spliced,
                    )
                    .await;
                    written += spliced;
                    let c = &shard.metrics.services[vs.slot].spliced_bytes;
                    c.set(c.get() + spliced);
                    r.map(|_| n)
                }
            }
        }
        _ => {
            // A large response streams through a bulk buffer lent by the shard; the
            // connection gets its own buffer back (with any bytes beyond the body) when done.
            let large = match body {
                BodyKind::Length(n) => n > 4 * UPSTREAM_BUF as u64,
                BodyKind::CloseDelimited => true,
                _ => false,
            };
            if large {
                own = shard.take_bulk().and_then(|b| match up.buf.exchange(b) {
                    Ok(own) => Some(own),
                    Err(b) => {
                        shard.give_bulk(b);
                        None
                    }
                });
            }
            relay_body(
                &mut up.stream,
                &mut up.buf,
                client,
                body,
                dechunk,
                Bounds {
                    read_timeout: vs.upstream_body_timeout,
                    write_timeout: vs.client_write_timeout,
                    max: 0,
                },
                &mut written,
            )
            .await
        }
    };
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
            // tells it). The upstream connection is dropped, never pooled. The record says
            // what the client did get.
            done.bytes_out += written;
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
pub(super) struct ClientHead<'a> {
    out: &'a mut Vec<u8>,
    set_cookie: &'a [u8],
    /// The response header rules and HSTS, with the values of this exchange.
    rules: Option<ResponseRules<'a>>,
    /// Asked when the head is written: a shutdown meanwhile ends keep-alive.
    shard: &'a Shard,
}

/// How a response is framed for this client: kept alive or closed, de-chunked for HTTP/1.0.
pub(super) fn client_framing(
    info: RequestInfo,
    resp: ResponseInfo,
    closing: bool,
) -> ClientFraming {
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
    pub(super) keep: bool,
    pub(super) status: u16,
    /// Bytes written to the client.
    pub(super) bytes_out: u64,
    /// Request body bytes read from the client (and tunnel bytes upstream).
    pub(super) body_in: u64,
}
