//! Strict parsing of request and response heads (RFC 9110/9112) on top of httparse. Every
//! message that passes has exactly one framing; anything ambiguous is refused, never guessed.

use crate::config::HeadLimits;
use httparse::{Header, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Options,
    Trace,
    Patch,
    Connect,
    Other,
}

impl Method {
    fn from_str(m: &str) -> Method {
        match m {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "OPTIONS" => Method::Options,
            "TRACE" => Method::Trace,
            "PATCH" => Method::Patch,
            "CONNECT" => Method::Connect,
            _ => Method::Other,
        }
    }

    /// RFC 9110 §9.2.2: safe to send twice.
    pub fn is_idempotent(self) -> bool {
        matches!(
            self,
            Method::Get
                | Method::Head
                | Method::Put
                | Method::Delete
                | Method::Options
                | Method::Trace
        )
    }
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    None,
    Length(u64),
    Chunked,
    /// Responses only: the body runs until the real server closes.
    CloseDelimited,
}

/// What the proxy keeps of a request once its head buffer is released.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo {
    pub method: Method,
    /// HTTP/1.`minor`.
    pub minor: u8,
    pub head_len: usize,
    pub body: BodyKind,
    pub keep_alive: bool,
    pub expect_continue: bool,
    pub upgrade: bool,
}

/// A refused request: the status to answer and why (for the security log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestError {
    pub status: u16,
    pub reason: &'static str,
}

fn bad(reason: &'static str) -> RequestError {
    RequestError {
        status: 400,
        reason,
    }
}

/// Header names listed in `Connection`, to be dropped when forwarding.
pub const MAX_CONNECTION_TOKENS: usize = 16;

#[derive(Debug, Clone, Copy, Default)]
pub struct ConnectionTokens<'b> {
    pub close: bool,
    pub keep_alive: bool,
    pub upgrade: bool,
    names: [&'b [u8]; MAX_CONNECTION_TOKENS],
    nr_names: usize,
}

impl<'b> ConnectionTokens<'b> {
    fn add(&mut self, value: &'b [u8]) -> Result<(), ()> {
        for tok in value.split(|&b| b == b',') {
            let tok = trim(tok);
            if tok.is_empty() {
                continue;
            }
            if tok.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if tok.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if tok.eq_ignore_ascii_case(b"upgrade") {
                self.upgrade = true;
            } else {
                if self.nr_names == MAX_CONNECTION_TOKENS {
                    return Err(());
                }
                self.names[self.nr_names] = tok;
                self.nr_names += 1;
            }
        }
        Ok(())
    }

    /// Is `name` listed as a connection option (hence hop-by-hop)?
    pub fn lists(&self, name: &str) -> bool {
        self.names[..self.nr_names]
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
    }
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// The request target, reduced to what is forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'b> {
    /// `/path?query` (absolute-form targets are reduced to this, their authority becoming Host).
    Origin(&'b str),
    /// `*` for `OPTIONS *`.
    Asterisk,
}

pub struct ParsedRequest<'h, 'b> {
    pub info: RequestInfo,
    pub method: &'b str,
    pub target: Target<'b>,
    /// Host to forward: the absolute-form authority if any, else the Host header.
    pub host: Option<&'b [u8]>,
    pub headers: &'h [Header<'b>],
    pub connection: ConnectionTokens<'b>,
}

/// Is `name` one of the hop-by-hop headers we never forward (RFC 9110 §7.6.1 plus the
/// legacy ones)?
pub fn is_hop_by_hop(name: &str) -> bool {
    const HOP: [&str; 7] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "transfer-encoding",
    ];
    HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// Every LF is preceded by CR and every CR followed by LF; no NUL anywhere.
fn line_endings_ok(head: &[u8]) -> bool {
    let mut prev = 0u8;
    for (i, &b) in head.iter().enumerate() {
        match b {
            b'\n' if prev != b'\r' => return false,
            b'\r' if head.get(i + 1) != Some(&b'\n') => return false,
            0 => return false,
            _ => {}
        }
        prev = b;
    }
    true
}

