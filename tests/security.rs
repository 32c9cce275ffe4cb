//! Holes a hostile client would use: paths encoded to route around a stricter sub-service,
//! hosts that are not host names, and IP access lists (service, sub-service, admin).

mod common;

use common::client::{one, Client};
use common::origin::Origin;
use common::{admin_get, free_port, local, simple_config, tmpdir, wait_until, Proxy};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

fn lines(path: &Path) -> Vec<Value> {
    common::json_lines(path)
}

/// A service whose /admin sub-service has a strict ESP (only /admin/ok*), and a lax default
/// pool. Returns (proxy, listen, lax origin, admin origin, security log).
fn layout(extra_vs: &str) -> (Proxy, SocketAddr, Origin, Origin, std::path::PathBuf) {
    let lax = Origin::ok("lax");
    let strict = Origin::ok("admin");
    let listen = local(free_port());
    let dir = tmpdir("routing");
    let security = dir.join("security.log");
    let cfg = format!(
        "[log]\nsecurity = \"{}\"\n[runtime]\nshards = 2\noversubscribe = true\n\
         [[virtual_service]]\nname = \"web\"\nlisten = \"{listen}\"\n{extra_vs}\n\
         [[virtual_service.real_server]]\naddress = \"{}\"\n\
         [[virtual_service.sub_service]]\nname = \"admin\"\npaths = [\"/admin\"]\n\
         [virtual_service.sub_service.esp]\nallowed_directories = [\"/admin/ok*\"]\n\
         [[virtual_service.sub_service.real_server]]\naddress = \"{}\"\n",
        security.display(),
        lax.addr,
        strict.addr
    );
    let p = Proxy::start(&cfg, listen);
    (p, listen, lax, strict, security)
}

fn get(listen: SocketAddr, target: &str) -> common::client::Response {
    one(
        listen,
        format!("GET {target} HTTP/1.1\r\nHost: ws-ext.example\r\n\r\n").as_bytes(),
    )
}

/// Before: routing matched the raw path, ESP the normalised one, so `/%61dmin/x` went to the
/// lax pool as it was, where IIS decodes it to /admin/x. Now every encoding of /admin is
/// routed to the admin sub-service and judged by its ESP; what is forwarded is normalised.
#[test]
fn routing_and_esp_judge_the_same_normalised_path() {
    let (_p, listen, lax, strict, security) = layout("");
    for trick in [
        "/%61dmin/x",
        "/x/../admin/x",
        "/./admin/x",
        "/%2e/admin/x",
        "//admin/x",
        "/%2E%2E/admin/x",
        "/admin/./x",
        "/ADMIN/../admin/x",
        "/%61%64%6d%69%6e/x",
        // any case, as IIS reads it
        "/ADMIN/x",
        "/Admin/x",
        "/%41dmin/x",
        "/%61DMIN/x",
        "http://ws-ext.example/ADMIN/x",
    ] {
        let r = get(listen, trick);
        if trick == "/%2E%2E/admin/x" {
            // above the root: cannot be normalised, refused without reaching anyone
            assert!(r.status >= 400, "{trick}: {}", r.status);
        } else {
            assert_eq!(r.status, 403, "{trick} is judged by the admin ESP");
        }
    }
    // encodings that could be read two ways are refused outright
    for trick in [
        "/admin%2fx",
        "/admin%5cx",
        "/adm\\in/x",
        "/admin%00",
        // path parameters on dot segments: `..` to Tomcat and Jetty
        "/x/..;/admin/x",
        "/admin/ok/..;/secret",
        "/.;/admin/x",
    ] {
        let r = get(listen, trick);
        assert!((400..500).contains(&r.status), "{trick}: {}", r.status);
    }
    assert_eq!(lax.nr_requests(), 0, "nothing reached the lax pool");
    assert_eq!(strict.nr_requests(), 0, "nor the admin pool");
    // allowed by the admin ESP: forwarded normalised, query as it came
    assert_eq!(get(listen, "/%61dmin/ok?q=%2e%2E").text(), "admin");
    assert_eq!(get(listen, "/admin//./ok").text(), "admin");
    assert_eq!(get(listen, "/x/%2e%2e/other").text(), "lax");
    let seen: Vec<String> = strict
        .requests()
        .iter()
        .map(|s| s.request_line.clone())
        .collect();
    assert_eq!(
        seen,
        vec!["GET /admin/ok?q=%2e%2E HTTP/1.1", "GET /admin/ok HTTP/1.1"]
    );
    assert_eq!(lax.requests()[0].request_line, "GET /other HTTP/1.1");
    wait_until(
        Duration::from_secs(5),
        "refusals in the security log",
        || lines(&security).len() >= 9,
    );
}

