//! One HTTP/2 stream as an HTTP/1.1 request on an in-process link into the request path, and
//! its HTTP/1.1 answer back as HEADERS, DATA and trailers under the client's flow control.

use crate::client::{Client, ClientStream, ConnFacts};
use crate::http::chunked::ChunkedDecoder;
use crate::http::parse::{parse_response, Method as H1Method};
use crate::http::{BodyKind, Buf};
use crate::net::link;
use crate::shard::accept::ClientGuard;
use crate::shard::Shard;
use bytes::Bytes;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use std::cell::Cell;
use std::io::Write as _;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Response head buffer (the request path's own head limits apply to requests).
const RESPONSE_BUF: usize = 32 * 1024;

/// A stream's link facts: the connection's client, service and TLS, as a connection of its
/// own that logs no connection record.
pub(super) fn link_facts(f: &ConnFacts) -> ConnFacts {
    ConnFacts {
        vs_idx: f.vs_idx,
        vs_slot: f.vs_slot,
        origin: f.origin.clone(),
        listen: f.listen,
        peer: f.peer,
        proto: f.proto,
        sni: f.sni.clone(),
        tls: f.tls,
        opened: Instant::now(),
        requests: 0,
        bytes_in: 0,
        bytes_out: 0,
        real_server: u32::MAX,
        bridged: true,
    }
}

pub(super) struct Link {
    pub(super) shard: Rc<Shard>,
    pub(super) facts: ConnFacts,
    /// Streams of this connection in the request path now.
    pub(super) active: Rc<Cell<usize>>,
    /// Streams of this connection the client reset before their answer.
    pub(super) resets: Rc<Cell<u64>>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.active.set(self.active.get().saturating_sub(1));
    }
}

/// Header fields that describe one HTTP/1.1 connection, never forwarded across protocols.
fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "upgrade" | "te"
    )
}

