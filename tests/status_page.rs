//! The admin status page in a real headless browser (Debian's chromium, installed by
//! .ci/run): it loads, fetches /status and shows the services and real servers with their
//! state.

mod common;

use common::client::one;
use common::origin::Origin;
use common::*;
use std::process::Command;

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

/// The page's DOM after its scripts ran.
fn rendered(url: &str) -> String {
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
            "--dump-dom",
        ])
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
                .split("<td>")
                .skip(1)
                .map(|c| c.split('<').next().unwrap())
                .collect();
            cells[3].parse::<u64>().unwrap()
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
