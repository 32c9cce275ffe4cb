//! Layer-4 virtual services (`mode = "tcp"`): bytes relayed both ways with half-close, retries
//! on connect failure, idle timeout, the connection log, source-IP persistence, the
//! appliance-wide connection counts, the PROXY protocol both ways, TLS passed through and
//! routed by SNI (whole, split, missing, garbage), and TLS terminated in front of a TCP server.

mod common;

use common::pki::{self, Ca};
use common::tlsio::TlsOrigin;
use common::*;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// One connection as a TCP origin saw it.
#[derive(Clone, Debug, Default)]
struct Conn {
    /// The PROXY v2 header's source, if one came.
    proxied: Option<SocketAddr>,
    /// Everything received until the client's FIN.
    bytes: Vec<u8>,
    done: bool,
}

/// A TCP origin: reads a connection to its FIN (after a PROXY v2 header when `proxy`), then
/// answers `<name> <length> <checksum>` and closes. Holds the connection open meanwhile.
struct TcpOrigin {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<Conn>>>,
}

fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, &c| {
        (h ^ c as u64).wrapping_mul(0x100000001b3)
    })
}

impl TcpOrigin {
    fn start(name: &'static str, proxy: bool) -> TcpOrigin {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(Mutex::new(Vec::new()));
        let c2 = conns.clone();
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let conns = c2.clone();
                thread::spawn(move || {
                    let i = {
                        let mut v = conns.lock().unwrap();
                        v.push(Conn::default());
                        v.len() - 1
                    };
                    if proxy {
                        let mut head = [0u8; 16];
                        if s.read_exact(&mut head).is_err() {
                            return;
                        }
                        let len = u16::from_be_bytes([head[14], head[15]]) as usize;
                        let mut rest = vec![0u8; len];
                        s.read_exact(&mut rest).unwrap();
                        let mut all = head.to_vec();
                        all.extend_from_slice(&rest);
                        conns.lock().unwrap()[i].proxied = match edgeshard::proxyproto::parse(&all)
                        {
                            edgeshard::proxyproto::Header::Complete { source, .. } => source,
                            _ => None,
                        };
                    }
                    let mut buf = [0u8; 65536];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => conns.lock().unwrap()[i].bytes.extend_from_slice(&buf[..n]),
                        }
                    }
                    let b = conns.lock().unwrap()[i].bytes.clone();
                    let _ = write!(s, "{name} {} {:x}", b.len(), checksum(&b));
                    let _ = s.shutdown(Shutdown::Write);
                    conns.lock().unwrap()[i].done = true;
                });
            }
        });
        TcpOrigin { addr, conns }
    }

    fn conns(&self) -> Vec<Conn> {
        self.conns.lock().unwrap().clone()
    }
}

/// Send `data`, close our half, read the answer to the end.
fn exchange(s: &mut TcpStream, data: &[u8]) -> String {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Send `data` and read: true when the proxy closed (or reset) without sending a byte.
fn refused(addr: SocketAddr, data: &[u8]) -> bool {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(data);
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => out.is_empty(),
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset && out.is_empty(),
    }
}

fn tcp_service(
    listen: SocketAddr,
    servers: &[SocketAddr],
    extra: &str,
    admin: SocketAddr,
) -> String {
    simple_config(
        listen,
        servers,
        &format!("mode = \"tcp\"\n{extra}"),
        &format!("[admin]\nlisten = \"{admin}\"\n[log]\nconnection = \"conn.log\"\nsecurity = \"sec.log\"\nformat = \"json\"\n"),
    )
}

