//! A real server that dies, or is dead from the start, costs no request that was not in
//! flight on it: connect failures are retried on another real server, passive health takes a
//! failing server out at once, health-checked servers start "checking", slow start ramps a
//! server that comes back.

mod common;

use common::client::{one, Client};
use common::origin::{Next, Origin, Seen};
use common::{
    free_port, local, metrics, proxy_with_admin, server_status, simple_config, wait_until, Proxy,
};
use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// One Prometheus sample's value, by name and labels.
fn metric(admin: SocketAddr, sample: &str) -> f64 {
    let all = metrics(admin);
    *all.get(sample)
        .unwrap_or_else(|| panic!("no sample {sample} in {all:?}"))
}

/// An origin answering 200 with `name`; its health URL answers 503 while `healthy` is false.
fn named(name: &'static str, healthy: Arc<AtomicBool>, addr: Option<SocketAddr>) -> Origin {
    Origin::health_checked(name, healthy, addr)
}

/// A loopback address nothing listens on (connects are refused).
fn dead_addr() -> SocketAddr {
    local(free_port())
}

/// What a load run saw: answers by body, and every failure (status or broken connection).
#[derive(Default, Debug)]
struct Tally {
    ok: HashMap<String, usize>,
    failures: Vec<String>,
}

/// `threads` clients, each on its own keep-alive connection, sending GETs every `gap` until
/// `stop` is set or `limit` passes (bounded either way). A failure is any non-200 answer or
/// a connection that broke; the client reconnects after one.
fn load(
    listen: SocketAddr,
    threads: usize,
    gap: Duration,
    stop: Arc<AtomicBool>,
    limit: Duration,
) -> thread::JoinHandle<Tally> {
    thread::spawn(move || {
        let deadline = Instant::now() + limit;
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                thread::spawn(move || {
                    let mut t = Tally::default();
                    let mut c = Client::connect(listen);
                    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                        if c.w
                            .write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
                            .is_err()
                        {
                            t.failures.push("write failed".into());
                            c = Client::connect(listen);
                            continue;
                        }
                        match c.read(false) {
                            Ok(r) if r.status == 200 => *t.ok.entry(r.text()).or_default() += 1,
                            Ok(r) => {
                                t.failures.push(format!("{} {}", r.status, r.text()));
                                c = Client::connect(listen);
                            }
                            Err(e) => {
                                t.failures.push(format!("connection broke: {e}"));
                                c = Client::connect(listen);
                            }
                        }
                        thread::sleep(gap);
                    }
                    t
                })
            })
            .collect();
        let mut all = Tally::default();
        for w in workers {
            let t = w.join().unwrap();
            for (k, v) in t.ok {
                *all.ok.entry(k).or_default() += v;
            }
            all.failures.extend(t.failures);
        }
        all
    })
}

/// The scenario: ~300 req/s over two real servers (check interval 1 s, fall 3), one
/// crashes. Before: ~400 requests failed with 502 in the following seconds. Now: none that
/// was not in flight on it (and an idempotent one in flight is retried too).
#[test]
fn a_crashing_real_server_costs_no_request_that_was_not_in_flight() {
    let up = Arc::new(AtomicBool::new(true));
    let a = named("a", up.clone(), None);
    let b = named("b", up.clone(), None);
    let (_p, listen, admin) = proxy_with_admin(
        &[a.addr, b.addr],
        "scheduling = \"least-connection\"\n[virtual_service.health_check]\nurl = \"/healthcheck.html\"\ninterval = \"1s\"\ntimeout = \"500ms\"\nfall = 3\n",
    );
    wait_until(Duration::from_secs(5), "both servers checked up", || {
        server_status(admin, 0) == "up" && server_status(admin, 1) == "up"
    });
    let stop = Arc::new(AtomicBool::new(false));
    // 6 clients, one request each per ~20 ms: about 300 requests per second
    let run = load(
        listen,
        6,
        Duration::from_millis(20),
        stop.clone(),
        Duration::from_secs(20),
    );
    wait_until(Duration::from_secs(5), "b serving under load", || {
        b.nr_requests() > 100
    });
    let in_flight = b.crash();
    let crashed = Instant::now();
    // the load runs on for 3 s: through passive health taking b out, before the active
    // check could have (fall 3 x interval 1 s)
    wait_until(
        Duration::from_secs(10),
        "3 s of load after the crash",
        || crashed.elapsed() > Duration::from_secs(3),
    );
    let a_before_stop = a.nr_requests();
    stop.store(true, Ordering::SeqCst);
    let t = run.join().unwrap();
    let total: usize = t.ok.values().sum::<usize>() + t.failures.len();
    eprintln!(
        "requests {total}, answers {:?}, failures {} (in flight on b at the crash: {in_flight})",
        t.ok,
        t.failures.len()
    );
    assert!(total > 300, "the load ran: {total} requests");
    assert!(a_before_stop > 300, "a took the load after the crash");
    assert!(
        t.failures.is_empty(),
        "failures after a crash (in flight on b: {in_flight}): {:?}",
        t.failures
    );
    // passive health took b out long before fall x interval, and said why
    wait_until(Duration::from_secs(2), "b down", || {
        server_status(admin, 1) == "down"
    });
    let downs = metric(
        admin,
        &format!(
            "edgeshard_real_server_passive_downs_total{{service=\"web\",pool=\"web\",real_server=\"{}\"}}",
            b.addr
        ),
    );
    assert!(downs >= 1.0, "passive health took b out: {downs}");
    assert!(
        _p.log().contains(&format!("real_server={}", b.addr)),
        "{}",
        _p.log()
    );
}

