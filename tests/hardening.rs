//! Hardening through the real binary: every timeout phase, body and connection limits,
//! per-client limits, and a connection flood that must not stop a normal request.

mod common;

use common::client::{one, Client};
use common::origin::{Next, Origin, Seen};
use common::*;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn one_shard(listen: SocketAddr, origin: SocketAddr, extra: &str, top: &str) -> String {
    format!("{top}\n[runtime]\nshards = 1\n[[virtual_service]]\nlisten = \"{listen}\"\n{extra}\n[[virtual_service.real_server]]\naddress = \"{origin}\"\n")
}

fn within(d: Duration, lo: u64, hi: u64) -> bool {
    d >= Duration::from_millis(lo) && d < Duration::from_millis(hi)
}

#[test]
fn a_trickling_head_is_cut_off_at_the_head_timeout() {
    let o = Origin::ok("ok");
    let listen = local(free_port());
    let _p = Proxy::start(
        &one_shard(listen, o.addr, "request_timeout = \"600ms\"", ""),
        listen,
    );
    let mut c = Client::connect(listen);
    let started = Instant::now();
    // a byte every 50 ms, forever: each read makes progress, the head never completes
    let w = c.w.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        let mut w = w;
        for b in b"GET / HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if w.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let r = c.read(false).unwrap();
    assert_eq!(r.status, 408);
    assert!(
        within(started.elapsed(), 550, 3000),
        "{:?}",
        started.elapsed()
    );
    trickle.join().unwrap();
    assert_eq!(o.nr_requests(), 0);
}

#[test]
fn a_stalled_request_body_gets_408() {
    let o = Origin::ok("ok");
    let listen = local(free_port());
    let _p = Proxy::start(
        &one_shard(listen, o.addr, "client_body_timeout = \"300ms\"", ""),
        listen,
    );
    let mut c = Client::connect(listen);
    c.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly ten b");
    let started = Instant::now();
    let r = c.read(false).unwrap();
    assert_eq!(r.status, 408);
    assert!(
        within(started.elapsed(), 250, 3000),
        "{:?}",
        started.elapsed()
    );
    assert!(c.is_closed());
}

