//! Where a parsed request goes: the sub-service (host, normalised path), the real server
//! (persistence, the pool's method, rendezvous hashing), the HTTPS redirect, ESP refusals.

use super::*;

/// An ESP refusal, counted; without ESP rules, a path that cannot be normalised is a 400.
pub(super) fn esp_refusal(
    shard: &Shard,
    vs_slot: usize,
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
    let c = &shard.metrics.services[vs_slot].esp_refusals[i];
    c.set(c.get() + 1);
    let event = match r {
        crate::esp::Refusal::Host | crate::esp::Refusal::HostSniMismatch => "esp_host",
        _ => "esp_directory",
    };
    // A client that reused a connection for another name its certificate covers (HTTP/2
    // coalescing) is told to open one for that name, not refused (RFC 9110 15.5.20).
    let status = match r {
        crate::esp::Refusal::HostSniMismatch => 421,
        _ => esp.refusal_status,
    };
    ProxyError::policy(status, r.reason()).with_event(event)
}

/// The pool a request goes to: the first sub-service whose hosts (Host, else SNI; no port,
/// any case) and path prefixes match, else the service's own real servers. None: no pool
/// (a service with sub-services and no real servers of its own).
pub(super) fn route(
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
pub(super) fn choose(
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
                .verify(&pool.name, v, unix_now(), address_of, pool.servers.len())
                .map(|i| pool.servers[i])
        }),
        Persistence::SourceIp { .. } => shard.source_tables[pool.slot]
            .borrow()
            .as_ref()
            .and_then(|t| t.get(peer.ip(), Instant::now())),
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
pub(super) fn pick_new(
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
pub(super) fn persist(
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
            if let Some(t) = shard.source_tables[pool.slot].borrow_mut().as_mut() {
                t.put(peer.ip(), server, Instant::now(), *timeout);
            }
        }
    }
}

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The value of cookie `name` in the request's Cookie fields.
pub(super) fn find_cookie<'b>(req: &ParsedRequest<'_, 'b>, name: &str) -> Option<&'b str> {
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
pub(super) enum Route {
    /// To this real server of this pool; the range is the Host value naming the server in
    /// the upstream head, if the client sent none.
    Forward(RequestInfo, ServerId, usize, Option<std::ops::Range<usize>>),
    Redirect(RequestInfo),
    /// Every candidate is at its connection limit (or held back by an admission awaiting the
    /// peers' acknowledgement): wait up to this long for room.
    Wait(Duration),
}

/// How long a request may wait for connection-limit acknowledgements before 503.
pub(super) const ACK_WAIT: Duration = Duration::from_millis(100);

/// The head of a redirect to the same URL over HTTPS, without its final CRLF.
pub(super) fn write_redirect(
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
