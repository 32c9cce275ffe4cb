//! `runtime.io_engine = "io_uring"` where it differs from epoll: a receive-buffer pool that
//! runs dry (slow real servers holding uploads, slow clients holding downloads) must cost
//! nobody their request; unsent bytes of a closed connection must still leave; splice is
//! refused. (The rest of the data path runs under io_uring too: `tests/run` runs the data-path
//! test files a second time with EDGESHARD_TEST_IO_ENGINE=io_uring.)

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// 16 buffers of 16 KiB: four sockets holding their 64 KiB take them all.
fn uring_config(listen: SocketAddr, server: SocketAddr, extra_vs: &str) -> String {
    format!(
        "[runtime]\nshards = 1\nio_engine = \"io_uring\"\nio_uring_buffers = 16\n\n\
         [[virtual_service]]\nname = \"web\"\nlisten = \"{listen}\"\n{extra_vs}\n\
         [[virtual_service.real_server]]\naddress = \"{server}\"\n"
    )
}

/// The byte at offset `i` of every body here: a pattern that shows a lost, doubled or
/// reordered chunk.
fn pattern(i: usize) -> u8 {
    ((i * 7 + i / 4093) % 251) as u8
}

fn read_head(r: &mut impl BufRead) -> Option<(String, usize)> {
    let mut first = String::new();
    if r.read_line(&mut first).ok()? == 0 {
        return None;
    }
    let mut len = 0;
    loop {
        let mut l = String::new();
        r.read_line(&mut l).ok()?;
        if l == "\r\n" || l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().ok()?;
            }
        }
    }
    Some((first, len))
}

/// A real server that reads upload heads at once but their bodies only once `gate` opens,
/// then answers with how many body bytes matched the pattern. GETs are answered at once.
fn gated_upload_origin(gate: Arc<AtomicBool>) -> (SocketAddr, Arc<AtomicUsize>) {
    // A small receive buffer (inherited by accepted sockets): the kernel must not absorb the
    // uploads the server is not reading, or the proxy's buffers would never fill.
    let sk = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sk.set_recv_buffer_size(4096).unwrap();
    sk.bind(&local(0).into()).unwrap();
    sk.listen(64).unwrap();
    let l: TcpListener = sk.into();
    let addr = l.local_addr().unwrap();
    let heads = Arc::new(AtomicUsize::new(0));
    let h2 = heads.clone();
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            let (gate, heads) = (gate.clone(), h2.clone());
            thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::with_capacity(4096, s);
                while let Some((line, len)) = read_head(&mut r) {
                    if line.starts_with("GET") {
                        w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .unwrap();
                        continue;
                    }
                    heads.fetch_add(1, Ordering::SeqCst);
                    while !gate.load(Ordering::SeqCst) {
                        thread::sleep(Duration::from_millis(5));
                    }
                    let mut good = 0usize;
                    let mut buf = vec![0u8; 65536];
                    let mut at = 0;
                    while at < len {
                        let n = r.read(&mut buf[..(len - at).min(65536)]).unwrap();
                        assert!(n > 0, "upload cut at {at} of {len}");
                        good += buf[..n]
                            .iter()
                            .enumerate()
                            .filter(|(k, b)| **b == pattern(at + k))
                            .count();
                        at += n;
                    }
                    let body = format!("{good}");
                    let _ = write!(
                        w,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                }
            });
        }
    });
    (addr, heads)
}

fn response_body(s: &mut TcpStream) -> (u16, Vec<u8>) {
    let mut r = BufReader::new(s);
    let (line, len) = read_head(&mut r).expect("a response head");
    let status = line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).unwrap();
    (status, body)
}

#[test]
fn a_dry_buffer_pool_costs_no_request() {
    dry_pool(false);
}

/// The same with PROXY headers, which are peeked at: the other clients' headers arrive one
/// byte per segment while no buffer is free (and each segment would take a whole buffer).
#[test]
fn a_dry_buffer_pool_still_reads_proxy_headers() {
    dry_pool(true);
}

