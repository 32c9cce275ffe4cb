//! Choosing the real server through the real binary: global least-connection across shards,
//! the connection-limit overshoot bound, cookie and source-IP persistence, health checks,
//! operator enable/disable and sub-service routing.

mod common;

use common::client::{one, Client};
use common::origin::{Next, Origin, Seen};
use common::*;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A legacy operator call (maint / ready by address), with the test operator token.
fn admin_post(admin: SocketAddr, path: &str) -> u16 {
    admin_call(admin, "POST", path, Some(OPERATOR_TOKEN), None).status
}

fn accepted(admin: SocketAddr) -> Vec<u64> {
    status(admin)["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["accepted_connections"].as_u64().unwrap())
        .collect()
}

fn ip(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

/// An origin that names itself, holding requests for /hold until `release`.
fn holding(
    name: &'static str,
    release: Arc<AtomicBool>,
    concurrent: Arc<AtomicUsize>,
    max: Arc<AtomicUsize>,
) -> Origin {
    Origin::start(Arc::new(move |s: &Seen, w: &mut TcpStream| {
        if s.request_line.contains("/hold") {
            let now = concurrent.fetch_add(1, Ordering::SeqCst) + 1;
            max.fetch_max(now, Ordering::SeqCst);
            wait_until(Duration::from_secs(60), "release", || {
                release.load(Ordering::SeqCst)
            });
            concurrent.fetch_sub(1, Ordering::SeqCst);
        }
        let _ = write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{}",
            name.len(),
            name
        );
        Next::KeepAlive
    }))
}

fn counters() -> (Arc<AtomicBool>, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    )
}

/// Find two loopback source addresses that the source-IP steering puts on different shards.
fn ips_on_two_shards(listen: SocketAddr, admin: SocketAddr) -> (IpAddr, IpAddr) {
    let mut first: Option<(IpAddr, usize)> = None;
    for n in 2..60u8 {
        let before = accepted(admin);
        let mut c = Client::connect_from(ip(n), listen);
        assert_eq!(
            c.request(b"GET /probe HTTP/1.1\r\nHost: a\r\n\r\n").status,
            200
        );
        let mut after = before.clone();
        wait_until(Duration::from_secs(5), "accept counted", || {
            after = accepted(admin);
            after.iter().sum::<u64>() > before.iter().sum::<u64>()
        });
        let shard = (0..after.len()).find(|&i| after[i] > before[i]).unwrap();
        match first {
            None => first = Some((ip(n), shard)),
            Some((a, s)) if s != shard => return (a, ip(n)),
            _ => {}
        }
    }
    panic!("all source addresses landed on one shard");
}

#[test]
fn least_connection_follows_the_appliance_wide_count() {
    let (release, conc, max) = counters();
    let a = holding("a", release.clone(), conc.clone(), max.clone());
    let b = holding("b", release.clone(), conc.clone(), max.clone());
    let (_p, listen, admin) = proxy_with_operator(
        &[a.addr, b.addr],
        "scheduling = \"least-connection\"\nshard_steering = \"source-ip\"",
    );
    let (x, y) = ips_on_two_shards(listen, admin);
    let (a0, b0) = (a.nr_requests(), b.nr_requests());
    // Shard X holds five connections on A (B disabled meanwhile).
    assert_eq!(
        admin_post(admin, &format!("/real_server/disable?address={}", b.addr)),
        200
    );
    let mut held: Vec<Client> = (0..5).map(|_| Client::connect_from(x, listen)).collect();
    for c in held.iter_mut() {
        c.send(b"GET /hold HTTP/1.1\r\nHost: a\r\n\r\n");
    }
    wait_until(Duration::from_secs(5), "five held on A", || {
        a.nr_requests() == a0 + 5
    });
    assert_eq!(
        admin_post(admin, &format!("/real_server/enable?address={}", b.addr)),
        200
    );
    wait_until(
        Duration::from_secs(5),
        "the other shard sees A's five",
        || {
            status(admin)["virtual_services"][0]["real_servers"][0]["active_connections"] == 5
                && status(admin)["virtual_services"][0]["real_servers"][1]["state"] == "ready"
        },
    );
    // Shard Y has nothing locally: local counts would alternate A, B; the global view says B.
    let mut more: Vec<Client> = (0..4).map(|_| Client::connect_from(y, listen)).collect();
    for c in more.iter_mut() {
        c.send(b"GET /hold HTTP/1.1\r\nHost: a\r\n\r\n");
    }
    wait_until(Duration::from_secs(5), "four more held", || {
        conc.load(Ordering::SeqCst) == 9
    });
    assert_eq!(
        a.nr_requests(),
        a0 + 5,
        "nothing more went to the busier server"
    );
    assert_eq!(b.nr_requests(), b0 + 4);
    release.store(true, Ordering::SeqCst);
    for c in held.iter_mut().chain(more.iter_mut()) {
        assert_eq!(c.read(false).unwrap().status, 200);
    }
}