/// A real server that is down when edgeshard starts: with a health check it gets no traffic
/// at all (servers start "checking" and the first checks run at once); without one, connect
/// failures are retried on the other server and passive health takes it out.
#[test]
fn a_dead_real_server_at_start_costs_no_request() {
    for check in [true, false] {
        let a = Origin::ok("a");
        let dead = dead_addr();
        let hc = if check {
            "[virtual_service.health_check]\nurl = \"/\"\ninterval = \"5s\"\ntimeout = \"1s\"\n"
        } else {
            ""
        };
        let (p, listen, admin) = proxy_with_admin(&[a.addr, dead], hc);
        // at once, from several clients: every request answered by a
        let stop = Arc::new(AtomicBool::new(false));
        let runs: Vec<_> = (0..4)
            .map(|_| {
                load(
                    listen,
                    1,
                    Duration::ZERO,
                    stop.clone(),
                    Duration::from_millis(800),
                )
            })
            .collect();
        let mut ok = 0;
        for r in runs {
            let t = r.join().unwrap();
            assert!(t.failures.is_empty(), "check={check}: {:?}", t.failures);
            assert_eq!(t.ok.keys().collect::<Vec<_>>(), vec!["a"], "check={check}");
            ok += t.ok["a"];
        }
        assert!(ok > 50, "check={check}: {ok} requests");
        assert_eq!(server_status(admin, 1), "down", "check={check}");
        let retries = metric(
            admin,
            &format!("edgeshard_real_server_retries_total{{service=\"web\",pool=\"web\",real_server=\"{dead}\"}}"),
        );
        // Once checked (or taken out passively), the dead server is tried no more.
        let mut c = Client::connect(listen);
        for _ in 0..50 {
            assert_eq!(c.request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").text(), "a");
        }
        let retries_after = metric(
            admin,
            &format!("edgeshard_real_server_retries_total{{service=\"web\",pool=\"web\",real_server=\"{dead}\"}}"),
        );
        assert_eq!(retries, retries_after, "check={check}: not tried once out");
        if !check {
            assert!(retries >= 1.0, "retried elsewhere: {retries}");
            assert!(
                p.log().contains("passive health"),
                "passive health took it out: {}",
                p.log()
            );
        }
    }
}

/// A connect that fails goes to another real server, never the same one twice, up to
/// `retries`; with every server dead the client gets one clean 502 naming nothing of ours.
#[test]
fn connect_failures_are_retried_up_to_retries_then_502() {
    let dead: Vec<SocketAddr> = (0..3).map(|_| dead_addr()).collect();
    let a = Origin::ok("a");
    // passive health off: every request meets the dead servers
    let mut servers = dead.clone();
    servers.push(a.addr);
    let (_p, listen, admin) = proxy_with_admin(&servers, "passive_fall = 0\nretries = 3\n");
    let mut c = Client::connect(listen);
    for _ in 0..20 {
        assert_eq!(c.request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").text(), "a");
    }
    // every dead server was met (and left) along the way
    let all = metrics(admin);
    for d in &dead {
        let tried = all[&format!(
            "edgeshard_real_server_retries_total{{service=\"web\",pool=\"web\",real_server=\"{d}\"}}"
        )];
        assert!(tried >= 1.0, "{d} retried away from: {tried}");
    }
    drop(_p);
    // retries = 1 over three dead servers and no live one: 502, once
    let listen = local(free_port());
    let cfg = simple_config(listen, &dead, "passive_fall = 0\nretries = 1\n", "");
    let p = Proxy::start(&cfg, listen);
    let r = one(listen, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.status, 502);
    wait_until(
        Duration::from_secs(2),
        "failure logged with its server",
        || p.log().contains("failed: real server refused"),
    );
    let line = p
        .log()
        .lines()
        .find(|l| l.contains("failed: real server refused"))
        .unwrap()
        .to_string();
    assert!(
        dead.iter().any(|d| line.contains(&d.to_string())) && line.contains("phase=\"connect\""),
        "the 502 line names the real server and the phase: {line}"
    );
}

/// A POST whose connection is reset after the request was sent is not retried (it may have
/// been acted on); a GET is, on another server.
#[test]
fn only_idempotent_requests_are_retried_after_sending() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h2 = hits.clone();
    // an origin that reads the request and closes without answering
    let mute = Origin::start(Arc::new(move |_s: &Seen, _w: &mut TcpStream| {
        h2.fetch_add(1, Ordering::SeqCst);
        Next::Close
    }));
    let a = Origin::ok("a");
    let listen = local(free_port());
    let cfg = simple_config(
        listen,
        &[mute.addr, a.addr],
        "passive_fall = 0\nscheduling = \"round-robin\"\n",
        "",
    );
    let _p = Proxy::start(&cfg, listen);
    let mut get_ok = 0;
    let mut post_502 = 0;
    for _ in 0..8 {
        let r = one(listen, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(r.status, 200, "a GET is retried on a");
        get_ok += 1;
        let r = one(
            listen,
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi",
        );
        match r.status {
            200 => {}
            502 => post_502 += 1,
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!(get_ok, 8);
    assert!(
        post_502 > 0,
        "a POST the server dropped is a 502, not a replay"
    );
    assert!(hits.load(Ordering::SeqCst) >= 8);
}

/// A request that makes every real server close without answering (a "query of death")
/// reaches two servers at most, and takes none of them out: passive health counts connect
/// failures and resets while sending, not a server that read a request and closed.
#[test]
fn a_query_of_death_reaches_two_servers_at_most_and_takes_none_out() {
    let hits = Arc::new(AtomicUsize::new(0));
    let mute = || {
        let h = hits.clone();
        Origin::start(Arc::new(move |_s: &Seen, _w: &mut TcpStream| {
            h.fetch_add(1, Ordering::SeqCst);
            Next::Close
        }))
    };
    let (m1, m2, m3) = (mute(), mute(), mute());
    let (_p, listen, admin) = proxy_with_admin(&[m1.addr, m2.addr, m3.addr], "retries = 5\n");
    for i in 1..=10 {
        assert_eq!(
            one(listen, b"GET /death HTTP/1.1\r\nHost: a\r\n\r\n").status,
            502
        );
        assert_eq!(
            hits.load(Ordering::SeqCst),
            2 * i,
            "two servers per request"
        );
    }
    for i in 0..3 {
        assert_eq!(server_status(admin, i), "up", "server {i} still in");
    }
}

/// slow_start: a server back up after being down takes a small share at first, its full
/// share once the ramp is over.
#[test]
fn slow_start_ramps_a_server_that_comes_back() {
    let (ha, hb) = (
        Arc::new(AtomicBool::new(true)),
        Arc::new(AtomicBool::new(true)),
    );
    let a = named("a", ha, None);
    let b = named("b", hb.clone(), None);
    let (_p, listen, admin) = proxy_with_admin(
        &[a.addr, b.addr],
        "slow_start = \"4s\"\n[virtual_service.health_check]\nurl = \"/healthcheck.html\"\ninterval = \"100ms\"\ntimeout = \"500ms\"\nrise = 1\nfall = 1\n",
    );
    wait_until(Duration::from_secs(5), "both up", || {
        server_status(admin, 0) == "up" && server_status(admin, 1) == "up"
    });
    hb.store(false, Ordering::SeqCst);
    wait_until(Duration::from_secs(5), "b down", || {
        server_status(admin, 1) == "down"
    });
    hb.store(true, Ordering::SeqCst);
    wait_until(Duration::from_secs(5), "b up", || {
        server_status(admin, 1) == "up"
    });
    let back = Instant::now();
    let share_of_b = |n: usize| {
        let mut c = Client::connect(listen);
        let mut nb = 0;
        for _ in 0..n {
            if c.request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").text() == "b" {
                nb += 1;
            }
        }
        nb as f64 / n as f64
    };
    let early = share_of_b(200);
    assert!(
        back.elapsed() < Duration::from_secs(2),
        "measured early enough"
    );
    wait_until(Duration::from_secs(10), "ramp over", || {
        back.elapsed() > Duration::from_millis(4200)
    });
    let late = share_of_b(200);
    eprintln!("b's share: {early:.2} in the first second, {late:.2} after the ramp");
    assert!(early < 0.3, "ramping: {early}");
    assert!((0.4..=0.6).contains(&late), "full share: {late}");
}