fn log_lines(p: &Proxy, name: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p.dir.join(name))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn bytes_relayed_both_ways_with_half_close_and_a_retry() {
    let a = TcpOrigin::start("A", false);
    let b = TcpOrigin::start("B", false);
    let dead = local(free_port()); // nothing listens: connecting there fails at once
    let (listen, admin) = (local(free_port()), local(free_port()));
    let cfg = tcp_service(
        listen,
        &[a.addr, dead, b.addr],
        "scheduling = \"round-robin\"\nretries = 2\n",
        admin,
    );
    let p = Proxy::start(&cfg, admin);
    // payloads of every size class, one larger than every buffer on the way
    let mut sizes = vec![0usize, 1, 1000, 16 * 1024, 16 * 1024 + 1, 1 << 20];
    sizes.extend(std::iter::repeat_n(777, 14));
    let mut answers = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let data: Vec<u8> = (0..n).map(|k| (k * 31 + i) as u8).collect();
        let mut s = TcpStream::connect(listen).unwrap();
        let got = exchange(&mut s, &data);
        let want_tail = format!(" {} {:x}", n, checksum(&data));
        assert!(
            got.ends_with(&want_tail),
            "connection {i}: {got:?} for {n} bytes"
        );
        answers.push(got);
    }
    // both live servers served, the dead one cost retries, never a connection
    let (na, nb) = (a.conns().len(), b.conns().len());
    assert_eq!(
        na + nb,
        sizes.len(),
        "every connection reached a live server"
    );
    assert!(na > 0 && nb > 0, "A {na} B {nb}");
    let m = metrics(admin);
    let errors: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("edgeshard_real_server_connect_errors_total"))
        .map(|(_, v)| v)
        .sum();
    assert!(errors >= 1.0, "connect errors counted: {m:?}");
    // the connection log: one close per connection, with the real server and the bytes
    wait_until(Duration::from_secs(5), "connection records", || {
        log_lines(&p, "conn.log")
            .iter()
            .filter(|r| r["event"] == "close")
            .count()
            == sizes.len()
    });
    let closes: Vec<_> = log_lines(&p, "conn.log")
        .into_iter()
        .filter(|r| r["event"] == "close")
        .collect();
    for r in &closes {
        assert_eq!(r["reason"], "closed", "{r}");
        let rs = r["real_server"].as_str().unwrap();
        assert!(rs == a.addr.to_string() || rs == b.addr.to_string(), "{r}");
    }
    let big = closes
        .iter()
        .find(|r| r["bytes_in"] == (1u64 << 20))
        .expect("the 1 MiB connection's record");
    assert!(big["bytes_out"].as_u64().unwrap() > 0);
}