#[test]
fn connection_limit_overshoot_stays_within_shards_minus_one() {
    let (release, conc, max) = counters();
    let o = holding("o", release.clone(), conc.clone(), max.clone());
    let listen = local(free_port());
    let cfg = format!(
        "[runtime]\nshards = 2\noversubscribe = true\n[[virtual_service]]\nlisten = \"{listen}\"\n\
         [[virtual_service.real_server]]\naddress = \"{}\"\nconnection_limit = 3\n",
        o.addr
    );
    let _p = Proxy::start(&cfg, listen);
    // 24 clients at once, from many addresses (so both shards take part)
    let mut clients: Vec<Client> = (0..24)
        .map(|i| Client::connect_from(ip(10 + i as u8), listen))
        .collect();
    for c in clients.iter_mut() {
        c.send(b"GET /hold HTTP/1.1\r\nHost: a\r\n\r\n");
    }
    // Everyone beyond the limit gets 503 at once; wait until all but the held ones answered.
    let mut refused = 0;
    let mut waiting = Vec::new();
    for mut c in clients {
        c.w.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        c.r.get_ref()
            .set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        match c.read(false) {
            Ok(r) => {
                assert_eq!(r.status, 503);
                refused += 1;
            }
            Err(_) => waiting.push(c),
        }
    }
    let peak = max.load(Ordering::SeqCst);
    assert!(
        (3..=4).contains(&peak),
        "peak {peak} concurrent under a limit of 3 with 2 shards"
    );
    assert_eq!(refused + waiting.len(), 24);
    assert_eq!(waiting.len(), peak);
    release.store(true, Ordering::SeqCst);
    for c in waiting.iter_mut() {
        c.r.get_ref()
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        assert_eq!(c.read(false).unwrap().status, 200);
    }
}

fn cookie_of(r: &common::client::Response, name: &str) -> String {
    let sc = r
        .header("set-cookie")
        .unwrap_or_else(|| panic!("no Set-Cookie in {}", r.head));
    assert!(sc.contains("HttpOnly") && sc.contains("Path=/"), "{sc}");
    sc.split(';')
        .next()
        .unwrap()
        .strip_prefix(&format!("{name}="))
        .unwrap()
        .to_string()
}

fn get_with_cookie(addr: SocketAddr, cookie: Option<&str>) -> common::client::Response {
    let c = cookie
        .map(|v| format!("Cookie: other=1; MS-WSMAN={v}\r\n"))
        .unwrap_or_default();
    one(
        addr,
        format!("GET / HTTP/1.1\r\nHost: a\r\n{c}\r\n").as_bytes(),
    )
}

