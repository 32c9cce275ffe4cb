//! The runtime API through the real binary: tokens and roles, CSRF and DNS-rebinding
//! defences, drain / maint / ready with persistence, weights, the state file across a
//! restart, and `edgeshard ctl` / `edgeshard token new`.

mod common;

use common::client::{one, Client};
use common::origin::Origin;
use common::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const READ_TOKEN: &str = "test-read-token-abcdef0123456789";

fn lines(path: &Path) -> Vec<Value> {
    json_lines(path)
}

/// A read token kept in a file (mode 0600), next to the operator token's hash.
fn tokens(dir: &Path) -> String {
    let f = dir.join("read.token");
    std::fs::write(&f, READ_TOKEN).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    format!(
        "{}[[admin.token]]\nname = \"grafana\"\nrole = \"read\"\ntoken_file = \"{}\"\n",
        operator_token_config(),
        f.display()
    )
}

fn state_of(admin: SocketAddr, pool_index: usize, i: usize) -> (String, u64) {
    let v: Value = serde_json::from_slice(
        &admin_call(admin, "GET", "/api/v1/services", Some(READ_TOKEN), None).body,
    )
    .unwrap();
    let rs = &v["virtual_services"][pool_index]["real_servers"][i];
    (
        rs["state"].as_str().unwrap().to_string(),
        rs["weight"].as_u64().unwrap(),
    )
}

fn set_state(admin: SocketAddr, server: SocketAddr, state: &str, token: Option<&str>) -> u16 {
    admin_call(
        admin,
        "POST",
        &format!("/api/v1/services/web/real_servers/{server}/state"),
        token,
        Some(&format!("{{\"state\": \"{state}\"}}")),
    )
    .status
}

