//! The admin listener (shard 0 only): the read-only pages (`/`, `/status`, `/metrics`,
//! `/healthz`) and the runtime API under `/api/v1`, behind bearer tokens with roles, a Host
//! check (no DNS rebinding) and, for changes, a JSON body and an Origin check (no CSRF). Every
//! change is applied on every shard before the call answers. Bounded: connections per address
//! and in all, a head timeout, a body limit.

mod api;
pub mod history;
mod status;

pub use api::{load_runtime_servers, load_state_file, StateEntry};
pub use status::status_json;

use crate::config::{Role, ServerId, Token};
use crate::http::Buf;
use crate::io::{fill, respond_and_close, until};
use crate::limits::ClientTable;
use crate::shard::{Shard, State};
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpListener;
use serde_json::{json, Value};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Admin connections served at once; beyond, new ones are closed at once (the admin port
/// must not become a way to exhaust the shard that also serves traffic).
const MAX_ADMIN_CONNECTIONS: usize = 64;
/// Admin connections from one address at once: one client cannot hold the whole listener.
const MAX_ADMIN_PER_ADDRESS: u32 = 16;
/// A request head (and its body) must arrive within this.
const ADMIN_HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request body (API calls are small JSON documents).
const MAX_BODY: usize = 64 * 1024;

pub async fn accept_loop(state: Rc<State>, listener: TcpListener) {
    let open = Rc::new(Cell::new(0usize));
    let per_address: Rc<RefCell<HashMap<IpAddr, u32>>> = Default::default();
    let auth_log = Rc::new(RefCell::new(ClientTable::new(10_000)));
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            state.closed().await;
            None
        })
        .await;
        // each connection is served by the configuration current when it arrived
        let shard = state.current();
        let access = shard.config.admin.as_ref().and_then(|a| a.access.as_ref());
        match accepted {
            None => return,
            Some(Ok(stream)) => {
                let peer = match stream.peer_addr() {
                    Ok(p) => p,
                    Err(_) => continue,
                };
                if access.as_ref().is_some_and(|a| !a.permits(peer.ip())) {
                    shard.diag(
                        "admin: client address not allowed",
                        || tracing::warn!(client = %peer, "admin: client address not allowed"),
                    );
                    continue;
                }
                let mine = per_address.borrow().get(&peer.ip()).copied().unwrap_or(0);
                if open.get() >= MAX_ADMIN_CONNECTIONS || mine >= MAX_ADMIN_PER_ADDRESS {
                    shard.diag(
                        "admin: too many connections",
                        || tracing::warn!(client = %peer, "admin: too many connections, closed"),
                    );
                    continue;
                }
                let slot = Slot::take(&open, &per_address, peer.ip());
                let (shard, auth_log) = (shard.clone(), auth_log.clone());
                crate::shard::spawn_connection(
                    peer,
                    Box::pin(async move {
                        match shard.admin_acceptor.clone() {
                            None => serve(&shard, stream, peer, &auth_log).await,
                            Some(acceptor) => {
                                let tls =
                                    crate::io::timeout(ADMIN_HEAD_TIMEOUT, acceptor.accept(stream))
                                        .await;
                                match tls {
                                    Ok(s) => serve(&shard, s, peer, &auth_log).await,
                                    Err(e) => shard.diag("admin: TLS handshake failed", || {
                                        tracing::info!(client = %peer, "admin: TLS handshake failed: {e}")
                                    }),
                                }
                            }
                        }
                        drop(slot);
                    }),
                );
            }
            Some(Err(_)) => glommio::timer::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// One admin connection's place in the caps; given back when dropped (a panicking request
/// included).
struct Slot {
    open: Rc<Cell<usize>>,
    per_address: Rc<RefCell<HashMap<IpAddr, u32>>>,
    ip: IpAddr,
}

impl Slot {
    fn take(
        open: &Rc<Cell<usize>>,
        per_address: &Rc<RefCell<HashMap<IpAddr, u32>>>,
        ip: IpAddr,
    ) -> Slot {
        open.set(open.get() + 1);
        *per_address.borrow_mut().entry(ip).or_default() += 1;
        Slot {
            open: open.clone(),
            per_address: per_address.clone(),
            ip,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.set(self.open.get() - 1);
        let mut map = self.per_address.borrow_mut();
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// One admin request, read whole.
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    host: Option<String>,
    authorization: Option<Vec<u8>>,
    content_type: Option<String>,
    origin: Option<String>,
    pub body: Vec<u8>,
    pub peer: SocketAddr,
}

impl Request {
    /// Value of `key` in the query string (no percent-decoding: addresses and names need none).
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query.split('&').find_map(|kv| {
            kv.split_once('=')
                .filter(|(k, _)| *k == key)
                .map(|(_, v)| v)
        })
    }
}

/// Read a request head and its Content-Length body within ADMIN_HEAD_TIMEOUT. Err(Some(s)):
/// answer status s; Err(None): the client went away.
async fn read_request<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    peer: SocketAddr,
) -> Result<Request, Option<u16>> {
    let mut buf = Buf::new(16 * 1024);
    let deadline = Instant::now() + ADMIN_HEAD_TIMEOUT;
    loop {
        let mut hdrs = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut hdrs);
        match req.parse(buf.filled()) {
            Ok(httparse::Status::Complete(head_len)) => {
                let header = |name: &str| {
                    req.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| h.value)
                };
                let text =
                    |name: &str| header(name).map(|v| String::from_utf8_lossy(v).into_owned());
                if header("transfer-encoding").is_some() {
                    return Err(Some(411));
                }
                let lengths = req
                    .headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .count();
                let length = match text("content-length") {
                    None => 0,
                    Some(v)
                        if lengths == 1
                            && !v.trim().is_empty()
                            && v.trim().bytes().all(|b| b.is_ascii_digit()) =>
                    {
                        v.trim().parse::<usize>().map_err(|_| Some(400))?
                    }
                    Some(_) => return Err(Some(400)),
                };
                // one Host and one Authorization: a second could be read differently elsewhere
                for name in ["host", "authorization"] {
                    if req
                        .headers
                        .iter()
                        .filter(|h| h.name.eq_ignore_ascii_case(name))
                        .count()
                        > 1
                    {
                        return Err(Some(400));
                    }
                }
                if length > MAX_BODY {
                    return Err(Some(413));
                }
                let target = req.path.unwrap_or("/");
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                let mut r = Request {
                    method: req.method.unwrap_or("").to_string(),
                    path: path.to_string(),
                    query: query.to_string(),
                    host: text("host"),
                    authorization: header("authorization").map(<[u8]>::to_vec),
                    content_type: text("content-type"),
                    origin: text("origin"),
                    body: buf.filled()[head_len..].to_vec(),
                    peer,
                };
                while r.body.len() < length {
                    let mut chunk = [0u8; 4096];
                    let want = (length - r.body.len()).min(chunk.len());
                    match until(
                        deadline,
                        futures_lite::AsyncReadExt::read(stream, &mut chunk[..want]),
                    )
                    .await
                    {
                        Ok(n) if n > 0 => r.body.extend_from_slice(&chunk[..n]),
                        _ => return Err(None),
                    }
                }
                r.body.truncate(length);
                return Ok(r);
            }
            Ok(httparse::Status::Partial) if !buf.is_full() => {}
            _ => return Err(Some(400)),
        }
        match until(deadline, fill(stream, &mut buf)).await {
            Ok(n) if n > 0 => {}
            _ => return Err(None),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        421 => "Misdirected Request",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// A complete response; a HEAD request gets the head alone (same Content-Length).
pub fn response(head_only: bool, status: u16, ctype: &str, body: &str) -> Vec<u8> {
    let mut resp = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
        reason(status),
        body.len()
    );
    if status == 401 {
        resp.push_str("WWW-Authenticate: Bearer realm=\"edgeshard\"\r\n");
    }
    resp.push_str("\r\n");
    let mut resp = resp.into_bytes();
    if !head_only {
        resp.extend_from_slice(body.as_bytes());
    }
    resp
}

fn json_response(head_only: bool, status: u16, v: &Value) -> Vec<u8> {
    response(head_only, status, "application/json", &v.to_string())
}

fn error(head_only: bool, status: u16, msg: &str) -> Vec<u8> {
    json_response(head_only, status, &json!({ "error": msg }))
}

/// Does the Host name this listener? Its address, any IP literal with its port (DNS
/// rebinding needs a name), `localhost`, or a name in `[admin] hosts`. No Host (HTTP/1.0):
/// not a browser, allowed.
fn host_allowed(shard: &Shard, host: Option<&str>) -> bool {
    let Some(admin) = &shard.config.admin else {
        return false;
    };
    let Some(h) = host else { return true };
    let h = h.trim().to_ascii_lowercase();
    let (name, port) = match h.rsplit_once(':') {
        Some((n, p)) if !n.ends_with(':') && p.chars().all(|c| c.is_ascii_digit()) => {
            match p.parse::<u16>() {
                Ok(p) => (n.to_string(), Some(p)),
                Err(_) => return false, // an empty or out-of-range port
            }
        }
        _ => (h.clone(), None),
    };
    if port.is_some_and(|p| p != admin.listen.port()) {
        return false;
    }
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().is_ok() || name == "localhost" || admin.hosts.contains(&name)
}

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Need {
    Nothing,
    Role(Role),
}

/// Check the bearer token against what the route needs. Ok: the token used (None when the
/// route needs none, or no token is configured and the route only reads).
fn authorize<'a>(
    shard: &'a Shard,
    req: &Request,
    need: Need,
    auth_log: &RefCell<ClientTable>,
) -> Result<Option<&'a Token>, Vec<u8>> {
    let head = req.method == "HEAD";
    let tokens = shard
        .config
        .admin
        .as_ref()
        .map(|a| &a.tokens[..])
        .unwrap_or(&[]);
    let role = match need {
        Need::Nothing => return Ok(None),
        Need::Role(r) => r,
    };
    if tokens.is_empty() {
        return if role == Role::Read {
            Ok(None)
        } else {
            Err(error(
                head,
                403,
                "the runtime API needs a token: add an [[admin.token]] to the config (edgeshard token new prints one)",
            ))
        };
    }
    // the scheme in any case (RFC 9110), then spaces or tabs, then the token
    let presented = req.authorization.as_deref().and_then(|v| {
        let (scheme, rest) = v.split_at(v.iter().position(|&b| b == b' ' || b == b'\t')?);
        scheme
            .eq_ignore_ascii_case(b"bearer")
            .then(|| rest.trim_ascii())
    });
    let Some(token) = presented.and_then(|t| crate::access::find_token(tokens, t)) else {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if auth_log.borrow_mut().should_log(req.peer.ip(), now) {
            api::audit(
                shard,
                req.peer,
                "api_auth",
                if presented.is_some() {
                    "wrong API token"
                } else {
                    "no API token"
                },
                Some(401),
                &req.path,
            );
        }
        return Err(error(
            head,
            401,
            "a valid token is needed: Authorization: Bearer <token>",
        ));
    };
    if token.role < role {
        return Err(error(
            head,
            403,
            &format!(
                "token {:?} has the {:?} role; this needs {:?}",
                token.name, token.role, role
            ),
        ));
    }
    Ok(Some(token))
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    shard: &Shard,
    mut stream: S,
    peer: SocketAddr,
    auth_log: &RefCell<ClientTable>,
) {
    let req = match read_request(&mut stream, peer).await {
        Ok(r) => r,
        Err(Some(status)) => {
            return respond_and_close(&mut stream, &error(false, status, reason(status))).await
        }
        Err(None) => return,
    };
    // A client that goes away (an operator's Ctrl-C on `ctl drain --wait`) ends its waiting
    // call: a wait must not hold an admin slot until its deadline. (Only a waiting call: a
    // client may half-close after sending an ordinary request and still read the answer.)
    let waits = req.method == "POST"
        && serde_json::from_slice::<Value>(&req.body).is_ok_and(|v| v.get("wait").is_some());
    let gone = async {
        if !waits {
            return std::future::pending().await;
        }
        let mut b = [0u8; 512];
        loop {
            match futures_lite::AsyncReadExt::read(&mut stream, &mut b).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {} // pipelined bytes: ignored (the connection closes after one call)
            }
        }
    };
    let answer =
        futures_lite::future::or(async { Some(handle(shard, &req, auth_log).await) }, gone).await;
    if let Some(resp) = answer {
        respond_and_close(&mut stream, &resp).await;
    }
}