#[test]
fn active_cookie_persistence_follows_expires_resists_forgery_and_replaces_down_servers() {
    let (a, b) = (Origin::named("a"), Origin::named("b"));
    let (_p, listen, admin) = proxy_with_operator(&[a.addr, b.addr], "[virtual_service.persistence]\nmode = \"active-cookie\"\ncookie = \"MS-WSMAN\"\ntimeout = \"2s\"");
    let first = get_with_cookie(listen, None);
    let server = first.text();
    let cookie = cookie_of(&first, "MS-WSMAN");
    assert!(
        !cookie.contains(&a.addr.to_string()) && !cookie.contains(&b.addr.to_string()),
        "opaque: {cookie}"
    );
    // follows, on new connections (any shard)
    for _ in 0..8 {
        let r = get_with_cookie(listen, Some(&cookie));
        assert_eq!(r.text(), server);
        cookie_of(&r, "MS-WSMAN"); // re-issued every time: the timeout slides
    }
    // forged: flip the server index; the signature no longer matches, so normal scheduling
    let forged = if cookie.starts_with('0') {
        cookie.replacen('0', "1", 1)
    } else {
        cookie.replacen('1', "0", 1)
    };
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        let r = get_with_cookie(listen, Some(&forged));
        seen.insert(r.text());
        assert_ne!(cookie_of(&r, "MS-WSMAN"), forged);
    }
    assert_eq!(seen.len(), 2, "a forged cookie pins nothing");
    // down (disabled) server: replaced, and the new cookie names the other one
    let (pinned, other) = if server == "a" { (&a, "b") } else { (&b, "a") };
    assert_eq!(
        admin_post(
            admin,
            &format!("/real_server/disable?address={}", pinned.addr)
        ),
        200
    );
    let r = get_with_cookie(listen, Some(&cookie));
    assert_eq!(r.text(), other);
    let moved = cookie_of(&r, "MS-WSMAN");
    let issued = Instant::now();
    assert_eq!(
        admin_post(
            admin,
            &format!("/real_server/enable?address={}", pinned.addr)
        ),
        200
    );
    wait_until(Duration::from_secs(5), "enabled everywhere", || {
        status(admin)["virtual_services"][0]["real_servers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["state"] == "ready")
    });
    for _ in 0..4 {
        assert_eq!(
            get_with_cookie(listen, Some(&moved)).text(),
            other,
            "re-persisted"
        );
    }
    // expiry: after the 2s timeout (whole seconds: 1-2 s from issue) the old cookie stops pinning
    wait_until(
        Duration::from_secs(10),
        "expired cookie no longer pins",
        || get_with_cookie(listen, Some(&moved)).text() != other,
    );
    assert!(
        issued.elapsed() >= Duration::from_millis(1000),
        "expired too early: {:?}",
        issued.elapsed()
    );
}

