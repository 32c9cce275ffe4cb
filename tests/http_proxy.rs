//! The HTTP/1.1 data path through the real binary: keep-alive on both sides, streaming,
//! pipelining, upgrades, forwarded headers, HTTP/1.0, HEAD/204/304, 100-continue.

mod common;

use common::client::{get, one, Client};
use common::origin::{Next, Origin, Seen};
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

fn proxy_for(origins: &[&Origin], extra: &str) -> (Proxy, std::net::SocketAddr) {
    let listen = local(free_port());
    let addrs: Vec<_> = origins.iter().map(|o| o.addr).collect();
    (
        Proxy::start(&simple_config(listen, &addrs, extra, ""), listen),
        listen,
    )
}

#[test]
fn keep_alive_is_reused_on_both_sides() {
    let o = Origin::ok("hi");
    let (_p, addr) = proxy_for(&[&o], "");
    let mut c = Client::connect(addr);
    for i in 0..5 {
        let r = c.request(&get(&format!("/k{i}")));
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"hi");
        assert!(
            r.header("connection").is_none(),
            "HTTP/1.1 keep-alive needs no Connection field"
        );
    }
    let seen = o.requests();
    assert_eq!(seen.len(), 5);
    assert_eq!(
        o.connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one upstream connection reused"
    );
    for (i, s) in seen.iter().enumerate() {
        assert_eq!(s.request_line, format!("GET /k{i} HTTP/1.1"));
    }
}

