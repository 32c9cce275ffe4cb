//! A shard's side of new connections: accepting on each listening socket (and draining one
//! whose address a reload removed), the access list and connection limits (`ClientGuard`),
//! the TLS handshake, and the connection's task.

use super::*;

/// Counts an admitted client connection (for the drain, the connection limits and the
/// per-client limits) until it ends, parked or not.
/// Counts by service slot: released against the same service whatever reloads happen.
pub struct ClientGuard {
    state: Rc<State>,
    slot: usize,
    ip: IpAddr,
    /// False for an HTTP/2 stream's link to the request path: its connection holds the count.
    counted: bool,
}

impl ClientGuard {
    /// The guard of a request-path link inside a connection that is counted already.
    pub fn uncounted(shard: &Shard, slot: usize, ip: IpAddr) -> ClientGuard {
        ClientGuard {
            state: shard.state.clone(),
            slot,
            ip,
            counted: false,
        }
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        if !self.counted {
            return;
        }
        let s = &self.state;
        s.nr_clients.set(s.nr_clients.get().saturating_sub(1));
        s.vs_conns[self.slot].set(s.vs_conns[self.slot].get().saturating_sub(1));
        if let Some(t) = s.clients[self.slot].borrow_mut().as_mut() {
            t.disconnect(self.ip);
        }
    }
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// This shard's share of an appliance-wide limit (0: none).
fn share(limit: u32, shards: usize) -> u32 {
    if limit == 0 {
        0
    } else {
        limit.div_ceil(shards as u32).max(1)
    }
}

impl Shard {
    /// Admit a new client connection of service `vs` from `peer`, or say which limit refuses it.
    fn admit(&self, vs: usize, peer: SocketAddr) -> Result<ClientGuard, (Limit, LimitAction)> {
        let svc = &self.config.services[vs];
        let slot = svc.slot;
        let own = self.config.runtime.shards[self.id].max_connections;
        let appliance = if own > 0 {
            own
        } else {
            share(self.config.runtime.max_connections, self.nr_shards)
        };
        if appliance > 0 && self.nr_clients.get() as u32 >= appliance {
            return Err((Limit::ApplianceConnections, LimitAction::Unavailable));
        }
        let service = share(svc.max_connections, self.nr_shards);
        if service > 0 && self.vs_conns[slot].get() >= service {
            return Err((Limit::ServiceConnections, LimitAction::Unavailable));
        }
        if let (Some(l), Some(t)) = (&svc.client_limits, self.clients[slot].borrow_mut().as_mut()) {
            t.connect(peer.ip(), unix_secs(), l)
                .map_err(|e| (e, l.action))?;
        }
        self.nr_clients.set(self.nr_clients.get() + 1);
        self.vs_conns[slot].set(self.vs_conns[slot].get() + 1);
        Ok(ClientGuard {
            state: self.state.clone(),
            slot,
            ip: peer.ip(),
            counted: true,
        })
    }

    /// Count one more request from `peer` against its request rate.
    pub fn admit_request(&self, vs: usize, peer: SocketAddr) -> Result<(), (Limit, LimitAction)> {
        let svc = &self.config.services[vs];
        match (
            &svc.client_limits,
            self.clients[svc.slot].borrow_mut().as_mut(),
        ) {
            (Some(l), Some(t)) => t
                .request(peer.ip(), unix_secs(), l)
                .map_err(|e| (e, l.action)),
            _ => Ok(()),
        }
    }

    /// Count a connection refused by service `vs`'s access list, and put it in the security
    /// log once per address per interval.
    pub fn access_refused(&self, vs: usize, peer: SocketAddr) {
        let svc = &self.config.services[vs];
        let c = &self.metrics.services[svc.slot].access_refusals;
        c.set(c.get() + 1);
        if svc.logging.security
            && self
                .limit_log
                .borrow_mut()
                .should_log(peer.ip(), unix_secs())
        {
            self.log.security(&crate::log::SecurityRecord {
                client: peer,
                service: &svc.name,
                event: "access",
                reason: "client address not allowed",
                status: None,
                host: None,
                path: None,
            });
        }
    }