fn parse_content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut n: u64 = 0;
    for &d in v {
        n = n.checked_mul(10)?.checked_add((d - b'0') as u64)?;
    }
    Some(n)
}

/// The Transfer-Encoding fields of a message, folded token by token.
#[derive(Debug, Clone, Copy, Default)]
struct Codings {
    present: bool,
    nr_tokens: usize,
    nr_chunked: usize,
    last_is_chunked: bool,
    unknown: bool,
}

impl Codings {
    fn add(&mut self, value: &[u8]) {
        self.present = true;
        for tok in value.split(|&b| b == b',') {
            let tok = trim(tok);
            if tok.is_empty() {
                continue;
            }
            self.nr_tokens += 1;
            let chunked = tok.eq_ignore_ascii_case(b"chunked");
            if chunked {
                self.nr_chunked += 1;
            } else if !["gzip", "x-gzip", "deflate", "compress", "x-compress"]
                .iter()
                .any(|c| tok.eq_ignore_ascii_case(c.as_bytes()))
            {
                self.unknown = true;
            }
            self.last_is_chunked = chunked;
        }
    }

    /// Exactly one `chunked`, and it is the final coding.
    fn is_chunked(&self) -> bool {
        self.nr_tokens > 0 && self.nr_chunked == 1 && self.last_is_chunked
    }
}

/// Version error: 505 for a well-formed but unsupported HTTP version, else 400.
fn version_error(input: &[u8]) -> RequestError {
    let line_end = input
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(input.len());
    let line = &input[..line_end];
    let v = line.rsplit(|&b| b == b' ').next().unwrap_or(b"");
    if v.len() == 8
        && v.starts_with(b"HTTP/")
        && v[5].is_ascii_digit()
        && v[6] == b'.'
        && v[7].is_ascii_digit()
    {
        RequestError {
            status: 505,
            reason: "unsupported HTTP version",
        }
    } else {
        bad("malformed HTTP version")
    }
}

/// Split an absolute-form target into (authority, origin-form path).
fn absolute_form(t: &str) -> Option<(&str, &str)> {
    let rest = t
        .strip_prefix("http://")
        .or_else(|| t.strip_prefix("https://"))
        .or_else(|| {
            // scheme is case-insensitive
            let lower = t.get(..8)?;
            if lower.eq_ignore_ascii_case("https://") {
                t.get(8..)
            } else if lower.get(..7)?.eq_ignore_ascii_case("http://") {
                t.get(7..)
            } else {
                None
            }
        })?;
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    let valid = !authority.is_empty()
        && authority.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_')
        });
    if !valid {
        return None;
    }
    Some((authority, if path.is_empty() { "/" } else { path }))
}