async fn handle(shard: &Shard, req: &Request, auth_log: &RefCell<ClientTable>) -> Vec<u8> {
    let head = req.method == "HEAD";
    if !host_allowed(shard, req.host.as_deref()) {
        return error(
            head,
            421,
            "this Host is not the admin listener's: add the name to [admin] hosts",
        );
    }
    let public_metrics = shard
        .config
        .admin
        .as_ref()
        .is_some_and(|a| a.public_metrics);
    let read = Need::Role(Role::Read);
    let (need, change) = match (req.method.as_str(), req.path.as_str()) {
        ("GET" | "HEAD", "/") => (Need::Nothing, false),
        ("GET" | "HEAD", "/status" | "/api/v1/services" | "/api/v1/history") => (read, false),
        ("GET" | "HEAD", "/metrics" | "/healthz") if public_metrics => (Need::Nothing, false),
        ("GET" | "HEAD", "/metrics" | "/healthz") => (read, false),
        ("POST", "/real_server/enable" | "/real_server/disable") => {
            (Need::Role(Role::Operator), true)
        }
        ("POST" | "PUT" | "DELETE", p) if p.starts_with("/api/v1/services/") => {
            (Need::Role(Role::Operator), true)
        }
        // the whole configuration: an admin's call
        ("POST", "/api/v1/reload") => (Need::Role(Role::Admin), true),
        (_, "/" | "/status" | "/metrics" | "/healthz" | "/api/v1/services" | "/api/v1/history") => {
            return error(head, 405, "method not allowed")
        }
        _ => return error(head, 404, "no such page"),
    };
    let token = match authorize(shard, req, need, auth_log) {
        Ok(t) => t,
        Err(resp) => return resp,
    };
    if change {
        // A browser sends Origin on every cross-site POST; a page elsewhere cannot change us.
        if let Some(o) = &req.origin {
            let own = o
                .strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"))
                .is_some_and(|h| {
                    Some(h.to_ascii_lowercase())
                        == req.host.as_ref().map(|x| x.to_ascii_lowercase())
                });
            if !own {
                return error(head, 403, "cross-origin request refused");
            }
        }
        let legacy = req.path.starts_with("/real_server/");
        let json_body = req.content_type.as_deref().is_some_and(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/json")
        });
        if !legacy && !json_body {
            return error(
                head,
                415,
                "send the change as Content-Type: application/json",
            );
        }
    }
    let who = token.map(|t| t.name.as_str()).unwrap_or("-");
    match req.path.as_str() {
        "/" => response(head, 200, "text/html; charset=utf-8", status::STATUS_PAGE),
        "/status" | "/api/v1/services" => {
            let merged = shard.gather_metrics().await;
            response(head, 200, "application/json", &status_json(shard, &merged))
        }
        "/api/v1/history" => {
            let body = match shard.history.borrow_mut().as_mut() {
                Some(h) => h.body(),
                None => "{}".into(),
            };
            response(head, 200, "application/json", &body)
        }
        "/metrics" => {
            let merged = shard.gather_metrics().await;
            let text = crate::metrics::prometheus(
                &shard.config,
                &merged,
                |i| shard.load.usable(ServerId(i)) as u8,
                |i| shard.load.global(ServerId(i)),
            );
            response(head, 200, "text/plain; version=0.0.4; charset=utf-8", &text)
        }
        "/healthz" => {
            let (ok, v) = api::healthz(shard, req.param("scope") == Some("appliance")).await;
            json_response(head, if ok { 200 } else { 503 }, &v)
        }
        "/api/v1/reload" => {
            let (status, v) = api::reload(shard, req, who).await;
            json_response(head, status, &v)
        }
        _ => {
            let (status, v) = api::change(shard, req, who).await;
            json_response(head, status, &v)
        }
    }
}