fn dry_pool(proxy_protocol: bool) {
    const UPLOADS: usize = 8;
    const SIZE: usize = 3 << 20;
    let gate = Arc::new(AtomicBool::new(false));
    let (origin, heads) = gated_upload_origin(gate.clone());
    let listen = local(free_port());
    let extra = if proxy_protocol {
        "accept_proxy = true\ntrusted_proxies = [\"127.0.0.1/32\"]"
    } else {
        ""
    };
    let _p = Proxy::start(&uring_config(listen, origin, extra), listen);
    let header = move |i: usize| -> Vec<u8> {
        if proxy_protocol {
            format!("PROXY TCP4 192.0.2.{i} 198.51.100.1 4000 443\r\n").into_bytes()
        } else {
            Vec::new()
        }
    };

    // Eight uploads the real server does not read yet: each socket fills its 64 KiB of the
    // shard's 256 KiB pool, so the pool runs dry.
    let senders: Vec<_> = (0..UPLOADS)
        .map(|i| {
            thread::spawn(move || {
                let mut s = TcpStream::connect(listen).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                s.write_all(&header(i + 1)).unwrap();
                write!(
                    s,
                    "POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: {SIZE}\r\n\r\n"
                )
                .unwrap();
                let body: Vec<u8> = (0..SIZE).map(pattern).collect();
                s.write_all(&body).unwrap();
                response_body(&mut s)
            })
        })
        .collect();
    wait_until(
        Duration::from_secs(20),
        "every upload's head at the origin",
        || heads.load(Ordering::SeqCst) == UPLOADS,
    );
    // Give the stalled uploads time to fill what they can: the proxy's buffers, then the
    // kernel's. Nothing here depends on it being long enough except how dry the pool gets.
    thread::sleep(Duration::from_millis(300));

    // Meanwhile another client is served, on the same shard, with no buffer free.
    let t = Instant::now();
    for i in 0..5 {
        let mut c = TcpStream::connect(listen).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.set_nodelay(true).unwrap();
        for b in header(100 + i) {
            c.write_all(&[b]).unwrap();
            thread::sleep(Duration::from_micros(300));
        }
        c.write_all(b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let (status, body) = response_body(&mut c);
        assert_eq!((status, body.as_slice()), (200, &b"ok"[..]));
    }
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "other clients waited {:?} behind the stalled uploads",
        t.elapsed()
    );

    // Open the gate: every upload arrives whole and in order.
    gate.store(true, Ordering::SeqCst);
    for s in senders {
        let (status, body) = s.join().unwrap();
        assert_eq!(status, 200);
        assert_eq!(String::from_utf8(body).unwrap(), SIZE.to_string());
    }
}

/// A real server that answers every GET with `size` bytes of the pattern.
fn big_origin(size: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        let body: Arc<Vec<u8>> = Arc::new((0..size).map(pattern).collect());
        for s in l.incoming().flatten() {
            let body = body.clone();
            thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                while read_head(&mut r).is_some() {
                    if write!(
                        w,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    )
                    .and_then(|_| w.write_all(&body))
                    .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn slow_readers_get_every_byte_and_the_close_after_it() {
    const SIZE: usize = 4 << 20;
    let origin = big_origin(SIZE);
    let listen = local(free_port());
    let _p = Proxy::start(&uring_config(listen, origin, ""), listen);
    // Six clients ask for 4 MiB and close after it (Connection: close), reading slowly at
    // first: the proxy holds their answers' tails when it closes their connections.
    let readers: Vec<_> = (0..6)
        .map(|i| {
            thread::spawn(move || {
                let mut s = TcpStream::connect(listen).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                s.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .unwrap();
                thread::sleep(Duration::from_millis(200 + 100 * i));
                let mut all = Vec::new();
                let mut buf = vec![0u8; 8192];
                let mut slow = 40;
                loop {
                    let n = s.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    all.extend_from_slice(&buf[..n]);
                    if slow > 0 {
                        slow -= 1;
                        thread::sleep(Duration::from_millis(5));
                    }
                }
                all
            })
        })
        .collect();
    for r in readers {
        let all = r.join().unwrap();
        let at = all
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a head")
            + 4;
        assert!(all.starts_with(b"HTTP/1.1 200"));
        let body = &all[at..];
        assert_eq!(body.len(), SIZE, "the whole body, then EOF");
        let bad = body.iter().enumerate().position(|(i, b)| *b != pattern(i));
        assert_eq!(bad, None, "body differs from what the real server sent");
    }
}

#[test]
fn splice_is_refused_under_io_uring() {
    let listen = local(free_port());
    let toml = uring_config(listen, local(9), "splice_response = true");
    let (ok, out, _) = check_config(&toml);
    assert!(!ok, "accepted: {out}");
    assert!(
        out.contains("splice_response") && out.contains("io_engine") && out.contains(":3"),
        "the refusal names the field and the io_engine line: {out}"
    );
    let bad = "[runtime]\nio_engine = \"io_uring\"\nio_uring_buffers = 1000\n";
    let (ok, out, _) = check_config(bad);
    assert!(
        !ok && out.contains("io_uring_buffers") && out.contains("power of two"),
        "{out}"
    );
    let bad = "[runtime]\nio_engine = \"uring\"\n";
    let (ok, out, _) = check_config(bad);
    assert!(!ok && out.contains("io_engine"), "{out}");
}

/// CPU time (user + system, in clock ticks) the process has used so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // the fields after the command name, which is in parentheses and may hold spaces
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// An idle io_uring shard sleeps: before, a timer-driven answer (a 408) on an idle shard left
/// it spinning between its ring and glommio's (a quarter of a core, for good).
#[test]
fn an_idle_shard_sleeps() {
    let listen = local(free_port());
    let p = Proxy::start(
        &uring_config(listen, local(9), "request_timeout = \"1s\""),
        listen,
    );
    let pid = p.child.id();
    let idle = |what: &str| {
        let before = cpu_ticks(pid);
        thread::sleep(Duration::from_secs(3));
        let used = cpu_ticks(pid) - before;
        // 3 s is 300 ticks of a core; an idle process uses a handful
        assert!(used < 15, "{what}: {used} ticks of CPU in 3 s while idle");
    };
    idle("after start");
    let mut c = TcpStream::connect(listen).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    let mut got = [0u8; 12];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"HTTP/1.1 408");
    drop(c);
    idle("after a 408");
}
