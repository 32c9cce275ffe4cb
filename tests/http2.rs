//! HTTP/2 on the client side, with curl (nghttp2) as the client: ALPN, the same request path
//! as HTTP/1.1 (ESP, routing, forwarded headers, logs), many streams on one connection, request
//! bodies with and without a length, a large response under flow control, and `http2 = false`.

mod common;

use common::origin::{Next, Origin, Seen};
use common::pki::{self, Ca};
use common::*;
use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, &c| {
        (h ^ c as u64).wrapping_mul(0x100000001b3)
    })
}

/// An origin that answers `/big` with 4 MiB, and anything else with the length and checksum
/// of the body it received.
fn origin() -> Origin {
    Origin::start(Arc::new(|s: &Seen, w: &mut TcpStream| {
        if s.request_line.starts_with("GET /slow ") {
            std::thread::sleep(Duration::from_millis(1500));
        }
        if s.request_line.starts_with("GET /hang ") {
            std::thread::sleep(Duration::from_secs(15));
        }
        if s.request_line.starts_with("GET /trailers ") {
            let _ = w.write_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n5\r\nhello\r\n0\r\nX-Checksum: abc123\r\nConnection: x\r\n\r\n",
            );
            return Next::KeepAlive;
        }
        if s.request_line.starts_with("GET /nocontent ") {
            let _ = w.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n");
            return Next::KeepAlive;
        }
        if s.request_line.contains(" /big ") {
            let body: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
            let _ = write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            if !s.request_line.starts_with("HEAD ") {
                let _ = w.write_all(&body);
            }
        } else {
            let text = format!("{} {:x}", s.body.len(), checksum(&s.body));
            let _ = write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Origin: yes\r\nKeep-Alive: timeout=5\r\n\r\n{text}",
                text.len()
            );
        }
        Next::KeepAlive
    }))
}

struct Setup {
    p: Proxy,
    listen: SocketAddr,
    admin: SocketAddr,
    o: Origin,
    ca_file: std::path::PathBuf,
}

fn setup(extra_tls: &str) -> Setup {
    setup_with("", extra_tls)
}

/// `service_keys` go in the virtual service's table, `extra_tls` in its TLS table.
fn setup_with(service_keys: &str, extra_tls: &str) -> Setup {
    let ca = Ca::new("h2 CA");
    let dir = tmpdir("h2");
    let (cert, key) = ca.leaf(&["web.example"], false).write(&dir, "web");
    let ca_file = pki::write_pem(&dir, "ca.pem", &ca.pem());
    let o = origin();
    let (listen, admin) = (local(free_port()), local(free_port()));
    let cfg = simple_config(
        listen,
        &[o.addr],
        &format!(
            "{service_keys}[virtual_service.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n{extra_tls}\n[virtual_service.esp]\nallowed_hosts = [\"web.example\"]\nallowed_directories = [\"/*\"]\nexcluded_directories = [\"/secret/*\"]\n",
            cert.display(),
            key.display()
        ),
        &format!("[admin]\nlisten = \"{admin}\"\n[log]\nuser_access = \"access.log\"\nconnection = \"conn.log\"\nsecurity = \"sec.log\"\n"),
    );
    let p = Proxy::start(&cfg, admin);
    Setup {
        p,
        listen,
        admin,
        o,
        ca_file,
    }
}

/// curl over HTTP/2 (ALPN), verifying the appliance's certificate; returns its stdout.
fn curl(s: &Setup, args: &[&str], stdin: Option<&[u8]>) -> String {
    let mut c = Command::new("curl");
    c.args(["-s", "--http2", "--max-time", "20", "--cacert"])
        .arg(&s.ca_file)
        .args([
            "--resolve",
            &format!("web.example:{}:127.0.0.1", s.listen.port()),
        ])
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c
        .spawn()
        .expect("curl (tests/run installs it when missing)");
    if let Some(data) = stdin {
        let mut i = child.stdin.take().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = i.write_all(&data);
        });
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One of tests/h2's Python clients (Python's h2 package), against the setup's service: the
/// host, port and authority go first, then the script's own arguments.
fn h2_client(s: &Setup, script: &str) -> Command {
    let mut c = Command::new("python3");
    c.arg(format!("{}/tests/h2/{script}", env!("CARGO_MANIFEST_DIR")))
        .args([
            "127.0.0.1".to_string(),
            s.listen.port().to_string(),
            format!("web.example:{}", s.listen.port()),
        ]);
    c
}

