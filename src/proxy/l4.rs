//! Layer-4 virtual services (`mode = "tcp"`): the client's bytes go to a real server and back
//! as they are, both halves closed independently, until both sides close or nothing moves for
//! `idle_timeout`. TLS is terminated here (and maybe re-encrypted), passed through untouched
//! (the sub-service chosen by the ClientHello's server name), or absent. Scheduling, limits,
//! source-IP persistence, retries on connect failure, passive health and the connection log are
//! those of HTTP services.

use super::*;
use crate::relay::{tunnel_until, TunnelEnd};
use crate::sni::{self, Hello};

/// Each direction's buffer (the client's also holds a ClientHello read for routing).
const RELAY_BUF: usize = 16 * 1024;

/// Serve one client connection of a tcp service to its end.
pub async fn serve(shard: Rc<Shard>, mut client: Client) {
    let vs = &shard.config.services[client.facts.vs_idx];
    let pass_through = vs.pass_through;
    let mut cbuf = Buf::new(if pass_through.is_some() {
        sni::MAX_READ.max(RELAY_BUF)
    } else {
        RELAY_BUF
    });
    if pass_through.is_some() {
        match until(
            Instant::now() + vs.request_timeout,
            read_hello(&mut client.stream, &mut cbuf),
        )
        .await
        {
            Ok(Ok(name)) => client.facts.sni = name,
            Ok(Err(why)) => return refuse(&shard, client, "tls_pass_through", why).await,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return refuse(&shard, client, "tls_pass_through", "no ClientHello in time").await
            }
            Err(_) => return crate::client::close(&shard, client, "reset").await,
        }
    }
    let by_sni = pass_through.is_none_or(|p| p.route_by_sni);
    let name = client.facts.sni.clone();
    let host = name.as_deref().filter(|_| by_sni).map(str::as_bytes);
    let own_empty = shard.config.pools[vs.pool].servers.is_empty();
    let Some((pool, sub)) = route(vs, own_empty, host, b"/") else {
        return refuse(
            &shard,
            client,
            "no_route",
            "no sub-service for this server name",
        )
        .await;
    };
    let peer = client.facts.peer;
    // a sub-service's own access list (the service's was checked at accept)
    if let Some(acl) = sub.and_then(|i| vs.sub_services[i].access.as_ref()) {
        if !acl.permits(peer.ip()) {
            let c = &shard.metrics.services[client.facts.vs_slot].access_refusals;
            c.set(c.get() + 1);
            return refuse(
                &shard,
                client,
                "access",
                "the sub-service's access list refuses this address",
            )
            .await;
        }
    }
    // Every real server at its limit only until the other shards acknowledge a release (or
    // this shard's beyond-share admission): wait for that, as HTTP requests do, a little
    // longer (a client waits for its connection anyway), within connect_timeout.
    let deadline = Instant::now() + (ACK_WAIT * 10).min(vs.connect_timeout);
    let chosen = loop {
        let gen = shard.load.capacity_gen();
        match choose_server(&shard, pool, peer) {
            Some(s) => break Some(s),
            None if shard.schedulers[pool].awaiting_ack(&shard.load)
                && Instant::now() < deadline =>
            {
                let _ = until(deadline, async {
                    std::future::poll_fn(|cx| shard.load.poll_capacity(cx, gen)).await;
                    Ok(())
                })
                .await;
            }
            None => break None,
        }
    };
    let Some(first) = chosen else {
        shard.diag("no real server available", || {
            tracing::warn!(service = %vs.name, client = %peer, "no real server available: connection closed")
        });
        return crate::client::close(&shard, client, "no_real_server").await;
    };
    let mut retry = Retry {
        pool,
        peer,
        proto: "tcp",
        deadline: Instant::now() + vs.connect_timeout * (vs.retries + 1),
        default_host: None,
    };
    let mut tried = Tried::new(first);
    let mut server = first;
    let (mut up, _lease) = loop {
        let rs = shard.server(server);
        let lease = shard.load.lease(server, rs.connection_limit);
        match connect(
            server,
            rs.address,
            retry.budget(vs),
            shard.upstream_tls(server),
        )
        .await
        {
            Ok(c) => break (c, lease),
            Err(e) => {
                drop(lease);
                let (mut no_head, mut no_cookie) = (Vec::new(), Vec::new());
                match connect_failed(
                    &shard,
                    vs,
                    &mut retry,
                    &mut tried,
                    server,
                    e,
                    &mut no_head,
                    &mut no_cookie,
                ) {
                    Ok(next) => server = next,
                    Err(err) => {
                        shard.diag(err.reason, || {
                            tracing::warn!(service = %vs.name, real_server = %rs.name, phase = err.phase.unwrap_or("connect"), client = %peer, "{}: connection closed", err.reason)
                        });
                        client.facts.real_server = server.0 as u32;
                        return crate::client::close(&shard, client, "connect_failed").await;
                    }
                }
            }
        }
    };
    shard.upstream_ok(server);
    let rs = shard.server(server);
    client.facts.real_server = server.0 as u32;
    client.facts.requests = 1;
    let sc = &shard.metrics.servers[server.0];
    sc.requests.set(sc.requests.get() + 1);
    let vc = &shard.metrics.services[client.facts.vs_slot];
    vc.requests.set(vc.requests.get() + 1);
    if rs.send_proxy {
        let mut head = Vec::with_capacity(52);
        let dest = local_addr(&client.stream).unwrap_or(client.facts.listen);
        crate::proxyproto::write_v2(&mut head, peer, dest);
        if write_all(&mut up.stream, &head, vs.connect_timeout)
            .await
            .is_err()
        {
            return crate::client::close(&shard, client, "error").await;
        }
    }
    // At shutdown a tunnel (no request boundary to stop at) gets the drain's time to end by
    // itself, then ends here, a little before the shard stops, so its record is written.
    let drain = shard.config.runtime.drain_timeout;
    let stop = async {
        shard.closed().await;
        glommio::timer::sleep(drain.saturating_sub(Duration::from_millis(250))).await;
    };
    let (to_server, to_client, end) = tunnel_until(
        &mut client.stream,
        &mut cbuf,
        &mut up.stream,
        &mut up.buf,
        vs.idle_timeout,
        stop,
    )
    .await;
    sc.bytes_in.set(sc.bytes_in.get() + to_server);
    sc.bytes_out.set(sc.bytes_out.get() + to_client);
    vc.bytes_in.set(vc.bytes_in.get() + to_server);
    vc.bytes_out.set(vc.bytes_out.get() + to_client);
    client.facts.bytes_in += to_server;
    client.facts.bytes_out += to_client;
    let reason = match end {
        TunnelEnd::Closed => "closed",
        TunnelEnd::Idle => "idle_timeout",
        TunnelEnd::Stopped => "shutdown",
        TunnelEnd::Error => {
            // a reset on one side is passed on as a reset, not a clean end of stream
            reset_on_close(&client.stream);
            "reset"
        }
    };
    crate::client::close(&shard, client, reason).await
}