/// path_normalization = "refuse": a path normalisation would change is a 400.
#[test]
fn path_normalization_refuse_answers_400() {
    let (_p, listen, lax, strict, _s) = layout("path_normalization = \"refuse\"\n");
    assert_eq!(get(listen, "/admin/ok").text(), "admin");
    assert_eq!(get(listen, "/other?x=/../").text(), "lax");
    // escapes differing only in hex case are the same path: forwarded as sent
    assert_eq!(get(listen, "/caf%c3%a9").text(), "lax");
    for t in ["/%61dmin/ok", "/x/../other", "//other", "/a%7e"] {
        assert_eq!(get(listen, t).status, 400, "{t}");
    }
    assert_eq!(lax.nr_requests() + strict.nr_requests(), 3);
    assert_eq!(lax.requests()[1].request_line, "GET /caf%c3%a9 HTTP/1.1");
}

/// Host (and an absolute-form authority) must be exactly `host [":" port]`; the target ASCII.
/// The security log keeps what was refused as valid UTF-8 (`/café`, not `/cafÃ©`).
#[test]
fn hosts_must_be_host_names_and_targets_ascii() {
    let o = Origin::ok("ok");
    let listen = local(free_port());
    let dir = tmpdir("hosts");
    let security = dir.join("security.log");
    let cfg = simple_config(
        listen,
        &[o.addr],
        "",
        &format!("[log]\nsecurity = \"{}\"\n", security.display()),
    );
    let _p = Proxy::start(&cfg, listen);
    for good in [
        "ws-ext.example",
        "WS-EXT.example:443",
        "192.0.2.1",
        "192.0.2.1:8080",
        "[2001:db8::1]",
        "[::1]:443",
        "xn--caf-dma.example",
        "a_b.example",
    ] {
        let r = one(
            listen,
            format!("GET / HTTP/1.1\r\nHost: {good}\r\n\r\n").as_bytes(),
        );
        assert_eq!(r.status, 200, "{good}");
    }
    let bad: [&[u8]; 12] = [
        b"%77s-ext.example",
        b"caf\xc3\xa9.example",
        b"\"a\".example",
        b"a\\b.example",
        b"a b.example",
        b"a\x01b",
        b"user@a.example",
        b"a.example/x",
        b"a.example:99999",
        b"a.example:8o",
        b"[not-v6]",
        b"[::1]x",
    ];
    for host in bad {
        let mut req = b"GET / HTTP/1.1\r\nHost: ".to_vec();
        req.extend_from_slice(host);
        req.extend_from_slice(b"\r\n\r\n");
        let r = one(listen, &req);
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(host));
    }
    let r = one(
        listen,
        b"GET http://caf\xc3\xa9.example/ HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    assert_eq!(r.status, 400, "absolute-form authority");
    let r = one(listen, b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.status, 400, "raw UTF-8 target");
    assert_eq!(
        o.nr_requests(),
        8,
        "no refused request reached the real server"
    );
    wait_until(Duration::from_secs(5), "the UTF-8 target logged", || {
        lines(&security).iter().any(|l| l["path"] == "/café")
    });
    let raw = std::fs::read_to_string(&security).unwrap();
    assert!(raw.contains("/café") && !raw.contains("cafÃ"), "{raw}");
}