#[test]
fn idle_timeout_counts_and_source_ip_persistence() {
    let a = TcpOrigin::start("A", false);
    let b = TcpOrigin::start("B", false);
    let (listen, admin) = (local(free_port()), local(free_port()));
    let cfg = tcp_service(
        listen,
        &[a.addr, b.addr],
        "idle_timeout = \"1s\"\nscheduling = \"least-connection\"\n[virtual_service.persistence]\nmode = \"source-ip\"\n",
        admin,
    );
    let p = Proxy::start(&cfg, admin);
    // tunnels held open count appliance-wide (what least connection reads)
    let mut open: Vec<TcpStream> = (0..6)
        .map(|_| {
            let mut s = TcpStream::connect(listen).unwrap();
            s.write_all(b"x").unwrap();
            s
        })
        .collect();
    wait_until(Duration::from_secs(5), "six tunnels counted", || {
        let st = status(admin);
        st["virtual_services"][0]["real_servers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["active_connections"].as_u64().unwrap())
            .sum::<u64>()
            == 6
    });
    // the proxy counts a tunnel once the kernel completed the connect; the origins'
    // accept threads may still be catching up
    wait_until(Duration::from_secs(5), "six tunnels at the origins", || {
        a.conns().len() + b.conns().len() == 6
    });
    // source-IP persistence: every connection from 127.0.0.1 went to one server
    let (na, nb) = (a.conns().len(), b.conns().len());
    assert!((na, nb) == (6, 0) || (na, nb) == (0, 6), "A {na} B {nb}");
    // nothing moves for the idle timeout: closed, and logged as such
    let t = Instant::now();
    for s in &mut open {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 16];
        assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    wait_until(Duration::from_secs(5), "idle closes logged", || {
        log_lines(&p, "conn.log")
            .iter()
            .filter(|r| r["reason"] == "idle_timeout")
            .count()
            == 6
    });
    wait_until(Duration::from_secs(5), "counts back to zero", || {
        status(admin)["virtual_services"][0]["real_servers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["active_connections"] == 0)
    });
    // another client address may land elsewhere, but keeps to its own choice
    let first = {
        let mut s = client::Client::connect_from("127.0.0.2".parse().unwrap(), listen).w;
        exchange(&mut s, b"hello")
    };
    for _ in 0..5 {
        let mut s = client::Client::connect_from("127.0.0.2".parse().unwrap(), listen).w;
        let got = exchange(&mut s, b"hello");
        assert_eq!(got[..1], first[..1], "the same real server");
    }
}

#[test]
fn proxy_protocol_to_real_servers_and_from_a_trusted_balancer() {
    let a = TcpOrigin::start("A", true);
    let (listen, admin) = (local(free_port()), local(free_port()));
    let strict = local(free_port());
    let cfg = format!(
        "{}\n[[virtual_service]]\nname = \"strict\"\nlisten = \"{strict}\"\nmode = \"tcp\"\naccept_proxy = true\ntrusted_proxies = [\"10.0.0.0/8\"]\nsend_proxy = \"v2\"\n[[virtual_service.real_server]]\naddress = \"{}\"\n",
        tcp_service(
            listen,
            &[a.addr],
            "send_proxy = \"v2\"\naccept_proxy = true\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
            admin
        ),
        a.addr
    );
    let p = Proxy::start(&cfg, admin);
    // a trusted balancer in front names the client; the real server learns it, the logs too
    let mut s = TcpStream::connect(listen).unwrap();
    let mut data = b"PROXY TCP4 203.0.113.9 192.0.2.1 40000 5061\r\n".to_vec();
    data.extend_from_slice(b"INVITE sip:x SIP/2.0\r\n");
    let got = exchange(&mut s, &data);
    assert!(got.starts_with("A 22 "), "{got}");
    let c = a.conns();
    assert_eq!(c[0].proxied, Some("203.0.113.9:40000".parse().unwrap()));
    assert_eq!(
        c[0].bytes, b"INVITE sip:x SIP/2.0\r\n",
        "only what follows the header"
    );
    // a v2 header, and a LOCAL one (the balancer's own check): its own address then
    let mut v2 = Vec::new();
    edgeshard::proxyproto::write_v2(
        &mut v2,
        "[2001:db8::9]:1234".parse().unwrap(),
        "[2001:db8::1]:5061".parse().unwrap(),
    );
    let mut s = TcpStream::connect(listen).unwrap();
    v2.extend_from_slice(b"v2");
    assert!(exchange(&mut s, &v2).starts_with("A 2 "));
    assert_eq!(
        a.conns()[1].proxied,
        Some("[2001:db8::9]:1234".parse().unwrap())
    );
    // no header from a trusted peer, and any connection from an untrusted one: refused
    // before any real server sees it
    for (addr, data) in [
        (listen, &b"INVITE sip:x SIP/2.0\r\n"[..]),
        (
            strict,
            &b"PROXY TCP4 203.0.113.9 192.0.2.1 40000 5061\r\nhi"[..],
        ),
    ] {
        assert!(refused(addr, data), "closed without a word");
    }
    assert_eq!(
        a.conns().len(),
        2,
        "no real server saw a refused connection"
    );
    wait_until(
        Duration::from_secs(5),
        "refusals in the security log",
        || {
            log_lines(&p, "sec.log")
                .iter()
                .filter(|r| r["event"] == "proxy_protocol")
                .count()
                == 2
        },
    );
    // each log is flushed on its own: waited for too
    wait_until(
        Duration::from_secs(5),
        "the connection log names the real client",
        || {
            log_lines(&p, "conn.log")
                .iter()
                .any(|r| r["client"] == "203.0.113.9:40000")
        },
    );
    // a client sending nothing does not hold a task forever: request_timeout (30 s) bounds it,
    // and a header arriving in pieces is read whole
    let mut s = TcpStream::connect(listen).unwrap();
    s.set_nodelay(true).unwrap();
    for piece in [
        &b"PROXY TCP4 198.51"[..],
        b".100.7 192.0.2.1 1 2\r",
        b"\nok",
    ] {
        s.write_all(piece).unwrap();
        thread::sleep(Duration::from_millis(30));
    }
    assert!(exchange(&mut s, b"").starts_with("A 2 "));
    assert_eq!(
        a.conns()[2].proxied,
        Some("198.51.100.7:1".parse().unwrap())
    );
}

#[test]
fn http_services_take_a_proxy_header_too() {
    let o = origin::Origin::ok("hi");
    let (listen, admin) = (local(free_port()), local(free_port()));
    let cfg = simple_config(
        listen,
        &[o.addr],
        "accept_proxy = true\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
        &format!("[admin]\nlisten = \"{admin}\"\n"),
    );
    let _p = Proxy::start(&cfg, listen);
    let mut c = client::Client::connect(listen);
    c.send(b"PROXY TCP4 203.0.113.9 192.0.2.1 40000 80\r\n");
    let r = c.request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(
        o.requests()[0].header("X-Forwarded-For"),
        Some("203.0.113.9")
    );
}

/// A client's first flight (its ClientHello) for `sni`, as rustls writes it.
fn client_hello(cfg: &Arc<rustls::ClientConfig>, sni: &str) -> (rustls::ClientConnection, Vec<u8>) {
    let mut conn = rustls::ClientConnection::new(
        cfg.clone(),
        rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    (conn, out)
}

#[test]
fn tls_passed_through_and_routed_by_sni() {
    let ca = Ca::new("pass-through CA");
    let a = TlsOrigin::start(
        ca.leaf(&["a.example", "*.a.example"], false)
            .server_config(),
        "A",
        false,
    );
    let b = TlsOrigin::start(ca.leaf(&["b.example"], false).server_config(), "B", false);
    let (listen, admin) = (local(free_port()), local(free_port()));
    let cfg = tcp_service(
        listen,
        &[b.addr],
        &format!("[virtual_service.pass_through]\n[[virtual_service.sub_service]]\nname = \"a\"\nhosts = [\"a.example\", \"*.a.example\"]\n[[virtual_service.sub_service.real_server]]\naddress = \"{}\"\n", a.addr),
        admin,
    );
    let p = Proxy::start(&cfg, admin);
    let client = pki::client_config(&ca);
    let get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    // the real servers' own certificates verify end to end: TLS was not touched
    for (sni, want) in [("a.example", "A"), ("x.A.Example", "A"), ("b.example", "B")] {
        let s = tlsio::connect(listen, &client, sni).unwrap();
        let (r, _) = tlsio::request(s, get);
        assert_eq!(r.status, 200, "{sni}");
        assert!(r.text().contains(want), "{sni}: {}", r.text());
    }
    // no SNI: the service's own pool
    let s = tlsio::connect(listen, &pki::any_cert_client(false), "b.example").unwrap();
    assert!(tlsio::request(s, get).0.text().contains('B'));
    // a ClientHello split over TCP segments (and the rest of the handshake as usual)
    let (conn, hello) = client_hello(&client, "a.example");
    let mut tcp = TcpStream::connect(listen).unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for chunk in hello.chunks(hello.len() / 5 + 1) {
        tcp.write_all(chunk).unwrap();
        thread::sleep(Duration::from_millis(20));
    }
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).unwrap();
    }
    let (r, _) = tlsio::request(s, get);
    assert!(r.text().contains('A'), "{}", r.text());
    // garbage, plaintext HTTP, an oversized hello: closed, logged, no real server reached
    let before = a.handshakes.load(std::sync::atomic::Ordering::SeqCst)
        + b.handshakes.load(std::sync::atomic::Ordering::SeqCst);
    let mut oversized = vec![22u8, 3, 1, 0x40, 0x00, 1, 0x01, 0, 0];
    oversized.extend(std::iter::repeat_n(0, 16384 - 4));
    for bad in [
        &b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"[..],
        &get[..],
        &oversized[..],
    ] {
        assert!(refused(listen, bad), "closed without a word");
    }
    let after = a.handshakes.load(std::sync::atomic::Ordering::SeqCst)
        + b.handshakes.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(before, after, "no real server saw them");
    wait_until(Duration::from_secs(5), "refusals logged", || {
        log_lines(&p, "sec.log")
            .iter()
            .filter(|r| r["event"] == "tls_pass_through")
            .count()
            == 3
    });
    let conns = log_lines(&p, "conn.log");
    assert!(
        conns
            .iter()
            .any(|r| r["sni"] == "a.example" && r["real_server"] == a.addr.to_string()),
        "{conns:?}"
    );
}

#[test]
fn tls_terminated_in_front_of_a_tcp_server() {
    let ca = Ca::new("front CA");
    let dir = tmpdir("l4tls");
    let (cert, key) = ca.leaf(&["sip.example"], false).write(&dir, "sip");
    let o = TcpOrigin::start("S", false);
    let (listen, admin) = (local(free_port()), local(free_port()));
    let cfg = tcp_service(
        listen,
        &[o.addr],
        &format!(
            "[virtual_service.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n",
            cert.display(),
            key.display()
        ),
        admin,
    );
    let _p = Proxy::start(&cfg, admin);
    let mut s = tlsio::connect(listen, &pki::client_config(&ca), "sip.example").unwrap();
    s.write_all(b"REGISTER sip:x SIP/2.0\r\n").unwrap();
    s.conn.send_close_notify();
    s.flush().unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("S 24 "), "{out:?}");
    assert_eq!(o.conns()[0].bytes, b"REGISTER sip:x SIP/2.0\r\n");
}