/// Parse a request head from `input`. `Ok(None)`: incomplete, read more. On `Ok(Some)`, the
/// head is `input[..info.head_len]`.
pub fn parse_request<'h, 'b>(
    input: &'b [u8],
    headers: &'h mut [Header<'b>],
    limits: &HeadLimits,
) -> Result<Option<ParsedRequest<'h, 'b>>, RequestError> {
    // The request line limit applies before anything else: 414 beats 431.
    let line_end = input.iter().position(|&b| b == b'\n');
    match line_end {
        None if input.len() > limits.max_request_line => {
            return Err(RequestError {
                status: 414,
                reason: "request line too long",
            })
        }
        Some(n) if n > limits.max_request_line => {
            return Err(RequestError {
                status: 414,
                reason: "request line too long",
            })
        }
        _ => {}
    }
    let mut req = httparse::Request::new(headers);
    let head_len = match req.parse(input) {
        Ok(Status::Complete(n)) => n,
        Ok(Status::Partial) => {
            if input.len() >= limits.max_header_size {
                return Err(RequestError {
                    status: 431,
                    reason: "request head too large",
                });
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(RequestError {
                status: 431,
                reason: "too many header fields",
            })
        }
        Err(httparse::Error::Version) => return Err(version_error(input)),
        Err(httparse::Error::HeaderName) => return Err(bad("invalid header field name")),
        Err(httparse::Error::HeaderValue) => return Err(bad("invalid header field value")),
        // httparse reports a bad byte in the method or the target alike
        Err(httparse::Error::Token) => return Err(bad("invalid method or request target")),
        Err(_) => return Err(bad("malformed request head")),
    };
    if head_len > limits.max_header_size {
        return Err(RequestError {
            status: 431,
            reason: "request head too large",
        });
    }
    if !line_endings_ok(&input[..head_len]) {
        return Err(bad("bare CR or LF, or NUL, in request head"));
    }
    let method_str = req.method.unwrap_or("");
    let method = Method::from_str(method_str);
    let minor = req.version.unwrap_or(1);
    let path = req.path.unwrap_or("");
    if method == Method::Connect {
        return Err(RequestError {
            status: 405,
            reason: "CONNECT is not served",
        });
    }
    if !path.is_ascii() {
        return Err(bad("request target is not ASCII"));
    }
    let mut host_from_target = None;
    let target = if path.starts_with('/') {
        Target::Origin(path)
    } else if path == "*" && method == Method::Options {
        Target::Asterisk
    } else if let Some((authority, p)) = absolute_form(path) {
        host_from_target = Some(authority.as_bytes());
        Target::Origin(p)
    } else {
        return Err(bad("invalid request target"));
    };

    let hdrs: &'h [Header<'b>] = req.headers;
    let mut content_length: Option<u64> = None;
    let mut nr_content_length = 0;
    let mut codings = Codings::default();
    let mut host: Option<&'b [u8]> = None;
    let mut nr_host = 0;
    let mut connection = ConnectionTokens::default();
    let mut expect_continue = false;
    let mut has_upgrade = false;
    for h in hdrs {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            nr_content_length += 1;
            if nr_content_length > 1 {
                return Err(bad("repeated Content-Length"));
            }
            content_length =
                Some(parse_content_length(h.value).ok_or(bad("invalid Content-Length"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            codings.add(h.value);
        } else if name.eq_ignore_ascii_case("host") {
            nr_host += 1;
            host = Some(trim(h.value));
        } else if name.eq_ignore_ascii_case("connection") {
            connection
                .add(h.value)
                .map_err(|_| bad("too many Connection options"))?;
        } else if name.eq_ignore_ascii_case("expect") {
            if trim(h.value).eq_ignore_ascii_case(b"100-continue") {
                expect_continue = true;
            } else {
                return Err(RequestError {
                    status: 417,
                    reason: "unsupported expectation",
                });
            }
        } else if name.eq_ignore_ascii_case("upgrade") {
            // HTTP/1.1's upgrade to h2c (deprecated by RFC 9113) is not passed on: a real
            // server's 101 would turn the connection into a tunnel no request rule sees.
            // The request is served as HTTP/1.1, as the client must then accept.
            has_upgrade = !h
                .value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"h2c"));
        }
    }
    if nr_host > 1 {
        return Err(bad("repeated Host"));
    }
    if minor == 1 && nr_host == 0 {
        return Err(bad("missing Host"));
    }
    for h in [host, host_from_target].into_iter().flatten() {
        if !valid_authority(h) {
            return Err(bad("invalid Host"));
        }
    }
    let body = if codings.present {
        if content_length.is_some() {
            return Err(bad("both Content-Length and Transfer-Encoding"));
        }
        if minor == 0 {
            return Err(bad("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if codings.unknown {
            return Err(RequestError {
                status: 501,
                reason: "unknown transfer coding",
            });
        }
        if !codings.is_chunked() {
            return Err(bad("final transfer coding is not chunked"));
        }
        BodyKind::Chunked
    } else {
        match content_length {
            Some(0) | None => BodyKind::None,
            Some(n) => BodyKind::Length(n),
        }
    };
    let keep_alive = if minor == 1 {
        !connection.close
    } else {
        connection.keep_alive && !connection.close
    };
    let upgrade = minor == 1 && connection.upgrade && has_upgrade;
    Ok(Some(ParsedRequest {
        info: RequestInfo {
            method,
            minor,
            head_len,
            body,
            keep_alive,
            // 100-continue means nothing without a body, or to an HTTP/1.0 client
            expect_continue: expect_continue && minor == 1 && body != BodyKind::None,
            upgrade,
        },
        method: method_str,
        target,
        host: host_from_target.or(host),
        headers: hdrs,
        connection,
    }))
}

/// Is `h` RFC 3986 `host [":" port]` (reg-name, IPv4 or IP-literal), without percent-escapes? Anything else
/// (raw UTF-8, quotes, backslashes, spaces, controls, userinfo, a path) is refused, so the
/// host routing, ESP and the real server read the same name. An empty Host is allowed (the
/// RFC allows it when the target has no authority).
pub fn valid_authority(h: &[u8]) -> bool {
    let (host, port) = if let Some(rest) = h.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &rest[..end];
        let ok = std::str::from_utf8(literal)
            .ok()
            .is_some_and(|l| l.parse::<std::net::Ipv6Addr>().is_ok());
        if !ok {
            return false;
        }
        match &rest[end + 1..] {
            [] => (&b""[..], None),
            [b':', port @ ..] => (&b""[..], Some(port)),
            _ => return false,
        }
    } else {
        match h.iter().rposition(|&b| b == b':') {
            Some(i) => (&h[..i], Some(&h[i + 1..])),
            None => (h, None),
        }
    };
    if let Some(p) = port {
        if p.len() > 5 || !p.iter().all(u8::is_ascii_digit) {
            return false;
        }
        if !p.is_empty()
            && std::str::from_utf8(p)
                .ok()
                .and_then(|p| p.parse::<u16>().ok())
                .is_none()
        {
            return false;
        }
    }
    // reg-name (an IPv4 address is one too): unreserved / sub-delims. Percent-encoded names
    // are refused: no client sends them, and they would route one way and serve another.
    host.iter().all(|&b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            )
    })
}