/// IP access lists: refused at accept (no byte read or written) with one security record per
/// address per interval and a counter; allow/deny with deny winning; a sub-service's list
/// answers 403 for requests routed to it.
#[test]
fn access_lists_refuse_at_accept_and_per_sub_service() {
    let o = Origin::ok("ok");
    let inner = Origin::ok("inner");
    let listen = local(free_port());
    let admin = local(free_port());
    let dir = tmpdir("access");
    let security = dir.join("security.log");
    let cfg = format!(
        "[log]\nsecurity = \"{}\"\n[admin]\nlisten = \"{admin}\"\n[runtime]\nshards = 2\noversubscribe = true\n\
         [[virtual_service]]\nname = \"web\"\nlisten = \"{listen}\"\n\
         [virtual_service.access]\nallow = [\"127.0.0.0/8\"]\ndeny = [\"127.0.0.3\"]\n\
         [[virtual_service.real_server]]\naddress = \"{}\"\n\
         [[virtual_service.sub_service]]\nhosts = [\"internal.example\"]\n\
         [virtual_service.sub_service.access]\nallow = [\"127.0.0.2/32\"]\n\
         [[virtual_service.sub_service.real_server]]\naddress = \"{}\"\n",
        security.display(),
        o.addr,
        inner.addr
    );
    let _p = Proxy::start(&cfg, listen);
    let req = |src: &str, host: &str| {
        let mut c = Client::connect_from(src.parse().unwrap(), listen);
        c.send(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes());
        c.read(false).map(|r| (r.status, r.text())).ok()
    };
    assert_eq!(req("127.0.0.1", "a"), Some((200, "ok".into())));
    for _ in 0..5 {
        assert_eq!(
            req("127.0.0.3", "a"),
            None,
            "denied: closed without a response"
        );
    }
    assert_eq!(
        req("127.0.0.2", "internal.example"),
        Some((200, "inner".into()))
    );
    // the sub-service's list holds for every spelling of its host
    for host in [
        "internal.example",
        "internal.example.",
        "INTERNAL.example.:80",
    ] {
        assert_eq!(req("127.0.0.1", host).unwrap().0, 403, "{host}");
    }
    assert_eq!(inner.nr_requests(), 1);
    let m = admin_get(admin, "/metrics").text();
    assert!(
        m.contains("edgeshard_access_refusals_total{service=\"web\"} 8"),
        "{m}"
    );
    // the three sub-service refusals and at least one denial, from whichever shards
    wait_until(Duration::from_secs(5), "access records", || {
        let recs = lines(&security);
        let access = |l: &&Value| l["event"] == "access";
        recs.iter()
            .filter(access)
            .filter(|l| l["status"] == 403)
            .count()
            == 3
            && recs
                .iter()
                .filter(access)
                .any(|l| l["client"].as_str().unwrap().starts_with("127.0.0.3:"))
    });
    // the upper bound on denials: a shard's late flush would show within this
    std::thread::sleep(Duration::from_millis(300));
    let recs = lines(&security);
    let denied: Vec<_> = recs
        .iter()
        .filter(|l| {
            l["event"] == "access" && l["client"].as_str().unwrap().starts_with("127.0.0.3:")
        })
        .collect();
    // once per address per interval on each shard that saw it (the kernel spreads them)
    assert!(
        (1..=2).contains(&denied.len()),
        "one record per address per interval and shard: {recs:?}"
    );
    let routed = recs
        .iter()
        .filter(|l| l["event"] == "access" && l["status"] == 403)
        .count();
    assert_eq!(routed, 3, "the sub-service refusals: {recs:?}");
    // a bad list is refused by check with the field named
    let (ok, text, _) = common::check_config("[[virtual_service]]\nlisten = \"127.0.0.1:1\"\n[virtual_service.access]\ndeny = [\"10.0.0.1/8\"]\n[[virtual_service.real_server]]\naddress = \"127.0.0.1:2\"\n");
    assert!(
        !ok && text.contains("virtual_service[0].access.deny"),
        "{text}"
    );
}