#[test]
fn source_ip_persistence_holds_across_shards() {
    let (a, b) = (Origin::named("a"), Origin::named("b"));
    let (_p, listen, admin) = proxy_with_operator(
        &[a.addr, b.addr],
        "[virtual_service.persistence]\nmode = \"source-ip\"\ntimeout = \"20m\"",
    );
    let mut per_ip = Vec::new();
    for n in 20..30u8 {
        // many connections from one address: one server, whichever shard would have taken them
        let mut names = std::collections::HashSet::new();
        for _ in 0..6 {
            let mut c = Client::connect_from(ip(n), listen);
            names.insert(c.request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").text());
        }
        assert_eq!(names.len(), 1, "127.0.0.{n} reached {names:?}");
        per_ip.push(names.into_iter().next().unwrap());
    }
    assert!(
        per_ip.contains(&"a".to_string()) && per_ip.contains(&"b".to_string()),
        "{per_ip:?}"
    );
    let shards = accepted(admin);
    assert!(
        shards.iter().all(|&n| n > 0),
        "both shards served: {shards:?}"
    );
}

#[test]
fn health_checks_take_servers_down_and_up() {
    let (ha, hb) = (
        Arc::new(AtomicBool::new(true)),
        Arc::new(AtomicBool::new(true)),
    );
    // A restarts on its port below: one outside the ephemeral range, which no client's
    // connection can take meanwhile
    let a = Origin::health_checked("a", ha.clone(), Some(local(free_port())));
    let b = Origin::health_checked("b", hb.clone(), None);
    let (_p, listen, admin) = proxy_with_operator(&[a.addr, b.addr], "[virtual_service.health_check]\nurl = \"/healthcheck.html\"\ninterval = \"200ms\"\ntimeout = \"300ms\"\nrise = 2\nfall = 2");
    wait_until(Duration::from_secs(5), "first checks reported", || {
        status(admin)["virtual_services"][0]["real_servers"][1]["last_check"]["ok"] == true
    });
    // A stops: down within fall x interval + timeout (+ slack for a loaded machine)
    let a_addr = a.addr;
    a.shut();
    let started = Instant::now();
    wait_until(Duration::from_secs(5), "A down", || {
        server_status(admin, 0) == "down"
    });
    assert!(
        started.elapsed() < Duration::from_millis(2 * 200 + 300 + 3000),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        status(admin)["virtual_services"][0]["real_servers"][0]["last_check"]["detail"]
            .as_str()
            .unwrap()
            .contains("connect")
    );
    // no new connections to A: everything goes to B, without errors
    let mut c = Client::connect(listen);
    for _ in 0..6 {
        assert_eq!(c.request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").text(), "b");
    }
    // B answers its check with 503: both down -> 503 at once, and the service is Down
    hb.store(false, Ordering::SeqCst);
    wait_until(Duration::from_secs(5), "B down", || {
        server_status(admin, 1) == "down"
    });
    let r = one(listen, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.status, 503);
    assert_eq!(status(admin)["virtual_services"][0]["status"], "down");
    // A restarts where it was: up again after `rise` successes
    let _a2 = Origin::health_checked("a", ha.clone(), Some(a_addr));
    wait_until(Duration::from_secs(5), "A up again", || {
        server_status(admin, 0) == "up"
    });
    assert_eq!(
        one(listen, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").text(),
        "a"
    );
    assert_eq!(status(admin)["virtual_services"][0]["status"], "up");
}

#[test]
fn sub_services_route_by_host_sni_and_path() {
    let (fe, dir, media) = (
        Origin::named("front-end"),
        Origin::named("director"),
        Origin::named("media"),
    );
    let listen = local(free_port());
    let cfg = format!(
        "[runtime]\nshards = 2\noversubscribe = true\n[[virtual_service]]\nlisten = \"{listen}\"\n\
         [[virtual_service.real_server]]\naddress = \"{}\"\n\
         [[virtual_service.sub_service]]\nname = \"director\"\nhosts = [\"LyncDiscover.example\", \"*.meet.example\"]\n\
         [[virtual_service.sub_service.real_server]]\naddress = \"{}\"\n\
         [[virtual_service.sub_service]]\nname = \"media\"\nhosts = [\"ws-ext.example\"]\npaths = [\"/media/\"]\n\
         [[virtual_service.sub_service.real_server]]\naddress = \"{}\"\n",
        fe.addr, dir.addr, media.addr
    );
    let _p = Proxy::start(&cfg, listen);
    let to = |host: &str, path: &str| {
        one(
            listen,
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(),
        )
        .text()
    };
    assert_eq!(to("lyncdiscover.example", "/"), "director");
    assert_eq!(
        to("LYNCDISCOVER.EXAMPLE:443", "/x"),
        "director",
        "case and port ignored"
    );
    assert_eq!(to("a.meet.example", "/"), "director");
    assert_eq!(
        to("meet.example", "/"),
        "front-end",
        "*.meet.example needs a label"
    );
    assert_eq!(to("ws-ext.example", "/media/x"), "media");
    assert_eq!(to("ws-ext.example", "/other"), "front-end");
    assert_eq!(to("unknown.example", "/media/x"), "front-end");
}

#[test]
fn sub_service_by_sni_and_404_without_a_default_pool() {
    use common::pki::{client_config, Ca};
    use common::tlsio::{connect, request};
    let ca = Ca::new("CA");
    let dir = tmpdir("subsni");
    let (cert, key) = ca
        .leaf(&["meet.example", "ws-ext.example"], false)
        .write(&dir, "c");
    let director = Origin::named("director");
    let listen = local(free_port());
    let cfg = format!(
        "[runtime]\nshards = 1\n[[virtual_service]]\nlisten = \"{listen}\"\n\
         [virtual_service.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n\
         [[virtual_service.sub_service]]\nhosts = [\"meet.example\"]\n\
         [[virtual_service.sub_service.real_server]]\naddress = \"{}\"\n",
        cert.display(),
        key.display(),
        director.addr
    );
    let _p = Proxy::start(&cfg, listen);
    let client = client_config(&ca);
    // HTTP/1.0 without Host: the SNI decides
    let (r, _) = request(
        connect(listen, &client, "meet.example").unwrap(),
        b"GET / HTTP/1.0\r\n\r\n",
    );
    assert_eq!(r.body, b"director");
    let (r, _) = request(
        connect(listen, &client, "ws-ext.example").unwrap(),
        b"GET / HTTP/1.1\r\nHost: ws-ext.example\r\n\r\n",
    );
    assert_eq!(
        r.status, 404,
        "no sub-service matches and the service has no real servers of its own"
    );
}

#[test]
fn a_bounded_queue_waits_for_room_under_the_limit() {
    let (release, conc, max) = counters();
    let o = holding("o", release.clone(), conc.clone(), max.clone());
    let listen = local(free_port());
    let admin = local(free_port());
    let cfg = format!(
        "[admin]\nlisten = \"{admin}\"\n[runtime]\nshards = 1\n[[virtual_service]]\nlisten = \"{listen}\"\nqueue_timeout = \"10s\"\nqueue_size = 1\n\
         [[virtual_service.real_server]]\naddress = \"{}\"\nconnection_limit = 1\n",
        o.addr
    );
    let _p = Proxy::start(&cfg, listen);
    let mut first = Client::connect(listen);
    first.send(b"GET /hold HTTP/1.1\r\nHost: a\r\n\r\n");
    wait_until(Duration::from_secs(5), "first held", || {
        conc.load(Ordering::SeqCst) == 1
    });
    let mut queued = Client::connect(listen);
    queued.send(b"GET /queued HTTP/1.1\r\nHost: a\r\n\r\n");
    wait_until(Duration::from_secs(5), "the second request queued", || {
        status(admin)["virtual_services"][0]["queued_requests"] == 1
    });
    // the queue holds one: a third request is refused at once
    let started = Instant::now();
    let r = one(listen, b"GET /third HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.status, 503);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(o.nr_requests(), 1, "the queued request waits for room");
    // the wait shows on /status and /metrics
    assert_eq!(status(admin)["virtual_services"][0]["queued_requests"], 1);
    assert_eq!(
        metrics(admin).get("edgeshard_queued_requests{service=\"vs0\"}"),
        Some(&1.0)
    );
    release.store(true, Ordering::SeqCst);
    let released = Instant::now();
    assert_eq!(first.read(false).unwrap().status, 200);
    assert_eq!(
        queued.read(false).unwrap().status,
        200,
        "served once the first finished"
    );
    assert!(
        released.elapsed() < Duration::from_secs(5),
        "woken by the release, not the queue timeout"
    );
    assert_eq!(max.load(Ordering::SeqCst), 1, "never beyond the limit");
}

#[test]
fn tcp_and_https_health_checks() {
    use common::pki::{write_pem, Ca};
    use common::tlsio::TlsOrigin;
    let ca = Ca::new("Internal CA");
    let rogue = Ca::new("Rogue CA");
    let dir = tmpdir("hc-https");
    let ca_path = write_pem(&dir, "ca.pem", &ca.pem());
    let good = TlsOrigin::start(
        ca.leaf(&["fe.example"], false).server_config(),
        "good",
        false,
    );
    let bad = TlsOrigin::start(
        rogue.leaf(&["fe.example"], false).server_config(),
        "bad",
        false,
    );
    let plain = Origin::named("plain");
    let listen = local(free_port());
    let listen2 = local(free_port());
    let admin = local(free_port());
    let cfg = format!(
        "[admin]\nlisten = \"{admin}\"\n[runtime]\nshards = 1\n\
         [[virtual_service]]\nname = \"https\"\nlisten = \"{listen}\"\n\
         [virtual_service.reencrypt]\nca = \"{}\"\nserver_name = \"fe.example\"\n\
         [virtual_service.health_check]\nurl = \"/healthcheck.html\"\ninterval = \"200ms\"\ntimeout = \"500ms\"\nfall = 1\n\
         [[virtual_service.real_server]]\naddress = \"{}\"\n[[virtual_service.real_server]]\naddress = \"{}\"\n\
         [[virtual_service]]\nname = \"tcp\"\nlisten = \"{listen2}\"\n\
         [virtual_service.health_check]\ntype = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"300ms\"\nfall = 1\n\
         [[virtual_service.real_server]]\naddress = \"{}\"\n",
        ca_path.display(),
        good.addr,
        bad.addr,
        plain.addr
    );
    let _p = Proxy::start(&cfg, listen);
    let check =
        |vs: usize, i: usize| status(admin)["virtual_services"][vs]["real_servers"][i].clone();
    wait_until(Duration::from_secs(5), "https checks done", || {
        check(0, 0)["last_check"]["ok"] == true && check(0, 1)["status"] == "down"
    });
    assert_eq!(check(0, 0)["last_check"]["detail"], "HTTP 200");
    assert!(check(0, 1)["last_check"]["detail"]
        .as_str()
        .unwrap()
        .contains("TLS handshake failed"));
    assert!(good
        .requests
        .lock()
        .unwrap()
        .iter()
        .any(|r| r.starts_with("GET /healthcheck.html")));
    // every request goes to the healthy one
    for _ in 0..4 {
        assert_eq!(
            one(listen, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").text(),
            "good"
        );
    }
    // TCP check: up while it accepts, down once it stops
    wait_until(Duration::from_secs(5), "tcp check ok", || {
        check(1, 0)["last_check"]["detail"] == "TCP connect succeeded"
    });
    plain.shut();
    wait_until(Duration::from_secs(5), "tcp check down", || {
        check(1, 0)["status"] == "down"
    });
    assert_eq!(
        one(listen2, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").status,
        503
    );
}