#[test]
fn http_settings_on_a_tcp_service_are_refused() {
    for (extra, field) in [
        ("mode = \"tcp\"\n[virtual_service.esp]\nallowed_hosts = [\"a\"]\n", "virtual_service[0].esp"),
        ("mode = \"tcp\"\n[virtual_service.persistence]\nmode = \"active-cookie\"\n", "virtual_service[0].persistence.mode"),
        ("send_proxy = \"v2\"\n", "virtual_service[0].send_proxy"),
        ("[virtual_service.pass_through]\n", "virtual_service[0].pass_through"),
        ("mode = \"tcp\"\naccept_proxy = true\n", "virtual_service[0].accept_proxy"),
        ("mode = \"tcp\"\n[virtual_service.pass_through]\n[virtual_service.reencrypt]\ninsecure_skip_verify = true\n", "virtual_service[0].pass_through"),
    ] {
        let cfg = simple_config(local(1), &[local(2)], extra, "");
        let (ok, out, _) = check_config(&cfg);
        assert!(!ok, "{extra}: accepted");
        assert!(out.contains(field), "{extra}: {out}");
    }
}

#[test]
fn limits_and_sub_service_access_hold_on_tcp_services() {
    let a = TcpOrigin::start("A", false);
    let (listen, admin) = (local(free_port()), local(free_port()));
    let pt = local(free_port());
    let cfg = format!(
        "{}\n[[virtual_service]]\nname = \"pt\"\nlisten = \"{pt}\"\nmode = \"tcp\"\n[virtual_service.pass_through]\n[[virtual_service.sub_service]]\nname = \"a\"\nhosts = [\"a.example\"]\n[virtual_service.sub_service.access]\ndeny = [\"127.0.0.0/8\"]\n[[virtual_service.sub_service.real_server]]\naddress = \"{}\"\n[[virtual_service.real_server]]\naddress = \"{}\"\n",
        tcp_service(listen, &[], "", admin).replace(
            "mode = \"tcp\"\n",
            &format!("mode = \"tcp\"\n[[virtual_service.real_server]]\naddress = \"{}\"\nconnection_limit = 100\n", a.addr)
        ),
        a.addr,
        a.addr
    );
    let p = Proxy::start(&cfg, admin);
    // a burst far below the server's limit: every connection served, none refused while the
    // shards acknowledge each other's admissions
    let handles: Vec<_> = (0..50)
        .map(|i| {
            thread::spawn(move || {
                let mut s = TcpStream::connect(listen).unwrap();
                exchange(&mut s, format!("burst {i}").as_bytes())
            })
        })
        .collect();
    for h in handles {
        let got = h.join().unwrap();
        assert!(got.starts_with("A "), "served: {got:?}");
    }
    // the sub-service's access list refuses 127.0.0.0/8, before any real server sees it
    let before = a.conns().len();
    let (_conn, hello) = client_hello(&pki::any_cert_client(true), "a.example");
    assert!(refused(pt, &hello));
    assert_eq!(a.conns().len(), before);
    wait_until(Duration::from_secs(5), "the refusal logged", || {
        log_lines(&p, "sec.log")
            .iter()
            .any(|r| r["event"] == "access")
    });
}

