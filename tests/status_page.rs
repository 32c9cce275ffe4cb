//! The admin status page in a real headless browser (Debian's chromium, installed by
//! .ci/run): it loads, fetches /status and shows the services and real servers with their
//! state.

mod common;

use common::client::one;
use common::origin::Origin;
use common::*;
use std::process::Command;
use std::time::Duration;

fn chromium() -> &'static str {
    for c in [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ] {
        if std::path::Path::new(c).exists() {
            return c;
        }
    }
    panic!("no chromium found: install Debian's chromium package (.ci/run does)");
}

/// Headless chromium on `url` with `extra` arguments (a fresh profile, no background
/// networking: the machine's network is closed); its stdout.
fn chromium_run(url: &str, extra: &[&str]) -> String {
    let profile = tmpdir("chromium-profile");
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=4000",
        ])
        .args(extra)
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .output()
        .expect("run chromium");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The page's DOM after its scripts ran.
fn rendered(url: &str) -> String {
    chromium_run(url, &["--dump-dom"])
}

#[test]
fn status_page_shows_services_and_real_servers_in_a_browser() {
    let (a, b) = (Origin::ok("a"), Origin::ok("b"));
    let listen = local(free_port());
    let admin = local(free_port());
    let cfg = simple_config(
        listen,
        &[a.addr, b.addr],
        "",
        &format!("[admin]\nlisten = \"{admin}\"\n{}", operator_token_config()),
    );
    let _p = Proxy::start(&cfg, listen);
    for _ in 0..5 {
        assert_eq!(
            one(listen, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").status,
            200
        );
    }
    // the page is self-contained: no external assets
    let page = admin_get(admin, "/");
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    let html = page.text();
    assert!(
        !html.contains("http://") && !html.contains("https://") && !html.contains("src="),
        "external asset in the page"
    );

    let b_addr = b.addr.to_string();
    assert_eq!(
        admin_call(
            admin,
            "POST",
            &format!("/api/v1/services/web/real_servers/{b_addr}/state"),
            Some(OPERATOR_TOKEN),
            Some(r#"{"state": "maint"}"#)
        )
        .status,
        200
    );
    // without a token the page asks for one; a login link carries it in the fragment
    let login = rendered(&format!("http://{admin}/"));
    assert!(login.contains("id=\"login\""), "login form: {login}");
    let dom = rendered(&format!("http://{admin}/#token={OPERATOR_TOKEN}"));
    assert!(
        dom.contains("<h2 class=\"vs\">web"),
        "service heading missing: {dom}"
    );
    assert!(
        dom.contains(&a.addr.to_string()) && dom.contains(&b_addr),
        "real servers missing: {dom}"
    );
    assert!(dom.contains("class=\"up\">Up"), "Up state missing: {dom}");
    assert!(
        dom.contains("class=\"maint\">Maint"),
        "Maint state missing: {dom}"
    );
    assert!(dom.contains("2 shards"), "shard line missing: {dom}");
    // the request counts are on the page (5 requests: 3 + 2 or 2 + 3 by round robin)
    let rendered_part = dom
        .split("<div id=\"services\">")
        .nth(1)
        .unwrap()
        .split("<script")
        .next()
        .unwrap();
    let rows: Vec<&str> = rendered_part.split("<tr class=\"rs\">").skip(1).collect();
    assert_eq!(rows.len(), 2);
    let total: u64 = rows
        .iter()
        .map(|r| {
            let cells: Vec<&str> = r
                .split("<td")
                .skip(1)
                .map(|c| c.split_once('>').unwrap().1.split('<').next().unwrap())
                .collect();
            // address, status, since, active connections, requests
            cells[4].parse::<u64>().unwrap()
        })
        .sum();
    assert_eq!(total, 5, "{rows:?}");

    // a's Drain button, clicked in the browser, drains a on every shard through the API
    let click = Command::new("node")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/browser/click.mjs"
        ))
        .arg(format!("http://{admin}/#token={OPERATOR_TOKEN}"))
        .arg(a.addr.to_string())
        .arg("Drain")
        .arg("drain")
        .output()
        .expect("node (tests/run installs playwright-core into tests/browser)");
    let out = String::from_utf8_lossy(&click.stdout);
    assert!(
        click.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&click.stderr)
    );
    assert!(
        out.contains("message: ") && out.contains(": drain"),
        "{out}"
    );
    let st = status(admin);
    assert_eq!(
        st["virtual_services"][0]["real_servers"][0]["state"],
        "drain"
    );
    // b is in maint and a now drains: a new client finds no server
    assert_eq!(
        one(listen, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").status,
        503
    );
}

