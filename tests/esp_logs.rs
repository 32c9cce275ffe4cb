//! Edge Security Pack filtering, the three ESP logs and /metrics, through the real binary.

mod common;

use common::client::{one, Client};
use common::origin::Origin;
use common::pki::{client_config, Ca};
use common::tlsio::{connect, request};
use common::*;
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn lines(path: &Path) -> Vec<Value> {
    json_lines(path)
}

struct Logs {
    access: PathBuf,
    security: PathBuf,
    connection: PathBuf,
}

fn log_config(dir: &Path) -> (String, Logs) {
    let logs = Logs {
        access: dir.join("access.log"),
        security: dir.join("security.log"),
        connection: dir.join("connection.log"),
    };
    let top = format!(
        "[log]\nuser_access = \"{}\"\nsecurity = \"{}\"\nconnection = \"{}\"\nformat = \"json\"\n",
        logs.access.display(),
        logs.security.display(),
        logs.connection.display()
    );
    (top, logs)
}

const ESP: &str = "[virtual_service.esp]\nallowed_hosts = [\"ws-ext.example\", \"meet.example\"]\n\
    allowed_directories = [\"/abs/*\", \"/meet/*\"]\nexcluded_directories = [\"/abs/secret*\"]\n";

#[test]
fn esp_refuses_hosts_and_directories_and_logs_why() {
    let o = Origin::ok("ok");
    let listen = local(free_port());
    let dir = tmpdir("esp");
    let (top, logs) = log_config(&dir);
    let _p = Proxy::start(&simple_config(listen, &[o.addr], ESP, &top), listen);
    let get = |host: &str, path: &str| {
        one(
            listen,
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(),
        )
    };
    // allowed: case and port do not matter
    for (host, path) in [
        ("ws-ext.example", "/abs/ok"),
        ("WS-EXT.Example:443", "/abs/ok"),
        ("meet.example", "/meet/x?y=1"),
    ] {
        assert_eq!(get(host, path).status, 200, "{host} {path}");
    }
    let refused = [
        ("evil.example", "/abs/ok", "host not allowed"),
        ("ws-ext.example.evil", "/abs/ok", "host not allowed"),
        ("ws-ext.example", "/abs/../secret", "directory not allowed"),
        (
            "ws-ext.example",
            "/abs/%2e%2e/other",
            "directory not allowed",
        ),
        ("ws-ext.example", "/other", "directory not allowed"),
        ("ws-ext.example", "/abs/secret", "directory excluded"),
        ("ws-ext.example", "/%61bs/secret", "directory excluded"),
        ("ws-ext.example", "//abs/secret", "directory excluded"),
        ("ws-ext.example", "/abs/./secret/x", "directory excluded"),
        (
            "ws-ext.example",
            "/abs%2fsecret",
            "path cannot be normalised safely",
        ),
        (
            "ws-ext.example",
            "/abs/..%5csecret",
            "path cannot be normalised safely",
        ),
        (
            "ws-ext.example",
            "/abs/x%00",
            "path cannot be normalised safely",
        ),
    ];
    for (host, path, _) in refused {
        let r = get(host, path);
        assert_eq!(r.status, 403, "{host} {path}");
    }
    let seen: Vec<String> = o
        .requests()
        .iter()
        .map(|s| s.request_line.clone())
        .collect();
    assert_eq!(
        seen,
        vec![
            "GET /abs/ok HTTP/1.1",
            "GET /abs/ok HTTP/1.1",
            "GET /meet/x?y=1 HTTP/1.1"
        ],
        "only allowed requests reach the origin"
    );
    // every refusal is in the security log with its reason, host and path
    let mut sec = Vec::new();
    wait_until(Duration::from_secs(5), "security records", || {
        sec = lines(&logs.security);
        sec.len() >= refused.len()
    });
    // (shards flush on their own: records are matched by host and path, not by order)
    for (host, path, reason) in refused {
        let rec = sec
            .iter()
            .find(|r| r["host"] == host && r["path"] == path)
            .unwrap_or_else(|| panic!("no security record for {host} {path}"));
        assert_eq!(rec["reason"], reason, "{rec}");
        assert_eq!(rec["status"], 403);
        assert!(rec["event"] == "esp_host" || rec["event"] == "esp_directory");
        assert_eq!(rec["service"], "web");
        assert!(rec["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    }
    // every request, allowed or not, has an access record
    wait_until(Duration::from_secs(5), "access records", || {
        lines(&logs.access).len() == 3 + refused.len()
    });
}

#[test]
fn access_and_connection_records_carry_the_right_fields() {
    let ca = Ca::new("CA");
    let dir = tmpdir("logfields");
    let (cert, key) = ca.leaf(&["ws-ext.example"], false).write(&dir, "c");
    let o = Origin::ok("hello");
    let plain = local(free_port());
    let secure = local(free_port());
    let (top, logs) = log_config(&dir);
    let cfg = format!(
        "{top}\n[runtime]\nshards = 2\noversubscribe = true\n\
         [[virtual_service]]\nname = \"plain\"\nlisten = \"{plain}\"\n[[virtual_service.real_server]]\naddress = \"{a}\"\n\
         [[virtual_service]]\nname = \"secure\"\nlisten = \"{secure}\"\n\
         [virtual_service.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n[[virtual_service.real_server]]\naddress = \"{a}\"\n",
        cert.display(),
        key.display(),
        a = o.addr
    );
    let _p = Proxy::start(&cfg, plain);
    let mut c = Client::connect(plain);
    let local_port = c.w.local_addr().unwrap().port();
    let req =
        b"POST /upload?x=1 HTTP/1.1\r\nHost: ws-ext.example\r\nContent-Length: 5\r\n\r\nhello";
    let r = c.request(req);
    assert_eq!(r.status, 200);
    drop(c);
    let (r, s) = request(
        connect(secure, &client_config(&ca), "ws-ext.example").unwrap(),
        b"GET /tls HTTP/1.1\r\nHost: ws-ext.example\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    drop(s);
    let mut acc = Vec::new();
    wait_until(Duration::from_secs(5), "two access records", || {
        acc = lines(&logs.access);
        acc.len() == 2
    });
    let p = acc.iter().find(|v| v["service"] == "plain").unwrap();
    assert_eq!(p["client"], format!("127.0.0.1:{local_port}"));
    assert_eq!(
        (p["method"].as_str(), p["path"].as_str(), p["host"].as_str()),
        (Some("POST"), Some("/upload?x=1"), Some("ws-ext.example"))
    );
    assert_eq!(p["status"], 200);
    assert_eq!(p["bytes_in"], req.len() as u64);
    assert!(p["bytes_out"].as_u64().unwrap() > 5);
    assert_eq!(p["real_server"], o.addr.to_string());
    assert!(p["duration_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(p["tls"], Value::Null);
    assert_eq!(p["sub_service"], Value::Null);
    assert!(p["time"].as_str().unwrap().ends_with('Z'));
    let t = acc.iter().find(|v| v["service"] == "secure").unwrap();
    assert_eq!(t["tls"], "TLSv1.3");
    assert_eq!(t["path"], "/tls");
    // connection records: open and close for each, with the close reason and counts
    let mut conns = Vec::new();
    let ours = format!("127.0.0.1:{local_port}");
    wait_until(
        Duration::from_secs(5),
        "open and close of our connections",
        || {
            conns = lines(&logs.connection);
            conns
                .iter()
                .any(|v| v["event"] == "close" && v["client"] == ours.as_str())
                && conns.iter().filter(|v| v["service"] == "secure").count() >= 2
        },
    );
    assert!(conns
        .iter()
        .any(|v| v["event"] == "open" && v["client"] == ours.as_str()));
    let close = conns
        .iter()
        .find(|v| v["event"] == "close" && v["client"] == ours.as_str())
        .unwrap();
    assert_eq!(close["reason"], "client");
    assert_eq!(close["requests"], 1);
    assert_eq!(close["bytes_in"], req.len() as u64);
    assert!(close["shard"].as_u64().unwrap() < 2);
    assert!(conns
        .iter()
        .any(|v| v["event"] == "open" && v["service"] == "secure" && v["tls"] == "TLSv1.3"));
}

#[test]
fn host_and_sni_must_agree_on_tls_services() {
    let ca = Ca::new("CA");
    let dir = tmpdir("sni-host");
    let (cert, key) = ca
        .leaf(&["ws-ext.example", "meet.example"], false)
        .write(&dir, "c");
    let o = Origin::ok("ok");
    let listen = local(free_port());
    let (top, logs) = log_config(&dir);
    let cfg = format!(
        "{top}\n[runtime]\nshards = 1\n[[virtual_service]]\nlisten = \"{listen}\"\n{ESP}\n\
         [virtual_service.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n[[virtual_service.real_server]]\naddress = \"{}\"\n",
        cert.display(),
        key.display(),
        o.addr
    );
    let _p = Proxy::start(&cfg, listen);
    let client = client_config(&ca);
    let (r, _) = request(
        connect(listen, &client, "meet.example").unwrap(),
        b"GET /meet/a HTTP/1.1\r\nHost: ws-ext.example\r\n\r\n",
    );
    // Misdirected: the client is to open a connection for that name (HTTP/2 coalescing)
    assert_eq!(r.status, 421);
    assert_eq!(o.nr_requests(), 0);
    let (r, _) = request(
        connect(listen, &client, "meet.example").unwrap(),
        b"GET /meet/a HTTP/1.1\r\nHost: meet.example\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(o.nr_requests(), 1);
    wait_until(Duration::from_secs(5), "mismatch logged", || {
        lines(&logs.security)
            .iter()
            .any(|v| v["reason"] == "Host and SNI disagree")
    });
}

/// Parse Prometheus text: every sample belongs to a family with HELP and TYPE.
fn prometheus(text: &str) -> HashMap<String, f64> {
    let mut typed = std::collections::HashSet::new();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let name = it.next().unwrap();
            let kind = it.next().unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            for pair in labels[1..labels.len() - 1].split("\",") {
                let (k, v) = pair
                    .split_once('=')
                    .unwrap_or_else(|| panic!("bad label in {line}"));
                assert!(
                    k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && v.starts_with('"'),
                    "{line}"
                );
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
        assert!(
            typed.contains(name) || typed.contains(family),
            "no TYPE for {name}"
        );
        samples.insert(
            series.to_string(),
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("bad value {line}")),
        );
    }
    samples
}

fn metrics(admin: SocketAddr) -> HashMap<String, f64> {
    let r = admin_get(admin, "/metrics");
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    prometheus(&r.text())
}

#[test]
fn metrics_parse_and_match_the_traffic() {
    let o = Origin::ok("ok");
    let listen = local(free_port());
    let admin = local(free_port());
    let cfg = simple_config(
        listen,
        &[o.addr],
        ESP,
        &format!("[admin]\nlisten = \"{admin}\"\n"),
    );
    let _p = Proxy::start(&cfg, listen);
    // the start-up probe connected once; everything else starts from here
    let mut base = HashMap::new();
    wait_until(Duration::from_secs(5), "probe connection counted", || {
        base = metrics(admin);
        base.get("edgeshard_connections_total{service=\"web\"}") == Some(&1.0)
    });
    // 10 clients (spread over both shards), 3 allowed requests and 1 refused each
    for _ in 0..10 {
        let mut c = Client::connect(listen);
        for _ in 0..3 {
            assert_eq!(
                c.request(b"GET /abs/x HTTP/1.1\r\nHost: ws-ext.example\r\n\r\n")
                    .status,
                200
            );
        }
        assert_eq!(
            c.request(b"GET /nope HTTP/1.1\r\nHost: ws-ext.example\r\n\r\n")
                .status,
            403
        );
    }
    let rs = format!("service=\"web\",pool=\"web\",real_server=\"{}\"", o.addr);
    let mut m = HashMap::new();
    wait_until(Duration::from_secs(5), "every request counted", || {
        m = metrics(admin);
        m.get("edgeshard_requests_total{service=\"web\",protocol=\"http/1.1\"}") == Some(&40.0)
    });
    assert_eq!(
        m["edgeshard_responses_total{service=\"web\",class=\"2xx\"}"],
        30.0
    );
    assert_eq!(
        m["edgeshard_responses_total{service=\"web\",class=\"4xx\"}"],
        10.0
    );
    assert_eq!(
        m["edgeshard_esp_refusals_total{service=\"web\",reason=\"directory\"}"],
        10.0
    );
    assert_eq!(
        m["edgeshard_esp_refusals_total{service=\"web\",reason=\"host\"}"],
        0.0
    );
    assert_eq!(
        m[&format!("edgeshard_real_server_requests_total{{{rs}}}")],
        30.0
    );
    assert_eq!(
        m[&format!("edgeshard_real_server_responses_total{{{rs},class=\"2xx\"}}")],
        30.0
    );
    assert_eq!(m[&format!("edgeshard_real_server_up{{{rs}}}")], 1.0);
    assert_eq!(m["edgeshard_connections_total{service=\"web\"}"], 11.0);
    assert_eq!(
        m["edgeshard_request_duration_seconds_count{service=\"web\"}"],
        40.0
    );
    assert_eq!(
        m["edgeshard_request_duration_seconds_bucket{service=\"web\",le=\"+Inf\"}"],
        40.0
    );
    let accepted: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("edgeshard_shard_accepted_connections_total"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(accepted, 11.0);
    let per_shard = m
        .keys()
        .filter(|k| k.starts_with("edgeshard_shard_accepted_connections_total"))
        .count();
    assert_eq!(per_shard, 2);
    let request_bytes = b"GET /abs/x HTTP/1.1\r\nHost: ws-ext.example\r\n\r\n".len() * 30
        + b"GET /nope HTTP/1.1\r\nHost: ws-ext.example\r\n\r\n".len() * 10;
    assert_eq!(
        m["edgeshard_received_bytes_total{service=\"web\"}"],
        request_bytes as f64
    );
}

#[test]
fn a_stuck_log_target_drops_records_without_slowing_requests() {
    let o = Origin::ok("ok");
    let listen = local(free_port());
    let admin = local(free_port());
    let dir = tmpdir("fifo");
    let fifo = dir.join("access.fifo");
    let cpath = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(cpath.as_ptr(), 0o600) }, 0);
    // nobody ever reads the FIFO: the writer blocks opening it, as on a dead disk
    let top = format!(
        "[admin]\nlisten = \"{admin}\"\n[log]\nuser_access = \"{}\"\n",
        fifo.display()
    );
    let _p = Proxy::start(&simple_config(listen, &[o.addr], "", &top), listen);
    let started = Instant::now();
    let mut threads = Vec::new();
    for _ in 0..4 {
        threads.push(std::thread::spawn(move || {
            let mut c = Client::connect(listen);
            let mut slowest = Duration::ZERO;
            for _ in 0..4000 {
                let t = Instant::now();
                assert_eq!(c.request(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n").status, 200);
                slowest = slowest.max(t.elapsed());
            }
            slowest
        }));
    }
    let slowest = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .max()
        .unwrap();
    assert!(
        slowest < Duration::from_secs(1),
        "a request took {slowest:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(120));
    let mut dropped = 0.0;
    wait_until(Duration::from_secs(5), "dropped records counted", || {
        dropped = metrics(admin)
            .get("edgeshard_log_records_dropped_total{log=\"user_access\"}")
            .copied()
            .unwrap_or(0.0);
        dropped > 0.0
    });
    assert!(dropped <= 16000.0);
}

#[test]
fn sigusr1_reopens_the_log_files() {
    let o = Origin::ok("ok");
    let listen = local(free_port());
    let dir = tmpdir("rotate");
    let (top, logs) = log_config(&dir);
    let p = Proxy::start(&simple_config(listen, &[o.addr], "", &top), listen);
    assert_eq!(
        one(listen, b"GET /before HTTP/1.1\r\nHost: a\r\n\r\n").status,
        200
    );
    wait_until(Duration::from_secs(5), "first record", || {
        lines(&logs.access).len() == 1
    });
    let rotated = dir.join("access.log.1");
    std::fs::rename(&logs.access, &rotated).unwrap();
    p.signal(libc::SIGUSR1);
    wait_until(Duration::from_secs(5), "reopen logged", || {
        p.log().contains("log files reopened")
    });
    assert_eq!(
        one(listen, b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n").status,
        200
    );
    wait_until(Duration::from_secs(5), "record in the new file", || {
        lines(&logs.access).len() == 1
    });
    assert_eq!(lines(&logs.access)[0]["path"], "/after");
    assert_eq!(lines(&rotated).len(), 1);
}