impl Link {
    pub(super) async fn serve(
        self,
        req: http::Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
    ) {
        let (parts, mut body) = req.into_parts();
        if parts.method == http::Method::CONNECT {
            let _ = respond.send_response(status_only(405), true);
            return;
        }
        // The request as HTTP/1.1: the request path judges it as it judges any other.
        let mut head = Vec::with_capacity(512);
        let target = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let _ = write!(head, "{} {target} HTTP/1.1\r\n", parts.method);
        if let Some(a) = parts.uri.authority() {
            let _ = write!(head, "Host: {a}\r\n");
        }
        let has_length = parts.headers.contains_key(http::header::CONTENT_LENGTH);
        // HTTP/2 may split Cookie into several fields; HTTP/1.1 wants one (RFC 9113 8.2.3)
        let mut cookies = parts.headers.get_all(http::header::COOKIE).iter();
        if let Some(first) = cookies.next() {
            head.extend_from_slice(b"Cookie: ");
            head.extend_from_slice(first.as_bytes());
            for c in cookies {
                head.extend_from_slice(b"; ");
                head.extend_from_slice(c.as_bytes());
            }
            head.extend_from_slice(b"\r\n");
        }
        for (name, value) in &parts.headers {
            let n = name.as_str();
            // a Host naming what :authority names is said once; one naming another entity
            // (RFC 9113 8.3.1) goes on as a second Host, which the request path refuses
            let same_host = |a: &http::uri::Authority| {
                a.as_str().as_bytes().eq_ignore_ascii_case(value.as_bytes())
            };
            if hop_by_hop(n)
                || n == "cookie"
                || (n == "host" && parts.uri.authority().is_some_and(same_host))
            {
                continue;
            }
            head.extend_from_slice(n.as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        let chunked = !body.is_end_stream() && !has_length;
        if chunked {
            head.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
        }
        head.extend_from_slice(b"Connection: close\r\n\r\n");
        let head_only = parts.method == http::Method::HEAD;

        let (mine, theirs) = link::pair();
        // each stream takes the configuration current when it starts (a reload since the
        // connection opened applies to its next streams, as to an HTTP/1.1 connection's)
        let shard = self.shard.current();
        let guard = ClientGuard::uncounted(&shard, self.facts.vs_slot, self.facts.peer.ip());
        let link = Client {
            stream: ClientStream::Link(theirs),
            facts: link_facts(&self.facts),
            guard,
        };
        crate::shard::accept::spawn_connection(
            self.facts.peer,
            Box::pin(crate::proxy::serve(shard.clone(), link)),
        );

        let send = async {
            let mut w = &mine;
            if w.write_all(&head).await.is_err() {
                return;
            }
            while let Some(chunk) = body.data().await {
                let Ok(data) = chunk else { return };
                let n = data.len();
                let ok = if chunked {
                    let mut size = Vec::with_capacity(12);
                    let _ = write!(size, "{n:x}\r\n");
                    w.write_all(&size).await.is_ok()
                        && w.write_all(&data).await.is_ok()
                        && w.write_all(b"\r\n").await.is_ok()
                } else {
                    w.write_all(&data).await.is_ok()
                };
                if !ok {
                    return;
                }
                let _ = body.flow_control().release_capacity(n);
            }
            if chunked {
                let _ = w.write_all(b"0\r\n\r\n").await;
            }
        };
        // The request body may still be coming when the answer is complete (an early 413):
        // the answer decides when this stream is done.
        let send = async {
            send.await;
            std::future::pending::<Result<(), &'static str>>().await
        };
        let window_wait = self.shard.config.services[self.facts.vs_idx].client_write_timeout;
        let answer = relay_response(&mine, &mut respond, head_only, window_wait);
        match futures_lite::future::or(send, answer).await {
            Ok(()) => {}
            Err(CLIENT_RESET) => {
                self.resets.set(self.resets.get() + 1);
                // dropping our end tells the request path, which stops at once (its real
                // server's connection closed); the stream keeps its place until it has
                let watch = mine.watch();
                drop(mine);
                let _ = crate::io::timeout(Duration::from_secs(60), async {
                    watch.gone().await;
                    Ok(())
                })
                .await;
            }
            Err(why) => {
                shard.diag("HTTP/2 stream failed", || {
                    tracing::info!(client = %self.facts.peer, "HTTP/2 stream ended early: {why}")
                });
                respond.send_reset(h2::Reason::INTERNAL_ERROR);
            }
        }
    }
}

/// Why a stream ended: the client reset it.
const CLIENT_RESET: &str = "client reset the stream";

fn status_only(status: u16) -> http::Response<()> {
    let mut r = http::Response::new(());
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY);
    r
}

/// Read the request path's HTTP/1.1 answer from the link and send it as HEADERS and DATA.
async fn relay_response(
    link: &link::End,
    respond: &mut h2::server::SendResponse<Bytes>,
    head_only: bool,
    window_wait: Duration,
) -> Result<(), &'static str> {
    let mut r = link;
    let mut buf = Buf::new(RESPONSE_BUF);
    let (response, framing, head_len) = loop {
        if buf.is_full() {
            return Err("response head too large");
        }
        // waiting for the request path's answer, a client's reset of the stream ends it
        let spare = buf.spare();
        let n = futures_lite::future::or(
            async { r.read(spare).await.map_err(|_| "link read failed") },
            async {
                let _ = std::future::poll_fn(|cx| respond.poll_reset(cx)).await;
                Err(CLIENT_RESET)
            },
        )
        .await?;
        if n == 0 {
            return Err("no response");
        }
        buf.advance(n);
        let mut hdrs = [httparse::EMPTY_HEADER; crate::config::MAX_HEADERS_CEILING];
        let method = if head_only {
            H1Method::Head
        } else {
            H1Method::Get
        };
        match parse_response(buf.filled(), &mut hdrs, method, RESPONSE_BUF) {
            Ok(None) => continue,
            Err(e) => return Err(e),
            Ok(Some(p)) if p.info.status < 200 => {
                // 1xx (the path sends none here: no Expect is forwarded): skip it
                let n = p.info.head_len;
                buf.consume(n);
                continue;
            }
            Ok(Some(p)) => {
                let mut resp = http::Response::new(());
                *resp.status_mut() =
                    http::StatusCode::from_u16(p.info.status).map_err(|_| "invalid status code")?;
                for h in p.headers {
                    let lower = h.name.to_ascii_lowercase();
                    // a 204 has no content, whatever its real server said (RFC 9110 8.6):
                    // HTTP/2 clients refuse the stream otherwise
                    let no_content_length = p.info.status == 204 && lower == "content-length";
                    if hop_by_hop(&lower) || p.connection.lists(&lower) || no_content_length {
                        continue;
                    }
                    let (Ok(name), Ok(value)) = (
                        http::header::HeaderName::from_bytes(lower.as_bytes()),
                        http::header::HeaderValue::from_bytes(h.value),
                    ) else {
                        continue;
                    };
                    resp.headers_mut().append(name, value);
                }
                break (resp, p.info.body, p.info.head_len);
            }
        }
    };
    buf.consume(head_len);
    let no_body = head_only || matches!(framing, BodyKind::None) || framing == BodyKind::Length(0);
    let mut tx = respond
        .send_response(response, no_body)
        .map_err(|_| "client reset the stream")?;
    if no_body {
        return Ok(());
    }
    let mut left = match framing {
        BodyKind::Length(n) => Some(n),
        _ => None,
    };
    let mut chunks = matches!(framing, BodyKind::Chunked).then(ChunkedDecoder::new);
    // a chunked body's framing since its last data: at its end, the last chunk and trailers
    let mut tail: Vec<u8> = Vec::new();
    loop {
        // what is buffered first, then more from the link
        while !buf.is_empty() {
            let filled = buf.filled();
            let (data, used, done) = match &mut chunks {
                Some(d) => {
                    let s = d.step(filled).map_err(|_| "bad chunked response")?;
                    match s.data {
                        Some(_) => tail.clear(),
                        // bounded: the decoder refuses trailer sections over 8 KiB
                        None => tail.extend_from_slice(&filled[..s.consumed]),
                    }
                    let data = s.data.map(|(o, l)| &filled[o..o + l]).unwrap_or(&[]);
                    (data, s.consumed, s.done)
                }
                None => {
                    let n = left.map_or(filled.len(), |l| (l as usize).min(filled.len()));
                    (&filled[..n], n, left == Some(n as u64))
                }
            };
            if !data.is_empty() {
                send_data(&mut tx, data, window_wait).await?;
            }
            if let Some(l) = left.as_mut() {
                *l -= data.len() as u64;
            }
            buf.consume(used);
            if done {
                let trailers = chunks.is_some().then(|| trailer_fields(&tail)).flatten();
                return match trailers {
                    Some(t) => tx.send_trailers(t),
                    None => tx.send_data(Bytes::new(), true),
                }
                .map_err(|_| "client reset the stream");
            }
            if used == 0 {
                break;
            }
        }
        let n = r.read(buf.spare()).await.map_err(|_| "link read failed")?;
        if n == 0 {
            return match (left, &chunks) {
                // a body delimited by the close: it is complete
                (None, None) => tx
                    .send_data(Bytes::new(), true)
                    .map_err(|_| "client reset the stream"),
                _ => Err("response cut short"),
            };
        }
        buf.advance(n);
    }
}