fn url(s: &Setup, path: &str) -> String {
    format!("https://web.example:{}{path}", s.listen.port())
}

/// The status code curl got over HTTP/2 for `path` (with `extra` curl arguments).
fn http_code(s: &Setup, path: &str, extra: &[&str]) -> String {
    let mut args = vec!["-o", "/dev/null", "-w", "%{http_code}"];
    args.extend_from_slice(extra);
    let target = url(s, path);
    args.push(&target);
    curl(s, &args, None)
}

fn log(s: &Setup, name: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(s.p.dir.join(name))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn streams_take_the_same_request_path() {
    let s = setup("");
    // negotiated h2; answered through the request path
    let out = curl(
        &s,
        &[
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version}",
            &url(&s, "/a?b=1"),
        ],
        None,
    );
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    assert!(out.contains("x-origin: yes"), "{out}");
    assert!(
        !out.to_ascii_lowercase().contains("keep-alive:"),
        "hop-by-hop dropped: {out}"
    );
    assert!(out.ends_with('2'), "{out}");
    let seen = s.o.requests();
    let r = seen.last().unwrap();
    assert_eq!(r.request_line, "GET /a?b=1 HTTP/1.1");
    assert_eq!(
        r.header("Host"),
        Some(&*format!("web.example:{}", s.listen.port()))
    );
    assert_eq!(r.header("X-Forwarded-Proto"), Some("https"));
    assert_eq!(r.header("X-Forwarded-For"), Some("127.0.0.1"));
    // ESP judges it as any request: refused, logged, never at the origin
    let before = s.o.nr_requests();
    let code = http_code(&s, "/secret/x", &[]);
    assert_eq!(code, "403");
    let code = http_code(&s, "/", &["-H", "Host: other.example"]);
    // a foreign host in :authority on a connection made for another name: misdirected (a
    // coalescing browser opens a connection for it, where ESP judges it alone)
    assert_eq!(code, "421", "a foreign host in :authority");
    assert_eq!(s.o.nr_requests(), before);
    wait_until(Duration::from_secs(5), "ESP refusals logged", || {
        log(&s, "sec.log")
            .iter()
            .filter(|r| r["event"].as_str().is_some_and(|e| e.starts_with("esp_")))
            .count()
            == 2
    });
    // many streams on one connection, all answered
    let mut args: Vec<String> = vec!["--parallel".into(), "--parallel-max".into(), "40".into()];
    for i in 0..40 {
        args.push("-o".into());
        args.push("/dev/null".into());
        args.push(url(&s, &format!("/many/{i}")));
    }
    args.push("-w".into());
    args.push("%{http_code} ".into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = curl(&s, &refs, None);
    assert_eq!(
        out.split_whitespace().filter(|c| *c == "200").count(),
        40,
        "{out}"
    );
    wait_until(Duration::from_secs(5), "the access records", || {
        log(&s, "access.log")
            .iter()
            .filter(|r| r["path"].as_str().is_some_and(|p| p.starts_with("/many/")))
            .filter(|r| r["protocol"] == "HTTP/2")
            .count()
            == 40
    });
    // the multiplexed connection's record comes once the client has gone
    wait_until(
        Duration::from_secs(10),
        "streams sharing a connection",
        || {
            log(&s, "conn.log")
                .iter()
                .any(|r| r["event"] == "close" && r["requests"].as_u64().unwrap_or(0) > 1)
        },
    );
    let conns = log(&s, "conn.log");
    let opens = conns.iter().filter(|r| r["event"] == "open").count();
    assert!(
        opens < 10,
        "44 requests, a few connections: stream links log no connection of their own ({opens})"
    );
}

#[test]
fn request_bodies_and_a_large_response() {
    let s = setup("");
    let data: Vec<u8> = (0..1_500_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let want = format!("{} {:x}", data.len(), checksum(&data));
    // with a length (curl sends content-length), and without (from a pipe: chunked upstream)
    let with_len = curl(&s, &["--data-binary", "@-", &url(&s, "/up")], Some(&data));
    assert_eq!(with_len, want);
    let streamed = curl(
        &s,
        &[
            "-T",
            "-",
            "-X",
            "POST",
            "-H",
            "Content-Length:",
            &url(&s, "/up"),
        ],
        Some(&data),
    );
    assert_eq!(streamed, want);
    let chunked =
        s.o.requests()
            .into_iter()
            .filter(|r| r.header("Transfer-Encoding").is_some())
            .count();
    assert!(chunked >= 1, "the length-less body went up chunked");
    // 4 MiB down through the client's flow-control window
    let dir = tmpdir("h2big");
    let file = dir.join("big");
    curl(&s, &["-o", file.to_str().unwrap(), &url(&s, "/big")], None);
    let got = std::fs::read(&file).unwrap();
    let body: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
    assert!(got == body, "4 MiB intact ({} bytes)", got.len());
    // a chunked response's trailers arrive as HTTP/2 trailers (framing fields left out)
    let out = curl(&s, &["-D", "-", &url(&s, "/trailers")], None);
    assert!(out.contains("hello"), "{out}");
    assert!(out.contains("x-checksum: abc123"), "trailers: {out}");
    assert!(!out.contains("connection: x"), "{out}");
    // a 204 goes without Content-Length (an HTTP/2 client refuses one there)
    let code = http_code(&s, "/nocontent", &[]);
    assert_eq!(code, "204");
    // HEAD: the head alone
    let out = curl(&s, &["-I", &url(&s, "/big")], None);
    assert!(
        out.starts_with("HTTP/2 200") && out.contains("content-length: 4194304"),
        "{out}"
    );
    // the connection records count the frames' bytes: the 4 MiB one's at least the body
    wait_until(
        Duration::from_secs(5),
        "the 4 MiB connection's record",
        || {
            log(&s, "conn.log").iter().any(|r| {
                r["event"] == "close"
                    && r["bytes_out"].as_u64().unwrap_or(0) > 4 << 20
                    && r["bytes_in"].as_u64().unwrap_or(0) > 0
            })
        },
    );
}

#[test]
fn http2_can_be_turned_off() {
    let s = setup("http2 = false\n");
    let v = curl(
        &s,
        &["-o", "/dev/null", "-w", "%{http_version}", &url(&s, "/")],
        None,
    );
    assert_eq!(v, "1.1");
}

#[test]
fn sigterm_lets_streams_in_flight_finish_then_exits() {
    let mut s = setup("");
    let curl = {
        let mut c = Command::new("curl");
        c.args(["-s", "--http2", "--max-time", "20", "--cacert"])
            .arg(&s.ca_file)
            .args([
                "--resolve",
                &format!("web.example:{}:127.0.0.1", s.listen.port()),
            ])
            .args(["-o", "/dev/null", "-w", "%{http_code}", &url(&s, "/slow")])
            .stdout(Stdio::piped());
        c.spawn().unwrap()
    };
    wait_until(
        Duration::from_secs(5),
        "the slow request at the origin",
        || {
            s.o.requests()
                .iter()
                .any(|r| r.request_line.starts_with("GET /slow "))
        },
    );
    let t = std::time::Instant::now();
    s.p.signal(libc::SIGTERM);
    let out = curl.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "the stream in flight finished"
    );
    assert_eq!(s.p.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "exited once it was done: {:?}",
        t.elapsed()
    );
}

/// Rapid reset (CVE-2023-44487): streams opened and cancelled in bulk on one connection; the
/// connection is cut with ENHANCE_YOUR_CALM, the origin sees a bounded number of them, and the
/// service goes on serving others.
#[test]
fn a_rapid_reset_flood_is_cut_and_bounded() {
    let s = setup("");
    let out = h2_client(&s, "rapid_reset.py")
        .args(["2000"])
        .output()
        .expect("python3 with the h2 package (tests/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 0xb: ENHANCE_YOUR_CALM
    assert!(
        text.contains("goaway=11"),
        "cut with ENHANCE_YOUR_CALM: {text}"
    );
    let sent: usize = text
        .split("sent=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(sent < 2000, "cut before the flood ended: {text}");
    let slow =
        s.o.requests()
            .iter()
            .filter(|r| r.request_line.starts_with("GET /slow "))
            .count();
    assert!(
        slow <= 300,
        "a bounded number reached the origin: {slow} of {sent}"
    );
    wait_until(Duration::from_secs(5), "the rapid reset counted", || {
        metrics(s.admin).get("edgeshard_h2_abuse_total{service=\"web\",kind=\"rapid_reset\"}")
            == Some(&1.0)
    });
    // others are still served
    let code = http_code(&s, "/after", &[]);
    assert_eq!(code, "200");
}

/// Run tests/h2/flood.py: `KIND` frames, up to `n`, on one connection.
fn flood(s: &Setup, kind: &str, n: usize) -> String {
    let out = h2_client(s, "flood.py")
        .args([kind, &n.to_string()])
        .output()
        .expect("python3 with the h2 package (tests/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{kind}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn control_frame_floods_are_cut_counted_and_logged() {
    let s = setup("");
    let kinds = [
        ("ping", "ping_flood"),
        ("settings", "settings_flood"),
        ("window_update", "window_update_flood"),
        ("priority", "priority_flood"),
        ("empty_data", "empty_frames"),
        ("continuation", "continuation_flood"),
        ("ping_ack", "ping_flood"),
        ("unknown", "unknown_frames"),
        ("malformed", "malformed_flood"),
    ];
    // floods of one label so far (unsolicited PING ACKs count as a PING flood)
    let times = |upto: usize, label: &str| kinds[..upto].iter().filter(|k| k.1 == label).count();
    for (i, (kind, label)) in kinds.into_iter().enumerate() {
        let text = flood(&s, kind, 20_000);
        // 0xb: ENHANCE_YOUR_CALM, long before the flood's end
        assert!(text.contains("goaway=11"), "{kind}: {text}");
        let sent: usize = text
            .split("sent=")
            .nth(1)
            .and_then(|t| t.split_whitespace().next()?.parse().ok())
            .unwrap();
        assert!(sent < 20_000, "{kind} cut early: {text}");
        let key = format!("edgeshard_h2_abuse_total{{service=\"web\",kind=\"{label}\"}}");
        let want = times(i + 1, label) as f64;
        wait_until(Duration::from_secs(5), &format!("{label} counted"), || {
            metrics(s.admin).get(&key) == Some(&want)
        });
    }
    // as many pings as the budget allows are answered, and nothing more happens (51 ACKs:
    // the 50 pongs and the one for the client's own SETTINGS)
    let text = flood(&s, "ping", 50);
    assert!(
        text.contains("goaway=None") && text.contains("acks=51"),
        "{text}"
    );
    wait_until(Duration::from_secs(5), "every flood logged", || {
        let events: Vec<String> = log(&s, "sec.log")
            .iter()
            .filter_map(|r| r["event"].as_str().map(String::from))
            .filter(|e| e.starts_with("h2_"))
            .collect();
        kinds.iter().all(|(_, label)| {
            events.iter().filter(|e| e[3..] == **label).count() == times(kinds.len(), label)
        })
    });
    // no request of a flood reached the origin; others are still served, as HTTP/2
    assert!(s.o.requests().is_empty(), "{:?}", s.o.requests().len());
    let code = curl(
        &s,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
            &url(&s, "/after"),
        ],
        None,
    );
    assert_eq!(code, "200 2");
    // counted once the answer is out: waited for, not assumed. Two: this one, and the empty
    // DATA flood's upload, cancelled with its connection (a 499 in the access log)
    wait_until(Duration::from_secs(5), "the requests counted", || {
        metrics(s.admin).get("edgeshard_requests_total{service=\"web\",protocol=\"h2\"}")
            == Some(&2.0)
    });
    wait_until(
        Duration::from_secs(5),
        "the cancelled upload's record",
        || {
            log(&s, "access.log")
                .iter()
                .any(|r| r["status"] == 499 && r["path"] == "/upload")
        },
    );
    let m = metrics(s.admin);
    assert_eq!(
        m["edgeshard_requests_total{service=\"web\",protocol=\"http/1.1\"}"],
        0.0
    );
    // one per flood, the pings within budget, and curl's
    assert_eq!(
        m["edgeshard_h2_connections_total{service=\"web\"}"],
        (kinds.len() + 2) as f64
    );
}

/// The proxy's resident memory, KiB.
fn rss_kib(p: &Proxy) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.child.id())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn a_reader_that_never_opens_its_window_pins_no_memory() {
    let s = setup_with("client_write_timeout = \"3s\"\n", "");
    // warm: the first streams' one-off growth is not what is measured
    let code = http_code(&s, "/big", &[]);
    assert_eq!(code, "200");
    let before = rss_kib(&s.p);
    // two connections, 100 streams each, for 4 MiB responses: 800 MiB if it were buffered
    let readers: Vec<_> = (0..2)
        .map(|_| {
            h2_client(&s, "slow_reader.py")
                .args(["/big", "100", "20"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("python3 with the h2 package (tests/run installs it)")
        })
        .collect();
    // every stream reached the origin and is stalled on the client's window
    wait_until(
        Duration::from_secs(10),
        "200 stalled streams at the origin",
        || {
            s.o.requests()
                .iter()
                .filter(|r| r.request_line.starts_with("GET /big "))
                .count()
                >= 201
        },
    );
    let peak = rss_kib(&s.p);
    // meanwhile another client is served
    let code = http_code(&s, "/other", &[]);
    assert_eq!(code, "200");
    for r in readers {
        let out = r.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // each stream got its head, then a reset once client_write_timeout passed (not 20 s)
        assert!(text.contains("headers=100 resets=100"), "{text}");
    }
    let grown = peak.saturating_sub(before);
    eprintln!("RSS before {before} KiB, with 200 stalled streams {peak} KiB (+{grown})");
    // on io_uring, the shards' receive-buffer pools (2 x 4 MiB by default) fill too: a fixed
    // cost, not one per stream
    let pools = if with_test_engine("").contains("io_uring") {
        8 * 1024
    } else {
        0
    };
    assert!(
        grown < 64 * 1024 + pools,
        "200 stalled 4 MiB responses grew RSS by {grown} KiB"
    );
}

#[test]
fn malformed_streams_never_reach_the_origin() {
    let s = setup("");
    let out = h2_client(&s, "malformed.py")
        .output()
        .expect("python3 with the h2 package (tests/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: std::collections::HashMap<&str, &str> =
        text.lines().filter_map(|l| l.split_once(' ')).collect();
    // the h2 layer refuses what RFC 9113 calls malformed: the stream (PROTOCOL_ERROR = 1),
    // or the whole connection when the field block itself is invalid
    for (case, want) in [
        ("connection_header", "reset=1"),
        ("transfer_encoding", "reset=1"),
        ("te_gzip", "reset=1"),
        ("no_path", "reset=1"),
        ("pseudo_after_regular", "reset=1"),
        ("uppercase_name", "goaway=1"),
        ("unknown_pseudo", "goaway=1"),
        ("smuggled_crlf", "goaway=1"),
        // a Host naming another entity than :authority: the request path's 400
        ("host_differs", "status=400"),
        ("ok", "status=200"),
    ] {
        assert_eq!(got.get(case).copied(), Some(want), "{case}: {text}");
    }
    // only the good one reached the origin
    let seen: Vec<String> =
        s.o.requests()
            .iter()
            .map(|r| r.request_line.clone())
            .collect();
    assert_eq!(seen, ["GET /m/ok HTTP/1.1"], "{seen:?}");
    // each refusal counted and recorded
    wait_until(Duration::from_secs(5), "refusals counted", || {
        let m = metrics(s.admin);
        m.get("edgeshard_h2_malformed_streams_total{service=\"web\"}") == Some(&5.0)
            && m.get("edgeshard_h2_abuse_total{service=\"web\",kind=\"protocol_error\"}")
                == Some(&3.0)
    });
    wait_until(
        Duration::from_secs(5),
        "refusals in the security log",
        || {
            let recs = log(&s, "sec.log");
            let n = |e: &str| recs.iter().filter(|r| r["event"] == e).count();
            n("h2_malformed_request") == 5 && n("h2_protocol_error") == 3
        },
    );
}

#[test]
fn cancelled_streams_free_their_places_and_their_real_server_connections() {
    let s = setup("");
    let out = h2_client(&s, "cancel.py")
        .args(["/hang", "100"])
        .output()
        .expect("python3 with the h2 package (tests/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 100 streams cancelled while their real server takes 15 s: the next is answered at once
    assert!(text.starts_with("after=200 "), "{text}");
    let secs: f64 = text
        .split("seconds=")
        .nth(1)
        .and_then(|t| t.trim().parse().ok())
        .unwrap();
    assert!(secs < 5.0, "answered after {secs} s");
    // the real server's connections for them were closed, their counts released
    wait_until(
        Duration::from_secs(5),
        "no active upstream connection left",
        || {
            let m = metrics(s.admin);
            let active: Vec<f64> = m
                .iter()
                .filter(|(k, _)| k.starts_with("edgeshard_real_server_active_connections{"))
                .map(|(_, v)| *v)
                .collect();
            !active.is_empty() && active.iter().all(|v| *v == 0.0)
        },
    );
    wait_until(
        Duration::from_secs(5),
        "100 cancelled requests logged",
        || {
            log(&s, "access.log")
                .iter()
                .filter(|r| r["status"] == 499 && r["path"] == "/hang")
                .count()
                == 100
        },
    );
}

#[test]
fn a_client_that_stops_reading_is_cut_after_client_write_timeout() {
    let s = setup_with("client_write_timeout = \"2s\"\n", "");
    let mut stalled = h2_client(&s, "stall.py")
        .args(["/big", "4", "30"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 with the h2 package (tests/run installs it)");
    // its windows are open and it asked for 16 MiB: the stall is the socket's, not the
    // streams'. Cut within the timeout (and a tick), not after idle_timeout and a grace.
    let t = std::time::Instant::now();
    wait_until(
        Duration::from_secs(10),
        "the stalled connection cut",
        || {
            log(&s, "conn.log")
                .iter()
                .any(|r| r["event"] == "close" && r["reason"] == "write_timeout")
        },
    );
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    assert_eq!(
        metrics(s.admin)["edgeshard_connections_active{service=\"web\"}"],
        0.0
    );
    let _ = stalled.kill();
    let _ = stalled.wait();
}

#[test]
fn h2c_by_prior_knowledge_on_a_plain_service() {
    let o = origin();
    let (listen, admin, plain) = (local(free_port()), local(free_port()), local(free_port()));
    let cfg = format!(
        "{}\n[[virtual_service]]\nname = \"h1only\"\nlisten = \"{plain}\"\n[[virtual_service.real_server]]\naddress = \"{}\"\n",
        simple_config(
            listen,
            &[o.addr],
            "h2c = true\n",
            &format!("[admin]\nlisten = \"{admin}\"\n[log]\nuser_access = \"access.log\"\n"),
        ),
        o.addr
    );
    let p = Proxy::start(&cfg, admin);
    let run = |addr: SocketAddr, path: &str| {
        let out = Command::new("curl")
            .args(["-s", "--http2-prior-knowledge", "--max-time", "10"])
            .args(["-o", "/dev/null", "-w", "%{http_code} %{http_version}"])
            .arg(format!("http://web.example:{}{path}", addr.port()))
            .args([
                "--resolve",
                &format!("web.example:{}:127.0.0.1", addr.port()),
            ])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // many streams on one h2c connection, through the same request path
    assert_eq!(run(listen, "/one"), "200 2");
    // (h2load: curl 7.88's --parallel sends only the first of several h2c transfers)
    let out = Command::new("h2load")
        .args(["-n", "10", "-c", "1", "-m", "10"])
        .arg(format!("http://127.0.0.1:{}/many", listen.port()))
        .output()
        .expect("h2load (tests/run installs nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("Application protocol: h2c"), "{text}");
    assert!(text.contains("10 succeeded, 0 failed"), "{text}");
    let seen = o.requests();
    assert!(seen.iter().any(|r| r.request_line == "GET /one HTTP/1.1"));
    assert_eq!(
        seen.last().unwrap().header("X-Forwarded-Proto"),
        Some("http")
    );
    wait_until(
        Duration::from_secs(5),
        "h2c requests counted as HTTP/2",
        || {
            metrics(admin).get("edgeshard_requests_total{service=\"web\",protocol=\"h2\"}")
                == Some(&11.0)
        },
    );
    wait_until(Duration::from_secs(5), "their access records", || {
        json_lines(&p.dir.join("access.log"))
            .iter()
            .filter(|r| r["protocol"] == "HTTP/2")
            .count()
            == 11
    });
    // HTTP/1.1 still works there; a service without h2c answers the preface with 505
    assert_eq!(
        common::client::one(listen, b"GET /h1 HTTP/1.1\r\nHost: a\r\n\r\n").status,
        200
    );
    assert_eq!(
        common::client::one(plain, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").status,
        505
    );
    // h2c on a TLS service is refused, with the field named
    let ca = Ca::new("h2c CA");
    let (cert, key) = ca
        .leaf(&["web.example"], false)
        .write(&tmpdir("h2c"), "web");
    let (ok, text, _) = check_config(&format!(
        "[[virtual_service]]\nlisten = \"127.0.0.1:1\"\nh2c = true\n[virtual_service.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n[[virtual_service.real_server]]\naddress = \"127.0.0.1:2\"\n",
        cert.display(),
        key.display()
    ));
    assert!(!ok && text.contains("h2c"), "{text}");
}

#[test]
fn a_reload_that_takes_the_service_away_sends_goaway() {
    let s = setup("");
    let mut py = h2_client(&s, "two_requests.py")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 with the h2 package (tests/run installs it)");
    let mut out = std::io::BufReader::new(py.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "first=200");
    // the service moves to another address: the open connection is told to go
    let moved = local(free_port());
    let cfg = std::fs::read_to_string(&s.p.config).unwrap().replace(
        &format!("listen = \"{}\"", s.listen),
        &format!("listen = \"{moved}\""),
    );
    std::fs::write(&s.p.config, cfg).unwrap();
    s.p.signal(libc::SIGHUP);
    wait_until(
        Duration::from_secs(10),
        "the reloaded service listening",
        || std::net::TcpStream::connect(moved).is_ok(),
    );
    py.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    // NO_ERROR GOAWAY: the second request is never served under the old service
    assert_eq!(line.trim(), "second=goaway=0", "{line}");
    let _ = py.wait();
    wait_until(
        Duration::from_secs(15),
        "the connection's record: reload",
        || {
            log(&s, "conn.log")
                .iter()
                .any(|r| r["event"] == "close" && r["reason"] == "reload")
        },
    );
    assert!(
        !s.o.requests()
            .iter()
            .any(|r| r.request_line.starts_with("GET /second")),
        "nothing reached the old real server after the reload"
    );
}

#[test]
fn streams_cancelled_in_the_queue_leave_it_at_once() {
    let s = setup_with("queue_timeout = \"20s\"\nqueue_size = 3\n", "");
    // the only real server takes one connection at a time
    let cfg = std::fs::read_to_string(&s.p.config).unwrap().replace(
        "[[virtual_service.real_server]]\n",
        "[[virtual_service.real_server]]\nconnection_limit = 1\n",
    );
    assert!(cfg.contains("connection_limit = 1"));
    std::fs::write(&s.p.config, &cfg).unwrap();
    s.p.signal(libc::SIGHUP);
    wait_until(Duration::from_secs(5), "the limit in force", || {
        status(s.admin)["virtual_services"][0]["real_servers"][0]["connection_limit"] == 1
    });
    let mut py = h2_client(&s, "queue_cancel.py")
        .args(["3", "10"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 with the h2 package (tests/run installs it)");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(py.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "cancelled");
    // the holder still runs (15 s); the three cancelled ones are out of the queue now
    wait_until(Duration::from_secs(3), "the queue empty again", || {
        status(s.admin)["virtual_services"][0]["queued_requests"] == 0
    });
    wait_until(Duration::from_secs(5), "three 499 records", || {
        log(&s, "access.log")
            .iter()
            .filter(|r| r["status"] == 499 && r["path"] == "/q")
            .count()
            == 3
    });
    assert!(!s
        .o
        .requests()
        .iter()
        .any(|r| r.request_line.starts_with("GET /q ")));
    let _ = py.kill();
    let _ = py.wait();
}