    /// Count a limit refusal, and put it in the security log once per client per interval.
    pub fn limit_refused(&self, vs: usize, peer: SocketAddr, limit: Limit) {
        let i = Limit::ALL.iter().position(|l| *l == limit).unwrap_or(0);
        let svc = &self.config.services[vs];
        let c = &self.metrics.services[svc.slot].limit_refusals[i];
        c.set(c.get() + 1);
        let log_now = match self.clients[svc.slot].borrow_mut().as_mut() {
            Some(t) => t.should_log(peer.ip(), unix_secs()),
            None => self
                .limit_log
                .borrow_mut()
                .should_log(peer.ip(), unix_secs()),
        };
        if log_now && svc.logging.security {
            self.log.security(&crate::log::SecurityRecord {
                client: peer,
                service: &svc.name,
                event: "limit",
                reason: limit.reason(),
                status: None,
                host: None,
                path: None,
            });
        }
    }
}

/// Accept on one listening socket until shutdown, or until the configuration no longer has
/// its address: then what is already in its queue is accepted and served (by the last
/// configuration that had it) before the socket closes.
pub(super) async fn accept_loop(
    state: Rc<State>,
    addr: SocketAddr,
    listener: net::Listener,
    stop: Rc<Semaphore>,
) {
    // counted while it runs (see State::accepting)
    struct Running<'a>(&'a State);
    impl Drop for Running<'_> {
        fn drop(&mut self) {
            self.0.accepting.set(self.0.accepting.get() - 1);
        }
    }
    state.accepting.set(state.accepting.get() + 1);
    let _running = Running(&state);
    let mut last: Option<Rc<Shard>> = None;
    let mut draining = false;
    loop {
        let accepted = if draining {
            match futures_lite::future::poll_once(listener.accept()).await {
                Some(r) => Some(r),
                None => return, // queue empty: the socket closes
            }
        } else {
            futures_lite::future::or(async { Some(listener.accept().await) }, async {
                futures_lite::future::or(state.closed(), async {
                    let _ = stop.acquire(1).await;
                })
                .await;
                None
            })
            .await
        };
        let (stream, peer) = match accepted {
            None if state.is_closing() => return,
            None => {
                draining = true;
                continue;
            }
            Some(Ok(s)) => s,
            Some(Err(_)) if draining => return,
            Some(Err(e)) => {
                // Out of file descriptors and the like: back off instead of spinning.
                state.diag("accept failed", || {
                    tracing::warn!(shard = state.id, "accept failed: {e}")
                });
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        state.accepted.set(state.accepted.get() + 1);
        let current = state.current();
        let shard = match current
            .config
            .services
            .iter()
            .position(|s| s.listen == addr)
        {
            Some(vs) => {
                last = Some(current.clone());
                (current, vs)
            }
            None => match last.clone().and_then(|l| {
                let vs = l.config.services.iter().position(|s| s.listen == addr)?;
                Some((l, vs))
            }) {
                Some(x) => x,
                None => continue, // never ours (cannot happen): the socket closes
            },
        };
        let (shard, vs) = shard;
        accepted_connection(shard, vs, stream, peer, addr);
    }
}

/// A connection accepted for service `vs`: its PROXY header first where the service takes
/// one, then the access list, limits, and its task.
fn accepted_connection(
    shard: Rc<Shard>,
    vs: usize,
    stream: net::Socket,
    peer: SocketAddr,
    listen: SocketAddr,
) {
    if shard.config.services[vs].accept_proxy {
        if shard.proxy_waiting.get() >= MAX_PROXY_WAITING {
            return; // closed at once: too many connections that have not said who they are
        }
        shard.proxy_waiting.set(shard.proxy_waiting.get() + 1);
        // Waiting for the header takes a task of its own: the accept loop goes on.
        spawn_connection(
            peer,
            Box::pin(async move {
                let client = proxy_header(&shard, vs, &stream, peer).await;
                shard.proxy_waiting.set(shard.proxy_waiting.get() - 1);
                if let Some(client) = client {
                    admitted(shard, vs, stream, client, listen);
                }
            }),
        );
        return;
    }
    admitted(shard, vs, stream, peer, listen)
}

/// The client a trusted load balancer in front names in its PROXY header (its own address
/// for a LOCAL one, e.g. its health check). None: refused (untrusted peer, no or a bad
/// header, none in time) and logged; the socket closes.
async fn proxy_header(
    shard: &Shard,
    vs: usize,
    stream: &net::Socket,
    peer: SocketAddr,
) -> Option<SocketAddr> {
    use crate::proxyproto::{parse, Header, MAX_HEADER};
    let service = &shard.config.services[vs];
    let refuse = |why: &str| {
        shard.diag(
            "PROXY header refused",
            || tracing::info!(client = %peer, service = %service.name, "{why}: connection closed"),
        );
        if service.logging.security {
            shard.log.security(&crate::log::SecurityRecord {
                client: peer,
                service: &service.name,
                event: "proxy_protocol",
                reason: why,
                status: None,
                host: None,
                path: None,
            });
        }
        let c = &shard.metrics.services[service.slot].access_refusals;
        c.set(c.get() + 1);
    };
    if !service
        .trusted_proxies
        .iter()
        .any(|n| n.contains(&peer.ip()))
    {
        refuse("a PROXY header is taken only from trusted_proxies");
        return None;
    }
    let mut buf = [0u8; MAX_HEADER];
    let mut seen = 0;
    let deadline = Instant::now() + service.request_timeout;
    loop {
        let n = match crate::io::until(deadline, stream.peek_more(&mut buf, seen)).await {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                refuse("no PROXY header in time");
                return None;
            }
            Err(_) => return None,
        };
        if n == 0 {
            return None; // closed before a word
        }
        seen = n;
        match parse(&buf[..n]) {
            Header::Incomplete if n < buf.len() => continue,
            Header::Incomplete => {
                refuse("PROXY header too long");
                return None;
            }
            Header::Invalid(why) => {
                refuse(why);
                return None;
            }
            Header::Complete { len, source, .. } => {
                if stream.discard(len).is_err() {
                    return None;
                }
                return Some(source.unwrap_or(peer));
            }
        }
    }
}