#[test]
fn a_tunnel_open_at_shutdown_ends_within_the_drain_and_is_logged() {
    let a = TcpOrigin::start("A", false);
    let (listen, admin) = (local(free_port()), local(free_port()));
    // drain_timeout is 5 s in the test configuration
    let mut p = Proxy::start(&tcp_service(listen, &[a.addr], "", admin), admin);
    let mut s = TcpStream::connect(listen).unwrap();
    s.write_all(b"held").unwrap();
    wait_until(Duration::from_secs(5), "the tunnel at the origin", || {
        a.conns().iter().any(|c| c.bytes == b"held")
    });
    let t = Instant::now();
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(t.elapsed() < Duration::from_secs(7), "{:?}", t.elapsed());
    let closes: Vec<_> = log_lines(&p, "conn.log")
        .into_iter()
        .filter(|r| r["event"] == "close")
        .collect();
    assert!(
        closes
            .iter()
            .any(|r| r["reason"] == "shutdown" && r["bytes_in"] == 4),
        "{closes:?}"
    );
}

#[test]
fn tls_health_checks_complete_a_handshake() {
    let ca = Ca::new("check CA");
    let a = TlsOrigin::start(ca.leaf(&["a.example"], false).server_config(), "A", false);
    // B takes connections but speaks no TLS: a TCP check would call it healthy
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    let b_addr = b.local_addr().unwrap();
    thread::spawn(move || {
        for s in b.incoming() {
            let Ok(mut s) = s else { continue };
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    // C takes connections and says nothing: the handshake times out, the connect did not
    let c = TcpListener::bind("127.0.0.1:0").unwrap();
    let c_addr = c.local_addr().unwrap();
    thread::spawn(move || {
        let held: Vec<TcpStream> = c.incoming().filter_map(Result::ok).collect();
        drop(held);
    });
    let (listen, admin) = (local(free_port()), local(free_port()));
    let cfg = tcp_service(
        listen,
        &[a.addr, b_addr, c_addr],
        "[virtual_service.pass_through]\n[virtual_service.health_check]\ntype = \"tls\"\nhost = \"a.example\"\ninterval = \"200ms\"\ntimeout = \"1s\"\n",
        admin,
    );
    let _p = Proxy::start(&cfg, admin);
    wait_until(
        Duration::from_secs(10),
        "A up, B and C down, by handshake",
        || {
            server_status(admin, 0) == "up"
                && server_status(admin, 1) == "down"
                && server_status(admin, 2) == "down"
        },
    );
    let st = status(admin);
    let detail = |i: usize| {
        st["virtual_services"][0]["real_servers"][i]["last_check"]["detail"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    assert!(
        detail(0).starts_with("TLS handshake succeeded (TLSv1_3)"),
        "{st}"
    );
    assert!(detail(1).starts_with("TLS handshake failed"), "{st}");
    assert_eq!(detail(2), "TLS handshake timed out", "{st}");
    // clients only reach the server whose TLS answers
    let client = pki::client_config(&ca);
    for _ in 0..4 {
        let s = tlsio::connect(listen, &client, "a.example").unwrap();
        let (r, _) = tlsio::request(s, b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n");
        assert!(r.text().contains('A'), "{}", r.text());
    }
    // the key is checked at load: an unknown type is refused with its field
    let (ok, text, _) = check_config(&cfg.replace("type = \"tls\"", "type = \"ssl\""));
    assert!(!ok && text.contains("health_check.type"), "{text}");
}