/// What the proxy keeps of a response once its head buffer is released.
#[derive(Debug, Clone, Copy)]
pub struct ResponseInfo {
    pub status: u16,
    pub minor: u8,
    pub head_len: usize,
    pub body: BodyKind,
    /// The real server will keep this connection open after the response.
    pub reusable: bool,
}

pub struct ParsedResponse<'h, 'b> {
    pub info: ResponseInfo,
    pub reason: &'b str,
    pub headers: &'h [Header<'b>],
    pub connection: ConnectionTokens<'b>,
}

/// Parse a response head. `Ok(None)`: incomplete. Errors name why the response is refused
/// (the client then gets 502).
pub fn parse_response<'h, 'b>(
    input: &'b [u8],
    headers: &'h mut [Header<'b>],
    request_method: Method,
    max_size: usize,
) -> Result<Option<ParsedResponse<'h, 'b>>, &'static str> {
    let mut resp = httparse::Response::new(headers);
    let head_len = match resp.parse(input) {
        Ok(Status::Complete(n)) => n,
        Ok(Status::Partial) => {
            if input.len() >= max_size {
                return Err("response head too large");
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => return Err("too many response header fields"),
        Err(_) => return Err("malformed response head"),
    };
    if !line_endings_ok(&input[..head_len]) {
        return Err("bare CR or LF, or NUL, in response head");
    }
    let status = resp.code.unwrap_or(0);
    if !(100..=599).contains(&status) {
        return Err("invalid status code");
    }
    let minor = resp.version.unwrap_or(1);
    let reason = resp.reason.unwrap_or("");
    let hdrs: &'h [Header<'b>] = resp.headers;
    let mut content_length = None;
    let mut nr_content_length = 0;
    let mut codings = Codings::default();
    let mut connection = ConnectionTokens::default();
    for h in hdrs {
        if h.name.eq_ignore_ascii_case("content-length") {
            nr_content_length += 1;
            if nr_content_length > 1 {
                return Err("repeated Content-Length in response");
            }
            content_length =
                Some(parse_content_length(h.value).ok_or("invalid Content-Length in response")?);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            codings.add(h.value);
        } else if h.name.eq_ignore_ascii_case("connection") {
            connection
                .add(h.value)
                .map_err(|_| "too many Connection options in response")?;
        }
    }
    if codings.present && content_length.is_some() {
        return Err("both Content-Length and Transfer-Encoding in response");
    }
    if codings.present && (minor == 0 || codings.unknown || !codings.is_chunked()) {
        return Err("response transfer coding is not a final chunked");
    }
    let no_body = status < 200 || status == 204 || status == 304 || request_method == Method::Head;
    let body = if no_body {
        BodyKind::None
    } else if codings.present {
        BodyKind::Chunked
    } else {
        match content_length {
            Some(0) => BodyKind::None,
            Some(n) => BodyKind::Length(n),
            None => BodyKind::CloseDelimited,
        }
    };
    let reusable = body != BodyKind::CloseDelimited
        && if minor == 1 {
            !connection.close
        } else {
            connection.keep_alive && !connection.close
        };
    Ok(Some(ParsedResponse {
        info: ResponseInfo {
            status,
            minor,
            head_len,
            body,
            reusable,
        },
        reason,
        headers: hdrs,
        connection,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(raw: &[u8]) -> Result<Option<RequestInfo>, RequestError> {
        let mut h = [httparse::EMPTY_HEADER; 64];
        parse_request(raw, &mut h, &HeadLimits::default()).map(|o| o.map(|r| r.info))
    }

    #[test]
    fn an_upgrade_to_h2c_is_not_an_upgrade() {
        let up = |v: &str| {
            let raw = format!("GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: {v}\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n");
            req(raw.as_bytes()).unwrap().unwrap().upgrade
        };
        assert!(!up("h2c"));
        assert!(!up("H2C"));
        assert!(!up("foo, h2c"));
        assert!(up("websocket"));
    }

    fn status(raw: &[u8]) -> u16 {
        match req(raw) {
            Err(e) => e.status,
            Ok(Some(_)) => 200,
            Ok(None) => 0,
        }
    }

    #[test]
    fn framing_is_determined_exactly() {
        let r = req(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.body, BodyKind::Length(10));
        let r = req(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, CHUNKED\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.body, BodyKind::Chunked);
        let r = req(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.body, BodyKind::None);
        let r = req(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").unwrap().unwrap();
        assert_eq!(r.body, BodyKind::None);
        assert!(r.keep_alive);
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        for raw in [
            &b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1,1\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked,chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: b\rc\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: \x00\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
        ] {
            let s = status(raw);
            assert!((400..500).contains(&s) || s == 501, "{s} for {:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn connection_options_and_keep_alive() {
        let mut h = [httparse::EMPTY_HEADER; 16];
        let raw = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, X-Foo\r\n\r\n";
        let r = parse_request(raw, &mut h, &HeadLimits::default())
            .unwrap()
            .unwrap();
        assert!(!r.info.keep_alive);
        assert!(r.connection.lists("x-foo"));
        assert!(!r.connection.lists("x-bar"));
        let r = req(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!r.keep_alive);
        let r = req(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(r.keep_alive);
        let r =
            req(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                .unwrap()
                .unwrap();
        assert!(r.upgrade);
        let r = req(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(
            !r.upgrade,
            "Upgrade without Connection: upgrade is not an upgrade"
        );
    }

    #[test]
    fn limits_and_versions() {
        assert_eq!(
            req(b"GET / HTTP/1.1\r\nHost: a\r\n").unwrap().map(|_| ()),
            None
        );
        let long = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "x".repeat(9000));
        assert_eq!(status(long.as_bytes()), 414);
        assert_eq!(status(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"), 505);
        assert_eq!(status(b"GET / HTTP/1.1x\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status(b"GET / FTP/1.1\r\nHost: a\r\n\r\n"), 400);
        let mut many = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
        for i in 0..70 {
            many.push_str(&format!("X-{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(status(many.as_bytes()), 431);
    }

    #[test]
    fn targets() {
        let mut h = [httparse::EMPTY_HEADER; 16];
        let r = parse_request(
            b"GET HTTP://Example.com:8080?q HTTP/1.1\r\nHost: x\r\n\r\n",
            &mut h,
            &HeadLimits::default(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.target, Target::Origin("?q"));
        assert_eq!(r.host, Some(&b"Example.com:8080"[..]));
        assert_eq!(status(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"), 200);
        assert_eq!(status(b"GET * HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(
            status(b"GET http://user@evil/ HTTP/1.1\r\nHost: a\r\n\r\n"),
            400
        );
        assert_eq!(status(b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n"), 405);
    }

    fn resp(raw: &[u8], method: Method) -> Result<Option<ResponseInfo>, &'static str> {
        let mut h = [httparse::EMPTY_HEADER; 64];
        parse_response(raw, &mut h, method, 16384).map(|o| o.map(|r| r.info))
    }

    #[test]
    fn response_framing() {
        let r = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", Method::Get)
            .unwrap()
            .unwrap();
        assert_eq!((r.body, r.reusable), (BodyKind::Length(3), true));
        let r = resp(b"HTTP/1.1 200 OK\r\n\r\n", Method::Get)
            .unwrap()
            .unwrap();
        assert_eq!((r.body, r.reusable), (BodyKind::CloseDelimited, false));
        let r = resp(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
            Method::Head,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.body, BodyKind::None);
        let r = resp(
            b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
            Method::Get,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.body, BodyKind::None);
        let r = resp(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", Method::Get)
            .unwrap()
            .unwrap();
        assert!(!r.reusable);
        let r = resp(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            Method::Get,
        )
        .unwrap()
        .unwrap();
        assert!(!r.reusable);
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\nContent-Length: 1\n\n",
            b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
            b"HTTP/1.1 20 OK\r\n\r\n",
        ] {
            assert!(
                resp(bad, Method::Get).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}

/// A bounded, seeded "never panics, never accepts ambiguity" test: mutated requests and
/// responses go through the parsers, and whatever is accepted is checked against an
/// independent reading of the raw head.
#[cfg(test)]
mod random_input {
    use super::*;
    use crate::http::chunked::ChunkedDecoder;

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            // xorshift64*
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    const SEEDS: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"GET http://h/p HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    ];
    const BITS: &[&[u8]] = &[
        b"Content-Length: 5\r\n",
        b"Content-Length: 6\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: gzip\r\n",
        b"transfer-encoding: chunked, identity\r\n",
        b"Host: b\r\n",
        b"\r\n",
        b"\n",
        b"\r",
        b" ",
        b"\t",
        b":",
        b"\0",
        b",",
        b"chunked",
        b"HTTP/1.0",
        b"Expect: 100-continue\r\n",
        b"Connection: close, Upgrade\r\nUpgrade: x\r\n",
        b"\x80\xff",
    ];

    fn mutate(rng: &mut Rng, base: &[u8]) -> Vec<u8> {
        let mut v = base.to_vec();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(v.len() + 1);
            match rng.below(4) {
                0 => {
                    let bit = BITS[rng.below(BITS.len())];
                    v.splice(at..at, bit.iter().copied());
                }
                1 if !v.is_empty() => {
                    let end = (at + 1 + rng.below(8)).min(v.len());
                    v.drain(at.min(end)..end);
                }
                2 if !v.is_empty() => {
                    let i = rng.below(v.len());
                    v[i] = rng.next() as u8;
                }
                _ => {
                    let bit = BITS[rng.below(BITS.len())];
                    v.extend_from_slice(bit);
                }
            }
        }
        v
    }

    /// Header lines of an accepted head, read without httparse.
    fn fields(head: &[u8]) -> Vec<(String, String)> {
        let text = String::from_utf8_lossy(head);
        text.split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_ascii_lowercase()))
            .collect()
    }

    fn check_unambiguous(head: &[u8], body: BodyKind, minor: u8, is_request: bool) {
        let what = String::from_utf8_lossy(head).into_owned();
        assert!(!head.contains(&0), "NUL accepted: {what:?}");
        for (i, &b) in head.iter().enumerate() {
            if b == b'\n' {
                assert!(i > 0 && head[i - 1] == b'\r', "bare LF accepted: {what:?}");
            }
            if b == b'\r' {
                assert_eq!(head.get(i + 1), Some(&b'\n'), "bare CR accepted: {what:?}");
            }
        }
        let f = fields(head);
        let cl = f.iter().filter(|(k, _)| k == "content-length").count();
        let te: Vec<&String> = f
            .iter()
            .filter(|(k, _)| k == "transfer-encoding")
            .map(|(_, v)| v)
            .collect();
        assert!(cl <= 1, "repeated Content-Length accepted: {what:?}");
        assert!(cl == 0 || te.is_empty(), "CL with TE accepted: {what:?}");
        if !te.is_empty() {
            let all = te.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",");
            let last = all.split(',').map(str::trim).rfind(|s| !s.is_empty());
            assert_eq!(
                last,
                Some("chunked"),
                "TE not ending in chunked accepted: {what:?}"
            );
            assert!(
                body == BodyKind::Chunked || body == BodyKind::None,
                "{what:?}"
            );
        }
        if is_request && minor == 1 {
            assert_eq!(
                f.iter().filter(|(k, _)| k == "host").count(),
                1,
                "Host count: {what:?}"
            );
        }
    }

    #[test]
    fn mutated_requests_never_panic_nor_pass_ambiguity() {
        let limits = HeadLimits::default();
        let mut accepted = 0;
        for seed in 1..=4u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for _ in 0..12_000 {
                let base = SEEDS[rng.below(SEEDS.len())];
                let input = mutate(&mut rng, base);
                let mut h = [httparse::EMPTY_HEADER; 64];
                if let Ok(Some(r)) = parse_request(&input, &mut h, &limits) {
                    accepted += 1;
                    check_unambiguous(&input[..r.info.head_len], r.info.body, r.info.minor, true);
                }
                let mut h = [httparse::EMPTY_HEADER; 64];
                let as_response = [
                    &b"HTTP/1.1 200 OK\r\n"[..],
                    &input[input.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1)..],
                ]
                .concat();
                if let Ok(Some(r)) = parse_response(&as_response, &mut h, Method::Get, 16384) {
                    check_unambiguous(
                        &as_response[..r.info.head_len],
                        r.info.body,
                        r.info.minor,
                        false,
                    );
                }
                // the chunked decoder on whatever follows the head
                let mut d = ChunkedDecoder::new();
                let mut off = 0;
                while off < input.len() {
                    match d.step(&input[off..]) {
                        Ok(s) => {
                            assert!(s.consumed <= input.len() - off);
                            if s.consumed == 0 || s.done {
                                break;
                            }
                            off += s.consumed;
                        }
                        Err(_) => break,
                    }
                }
            }
        }
        assert!(
            accepted > 1000,
            "the mutations still exercise accepted paths ({accepted})"
        );
    }
}