#[test]
fn without_a_token_the_admin_listener_only_reads() {
    let o = Origin::ok("ok");
    let (_p, _listen, admin) = proxy_with_admin(&[o.addr], "");
    for page in ["/status", "/metrics", "/healthz", "/api/v1/services", "/"] {
        assert_eq!(
            admin_call(admin, "GET", page, None, None).status,
            200,
            "{page}"
        );
    }
    let r = admin_call(
        admin,
        "POST",
        &format!("/api/v1/services/web/real_servers/{}/state", o.addr),
        None,
        Some(r#"{"state": "maint"}"#),
    );
    assert_eq!(r.status, 403);
    assert!(r.text().contains("[[admin.token]]"), "{}", r.text());
    assert_eq!(
        admin_call(
            admin,
            "POST",
            &format!("/real_server/disable?address={}", o.addr),
            None,
            None
        )
        .status,
        403,
        "the legacy call needs a token too"
    );
}

/// No token, a wrong one, or a read token on a change: 401/403, nothing changed, a security
/// record; a form-encoded or cross-origin change and a foreign Host are refused.
#[test]
fn tokens_roles_csrf_and_host_are_enforced() {
    let o = Origin::ok("ok");
    let listen = local(free_port());
    let admin = local(free_port());
    let dir = tmpdir("api");
    let security = dir.join("security.log");
    let cfg = simple_config(
        listen,
        &[o.addr],
        "",
        &format!(
            "[log]\nsecurity = \"{}\"\n[admin]\nlisten = \"{admin}\"\n{}",
            security.display(),
            tokens(&dir)
        ),
    );
    let _p = Proxy::start(&cfg, listen);
    // reads: a token for /status and the API; /metrics and /healthz public on loopback
    let r = admin_call(admin, "GET", "/status", None, None);
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").unwrap().starts_with("Bearer"));
    assert_eq!(
        admin_call(admin, "GET", "/status", Some(READ_TOKEN), None).status,
        200
    );
    assert_eq!(admin_call(admin, "GET", "/metrics", None, None).status, 200);
    assert_eq!(admin_call(admin, "GET", "/healthz", None, None).status, 200);
    // changes
    assert_eq!(set_state(admin, o.addr, "maint", None), 401);
    assert_eq!(
        set_state(admin, o.addr, "maint", Some("not-the-token-at-all")),
        401
    );
    assert_eq!(set_state(admin, o.addr, "maint", Some(READ_TOKEN)), 403);
    let form = format!(
        "POST /api/v1/services/web/real_servers/{}/state HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {OPERATOR_TOKEN}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 11\r\n\r\nstate=maint",
        o.addr
    );
    assert_eq!(one(admin, form.as_bytes()).status, 415, "form-encoded");
    let cross = format!(
        "POST /api/v1/services/web/real_servers/{}/state HTTP/1.1\r\nHost: {admin}\r\nOrigin: http://evil.example\r\nAuthorization: Bearer {OPERATOR_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n{{\"state\":\"maint\"}}",
        o.addr
    );
    assert_eq!(one(admin, cross.as_bytes()).status, 403, "cross-origin");
    let rebound = format!(
        "GET /status HTTP/1.1\r\nHost: evil.example:{}\r\nAuthorization: Bearer {READ_TOKEN}\r\n\r\n",
        admin.port()
    );
    assert_eq!(one(admin, rebound.as_bytes()).status, 421, "foreign Host");
    assert_eq!(state_of(admin, 0, 0).0, "ready", "nothing changed");
    assert_eq!(
        one(listen, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").status,
        200
    );
    // the operator token changes it, from our own page's origin too, and the record says so
    let own = format!(
        "POST /api/v1/services/web/real_servers/{}/state HTTP/1.1\r\nHost: {admin}\r\nOrigin: http://{admin}\r\nAuthorization: Bearer {OPERATOR_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n{{\"state\":\"maint\"}}",
        o.addr
    );
    assert_eq!(one(admin, own.as_bytes()).status, 200);
    assert_eq!(state_of(admin, 0, 0).0, "maint");
    assert_eq!(
        one(listen, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").status,
        503
    );
    wait_until(Duration::from_secs(5), "security records", || {
        let recs = lines(&security);
        recs.iter().any(|r| r["event"] == "api_change")
            && recs.iter().any(|r| r["event"] == "api_auth")
    });
    let recs = lines(&security);
    let change = recs.iter().find(|r| r["event"] == "api_change").unwrap();
    let reason = change["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("ops:") && reason.contains("state ready -> maint"),
        "{reason}"
    );
    let auth = recs.iter().filter(|r| r["event"] == "api_auth").count();
    assert_eq!(auth, 1, "one 401 record per address per interval: {recs:?}");
    // a token file others may read is refused by check, with the field named
    let loose = dir.join("loose.token");
    std::fs::write(&loose, "0123456789abcdef0123").unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, text, _) = check_config(&format!(
        "[admin]\nlisten = \"127.0.0.1:1\"\n[[admin.token]]\nname = \"x\"\nrole = \"read\"\ntoken_file = \"{}\"\n[[virtual_service]]\nlisten = \"127.0.0.1:2\"\n",
        loose.display()
    ));
    assert!(
        !ok && text.contains("admin.token[0]") && text.contains("chmod 600"),
        "{text}"
    );
}

fn cookie_of(r: &common::client::Response) -> String {
    let v = r.header("set-cookie").expect("a persistence cookie");
    v.split(';').next().unwrap().to_string()
}

/// Drain: pinned clients keep their server, new ones never get it, `wait` answers when its
/// last request is done. Maint: nothing new, pinned clients move.
#[test]
fn drain_keeps_persisted_clients_and_wait_answers_when_idle() {
    let a = Origin::named("a");
    // /slow is held until the test lets it go (bounded)
    let hold = Arc::new(AtomicBool::new(true));
    let h = hold.clone();
    let b = Origin::start(std::sync::Arc::new(
        move |s: &common::origin::Seen, w: &mut std::net::TcpStream| {
            use std::io::Write;
            if s.request_line.contains("/slow") {
                let until = Instant::now() + Duration::from_secs(15);
                while h.load(Ordering::SeqCst) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb");
            common::origin::Next::KeepAlive
        },
    ));
    let (_p, listen, admin) = proxy_with_operator(
        &[a.addr, b.addr],
        "[virtual_service.persistence]\nmode = \"active-cookie\"\ncookie = \"S\"\n",
    );
    // a client pinned to b
    let pinned = (0..20)
        .map(|_| one(listen, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
        .find(|r| r.text() == "b")
        .map(|r| cookie_of(&r))
        .expect("b answered once");
    let with_cookie = |path: &str| {
        one(
            listen,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nCookie: {pinned}\r\n\r\n").as_bytes(),
        )
    };
    assert_eq!(with_cookie("/").text(), "b");
    assert_eq!(set_state(admin, b.addr, "drain", Some(OPERATOR_TOKEN)), 200);
    for _ in 0..20 {
        assert_eq!(
            one(listen, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").text(),
            "a",
            "new clients never reach a draining server"
        );
    }
    for _ in 0..5 {
        assert_eq!(with_cookie("/").text(), "b", "pinned clients keep it");
    }
    // a request in flight on b: drain with wait answers once it is done
    let pinned2 = pinned.clone();
    let slow = std::thread::spawn(move || {
        one(
            listen,
            format!("GET /slow HTTP/1.1\r\nHost: x\r\nCookie: {pinned2}\r\n\r\n").as_bytes(),
        )
        .text()
    });
    wait_until(Duration::from_secs(5), "the slow request reached b", || {
        b.requests()
            .iter()
            .any(|s| s.request_line.contains("/slow"))
    });
    // a waiting call whose client leaves gives its admin slot back at once: with 15 more
    // connections from its address held, a new call from there is served right after it
    // leaves (all from 127.0.0.3, so that the calls below are not queued behind them)
    {
        use std::io::Write;
        let from = || Client::connect_from(std::net::IpAddr::from([127, 0, 0, 3]), admin);
        let wait_body = r#"{"state":"drain","wait":"30s"}"#;
        let mut waiting = from();
        waiting.send(
            format!(
                "POST /api/v1/services/web/real_servers/{}/state HTTP/1.1\r\nHost: {admin}\r\nContent-Type: application/json\r\nAuthorization: Bearer {OPERATOR_TOKEN}\r\nContent-Length: {}\r\n\r\n{wait_body}",
                b.addr,
                wait_body.len()
            )
            .as_bytes(),
        );
        let held: Vec<Client> = (0..15).map(|_| from()).collect();
        std::thread::sleep(Duration::from_millis(300));
        drop(waiting);
        wait_until(
            Duration::from_secs(2),
            "the waiting call's slot is free again",
            || {
                let mut c = from();
                let _ = c.w.write_all(
                format!("GET /healthz HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {OPERATOR_TOKEN}\r\n\r\n")
                    .as_bytes(),
            );
                c.read(false).is_ok_and(|r| r.status == 200)
            },
        );
        drop(held);
    }
    // the request in flight ends 500 ms after the waiting call starts
    let release = {
        let hold = hold.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            hold.store(false, Ordering::SeqCst);
        })
    };
    let t = Instant::now();
    let r = admin_call(
        admin,
        "POST",
        &format!("/api/v1/services/web/real_servers/{}/state", b.addr),
        Some(OPERATOR_TOKEN),
        Some(r#"{"state": "drain", "wait": "5s"}"#),
    );
    release.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        t.elapsed() > Duration::from_millis(300),
        "waited for the request in flight"
    );
    assert_eq!(slow.join().unwrap(), "b");
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["active_connections"], 0);
    // maint: even the pinned client moves
    assert_eq!(set_state(admin, b.addr, "maint", Some(OPERATOR_TOKEN)), 200);
    assert_eq!(with_cookie("/").text(), "a");
    assert_eq!(set_state(admin, b.addr, "ready", Some(OPERATOR_TOKEN)), 200);
    assert_eq!(
        set_state(admin, b.addr, "sleeping", Some(OPERATOR_TOKEN)),
        400
    );
}

/// A weight set through the API shows in the split of the next requests, on every shard.
#[test]
fn a_weight_change_shows_in_the_split() {
    let (a, b) = (Origin::named("a"), Origin::named("b"));
    let (_p, listen, admin) =
        proxy_with_operator(&[a.addr, b.addr], "scheduling = \"weighted-round-robin\"\n");
    let r = admin_call(
        admin,
        "PUT",
        &format!("/api/v1/services/web/real_servers/{}/weight", b.addr),
        Some(OPERATOR_TOKEN),
        Some(r#"{"weight": 3000}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // fresh connections land on both shards
    let n = 400;
    let to_b = (0..n)
        .filter(|_| one(listen, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").text() == "b")
        .count();
    let share = to_b as f64 / n as f64;
    assert!((0.70..=0.80).contains(&share), "b's share {share}");
    let bad = admin_call(
        admin,
        "PUT",
        &format!("/api/v1/services/web/real_servers/{}/weight", b.addr),
        Some(OPERATOR_TOKEN),
        Some(r#"{"weight": 0}"#),
    );
    assert_eq!(bad.status, 400);
}

/// Runtime changes are kept in the state file and survive a restart.
#[test]
fn runtime_state_survives_a_restart() {
    let (a, b) = (Origin::named("a"), Origin::named("b"));
    let listen = local(free_port());
    let admin = local(free_port());
    let dir = tmpdir("state");
    let state = dir.join("state.json");
    let cfg = simple_config(
        listen,
        &[a.addr, b.addr],
        "",
        &format!(
            "[admin]\nlisten = \"{admin}\"\nstate_file = \"{}\"\n{}",
            state.display(),
            tokens(&dir)
        ),
    );
    {
        let _p = Proxy::start(&cfg, listen);
        assert_eq!(set_state(admin, b.addr, "drain", Some(OPERATOR_TOKEN)), 200);
        let r = admin_call(
            admin,
            "PUT",
            &format!("/api/v1/services/web/real_servers/{}/weight", a.addr),
            Some(OPERATOR_TOKEN),
            Some(r#"{"weight": 500}"#),
        );
        assert_eq!(r.status, 200);
    }
    let kept: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(kept["servers"].as_array().unwrap().len(), 2, "{kept}");
    let _p = Proxy::start(&cfg, listen);
    assert_eq!(state_of(admin, 0, 0), ("ready".to_string(), 500));
    assert_eq!(state_of(admin, 0, 1), ("drain".to_string(), 1000));
    let v: Value = serde_json::from_slice(
        &admin_call(admin, "GET", "/api/v1/services", Some(READ_TOKEN), None).body,
    )
    .unwrap();
    let rs = &v["virtual_services"][0]["real_servers"];
    assert_eq!(
        (&rs[0]["weight_source"], &rs[0]["state_source"]),
        (&Value::from("runtime"), &Value::from("config"))
    );
    assert_eq!(rs[1]["state_source"], "runtime");
    for _ in 0..6 {
        assert_eq!(
            one(listen, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").text(),
            "a"
        );
    }
}

fn ctl(admin: SocketAddr, token: Option<&Path>, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(bin());
    cmd.args(["ctl", "--admin", &format!("http://{admin}")]);
    if let Some(t) = token {
        cmd.arg("--token-file").arg(t);
    }
    let out = cmd
        .args(args)
        .env_remove("EDGESHARD_TOKEN")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn ctl_and_token_new_end_to_end() {
    // token new: a token and the config lines with its hash, which the appliance accepts
    let out = Command::new(bin())
        .args(["token", "new", "--name", "deploy", "--role", "operator"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let token = text.lines().nth(1).unwrap().trim().to_string();
    assert_eq!(token.len(), 64);
    let config_lines = text
        .split_once("config (only the hash lives there):\n")
        .unwrap()
        .1;
    assert!(
        !config_lines.contains(&token),
        "only the hash goes in the config"
    );

    let (a, b) = (Origin::named("a"), Origin::named("b"));
    let listen = local(free_port());
    let admin = local(free_port());
    let dir = tmpdir("ctl");
    let cfg = simple_config(
        listen,
        &[a.addr, b.addr],
        "",
        &format!("[admin]\nlisten = \"{admin}\"\n{config_lines}"),
    );
    let _p = Proxy::start(&cfg, listen);
    let tf = dir.join("deploy.token");
    std::fs::write(&tf, &token).unwrap();
    let t = Some(tf.as_path());
    let (code, table, _) = ctl(admin, t, &["servers"]);
    assert_eq!(code, 0);
    assert!(
        table.starts_with("POOL") && table.contains(&b.addr.to_string()),
        "{table}"
    );
    let b_addr = b.addr.to_string();
    let (code, line, _) = ctl(admin, t, &["drain", "web", &b_addr, "--wait", "2s"]);
    assert_eq!(code, 0, "{line}");
    assert!(line.contains("state drain"), "{line}");
    let (code, line, _) = ctl(admin, t, &["weight", "web", &b_addr, "250"]);
    assert_eq!(code, 0);
    assert!(line.contains("weight 250"), "{line}");
    let (code, _, _) = ctl(admin, t, &["ready", "web", &b_addr]);
    assert_eq!(code, 0);
    let (code, json, _) = ctl(admin, t, &["--json", "servers"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["virtual_services"][0]["real_servers"][1]["weight"], 250);
    assert_eq!(ctl(admin, t, &["health"]).0, 0);
    // refused: exit 1 with the reason; no answer at all: exit 2
    let (code, _, err) = ctl(admin, None, &["maint", "web", &b_addr]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("401"), "{err}");
    let (code, _, err) = ctl(admin, t, &["maint", "web", "192.0.2.1:1"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(ctl(local(free_port()), t, &["servers"]).0, 2);
    // add, remove (once in maint), and reload: an operator may not reload
    let c = Origin::named("c");
    let c_addr = c.addr.to_string();
    let (code, line, err) = ctl(admin, t, &["add", "web", &c_addr, "--weight", "300"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        line.contains("added") && line.contains("weight 300"),
        "{line}"
    );
    wait_until(Duration::from_secs(5), "c serves", || {
        (0..6).any(|_| one(listen, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").text() == "c")
    });
    let (code, _, err) = ctl(admin, t, &["remove", "web", &c_addr]);
    assert_eq!(code, 1, "not in maint: refused");
    assert!(err.contains("409"), "{err}");
    assert_eq!(
        ctl(admin, t, &["maint", "web", &c_addr, "--wait", "5s"]).0,
        0
    );
    let (code, line, err) = ctl(admin, t, &["remove", "web", &c_addr]);
    assert_eq!(code, 0, "{err}");
    assert!(line.contains("removed"), "{line}");
    let (_, table, _) = ctl(admin, t, &["servers"]);
    assert!(!table.contains(&c_addr), "{table}");
    let (code, _, err) = ctl(admin, t, &["reload"]);
    assert_eq!(code, 1, "an operator token cannot reload");
    assert!(err.contains("403"), "{err}");
    // unhealthy: every real server in maint
    ctl(admin, t, &["maint", "web", &a.addr.to_string()]);
    ctl(admin, t, &["maint", "web", &b_addr]);
    assert_eq!(ctl(admin, t, &["health"]).0, 1);
    let _ = Client::connect(listen);
}

/// What a hostile review found, held: strict request framing, the bearer scheme in any case,
/// `wait` bounded, a state file that cannot be written is an error, `ctl health` says when it
/// cannot tell, `/healthz?scope=appliance`. (A wait ended by its client leaving is tested with
/// the drain above.)
#[test]
fn api_edges_hold() {
    let (a, b) = (Origin::named("a"), Origin::named("b"));
    let listen = local(free_port());
    let admin = local(free_port());
    let cfg = simple_config(
        listen,
        &[a.addr, b.addr],
        "",
        &format!(
            "[admin]\nlisten = \"{admin}\"\npublic_metrics = false\nstate_file = \"no/such/dir/state.json\"\n{}",
            operator_token_config()
        ),
    );
    let (ok, text, _) = check_config(&cfg);
    assert!(ok && text.contains("no/such/dir does not exist"), "{text}");
    let _p = Proxy::start(&cfg, listen);
    let path = format!("/api/v1/services/web/real_servers/{}/state", b.addr);
    let raw = |extra: &str, body: &str| {
        one(
            admin,
            format!(
                "POST {path} HTTP/1.1\r\nHost: {admin}\r\nContent-Type: application/json\r\n{extra}\r\n{body}"
            )
            .as_bytes(),
        )
        .status
    };
    let body = r#"{"state":"ready"}"#;
    let auth = format!("Authorization: BEARER\t{OPERATOR_TOKEN}\r\n");
    let cl = format!("Content-Length: {}\r\n", body.len());
    assert_eq!(
        raw(&format!("{auth}{cl}{cl}"), body),
        400,
        "two Content-Length"
    );
    assert_eq!(
        raw(&format!("{auth}Content-Length: +17\r\n"), body),
        400,
        "a signed length"
    );
    assert_eq!(
        raw(&format!("{auth}Transfer-Encoding: chunked\r\n"), body),
        411
    );
    assert_eq!(
        raw(&format!("{auth}{auth}{cl}"), body),
        400,
        "two Authorization"
    );
    // the scheme in any case; the change is applied but the state file cannot be written: 500
    let r = one(
        admin,
        format!("POST {path} HTTP/1.1\r\nHost: {admin}\r\nContent-Type: application/json\r\n{auth}{cl}\r\n{body}").as_bytes(),
    );
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(r.text().contains("not kept for a restart"), "{}", r.text());
    for bad in [
        r#"{"state":"drain","wait":5}"#,
        r#"{"state":"drain","wait":"2h"}"#,
    ] {
        let r = admin_call(admin, "POST", &path, Some(OPERATOR_TOKEN), Some(bad));
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }
    // percent-encoded address
    let encoded = path.replace(':', "%3A");
    assert_eq!(
        admin_call(admin, "POST", &encoded, Some(OPERATOR_TOKEN), Some(body)).status,
        500,
        "found (and the state file still cannot be written)"
    );
    let path_a = path.replace(&b.addr.to_string(), &a.addr.to_string());
    let maint = r#"{"state":"maint"}"#;
    admin_call(admin, "POST", &path_a, Some(OPERATOR_TOKEN), Some(maint));
    // healthz: the real servers' view, and the appliance's own
    admin_call(
        admin,
        "POST",
        &path.replace(&b.addr.to_string(), &a.addr.to_string()),
        Some(OPERATOR_TOKEN),
        Some(r#"{"state":"maint"}"#),
    );
    admin_call(
        admin,
        "POST",
        &path,
        Some(OPERATOR_TOKEN),
        Some(r#"{"state":"maint"}"#),
    );
    assert_eq!(admin_get(admin, "/healthz").status, 503);
    assert_eq!(admin_get(admin, "/healthz?scope=appliance").status, 200);
    // ctl health: 1 unhealthy, 0 for the appliance, 2 when it cannot tell (no token)
    let health = |token: bool, appliance: bool| {
        let mut c = Command::new(bin());
        c.args(["ctl", "health", "--admin", &format!("http://{admin}")]);
        if appliance {
            c.arg("--appliance");
        }
        if token {
            c.env("EDGESHARD_TOKEN", OPERATOR_TOKEN);
        } else {
            c.env_remove("EDGESHARD_TOKEN");
        }
        c.output().unwrap().status.code()
    };
    assert_eq!(health(true, false), Some(1));
    assert_eq!(health(true, true), Some(0));
    assert_eq!(health(false, true), Some(2), "401: cannot tell");
}

/// `[admin] tls`: the admin listener speaks HTTPS; `ctl --ca` reaches it; plain HTTP gets no
/// answer; `check` no longer warns about a non-loopback listener.
#[test]
fn the_admin_listener_speaks_https() {
    use common::pki::{client_config, Ca};
    let o = Origin::ok("ok");
    let ca = Ca::new("Admin CA");
    let dir = tmpdir("admin-tls");
    let (cert, key) = ca.leaf(&["localhost"], false).write(&dir, "admin");
    let ca_pem = dir.join("ca.pem");
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    let listen = local(free_port());
    let admin = local(free_port());
    let tls = format!(
        "tls = {{ cert = \"{}\", key = \"{}\" }}\n",
        cert.display(),
        key.display()
    );
    let cfg = simple_config(
        listen,
        &[o.addr],
        "",
        &format!(
            "[admin]\nlisten = \"{admin}\"\n{tls}{}",
            operator_token_config()
        ),
    );
    let _p = Proxy::start(&cfg, listen);
    // HTTPS, verified against the CA
    let s = common::tlsio::connect(admin, &client_config(&ca), "localhost").unwrap();
    let req = format!(
        "GET /status HTTP/1.1\r\nHost: localhost:{}\r\nAuthorization: Bearer {OPERATOR_TOKEN}\r\n\r\n",
        admin.port()
    );
    let (r, _) = common::tlsio::request(s, req.as_bytes());
    assert_eq!(r.status, 200);
    // plain HTTP on it: no HTTP answer
    let mut c = Client::connect(admin);
    c.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(c.read(false).is_err(), "plain HTTP is not answered");
    // ctl over https with --ca
    let tf = dir.join("ops.token");
    std::fs::write(&tf, OPERATOR_TOKEN).unwrap();
    let url = format!("https://localhost:{}", admin.port());
    let out = Command::new(bin())
        .args(["ctl", "--admin", &url, "--ca"])
        .arg(&ca_pem)
        .arg("--token-file")
        .arg(&tf)
        .arg("servers")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&o.addr.to_string()), "{text}");
    let no_ca = Command::new(bin())
        .args(["ctl", "--admin", &url, "servers"])
        .output()
        .unwrap();
    assert_eq!(no_ca.status.code(), Some(2), "https needs --ca");
    // a non-loopback admin listener with TLS: no warning
    let (ok, text, _) = check_config(&format!(
        "[admin]\nlisten = \"0.0.0.0:{}\"\n{tls}[[virtual_service]]\nlisten = \"127.0.0.1:{}\"\n[[virtual_service.real_server]]\naddress = \"127.0.0.1:1\"\n",
        free_port(),
        free_port()
    ));
    assert!(ok && !text.contains("warning: admin.listen"), "{text}");
}

/// An origin named `name` whose /healthcheck.html answers 503 until `healthy`, and whose
/// /slow answers after 1.5 s (counted in `slow_in_flight` meanwhile: long enough for the
/// admin calls to land while it is in flight, even on a loaded machine).
fn checked_slow(
    name: &'static str,
    healthy: Arc<AtomicBool>,
    slow_in_flight: Arc<std::sync::atomic::AtomicUsize>,
    hold: Arc<AtomicBool>,
) -> Origin {
    Origin::start(Arc::new(
        move |s: &common::origin::Seen, w: &mut std::net::TcpStream| {
            use std::io::Write;
            if s.request_line.contains("/healthcheck.html") && !healthy.load(Ordering::SeqCst) {
                let _ =
                    w.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
                return common::origin::Next::KeepAlive;
            }
            if s.request_line.contains(" /slow") {
                slow_in_flight.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(1500));
                // held longer while the test needs a request in flight (bounded)
                let until = std::time::Instant::now() + Duration::from_secs(15);
                while hold.load(Ordering::SeqCst) && std::time::Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(10));
                }
                slow_in_flight.fetch_sub(1, Ordering::SeqCst);
            }
            let _ = write!(w, "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n{name}");
            common::origin::Next::KeepAlive
        },
    ))
}

/// Requests that are not health checks.
fn served(o: &Origin) -> usize {
    o.requests()
        .iter()
        .filter(|s| !s.request_line.contains("/healthcheck.html"))
        .count()
}

/// Add then remove a real server under load through the API: it gets traffic only after its
/// first good health check; removal is refused while it has connections, then accepted; no
/// request fails throughout; the addition survives a reload and a restart (state file); a
/// reload needs the admin role.
#[test]
fn servers_added_and_removed_under_load_fail_nothing() {
    let a_ok = Arc::new(AtomicBool::new(true));
    let b_ok = Arc::new(AtomicBool::new(false));
    let b_slow = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let b_hold = Arc::new(AtomicBool::new(false));
    let a = checked_slow("a", a_ok, Default::default(), Default::default());
    let b = checked_slow("b", b_ok.clone(), b_slow.clone(), b_hold.clone());
    let listen = local(free_port());
    let admin = local(free_port());
    let dir = tmpdir("add-remove");
    let state = dir.join("state.json");
    let admin_token = "test-admin-token-0123456789abcdef";
    let admin_hash: String = edgeshard::access::sha256(admin_token.as_bytes())
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect();
    let cfg = simple_config(
        listen,
        &[a.addr],
        "[virtual_service.health_check]\nurl = \"/healthcheck.html\"\ninterval = \"200ms\"\n",
        &format!(
            "[admin]\nlisten = \"{admin}\"\nstate_file = \"{}\"\n{}[[admin.token]]\nname = \"root\"\nrole = \"admin\"\nsha256 = \"{admin_hash}\"\n",
            state.display(),
            operator_token_config()
        ),
    );
    let mut p = Proxy::start(&cfg, listen);
    // load: keep-alive and new connections, some requests slow
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let threads: Vec<_> = [(true, "/"), (false, "/"), (true, "/slow"), (false, "/slow")]
        .into_iter()
        .map(|(keep, path)| {
            let (stop, failures, done) = (stop.clone(), failures.clone(), done.clone());
            std::thread::spawn(move || {
                let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
                let mut c: Option<Client> = None;
                while !stop.load(Ordering::SeqCst) {
                    let reused = c.is_some();
                    let conn = c.get_or_insert_with(|| Client::connect(listen));
                    match conn.request_checked(req.as_bytes()) {
                        Some(200) => {
                            done.fetch_add(1, Ordering::SeqCst);
                            if !keep {
                                c = None;
                            }
                        }
                        // a reused connection closed before answering: resent (never here)
                        None if reused => c = None,
                        other => {
                            failures.lock().unwrap().push(format!("{path}: {other:?}"));
                            c = None;
                        }
                    }
                }
            })
        })
        .collect();
    let add = |token: &str| {
        admin_call(
            admin,
            "POST",
            "/api/v1/services/web/real_servers",
            Some(token),
            Some(&format!(
                "{{\"address\": \"{}\", \"weight\": 1000}}",
                b.addr
            )),
        )
    };
    let r = add(OPERATOR_TOKEN);
    assert_eq!(r.status, 201, "{}", r.text());
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    // checked at once: "checking" or already "down", never "up" before a good check
    assert_ne!(v["health"], "up", "{v}");
    assert_eq!(add(OPERATOR_TOKEN).status, 409, "added twice");
    // not healthy yet: no traffic
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(served(&b), 0, "traffic before a good health check");
    b_ok.store(true, Ordering::SeqCst);
    wait_until(
        Duration::from_secs(5),
        "b gets traffic once healthy",
        || served(&b) > 20,
    );
    let st = status(admin);
    assert_eq!(
        st["virtual_services"][0]["real_servers"][1]["source"],
        "runtime"
    );
    // a reload (admin role only) keeps it
    let r = admin_call(
        admin,
        "POST",
        "/api/v1/reload",
        Some(OPERATOR_TOKEN),
        Some("{}"),
    );
    assert_eq!(r.status, 403, "{}", r.text());
    let r = admin_call(
        admin,
        "POST",
        "/api/v1/reload",
        Some(admin_token),
        Some("{}"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(server_status(admin, 1), "up");
    // removal: refused while ready, refused while connections remain, then accepted
    let remove = || {
        admin_call(
            admin,
            "DELETE",
            &format!("/api/v1/services/web/real_servers/{}", b.addr),
            Some(OPERATOR_TOKEN),
            None,
        )
    };
    assert_eq!(remove().status, 409);
    // a slow request on b stays in flight until the refusal below has been seen
    b_hold.store(true, Ordering::SeqCst);
    wait_until(
        Duration::from_secs(5),
        "a slow request in flight on b",
        || b_slow.load(Ordering::SeqCst) > 0,
    );
    let r = admin_call(
        admin,
        "POST",
        &format!("/api/v1/services/web/real_servers/{}/state", b.addr),
        Some(OPERATOR_TOKEN),
        Some(r#"{"state": "maint"}"#),
    );
    assert_eq!(r.status, 200);
    let refused = remove();
    assert_eq!(refused.status, 409, "{}", refused.text());
    let busy: Value = serde_json::from_slice(&refused.body).unwrap();
    assert!(busy["active_connections"].as_u64().unwrap() > 0, "{busy}");
    b_hold.store(false, Ordering::SeqCst);
    let r = admin_call(
        admin,
        "POST",
        &format!("/api/v1/services/web/real_servers/{}/state", b.addr),
        Some(OPERATOR_TOKEN),
        Some(r#"{"state": "maint", "wait": "10s"}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = remove();
    assert_eq!(r.status, 200, "{}", r.text());
    let after = served(&b);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(served(&b), after, "nothing reaches a removed server");
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    let f = failures.lock().unwrap();
    assert!(f.is_empty(), "{f:?}\n{}", p.log());
    assert!(done.load(Ordering::SeqCst) > 200);
    // added again, then a restart: the state file keeps it
    assert_eq!(add(OPERATOR_TOKEN).status, 201);
    let kept: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(
        kept["runtime"]["added"][0]["address"],
        b.addr.to_string(),
        "{kept}"
    );
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(10)), Some(0), "{}", p.log());
    let _p = Proxy::start(&cfg, listen);
    let st = status(admin);
    let servers = &st["virtual_services"][0]["real_servers"];
    assert_eq!(servers.as_array().unwrap().len(), 2, "{st}");
    assert_eq!(servers[1]["address"], b.addr.to_string());
    assert_eq!(
        servers[1]["state"], "ready",
        "a server added again starts afresh"
    );
}