/// The history behind the page's plots: what the test sent shows in the right series, in
/// /api/v1/history and drawn on the page (inline SVG), and a screenshot of it.
#[test]
fn history_plots_show_the_traffic_sent() {
    use std::sync::Arc;
    let ok = Origin::ok("fine");
    let failing = Origin::start(Arc::new(
        |_s: &origin::Seen, w: &mut std::net::TcpStream| {
            let _ = std::io::Write::write_all(
                w,
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nfail",
            );
            origin::Next::KeepAlive
        },
    ));
    let listen = local(free_port());
    let admin = local(free_port());
    let cfg = simple_config(
        listen,
        &[ok.addr, failing.addr],
        "",
        &format!("[admin]\nlisten = \"{admin}\"\nhistory_interval = \"1s\"\n"),
    );
    let _p = Proxy::start(&cfg, listen);
    let history = || -> serde_json::Value {
        let r = admin_get(admin, "/api/v1/history");
        assert_eq!(r.status, 200);
        serde_json::from_str(&r.text()).unwrap()
    };
    // a first point taken: what follows is measured from a baseline before it
    wait_until(Duration::from_secs(10), "a first history point", || {
        history()["timestamps_ms"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
    });
    // 60 requests by round robin in three bursts a point apart: the failing server answers
    // its share with 500
    let points = || history()["timestamps_ms"].as_array().map_or(0, |a| a.len());
    let mut fives = 0;
    for burst in [10, 30, 20] {
        let before = points();
        for _ in 0..burst {
            if one(listen, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").status == 500 {
                fives += 1;
            }
        }
        wait_until(Duration::from_secs(5), "the next point", || {
            points() > before
        });
    }
    assert!(fives > 0 && fives < 60, "{fives}");
    // the rates integrate back to what was sent, once the points covering it are taken
    let total = |series: &serde_json::Value, dt: f64| -> f64 {
        series
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_f64()).sum::<f64>() * dt)
            .unwrap_or(0.0)
    };
    let mut h = history();
    wait_until(
        Duration::from_secs(10),
        "the traffic in the history",
        || {
            h = history();
            let dt = h["interval_seconds"].as_f64().unwrap();
            h["services"][0]["requests_per_second"]
                .as_array()
                .is_some_and(|_| {
                    (total(&h["services"][0]["requests_per_second"], dt) - 60.0).abs() < 6.0
                })
        },
    );
    let dt = h["interval_seconds"].as_f64().unwrap();
    assert_eq!(h["services"][0]["name"], "web");
    let server = |addr: std::net::SocketAddr| {
        h["real_servers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["address"] == addr.to_string())
            .unwrap()
            .clone()
    };
    let bad = server(failing.addr);
    let good = server(ok.addr);
    let bad_errors = total(&bad["errors_per_second"], dt);
    assert!(
        (bad_errors - fives as f64).abs() < 3.0,
        "the failing server's errors: {bad_errors} for {fives} sent"
    );
    assert!(total(&good["errors_per_second"], dt) < 0.5, "{good}");
    assert!(
        (total(&h["services"][0]["errors_5xx_per_second"], dt) - fives as f64).abs() < 3.0,
        "{h}"
    );
    assert!(h["services"][0]["p99_ms"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v.as_f64().is_some_and(|x| x > 0.0)));
    assert_eq!(
        h["timestamps_ms"].as_array().unwrap().len(),
        h["services"][0]["p99_ms"].as_array().unwrap().len()
    );
    assert_eq!(h["shards"].as_array().unwrap().len(), 2);

    // the page draws them: the failing server's error sparkline has points and a maximum
    let dom = rendered(&format!("http://{admin}/"));
    let plot = |id: &str| -> Option<(u64, f64)> {
        let at = dom.find(&format!("data-series=\"{id}\""))?;
        let tail = &dom[at..];
        let attr = |name: &str| -> Option<&str> {
            let i = tail.find(&format!("{name}=\""))? + name.len() + 2;
            tail[i..].split('"').next()
        };
        Some((
            attr("data-points")?.parse().ok()?,
            attr("data-max")?.parse().ok()?,
        ))
    };
    let (points, max) = plot(&format!("server:web:{}:errors_per_second", failing.addr))
        .unwrap_or_else(|| panic!("no error plot for the failing server: {dom}"));
    assert!(points >= 2 && max > 0.0, "{points} points, max {max}");
    let (_, good_max) = plot(&format!("server:web:{}:errors_per_second", ok.addr)).unwrap();
    assert_eq!(good_max, 0.0, "no errors drawn for the healthy server");
    for id in [
        "service:web:requests_per_second",
        "service:web:latency",
        "service:web:errors_5xx_per_second",
        "shards:accepted_per_second",
        "shards:busy",
    ] {
        let (points, _) = plot(id).unwrap_or_else(|| panic!("no plot {id}"));
        assert!(points >= 2, "{id}: {points} points");
    }
    assert!(dom.contains("<path"), "SVG paths drawn");

    // a screenshot of it (the README's picture comes from this test's output)
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    chromium_run(
        &format!("http://{admin}/"),
        &[
            "--hide-scrollbars",
            "--window-size=1280,760",
            &format!("--screenshot={}", shot.display()),
        ],
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a screenshot: {} bytes",
        png.len()
    );
}
