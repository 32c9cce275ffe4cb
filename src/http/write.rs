//! Writing forwarded heads: the request as the real server sees it and the response as the
//! client sees it. Hop-by-hop fields go; X-Forwarded-For/-Proto and Via are added.

use super::parse::{is_hop_by_hop, ParsedRequest, ParsedResponse, Target};
use super::rules::{emit, removes, Rule, Vars};
use std::io::Write;
use std::net::IpAddr;

/// Facts about the client connection that go into forwarded headers.
#[derive(Debug, Clone, Copy)]
pub struct Forwarded {
    pub client_ip: IpAddr,
    /// "http" or "https".
    pub proto: &'static str,
    /// The client is a trusted proxy: its forwarding headers are kept (X-Forwarded-For
    /// appended to); from anyone else they are dropped and X-Forwarded-For is replaced.
    pub trusted: bool,
    /// Add an RFC 7239 Forwarded header.
    pub rfc7239: bool,
}

/// The values of every `name` field, each followed by ", " (a list we append our hop to).
fn put_earlier_hops(out: &mut Vec<u8>, req: &ParsedRequest<'_, '_>, name: &str) {
    for h in req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(name))
    {
        out.extend_from_slice(h.value);
        out.extend_from_slice(b", ");
    }
}

/// Forwarding headers a client could forge: dropped unless the client is a trusted proxy
/// (X-Forwarded-For and X-Forwarded-Proto are written by us in any case). X-Original-URL and
/// X-Rewrite-URL are IIS URL Rewrite's: a client's would route around path rules.
const FORWARDING: [&str; 13] = [
    "forwarded",
    "x-real-ip",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-ssl",
    "x-forwarded-scheme",
    "x-forwarded-server",
    "x-forwarded-prefix",
    "front-end-https",
    "x-client-ip",
    "true-client-ip",
    "x-original-url",
    "x-rewrite-url",
];

/// Fields we write ourselves: a client's spelling of them with `_` for `-` is dropped, since
/// CGI, PHP and WSGI servers read `X_Forwarded_For` as `X-Forwarded-For`.
const OURS: [&str; 4] = ["x-forwarded-for", "x-forwarded-proto", "via", "host"];

/// `name` equals `want` (lower case, hyphenated) in any case, with `_` read as `-`.
fn same_field(name: &str, want: &str) -> bool {
    name.len() == want.len()
        && name
            .bytes()
            .zip(want.bytes())
            .all(|(a, b)| a.to_ascii_lowercase() == b || (a == b'_' && b == b'-'))
}

fn is_forwarding(name: &str) -> bool {
    FORWARDING.iter().any(|f| same_field(name, f))
}

/// An underscore spelling of a field we set (never forwarded, trusted or not).
fn shadows_ours(name: &str) -> bool {
    name.contains('_') && OURS.iter().any(|f| same_field(name, f))
}

/// Append `n` in decimal (no formatting machinery: this runs for every request).
pub fn put_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Append the client's address as X-Forwarded-For writes it.
fn put_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                put_decimal(out, u64::from(o));
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// Append "Via: 1.x edgeshard" and the blank line ending the head.
fn put_via_and_end(out: &mut Vec<u8>, minor: u8) {
    out.extend_from_slice(b"Via: 1.");
    put_decimal(out, u64::from(minor));
    out.extend_from_slice(b" edgeshard\r\n\r\n");
}