#[test]
fn a_silent_tls_client_is_closed_at_the_handshake_timeout() {
    let ca = common::pki::Ca::new("CA");
    let dir = tmpdir("hs-timeout");
    let (cert, key) = ca.leaf(&["a.example"], false).write(&dir, "c");
    let o = Origin::ok("ok");
    let listen = local(free_port());
    let extra = format!(
        "[virtual_service.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\nhandshake_timeout = \"300ms\"\n",
        cert.display(),
        key.display()
    );
    let p = Proxy::start(&one_shard(listen, o.addr, &extra, ""), listen);
    let mut s = TcpStream::connect(listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    let mut b = [0u8; 16];
    let n = s.read(&mut b).unwrap_or(0);
    assert_eq!(n, 0, "closed without a byte");
    assert!(
        within(started.elapsed(), 250, 3000),
        "{:?}",
        started.elapsed()
    );
    wait_until(Duration::from_secs(5), "logged", || {
        p.log().contains("TLS handshake failed")
    });
}

#[test]
fn an_unreachable_real_server_gives_504_at_the_connect_timeout() {
    // A listener with a zero backlog that never accepts: once its queue is full the kernel
    // drops further SYNs, so connecting hangs.
    use socket2::{Domain, Socket, Type};
    let sk = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    sk.bind(&local(0).into()).unwrap();
    sk.listen(0).unwrap();
    let addr = sk.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let f = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        f.set_nonblocking(true).unwrap();
        let _ = f.connect(&addr.into());
        fillers.push(f);
    }
    std::thread::sleep(Duration::from_millis(100)); // let the fillers' SYNs land in the queue
    let listen = local(free_port());
    let _p = Proxy::start(
        &one_shard(listen, addr, "connect_timeout = \"400ms\"", ""),
        listen,
    );
    let started = Instant::now();
    let r = one(listen, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.status, 504);
    assert!(
        within(started.elapsed(), 350, 5000),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_real_server_stalling_mid_body_is_cut_off() {
    let o = Origin::start(Arc::new(|_s: &Seen, w: &mut TcpStream| {
        let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nhalf");
        std::thread::sleep(Duration::from_secs(10));
        Next::Close
    }));
    let listen = local(free_port());
    let _p = Proxy::start(
        &one_shard(listen, o.addr, "upstream_body_timeout = \"300ms\"", ""),
        listen,
    );
    let mut c = Client::connect(listen);
    c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    let started = Instant::now();
    assert!(c.read(false).is_err(), "truncated, not complete");
    assert!(
        within(started.elapsed(), 250, 5000),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn an_idle_tunnel_is_closed() {
    let o = Origin::start(Arc::new(|_s: &Seen, w: &mut TcpStream| {
        let _ = w.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n");
        Next::Echo
    }));
    let listen = local(free_port());
    let _p = Proxy::start(
        &one_shard(listen, o.addr, "tunnel_idle_timeout = \"300ms\"", ""),
        listen,
    );
    let mut c = Client::connect(listen);
    let r = c
        .request(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
    assert_eq!(r.status, 101);
    c.send(b"ping");
    let mut back = [0u8; 4];
    c.r.read_exact(&mut back).unwrap();
    let started = Instant::now();
    assert!(c.is_closed());
    assert!(
        within(started.elapsed(), 250, 5000),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn bodies_over_the_limit_get_413() {
    let o = Origin::ok("ok");
    let listen = local(free_port());
    let _p = Proxy::start(
        &one_shard(listen, o.addr, "max_body_size = \"1KiB\"", ""),
        listen,
    );
    let mut c = Client::connect(listen);
    c.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2048\r\n\r\n");
    assert_eq!(c.read(false).unwrap().status, 413);
    assert_eq!(o.nr_requests(), 0, "refused before anything was forwarded");
    // chunked: found while streaming; the client still gets 413
    let mut c = Client::connect(listen);
    let mut req = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..4 {
        req.extend_from_slice(b"200\r\n");
        req.extend_from_slice(&[b'x'; 512]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    c.send(&req);
    assert_eq!(c.read(false).unwrap().status, 413);
    // within the limit: fine
    let mut c = Client::connect(listen);
    let mut ok = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n".to_vec();
    ok.extend_from_slice(&[b'y'; 1000]);
    assert_eq!(c.request(&ok).status, 200);
}

#[test]
fn service_and_appliance_connection_limits() {
    let o = Origin::ok("ok");
    let listen = local(free_port());
    for (extra, top) in [
        ("max_connections = 2", ""),
        ("", "[runtime]\nmax_connections = 2\n"),
    ] {
        let cfg = if top.is_empty() {
            one_shard(listen, o.addr, extra, "")
        } else {
            format!("{top}shards = 1\n[[virtual_service]]\nlisten = \"{listen}\"\n[[virtual_service.real_server]]\naddress = \"{}\"\n", o.addr)
        };
        let p = Proxy::start(&cfg, listen);
        // the start-up probe's connection may still be open: wait until a fresh one is served
        wait_until(Duration::from_secs(5), "probe gone", || {
            let mut c = Client::connect(listen);
            c.send(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
            matches!(c.read(false), Ok(r) if r.status == 200)
        });
        // the probe's own connection may still hold its place for a moment after its answer
        let mut held: Vec<Client> = Vec::new();
        wait_until(Duration::from_secs(5), "two connections held", || {
            held = (0..2).map(|_| Client::connect(listen)).collect();
            held.iter_mut()
                .all(|c| c.request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").status == 200)
        });
        let r = one(listen, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(r.status, 503, "{extra}{top}");
        drop(held);
        wait_until(Duration::from_secs(5), "room again", || {
            one(listen, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").status == 200
        });
        drop(p);
    }
}

fn ip(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

#[test]
fn per_client_limits_refuse_only_that_client_and_log_once() {
    let o = Origin::ok("ok");
    let listen = local(free_port());
    let admin = local(free_port());
    let dir = tmpdir("client-limits");
    let sec = dir.join("security.log");
    let top = format!(
        "[admin]\nlisten = \"{admin}\"\n[log]\nsecurity = \"{}\"\n",
        sec.display()
    );
    let cfg = simple_config(
        listen,
        &[o.addr],
        "[virtual_service.client_limits]\nmax_connections = 2\nrequests_per_second = 5\naction = \"429\"",
        &top,
    );
    let _p = Proxy::start(&cfg, listen);
    let a = ip(41);
    let mut held: Vec<Client> = (0..2).map(|_| Client::connect_from(a, listen)).collect();
    for c in held.iter_mut() {
        assert_eq!(c.request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").status, 200);
    }
    for _ in 0..5 {
        let mut c = Client::connect_from(a, listen);
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(c.read(false).unwrap().status, 429);
    }
    // another address is unaffected
    let mut other = Client::connect_from(ip(42), listen);
    assert_eq!(
        other.request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").status,
        200
    );
    // request rate: at most 5 a second on a keep-alive connection, then 429 and close
    let mut statuses = Vec::new();
    let started = Instant::now();
    for _ in 0..20 {
        match other.request_checked(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") {
            Some(s) => statuses.push(s),
            None => break,
        }
    }
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    assert!(statuses.contains(&429), "{statuses:?}");
    let seconds = started.elapsed().as_secs() + 2;
    assert!(ok as u64 <= 5 * seconds, "{ok} ok in {seconds}s");
    // five refusals of one address, one security record (once per interval)
    let mut records = Vec::new();
    wait_until(Duration::from_secs(5), "security record", || {
        records = std::fs::read_to_string(&sec)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect();
        records.iter().any(|l| l.contains("127.0.0.41"))
    });
    assert_eq!(
        records.iter().filter(|l| l.contains("127.0.0.41:")).count(),
        1,
        "{records:?}"
    );
    let m = admin_get(admin, "/metrics").text();
    let line = m
        .lines()
        .find(|l| {
            l.starts_with(
                "edgeshard_limit_refusals_total{service=\"web\",limit=\"client_connections\"}",
            )
        })
        .unwrap();
    assert!(line.ends_with(" 5"), "{line}");
}

#[test]
fn a_connection_flood_does_not_stop_a_normal_request() {
    // 2,000 idle and 200 half-sent connections, within the limits
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur);
        let want = libc::rlimit {
            rlim_cur: cur.rlim_max.min(8192),
            rlim_max: cur.rlim_max,
        };
        libc::setrlimit(libc::RLIMIT_NOFILE, &want);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur);
    }
    assert!(
        cur.rlim_cur >= 4600,
        "open-files limit {} is too low for this test: raise `ulimit -Hn`",
        cur.rlim_cur
    );
    let o = Origin::ok("ok");
    let listen = local(free_port());
    let _p = Proxy::start(
        &simple_config(listen, &[o.addr], "request_timeout = \"60s\"", ""),
        listen,
    );
    let mut flood = Vec::new();
    for i in 0..2200 {
        let mut s = TcpStream::connect(listen).unwrap();
        if i % 11 == 0 {
            let _ = s.write_all(b"GET /half HTTP/1.1\r\nHost: a\r\n");
        }
        flood.push(s);
    }
    let started = Instant::now();
    let r = one(listen, b"GET /normal HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        o.requests()
            .iter()
            .filter(|s| s.request_line.contains("/half"))
            .count(),
        0
    );
    drop(flood);
}