/// The real server for a new connection: the client's persisted one (source IP) while it can
/// take it, else by the pool's method (or the rendezvous hash of the client's address).
fn choose_server(shard: &Shard, pool_idx: usize, peer: SocketAddr) -> Option<ServerId> {
    let pool = &shard.config.pools[pool_idx];
    let persisted = match pool.persistence {
        Persistence::SourceIp { .. } => shard.source_tables[pool.slot]
            .borrow()
            .as_ref()
            .and_then(|t| t.get(peer.ip(), Instant::now())),
        _ => None,
    };
    let server = match persisted {
        Some(id) if shard.schedulers[pool_idx].accepts(id, &shard.load) => id,
        _ => pick_new(shard, pool_idx, peer, &[])?,
    };
    persist(shard, pool_idx, server, peer, "tcp", &mut Vec::new());
    Some(server)
}

/// Read until `buf` holds the client's whole ClientHello; its server name.
async fn read_hello(
    stream: &mut ClientStream,
    buf: &mut Buf,
) -> io::Result<Result<Option<Box<str>>, &'static str>> {
    loop {
        match sni::parse(buf.filled()) {
            Hello::Complete { sni } => return Ok(Ok(sni)),
            Hello::Invalid(why) => return Ok(Err(why)),
            Hello::Incomplete if buf.is_full() => return Ok(Err("ClientHello too large")),
            Hello::Incomplete => {}
        }
        let n = futures_lite::AsyncReadExt::read(stream, buf.spare()).await?;
        if n == 0 {
            return Ok(Err("closed before its ClientHello"));
        }
        buf.advance(n);
    }
}

/// A connection refused before any real server saw it: counted, in the security log, closed.
async fn refuse(shard: &Shard, client: Client, event: &str, why: &str) {
    let facts = &client.facts;
    if let Some(vs) = facts.service(shard) {
        shard.diag("tcp connection refused", || {
            tracing::info!(service = %vs.name, client = %facts.peer, sni = ?facts.sni, "{why}: connection closed")
        });
        if vs.logging.security {
            shard.log.security(&SecurityRecord {
                client: facts.peer,
                service: &vs.name,
                event,
                reason: why,
                status: None,
                host: facts.sni.as_deref().map(str::as_bytes),
                path: None,
            });
        }
    }
    crate::client::close(shard, client, "refused").await
}

/// Make the socket's close send RST (SO_LINGER 0), so the client sees the stream was cut.
pub(crate) fn reset_on_close(stream: &ClientStream) {
    let Some(fd) = crate::client::socket_fd(stream) else {
        return;
    };
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on the connection's own fd with a linger struct of its size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// The address the client reached (a wildcard listener's own address for this connection).
fn local_addr(stream: &ClientStream) -> Option<SocketAddr> {
    let fd = crate::client::socket_fd(stream)?;
    // SAFETY: a borrowed view of the connection's fd, only to ask its local address; the
    // view is never closed.
    let sock = std::mem::ManuallyDrop::new(unsafe {
        <socket2::Socket as std::os::unix::io::FromRawFd>::from_raw_fd(fd)
    });
    sock.local_addr().ok()?.as_socket()
}