fn put(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Append the upstream request head to `out`. `default_host` is sent when an HTTP/1.0
/// client sent no Host; then its place in `out` is returned (a retry on another real server
/// rewrites it). `expect_handled`: we answered 100-continue ourselves, so Expect goes.
/// `path`: the normalised path sent instead of the client's (its query is kept as it came).
pub fn write_request_head(
    req: &ParsedRequest<'_, '_>,
    fwd: &Forwarded,
    default_host: &str,
    expect_handled: bool,
    path: Option<&[u8]>,
    rules: Option<(&[Rule], &Vars<'_>)>,
    out: &mut Vec<u8>,
) -> Option<std::ops::Range<usize>> {
    out.extend_from_slice(req.method.as_bytes());
    out.push(b' ');
    match (req.target, path) {
        (Target::Origin(p), Some(normal)) => {
            out.extend_from_slice(normal);
            if let Some(q) = p.find('?') {
                out.extend_from_slice(&p.as_bytes()[q..]);
            }
        }
        (Target::Origin(p), None) => out.extend_from_slice(p.as_bytes()),
        (Target::Asterisk, _) => out.push(b'*'),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let host_at = out.len() + "Host: ".len();
    put(out, "Host", req.host.unwrap_or(default_host.as_bytes()));
    let default_host = req
        .host
        .is_none()
        .then(|| host_at..host_at + default_host.len());
    let mut nr_xff = 0;
    for h in req.headers {
        let n = h.name;
        if n.eq_ignore_ascii_case("x-forwarded-for") {
            nr_xff += 1;
            continue;
        }
        if n.eq_ignore_ascii_case("forwarded") && fwd.rfc7239 {
            continue; // written below, theirs first when trusted
        }
        if n.eq_ignore_ascii_case("host")
            || n.eq_ignore_ascii_case("x-forwarded-proto")
            || (!fwd.trusted && is_forwarding(n))
            || shadows_ours(n)
            || rules.is_some_and(|(r, _)| removes(r, n))
            || (expect_handled && n.eq_ignore_ascii_case("expect"))
            || req.connection.lists(n)
        {
            continue;
        }
        // Transfer-Encoding stays: the chunked body is forwarded as it came.
        if is_hop_by_hop(n) && !n.eq_ignore_ascii_case("transfer-encoding") {
            if req.info.upgrade && n.eq_ignore_ascii_case("upgrade") {
                put(out, "Upgrade", h.value);
            }
            continue;
        }
        put(out, n, h.value);
    }
    if req.info.upgrade {
        out.extend_from_slice(b"Connection: Upgrade\r\n");
    }
    if let Some((r, vars)) = rules {
        emit(r, vars, out);
    }
    // Earlier hops first, in order (from a trusted proxy only), then this connection's address.
    out.extend_from_slice(b"X-Forwarded-For: ");
    if nr_xff > 0 && fwd.trusted {
        put_earlier_hops(out, req, "x-forwarded-for");
    }
    put_ip(out, fwd.client_ip);
    out.extend_from_slice(b"\r\nX-Forwarded-Proto: ");
    out.extend_from_slice(fwd.proto.as_bytes());
    out.extend_from_slice(b"\r\n");
    if fwd.rfc7239 {
        out.extend_from_slice(b"Forwarded: ");
        if fwd.trusted {
            put_earlier_hops(out, req, "forwarded");
        }
        out.extend_from_slice(b"for=");
        match fwd.client_ip {
            IpAddr::V4(_) => put_ip(out, fwd.client_ip),
            IpAddr::V6(_) => {
                // RFC 7239: an IPv6 node is a quoted, bracketed string
                out.extend_from_slice(b"\"[");
                put_ip(out, fwd.client_ip);
                out.extend_from_slice(b"]\"");
            }
        }
        out.extend_from_slice(b";proto=");
        out.extend_from_slice(fwd.proto.as_bytes());
        if let Some(h) = req.host {
            // Host is validated (no quote or backslash), so it quotes as it is.
            out.extend_from_slice(b";host=\"");
            out.extend_from_slice(h);
            out.push(b'"');
        }
        out.extend_from_slice(b"\r\n");
    }
    put_via_and_end(out, req.info.minor);
    default_host
}

/// How the response head is to be framed for the client.
#[derive(Debug, Clone, Copy)]
pub struct ClientFraming {
    /// The client connection stays open after this response.
    pub keep_alive: bool,
    /// The client is HTTP/1.0.
    pub client_minor: u8,
    /// A chunked body is decoded for an HTTP/1.0 client (Transfer-Encoding goes).
    pub dechunk: bool,
    /// Interim (1xx) response: no Connection field of our own.
    pub interim: bool,
}

/// Response header rules for one response: the rules, HSTS (HTTPS clients only), the values.
#[derive(Clone, Copy)]
pub struct ResponseRules<'a> {
    pub rules: &'a [Rule],
    pub hsts: Option<&'a str>,
    pub vars: Vars<'a>,
}

/// Append the client-facing response head to `out`; `extra` holds complete header lines of
/// our own (a persistence cookie).
pub fn write_response_head(
    resp: &ParsedResponse<'_, '_>,
    f: ClientFraming,
    extra: &[u8],
    rules: Option<&ResponseRules<'_>>,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    put_decimal(out, u64::from(resp.info.status));
    out.push(b' ');
    out.extend_from_slice(resp.reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    let switching = resp.info.status == 101;
    for h in resp.headers {
        let n = h.name;
        if resp.connection.lists(n) {
            continue;
        }
        if let Some(r) = rules {
            let hsts = r.hsts.is_some() && n.eq_ignore_ascii_case("strict-transport-security");
            if hsts || removes(r.rules, n) {
                continue;
            }
        }
        if is_hop_by_hop(n) {
            let keep = (switching && n.eq_ignore_ascii_case("upgrade"))
                || (!f.dechunk && n.eq_ignore_ascii_case("transfer-encoding"))
                || (!f.dechunk && n.eq_ignore_ascii_case("trailer"));
            if !keep {
                continue;
            }
        }
        put(out, n, h.value);
    }
    out.extend_from_slice(extra);
    if let Some(r) = rules {
        if let Some(h) = r.hsts {
            put(out, "Strict-Transport-Security", h.as_bytes());
        }
        emit(r.rules, &r.vars, out);
    }
    if switching {
        out.extend_from_slice(b"Connection: Upgrade\r\n");
    } else if !f.interim {
        if !f.keep_alive {
            out.extend_from_slice(b"Connection: close\r\n");
        } else if f.client_minor == 0 {
            out.extend_from_slice(b"Connection: keep-alive\r\n");
        }
    }
    put_via_and_end(out, resp.info.minor);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_forwarding_fields_are_recognised_in_any_spelling() {
        for f in [
            "X-Real-IP",
            "x_real_ip",
            "X_FORWARDED_HOST",
            "Front-End-Https",
            "X-Original-URL",
        ] {
            assert!(is_forwarding(f), "{f}");
        }
        for f in ["X-Realip", "X-Forwarded-For", "Accept"] {
            assert!(!is_forwarding(f), "{f}");
        }
        assert!(shadows_ours("X_Forwarded_For") && shadows_ours("x_forwarded_proto"));
        assert!(
            !shadows_ours("X-Forwarded-For"),
            "the real one is handled apart"
        );
    }

    #[test]
    fn decimals_and_addresses_are_written_as_display_would() {
        for n in [0u64, 7, 10, 99, 100, 255, 65535, 1 << 40, u64::MAX] {
            let mut out = Vec::new();
            put_decimal(&mut out, n);
            assert_eq!(out, n.to_string().into_bytes());
        }
        for ip in [
            "0.0.0.0",
            "10.0.0.1",
            "192.168.100.255",
            "::1",
            "2001:db8::8:800:200c:417a",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            put_ip(&mut out, ip);
            assert_eq!(out, ip.to_string().into_bytes());
        }
    }
}