/// Access list, limits and the task of a connection whose client is known.
fn admitted(
    shard: Rc<Shard>,
    vs: usize,
    stream: net::Socket,
    peer: SocketAddr,
    listen: SocketAddr,
) {
    let tcp = shard.config.services[vs].mode == crate::config::Mode::Tcp;
    if let Some(acl) = &shard.config.services[vs].access {
        if !acl.permits(peer.ip()) {
            // Refused before TLS and before any byte is read: the socket just closes.
            shard.access_refused(vs, peer);
            return;
        }
    }
    let guard = match shard.admit(vs, peer) {
        Ok(g) => g,
        Err((limit, action)) => {
            shard.limit_refused(vs, peer, limit);
            // A plain-HTTP client is told why (unless told to drop); a TLS one is closed.
            let status = match action {
                LimitAction::TooManyRequests => Some(429),
                LimitAction::Unavailable => Some(503),
                LimitAction::Drop => None,
            };
            // Bounded: a flood of refused connections must not become a flood of tasks
            // holding sockets; beyond the bound they are closed at once.
            let refusing = shard.refusing.get();
            if let (Some(status), None, false, true) =
                (status, &shard.acceptors[vs], tcp, refusing < MAX_REFUSING)
            {
                shard.refusing.set(refusing + 1);
                let shard = shard.clone();
                glommio::spawn_local(async move {
                    let mut stream = stream;
                    crate::io::respond_and_close(
                        &mut stream,
                        crate::http::canned::error_response(status),
                    )
                    .await;
                    shard.refusing.set(shard.refusing.get() - 1);
                })
                .detach();
            }
            return;
        }
    };
    let facts = ConnFacts {
        vs_idx: vs,
        vs_slot: shard.config.services[vs].slot,
        origin: shard.clone(),
        listen,
        peer,
        proto: "http",
        sni: None,
        tls: None,
        opened: Instant::now(),
        requests: 0,
        bytes_in: 0,
        bytes_out: 0,
        real_server: u32::MAX,
        bridged: false,
    };
    let shard = shard.clone();
    match shard.acceptors[vs].clone() {
        None => {
            client::opened(&shard, &facts);
            let c = Client {
                stream: ClientStream::Plain(stream),
                facts,
                guard,
            };
            if tcp {
                spawn_connection(peer, Box::pin(proxy::l4::serve(shard, c)));
            } else {
                spawn_connection(peer, Box::pin(proxy::serve(shard, c)));
            }
        }
        // The handshake's state lives in its own allocation, gone once it is done.
        Some(acceptor) => spawn_connection(
            peer,
            Box::pin(serve_tls(shard, acceptor, stream, facts, guard)),
        ),
    }
}