#[test]
fn forwarded_headers_and_hop_by_hop_removal() {
    let o = Origin::ok("x");
    let (_p, addr) = proxy_for(&[&o], "");
    let r = one(
        addr,
        b"GET /h HTTP/1.1\r\nHost: ws-ext.example\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-T\r\nUpgrade: h2c\r\nX-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\nForwarded: for=203.0.113.9\r\nX-Real-IP: 203.0.113.9\r\nX-Forwarded-Host: evil.example\r\nX-Forwarded-Port: 8443\r\nX_Forwarded_For: 6.6.6.6\r\nX_Forwarded_Proto: https\r\nX_Real_IP: 6.6.6.6\r\nX-Original-URL: /admin\r\nFront-End-Https: on\r\nTrue-Client-IP: 6.6.6.6\r\nX-Other: kept\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    assert!(r.header("via").unwrap().contains("edgeshard"));
    let s = &o.requests()[0];
    for h in [
        "connection",
        "x-secret",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        // forged forwarding headers from an untrusted client
        "forwarded",
        "x-real-ip",
        "x-forwarded-host",
        "x-forwarded-port",
        // underscore spellings (CGI/PHP/WSGI read them as the hyphenated ones) and others
        "x_forwarded_for",
        "x_forwarded_proto",
        "x_real_ip",
        "x-original-url",
        "front-end-https",
        "true-client-ip",
    ] {
        assert!(
            s.header(h).is_none(),
            "{h} must not be forwarded: {:?}",
            s.headers
        );
    }
    assert_eq!(s.header("host"), Some("ws-ext.example"));
    // An untrusted client's X-Forwarded-For is replaced by its own address.
    assert_eq!(s.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(s.headers_named("x-forwarded-for"), 1);
    assert_eq!(s.header("x-forwarded-proto"), Some("http"));
    assert_eq!(s.headers_named("x-forwarded-proto"), 1);
    assert_eq!(s.header("via"), Some("1.1 edgeshard"));
    assert_eq!(s.header("x-other"), Some("kept"));
}

/// From a trusted proxy the forwarding headers are kept and X-Forwarded-For is appended to;
/// RFC 7239 Forwarded is written when asked; "append" alone trusts every client.
#[test]
fn trusted_proxies_keep_forwarding_headers_and_forwarded_is_written() {
    let forged = b"GET /h HTTP/1.1\r\nHost: ws-ext.example\r\nX-Forwarded-For: 203.0.113.9\r\nForwarded: for=203.0.113.9\r\nX-Real-IP: 203.0.113.9\r\n\r\n";
    let o = Origin::ok("x");
    let (_p, addr) = proxy_for(
        &[&o],
        "trusted_proxies = [\"127.0.0.0/8\"]\nforwarded_header = true\n",
    );
    assert_eq!(one(addr, forged).status, 200);
    let s = &o.requests()[0];
    assert_eq!(s.header("x-forwarded-for"), Some("203.0.113.9, 127.0.0.1"));
    assert_eq!(s.header("x-real-ip"), Some("203.0.113.9"));
    assert_eq!(
        s.header("forwarded"),
        Some("for=203.0.113.9, for=127.0.0.1;proto=http;host=\"ws-ext.example\"")
    );
    assert_eq!(s.headers_named("forwarded"), 1);

    // A trusted list that does not hold the client: replaced and dropped as by default.
    let o2 = Origin::ok("x");
    let (_p2, addr2) = proxy_for(
        &[&o2],
        "trusted_proxies = [\"10.0.0.0/8\"]\nforwarded_header = true\n",
    );
    assert_eq!(one(addr2, forged).status, 200);
    let s = &o2.requests()[0];
    assert_eq!(s.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(s.header("x-real-ip"), None);
    assert_eq!(
        s.header("forwarded"),
        Some("for=127.0.0.1;proto=http;host=\"ws-ext.example\"")
    );

    let o3 = Origin::ok("x");
    let (_p3, addr3) = proxy_for(&[&o3], "forwarded_for = \"append\"\n");
    assert_eq!(one(addr3, forged).status, 200);
    assert_eq!(
        o3.requests()[0].header("x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );
}

fn chunked(body: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for c in body.chunks(chunk) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

#[test]
fn chunked_bodies_larger_than_any_buffer_stream_both_ways() {
    // The origin echoes the request body back, chunked in its own sizes.
    let o = Origin::start(Arc::new(|s: &Seen, w: &mut TcpStream| {
        let _ = w.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        let _ = w.write_all(&chunked(&s.body, 40_000));
        Next::KeepAlive
    }));
    let (_p, addr) = proxy_for(&[&o], "");
    let body = pattern(3 * 1024 * 1024 + 17);
    let mut c = Client::connect(addr);
    c.send(b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n");
    let framed = chunked(&body, 65_537);
    let w = c.w.try_clone().unwrap();
    // write from another thread: the proxy streams, so reading must go on concurrently
    let t = std::thread::spawn(move || {
        let mut w = w;
        w.write_all(&framed).unwrap();
    });
    let r = c.read(false).unwrap();
    t.join().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert!(
        r.body == body,
        "response body differs ({} vs {} bytes)",
        r.body.len(),
        body.len()
    );
    let seen = o.requests();
    assert!(seen[0].body == body, "origin saw a different body");
    // and the connection still works afterwards
    assert_eq!(c.request(&get("/after")).status, 200);
}

#[test]
fn content_length_bodies_stream_both_ways() {
    let o = Origin::start(Arc::new(|s: &Seen, w: &mut TcpStream| {
        let _ = write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            s.body.len()
        );
        let _ = w.write_all(&s.body);
        Next::KeepAlive
    }));
    let (_p, addr) = proxy_for(&[&o], "");
    let body = pattern(2 * 1024 * 1024);
    let mut c = Client::connect(addr);
    let mut req = format!(
        "PUT /cl HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    let w = c.w.try_clone().unwrap();
    let t = std::thread::spawn(move || {
        let mut w = w;
        w.write_all(&req).unwrap();
    });
    let r = c.read(false).unwrap();
    t.join().unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body == body);
    assert!(o.requests()[0].body == body);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let o = Origin::start(Arc::new(|s: &Seen, w: &mut TcpStream| {
        let path = s.request_line.split(' ').nth(1).unwrap().to_string();
        let _ = write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{}",
            path.len(),
            path
        );
        Next::KeepAlive
    }));
    let (_p, addr) = proxy_for(&[&o], "");
    let mut c = Client::connect(addr);
    let mut all = Vec::new();
    for i in 0..10 {
        all.extend_from_slice(&get(&format!("/p{i}")));
    }
    all.extend_from_slice(b"POST /p10 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc");
    all.extend_from_slice(&get("/p11"));
    c.send(&all);
    for i in 0..12 {
        let r = c.read(false).unwrap();
        assert_eq!(r.text(), format!("/p{i}"));
    }
    assert_eq!(o.requests()[10].body, b"abc");
}

#[test]
fn websocket_upgrade_is_tunnelled_both_ways() {
    let o = Origin::start(Arc::new(|s: &Seen, w: &mut TcpStream| {
        if s.header("upgrade") == Some("websocket") {
            let _ = w.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n");
            Next::Echo
        } else {
            let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
            Next::KeepAlive
        }
    }));
    let (_p, addr) = proxy_for(&[&o], "");
    let mut c = Client::connect(addr);
    let r = c.request(b"GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: k\r\nSec-WebSocket-Version: 13\r\n\r\n");
    assert_eq!(r.status, 101);
    assert_eq!(r.header("upgrade"), Some("websocket"));
    let s = &o.requests()[0];
    assert_eq!(s.header("connection"), Some("Upgrade"));
    assert_eq!(s.header("upgrade"), Some("websocket"));
    for msg in [&b"frame-one"[..], &pattern(100_000)[..]] {
        c.send(msg);
        let mut back = vec![0; msg.len()];
        c.r.read_exact(&mut back).unwrap();
        assert!(back == msg);
    }
    // closing our side ends the tunnel: the origin sees EOF and closes too
    c.w.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(c.is_closed());
}

#[test]
fn http10_client_gets_plain_body_and_close() {
    let o = Origin::start(Arc::new(|_s: &Seen, w: &mut TcpStream| {
        let _ = w.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
        Next::KeepAlive
    }));
    let (_p, addr) = proxy_for(&[&o], "");
    let mut c = Client::connect(addr);
    c.send(b"GET /old HTTP/1.0\r\n\r\n");
    let r = c.read(false).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.header("transfer-encoding").is_none());
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(r.body, b"hello world");
    let s = &o.requests()[0];
    assert_eq!(s.request_line, "GET /old HTTP/1.1");
    assert_eq!(s.header("host"), Some(o.addr.to_string().as_str()));
    assert_eq!(s.header("via"), Some("1.0 edgeshard"));
}

#[test]
fn http10_keep_alive_is_honoured() {
    let o = Origin::ok("ten");
    let (_p, addr) = proxy_for(&[&o], "");
    let mut c = Client::connect(addr);
    for _ in 0..2 {
        let r = c.request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert_eq!(r.body, b"ten");
        assert_eq!(r.header("connection"), Some("keep-alive"));
    }
}

#[test]
fn head_204_and_304_carry_no_body() {
    let o = Origin::start(Arc::new(|s: &Seen, w: &mut TcpStream| {
        let _ = if s.request_line.starts_with("HEAD") {
            w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        } else if s.request_line.contains("/204") {
            w.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
        } else {
            w.write_all(b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n")
        };
        Next::KeepAlive
    }));
    let (_p, addr) = proxy_for(&[&o], "");
    let mut c = Client::connect(addr);
    let r = c.request(b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!((r.status, r.header("content-length")), (200, Some("1000")));
    let r = c.request(&get("/204"));
    assert_eq!(r.status, 204);
    let r = c.request(&get("/304"));
    assert_eq!(r.status, 304);
    // were any body bytes smuggled in, this next response would be out of step
    let r = c.request(b"HEAD /h2 HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(o.connections.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn expect_100_continue_is_answered_before_the_body() {
    let o = Origin::start(Arc::new(|s: &Seen, w: &mut TcpStream| {
        let _ = write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            s.body.len()
        );
        let _ = w.write_all(&s.body);
        Next::KeepAlive
    }));
    let (_p, addr) = proxy_for(&[&o], "");
    let mut c = Client::connect(addr);
    c.send(b"POST /e HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n");
    let r = c.read(false).unwrap();
    assert_eq!(r.status, 100);
    c.send(b"hello");
    let r = c.read(false).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"hello");
    let s = &o.requests()[0];
    assert_eq!(s.body, b"hello");
    assert!(s.header("expect").is_none());
}

#[test]
fn close_delimited_response_is_relayed_then_closed() {
    let o = Origin::start(Arc::new(|_s: &Seen, w: &mut TcpStream| {
        let _ = w.write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil-eof");
        Next::Close
    }));
    let (_p, addr) = proxy_for(&[&o], "");
    let mut c = Client::connect(addr);
    c.send(&get("/eof"));
    let r = c.read(false).unwrap();
    assert_eq!(r.body, b"until-eof");
    assert_eq!(r.header("connection"), Some("close"));
}

#[test]
fn absolute_form_target_becomes_origin_form_with_its_host() {
    let o = Origin::ok("abs");
    let (_p, addr) = proxy_for(&[&o], "");
    let r = one(
        addr,
        b"GET http://meet.example/a/b?c=1 HTTP/1.1\r\nHost: other.example\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    let s = &o.requests()[0];
    assert_eq!(s.request_line, "GET /a/b?c=1 HTTP/1.1");
    assert_eq!(s.header("host"), Some("meet.example"));
    assert_eq!(s.headers_named("host"), 1);
}

#[test]
fn big_response_reaches_a_slow_reader_intact() {
    let body = Arc::new(pattern(4 * 1024 * 1024));
    let b2 = body.clone();
    let o = Origin::start(Arc::new(move |_s: &Seen, w: &mut TcpStream| {
        let _ = write!(w, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", b2.len());
        let _ = w.write_all(&b2);
        Next::KeepAlive
    }));
    let (_p, addr) = proxy_for(&[&o], "");
    let mut c = Client::connect(addr);
    c.send(&get("/big"));
    std::thread::sleep(Duration::from_millis(200)); // let buffers fill: back-pressure, not loss
    let r = c.read(false).unwrap();
    assert!(r.body == *body);
}

#[test]
fn large_responses_stream_through_bulk_buffers_and_the_upstream_connection_is_reused() {
    // Bodies above 64 KiB stream through a shard-lent 256 KiB buffer; the pooled upstream
    // connection gets its own buffer back, so a small response follows on it.
    let big = Arc::new(pattern(3 * 1024 * 1024 + 17));
    let b2 = big.clone();
    let o = Origin::start(Arc::new(move |s: &Seen, w: &mut TcpStream| {
        let body: &[u8] = if s.request_line.starts_with("GET /big") {
            &b2
        } else {
            b"small"
        };
        let _ = write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let _ = w.write_all(body);
        Next::KeepAlive
    }));
    let (_p, addr) = proxy_for(&[&o], "");
    let mut c = Client::connect(addr);
    for round in 0..3 {
        let r = c.request(&get("/big"));
        assert_eq!(r.status, 200);
        assert!(r.body == *big, "round {round}: big body intact");
        let r = c.request(&get("/small"));
        assert_eq!(r.text(), "small", "round {round}");
    }
    let seen = o.requests();
    assert_eq!(seen.len(), 6);
    assert!(
        seen.iter().all(|s| s.conn == seen[0].conn),
        "one upstream connection carried every request"
    );
}

#[test]
fn large_plain_bodies_move_by_splice_and_a_cut_is_a_cut() {
    // `splice_response`, plain on both sides, beyond 256 KiB: socket → pipe → socket, then
    // the same pooled upstream connection serves the next request
    let big = Arc::new(pattern(5 * 1024 * 1024 + 3));
    let b2 = big.clone();
    let o = Origin::start(Arc::new(move |s: &Seen, w: &mut TcpStream| {
        if s.request_line.starts_with("GET /cut") {
            // promises 2 MiB, sends 1, then closes
            let _ = write!(w, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", 2 << 20);
            let _ = w.write_all(&b2[..1 << 20]);
            return Next::Close;
        }
        let body: &[u8] = if s.request_line.starts_with("GET /big") {
            &b2
        } else {
            b"small"
        };
        let _ = write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let _ = w.write_all(body);
        Next::KeepAlive
    }));
    let admin = local(free_port());
    let listen = local(free_port());
    let _p = Proxy::start(
        &simple_config(
            listen,
            &[o.addr],
            "splice_response = true\n",
            &format!("[admin]\nlisten = \"{admin}\"\n"),
        ),
        listen,
    );
    let mut c = Client::connect(listen);
    for round in 0..2 {
        let r = c.request(&get("/big"));
        assert!(r.body == *big, "round {round}: the body intact");
        assert_eq!(c.request(&get("/small")).text(), "small");
    }
    let seen = o.requests();
    assert!(
        seen.iter().all(|s| s.conn == seen[0].conn),
        "the upstream connection reused"
    );
    // nearly all of it never came up to user space (the head's first segment may)
    let spliced = metrics(admin)["edgeshard_spliced_bytes_total{service=\"web\"}"];
    assert!(
        spliced > 2.0 * (big.len() as f64 - 300_000.0),
        "spliced {spliced}"
    );
    // a real server that dies midway: the client's response is cut short, the proxy serves on
    let mut cut = Client::connect(listen);
    cut.send(&get("/cut"));
    assert!(
        cut.read(false).is_err(),
        "a truncated body is not a response"
    );
    assert_eq!(
        Client::connect(listen).request(&get("/small")).text(),
        "small"
    );
}

#[test]
fn an_ipv6_service_accepts_and_forwards_the_client_address() {
    let o = Origin::ok("over v6");
    let listen: std::net::SocketAddr = format!("[::1]:{}", free_port()).parse().unwrap();
    let _p = Proxy::start(&simple_config(listen, &[o.addr], "", ""), listen);
    let mut c = Client::connect(listen);
    for _ in 0..2 {
        let r = c.request(&get("/six"));
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "over v6");
    }
    let seen = o.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].header("x-forwarded-for"), Some("::1"));
}

/// Header rules: set, add and delete on the request (what the real server sees) and the
/// response (what the client sees), in order, with variables; a sub-service's replace the
/// service's; HSTS only over HTTPS; bad rules are refused by check.
#[test]
fn header_rules_change_both_directions() {
    let o = Origin::start(std::sync::Arc::new(
        |_s: &common::origin::Seen, w: &mut std::net::TcpStream| {
            use std::io::Write;
            let _ = w.write_all(
                b"HTTP/1.1 200 OK\r\nServer: IIS/10\r\nX-Powered-By: ASP.NET\r\nStrict-Transport-Security: max-age=1\r\nContent-Length: 2\r\n\r\nok",
            );
            common::origin::Next::KeepAlive
        },
    ));
    let inner = Origin::ok("inner");
    let listen = local(free_port());
    let cfg = format!(
        "[runtime]\nshards = 2\noversubscribe = true\n[[virtual_service]]\nname = \"web\"\nlisten = \"{listen}\"\n\
         [virtual_service.headers]\nhsts = \"max-age=31536000\"\n\
         request = [ {{ set = \"X-Client\", value = \"${{client_addr}} via ${{service}} to ${{real_server}}\" }}, {{ delete = \"X-Debug\" }}, {{ add = \"X-Tag\", value = \"one\" }} ]\n\
         response = [ {{ set = \"X-Frame-Options\", value = \"DENY\" }}, {{ add = \"X-Served-By\", value = \"${{real_server}}\" }}, {{ delete = \"Server\" }}, {{ delete = \"X-Powered-By\" }} ]\n\
         [[virtual_service.real_server]]\naddress = \"{}\"\n\
         [[virtual_service.sub_service]]\nhosts = [\"inner.example\"]\n\
         [virtual_service.sub_service.headers]\nresponse = [ {{ add = \"X-Inner\", value = \"yes\" }} ]\n\
         [[virtual_service.sub_service.real_server]]\naddress = \"{}\"\n",
        o.addr, inner.addr
    );
    let _p = Proxy::start(&cfg, listen);
    let r = one(
        listen,
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Client: forged\r\nX-Debug: 1\r\nX-Tag: theirs\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    // what the real server saw
    let s = &o.requests()[0];
    assert_eq!(
        s.header("x-client"),
        Some(format!("127.0.0.1 via web to {}", o.addr).as_str())
    );
    assert_eq!(s.headers_named("x-client"), 1, "set replaced the client's");
    assert_eq!(s.header("x-debug"), None);
    assert_eq!(s.headers_named("x-tag"), 2, "add appended to the client's");
    // what the client saw
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    assert_eq!(r.header("x-served-by"), Some(o.addr.to_string().as_str()));
    assert_eq!(r.header("server"), None);
    assert_eq!(r.header("x-powered-by"), None);
    assert_eq!(
        r.header("strict-transport-security"),
        Some("max-age=1"),
        "HSTS is not added over plain HTTP (the real server's passes)"
    );
    // a sub-service's rules replace the service's
    let r = one(listen, b"GET / HTTP/1.1\r\nHost: inner.example\r\n\r\n");
    assert_eq!(r.header("x-inner"), Some("yes"));
    assert_eq!(r.header("x-frame-options"), None);
    // bad rules: refused with the field named
    for (rule, words) in [
        (
            "{ set = \"Content-Length\", value = \"1\" }",
            "may not be changed",
        ),
        (
            "{ set = \"X-A\", value = \"a\\r\\nX-Evil: 1\" }",
            "control characters",
        ),
        ("{ set = \"X-A\", value = \"${nope}\" }", "unknown variable"),
        (
            "{ set = \"X-A\", add = \"X-B\", value = \"1\" }",
            "exactly one of",
        ),
    ] {
        let (ok, text, _) = common::check_config(&format!(
            "[[virtual_service]]\nlisten = \"127.0.0.1:1\"\n[virtual_service.headers]\nrequest = [ {rule} ]\n[[virtual_service.real_server]]\naddress = \"127.0.0.1:2\"\n"
        ));
        assert!(
            !ok && text.contains("virtual_service[0].headers.request[0]") && text.contains(words),
            "{rule}: {text}"
        );
    }
}

#[test]
fn a_reader_cut_by_client_write_timeout_is_logged_with_what_it_got() {
    let body = Arc::new(pattern(64 * 1024 * 1024));
    let b2 = body.clone();
    let o = Origin::start(Arc::new(move |_s: &Seen, w: &mut TcpStream| {
        let _ = write!(w, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", b2.len());
        let _ = w.write_all(&b2);
        Next::Close
    }));
    let listen = local(free_port());
    let p = Proxy::start(
        &simple_config(
            listen,
            &[o.addr],
            "client_write_timeout = \"1s\"\n",
            "[log]\nuser_access = \"access.log\"\n",
        ),
        listen,
    );
    // takes 1 MiB, then reads no more
    let mut s = TcpStream::connect(listen).unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    let mut got = vec![0u8; 1 << 20];
    s.read_exact(&mut got).unwrap();
    wait_until(Duration::from_secs(10), "the cut request's record", || {
        json_lines(&p.dir.join("access.log")).iter().any(|r| {
            r["path"] == "/big"
                && r["status"] == 200
                && r["bytes_out"].as_u64().unwrap_or(0) >= 1 << 20
        })
    });
}