/// The trailer fields at the end of a chunked body's framing (`\r\n0\r\nName: value\r\n\r\n`),
/// as HTTP/2 trailers; None when there are none. Fields that describe the framing or the
/// connection are not carried over.
fn trailer_fields(tail: &[u8]) -> Option<http::HeaderMap> {
    let mut lines = tail
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    // past the last chunk's size line (`0`, maybe with extensions)
    lines.find(|l| l.first() == Some(&b'0'))?;
    let mut map = http::HeaderMap::new();
    for line in lines.take_while(|l| !l.is_empty()) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = String::from_utf8_lossy(&line[..colon])
            .trim()
            .to_ascii_lowercase();
        if hop_by_hop(&name) || matches!(name.as_str(), "content-length" | "host" | "trailer") {
            continue;
        }
        let value = line[colon + 1..].trim_ascii();
        if let (Ok(n), Ok(v)) = (
            http::header::HeaderName::from_bytes(name.as_bytes()),
            http::header::HeaderValue::from_bytes(value),
        ) {
            map.append(n, v);
        }
    }
    (!map.is_empty()).then_some(map)
}

/// Send `data` within the client's flow-control window (waiting for it, bounded).
async fn send_data(
    tx: &mut h2::SendStream<Bytes>,
    mut data: &[u8],
    window_wait: Duration,
) -> Result<(), &'static str> {
    while !data.is_empty() {
        tx.reserve_capacity(data.len());
        let cap = crate::io::timeout(window_wait, async {
            Ok(std::future::poll_fn(|cx| tx.poll_capacity(cx)).await)
        })
        .await
        .map_err(|_| "client window stayed closed")?;
        let n = match cap {
            Some(Ok(n)) => n.min(data.len()),
            _ => return Err("client reset the stream"),
        };
        if n == 0 {
            continue;
        }
        tx.send_data(Bytes::copy_from_slice(&data[..n]), false)
            .map_err(|_| "client reset the stream")?;
        data = &data[n..];
    }
    Ok(())
}