/// Run a client connection's task. Defence in depth: a bug that panics must cost one
/// connection, not the shard. The task comes boxed: a connection gets a task again each
/// time it leaves the parking lot, and moving a pointer is cheaper than moving its state.
pub fn spawn_connection(
    peer: SocketAddr,
    task: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'static>>,
) {
    glommio::spawn_local(async move {
        use futures_lite::FutureExt;
        if std::panic::AssertUnwindSafe(task)
            .catch_unwind()
            .await
            .is_err()
        {
            tracing::error!(client = %peer, "connection task panicked (bug): connection dropped");
        }
    })
    .detach();
}

/// Complete a TLS handshake (bounded), then serve the connection.
async fn serve_tls(
    shard: Rc<Shard>,
    acceptor: TlsAcceptor,
    stream: net::Socket,
    mut facts: ConnFacts,
    guard: ClientGuard,
) {
    let (vs, peer) = (facts.vs_idx, facts.peer);
    let limit = shard.config.services[vs]
        .tls
        .as_ref()
        .map(|t| t.handshake_timeout);
    let limit = limit.unwrap_or(Duration::from_secs(10));
    let counters = &shard.metrics.services[vs];
    match crate::io::timeout(limit, acceptor.accept(stream)).await {
        Ok(tls) => {
            counters
                .tls_handshakes
                .set(counters.tls_handshakes.get() + 1);
            let session = tls.get_ref().1;
            if session.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                counters.tls_resumed.set(counters.tls_resumed.get() + 1);
            }
            facts.sni = session.server_name().map(Box::from);
            facts.tls = match session.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_3) => Some("TLSv1.3"),
                Some(rustls::ProtocolVersion::TLSv1_2) => Some("TLSv1.2"),
                _ => None,
            };
            facts.proto = "https";
            let h2 = session.alpn_protocol() == Some(b"h2");
            client::opened(&shard, &facts);
            let c = Client {
                stream: ClientStream::Tls(Box::new(tls)),
                facts,
                guard,
            };
            if shard.config.services[vs].mode == crate::config::Mode::Tcp {
                proxy::l4::serve(shard, c).await
            } else if h2 {
                proxy::h2::serve(shard, c).await
            } else {
                proxy::serve(shard, c).await
            }
        }
        Err(e) => {
            counters.tls_failures.set(counters.tls_failures.get() + 1);
            let service = &shard.config.services[vs];
            shard.diag("TLS handshake failed", || {
                tracing::info!(client = %peer, service = %service.name, "TLS handshake failed: {e}")
            });
            if service.logging.security {
                let reason = e.to_string();
                shard.log.security(&crate::log::SecurityRecord {
                    client: peer,
                    service: &service.name,
                    event: "tls_handshake",
                    reason: &reason,
                    status: None,
                    host: None,
                    path: None,
                });
            }
        }
    }
}
