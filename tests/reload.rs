//! Live operations through the real binary, under load: SIGHUP reloads (`edgeshard reload`)
//! and SIGUSR2 binary upgrades (`edgeshard upgrade`), with every request counted.

mod common;

use common::origin::{Next, Origin, Seen};
use common::pki::Ca;
use common::*;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// An origin answering its name; `/slow` after `SLOW`, so that requests are in flight on it.
fn origin(name: &'static str) -> Origin {
    Origin::start(Arc::new(move |s: &Seen, w: &mut TcpStream| {
        if s.request_line.contains(" /slow") {
            thread::sleep(SLOW);
        }
        let _ = write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{name}",
            name.len()
        );
        Next::KeepAlive
    }))
}

const SLOW: Duration = Duration::from_millis(300);

/// Requests in flight at an origin (received, not yet answered).
fn in_flight(o: &Origin) -> usize {
    o.nr_requests() - o.answered.load(Ordering::SeqCst)
}

/// Run an `edgeshard` subcommand; (exit code, stdout + stderr).
fn cli(args: &[&str]) -> (i32, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// Whatever process the pid file names is killed at the end (an upgrade's new process is
/// not the test's child).
struct KillPid(PathBuf);

impl Drop for KillPid {
    fn drop(&mut self) {
        if let Some(pid) = pid_of(&self.0) {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn pid_of(pid_file: &Path) -> Option<i32> {
    std::fs::read_to_string(pid_file).ok()?.trim().parse().ok()
}

fn alive(pid: i32) -> bool {
    unsafe { libc::kill(pid, 0) == 0 }
}

/// How a response read ended.
enum ReadErr {
    /// Closed or reset before any byte of a response.
    Nothing(String),
    /// Cut short.
    Partial(String),
}

/// Read one response with a Content-Length body: (status, body).
fn read_response<R: BufRead>(r: &mut R) -> Result<(u16, String), ReadErr> {
    let mut head = String::new();
    loop {
        let mut l = String::new();
        match r.read_line(&mut l) {
            Ok(0) if head.is_empty() => return Err(ReadErr::Nothing("EOF".into())),
            Ok(0) => return Err(ReadErr::Partial(format!("EOF in head {head:?}"))),
            Err(e) if head.is_empty() => return Err(ReadErr::Nothing(e.to_string())),
            Err(e) => return Err(ReadErr::Partial(e.to_string())),
            Ok(_) => {}
        }
        head.push_str(&l);
        if l == "\r\n" {
            break;
        }
    }
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body)
        .map_err(|e| ReadErr::Partial(format!("body: {e}")))?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[derive(Default, Debug)]
struct Tally {
    /// Answers by origin name.
    ok: HashMap<String, usize>,
    failures: Vec<String>,
    /// Reused keep-alive connections the proxy closed before answering: retried once on a
    /// new connection, as HTTP clients do for idempotent requests.
    retried: usize,
}

type Stream = Box<dyn ReadWrite>;
trait ReadWrite: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWrite for T {}

/// A client thread: plain or TLS, keep-alive or a new connection per request, until `stop`.
fn client(
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    keep_alive: bool,
    path: &'static str,
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let connect = || -> Result<BufReader<Stream>, String> {
            let tcp = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
            tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            tcp.set_nodelay(true).unwrap();
            let s: Stream = match &tls {
                None => Box::new(tcp),
                Some(cfg) => {
                    let conn = rustls::ClientConnection::new(
                        cfg.clone(),
                        "www.example.com".try_into().unwrap(),
                    )
                    .unwrap();
                    let mut s = rustls::StreamOwned::new(conn, tcp);
                    while s.conn.is_handshaking() {
                        s.conn
                            .complete_io(&mut s.sock)
                            .map_err(|e| format!("handshake: {e}"))?;
                    }
                    Box::new(s)
                }
            };
            Ok(BufReader::new(s))
        };
        let req = format!("GET {path} HTTP/1.1\r\nHost: www.example.com\r\n\r\n");
        let mut conn: Option<BufReader<Stream>> = None;
        while !stop.load(Ordering::SeqCst) {
            let reused = conn.is_some();
            let mut c = match conn.take() {
                Some(c) => c,
                None => match connect() {
                    Ok(c) => c,
                    Err(e) => {
                        tally.lock().unwrap().failures.push(e);
                        thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                },
            };
            let sent = c
                .get_mut()
                .write_all(req.as_bytes())
                .and_then(|_| c.get_mut().flush());
            let got = match sent {
                Ok(()) => read_response(&mut c),
                Err(e) => Err(ReadErr::Nothing(e.to_string())),
            };
            let got = match got {
                Err(ReadErr::Nothing(_)) if reused => {
                    tally.lock().unwrap().retried += 1;
                    continue; // once, on a new connection (the next turn)
                }
                other => other,
            };
            let mut t = tally.lock().unwrap();
            match got {
                Ok((200, body)) if body.len() == 1 => {
                    *t.ok.entry(body).or_default() += 1;
                    if keep_alive {
                        conn = Some(c);
                    }
                }
                Ok((status, body)) => t.failures.push(format!("{status} {body:?}")),
                Err(ReadErr::Nothing(e)) => t.failures.push(format!("no response: {e}")),
                Err(ReadErr::Partial(e)) => t.failures.push(format!("cut short: {e}")),
            }
        }
    })
}

/// A TLS client config trusting `ca`, with session resumption off or on.
fn tls_client(ca: &Ca, resume: bool) -> Arc<rustls::ClientConfig> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(ca.roots())
    .with_no_client_auth();
    if !resume {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    Arc::new(cfg)
}

/// The certificate a fresh TLS connection to `addr` is served.
fn served_cert(addr: SocketAddr, cfg: &Arc<rustls::ClientConfig>) -> Vec<u8> {
    let s = common::tlsio::connect(addr, cfg, "www.example.com").unwrap();
    s.conn.peer_certificates().unwrap()[0].to_vec()
}

struct Setup {
    dir: PathBuf,
    web: SocketAddr,
    secure: SocketAddr,
    admin: SocketAddr,
    pid_file: PathBuf,
    cert: (PathBuf, PathBuf),
}

/// The configuration: `web` (plain) over `servers` with `weights`, `secure` (TLS) over the
/// same, and `extra` services on further listeners.
fn config(s: &Setup, servers: &[(SocketAddr, u32)], extra: &[SocketAddr]) -> String {
    let mut c = format!(
        "[runtime]\nshards = 2\noversubscribe = true\ndrain_timeout = \"5s\"\npid_file = \"{}\"\n\n[admin]\nlisten = \"{}\"\n",
        s.pid_file.display(),
        s.admin
    );
    let pool = |c: &mut String| {
        for (a, w) in servers {
            c.push_str(&format!(
                "[[virtual_service.real_server]]\naddress = \"{a}\"\nweight = {w}\n"
            ));
        }
    };
    c.push_str(&format!(
        "\n[[virtual_service]]\nname = \"web\"\nlisten = \"{}\"\n",
        s.web
    ));
    pool(&mut c);
    c.push_str(&format!(
        "\n[[virtual_service]]\nname = \"secure\"\nlisten = \"{}\"\n[virtual_service.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n",
        s.secure,
        s.cert.0.display(),
        s.cert.1.display()
    ));
    pool(&mut c);
    for (i, l) in extra.iter().enumerate() {
        c.push_str(&format!(
            "\n[[virtual_service]]\nname = \"extra{i}\"\nlisten = \"{l}\"\n"
        ));
        pool(&mut c);
    }
    c
}

/// Five reloads (add a server, remove one with requests in flight on it, change weights,
/// swap the certificate, add a listener) and two binary upgrades while plain and TLS
/// clients, keep-alive and not, send requests all along: none fails.
#[test]
fn reloads_and_upgrades_under_load_fail_no_request() {
    let (a, b, c) = (origin("A"), origin("B"), origin("C"));
    let ca = Ca::new("reload CA");
    let dir = tmpdir("reload");
    let cert = ca.leaf(&["www.example.com"], false).write(&dir, "site");
    let s = Setup {
        web: local(free_port()),
        secure: local(free_port()),
        admin: local(free_port()),
        pid_file: dir.join("edgeshard.pid"),
        cert,
        dir,
    };
    let _kill = KillPid(s.pid_file.clone());
    let mut p = Proxy::start(&config(&s, &[(a.addr, 1000), (b.addr, 1000)], &[]), s.web);
    let write = |text: String| std::fs::write(&p.config, text).unwrap();
    let reload = || {
        let (code, out) = cli(&["reload", "--pid-file", s.pid_file.to_str().unwrap()]);
        assert_eq!(code, 0, "{out}");
    };
    let (no_resume, resume) = (tls_client(&ca, false), tls_client(&ca, true));

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut threads = Vec::new();
    for (addr, tls, keep, path) in [
        (s.web, None, true, "/"),
        (s.web, None, true, "/slow"),
        (s.web, None, false, "/"),
        (s.web, None, false, "/slow"),
        (s.secure, Some(no_resume.clone()), true, "/"),
        (s.secure, Some(no_resume.clone()), false, "/"),
        (s.secure, Some(resume.clone()), false, "/slow"),
    ] {
        threads.push(client(addr, tls, keep, path, stop.clone(), tally.clone()));
    }
    let settle = || thread::sleep(Duration::from_millis(600));
    let served = |name: &str| tally.lock().unwrap().ok.get(name).copied().unwrap_or(0);
    settle();

    // 1. add a server
    write(config(
        &s,
        &[(a.addr, 1000), (b.addr, 1000), (c.addr, 1000)],
        &[],
    ));
    reload();
    wait_until(Duration::from_secs(5), "C serves", || served("C") > 0);
    settle();

    // 2. remove A while requests are in flight on it: they finish there
    wait_until(Duration::from_secs(5), "a request in flight on A", || {
        in_flight(&a) > 0
    });
    let answered_by_a = a.answered.load(Ordering::SeqCst) + in_flight(&a);
    write(config(&s, &[(b.addr, 1000), (c.addr, 1000)], &[]));
    reload();
    wait_until(Duration::from_secs(5), "A's last requests answered", || {
        in_flight(&a) == 0 && a.answered.load(Ordering::SeqCst) >= answered_by_a
    });
    let a_after = steady(Duration::from_secs(5), "A's count", || a.nr_requests());
    settle();
    assert_eq!(
        a.nr_requests(),
        a_after,
        "nothing new reaches a removed server"
    );

    // 3. weights
    write(config(&s, &[(b.addr, 3000), (c.addr, 1000)], &[]));
    reload();
    settle();

    // 4. a new certificate in the same files
    let old_cert = served_cert(s.secure, &no_resume);
    ca.leaf(&["www.example.com"], false).write(&s.dir, "site");
    reload();
    let new_cert = served_cert(s.secure, &no_resume);
    assert_ne!(old_cert, new_cert, "new handshakes get the new certificate");
    settle();

    // 5. a new listener, with traffic of its own from now on
    let extra = local(free_port());
    write(config(&s, &[(b.addr, 3000), (c.addr, 1000)], &[extra]));
    reload();
    threads.push(client(extra, None, true, "/", stop.clone(), tally.clone()));
    threads.push(client(extra, None, false, "/", stop.clone(), tally.clone()));
    settle();

    // 6, 7. two binary upgrades, the second to the binary the first started
    let first = p.child.id() as i32;
    for n in 1..=2 {
        let before = pid_of(&s.pid_file).unwrap();
        let (code, out) = cli(&["upgrade", "--pid-file", s.pid_file.to_str().unwrap()]);
        assert_eq!(code, 0, "upgrade {n}: {out}\n{}", p.log());
        let after = pid_of(&s.pid_file).unwrap();
        assert_ne!(before, after, "the pid file names the new process");
        assert!(out.contains(&after.to_string()), "{out}");
        // the old one drains and exits
        wait_until(Duration::from_secs(10), "the old process exits", || {
            !alive(before) || (before == first && p.child.try_wait().unwrap().is_some())
        });
        settle();
    }
    assert_eq!(p.wait_exit(Duration::from_secs(1)), Some(0), "{}", p.log());

    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    let t = tally.lock().unwrap();
    let total: usize = t.ok.values().sum();
    eprintln!(
        "reload/upgrade under load: {total} requests answered {:?}, {} failed, {} retried on a new connection",
        t.ok,
        t.failures.len(),
        t.retried
    );
    assert!(t.failures.is_empty(), "{:?}\n{}", t.failures, p.log());
    assert!(total > 500, "{total} requests");
    assert!(t.ok.get("C").copied().unwrap_or(0) > 0);
    let m = metrics(s.admin);
    assert_eq!(
        m["edgeshard_config_generation"], 8.0,
        "5 reloads, 2 upgrades"
    );
    assert_eq!(m["edgeshard_config_reloads_total{result=\"ok\"}"], 5.0);
    assert_eq!(m["edgeshard_upgrades_total"], 2.0);
    let log = p.log();
    for g in 2..=6 {
        assert!(
            log.contains(&format!("configuration reloaded generation={g}")),
            "{log}"
        );
    }
}

/// A plain setup: `web` on its own listener over `servers`, with `extra_vs` in the service,
/// an admin listener and a pid file.
fn plain(servers: &[SocketAddr], extra_vs: &str, dir: &Path) -> (String, SocketAddr, SocketAddr) {
    let listen = local(free_port());
    let admin = local(free_port());
    let pid = dir.join("edgeshard.pid");
    let cfg = simple_config(
        listen,
        servers,
        extra_vs,
        &format!("[admin]\nlisten = \"{admin}\"\n"),
    )
    .replace(
        "[runtime]\n",
        &format!("[runtime]\npid_file = \"{}\"\n", pid.display()),
    );
    (cfg, listen, admin)
}

/// A running appliance from `plain`: the proxy, its pid file, config text, listener, admin
/// listener, and the guard that kills whatever process serves at the end.
struct Started {
    p: Proxy,
    pid: PathBuf,
    cfg: String,
    listen: SocketAddr,
    admin: SocketAddr,
    _kill: KillPid,
}

fn started(tag: &str, servers: &[SocketAddr], extra_vs: &str) -> Started {
    let dir = tmpdir(tag);
    let pid = dir.join("edgeshard.pid");
    let (cfg, listen, admin) = plain(servers, extra_vs, &dir);
    let p = Proxy::start(&cfg, listen);
    Started {
        _kill: KillPid(pid.clone()),
        p,
        pid,
        cfg,
        listen,
        admin,
    }
}

/// An invalid file on SIGHUP: refused with the same text `check` gives, counted, and the
/// running configuration goes on serving unchanged.
#[test]
fn an_invalid_reload_keeps_serving_and_says_why() {
    let (a, b) = (origin("A"), origin("B"));
    let dir = tmpdir("bad-reload");
    let pid = dir.join("edgeshard.pid");
    let (cfg, listen, admin) = plain(&[a.addr], "", &dir);
    let security = dir.join("security.log");
    let cfg = format!(
        "[log]\nsecurity = \"{}\"\nformat = \"json\"\n{cfg}",
        security.display()
    );
    let p = Proxy::start(&cfg, listen);
    let _kill = KillPid(pid.clone());
    // a typo, and a server that would otherwise be new
    let broken = cfg.replace(&a.addr.to_string(), &b.addr.to_string()) + "\nshards = oops\n";
    std::fs::write(&p.config, &broken).unwrap();
    let (ok, check_text, _) = check_config(&broken);
    assert!(!ok);
    let problem = check_text
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap()
        .split_once(": ")
        .unwrap()
        .1
        .split_once(": ")
        .unwrap()
        .1
        .to_string(); // "line: field: problem" without the file name
    let (code, out) = cli(&["reload", "--pid-file", pid.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&problem), "{out}\nvs check: {check_text}");
    wait_until(Duration::from_secs(5), "the error on stderr", || {
        p.log().contains(&problem)
    });
    // still the old configuration, still the same process
    for _ in 0..20 {
        assert_eq!(
            common::client::one(listen, &common::client::get("/")).text(),
            "A"
        );
    }
    assert_eq!(b.nr_requests(), 0);
    let m = metrics(admin);
    assert_eq!(m["edgeshard_config_reloads_total{result=\"error\"}"], 1.0);
    assert_eq!(m["edgeshard_config_last_reload_success"], 0.0);
    assert_eq!(m["edgeshard_config_generation"], 1.0);
    let st = status(admin);
    assert_eq!(st["config"]["last_reload"]["result"], "error");
    // what a reload cannot change is refused too, naming the field
    std::fs::write(&p.config, cfg.replace("shards = 2", "shards = 1")).unwrap();
    let (code, out) = cli(&["reload", "--pid-file", pid.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("runtime.cores") && out.contains("edgeshard upgrade"),
        "{out}"
    );
    // and a good one after it works
    std::fs::write(
        &p.config,
        cfg.replace(&a.addr.to_string(), &b.addr.to_string()),
    )
    .unwrap();
    let (code, out) = cli(&["reload", "--pid-file", pid.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        common::client::one(listen, &common::client::get("/")).text(),
        "B"
    );
    // each reload left one record in the security log, with its generation and result
    wait_until(Duration::from_secs(5), "three reload records", || {
        std::fs::read_to_string(&security)
            .is_ok_and(|t| t.matches("\"config_reload\"").count() == 3)
    });
    let seen: Vec<(String, u64)> = std::fs::read_to_string(&security)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["event"] == "config_reload")
        .map(|r| {
            (
                r["result"].as_str().unwrap().to_string(),
                r["generation"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [("error".into(), 1), ("error".into(), 1), ("ok".into(), 2)]
    );
}

/// An appliance run from a copy of the binary (so that the test can replace it, as a package
/// upgrade does): its folder, pid file, binary path, listener and process, once serving.
struct CopyRun {
    dir: PathBuf,
    pid: PathBuf,
    exe: PathBuf,
    listen: SocketAddr,
    child: std::process::Child,
}

fn run_copy(tag: &str, origin: SocketAddr, stderr: std::process::Stdio) -> CopyRun {
    let dir = tmpdir(tag);
    let pid = dir.join("edgeshard.pid");
    let exe = dir.join("edgeshard");
    std::fs::copy(bin(), &exe).unwrap();
    let (cfg, listen, _admin) = plain(&[origin], "", &dir);
    let config = dir.join("c.toml");
    std::fs::write(&config, &cfg).unwrap();
    let child = Command::new(&exe)
        .args(["run", "--config"])
        .arg(&config)
        .stderr(stderr)
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(10), "serving", || {
        pid_of(&pid).is_some() && TcpStream::connect(listen).is_ok()
    });
    CopyRun {
        dir,
        pid,
        exe,
        listen,
        child,
    }
}

/// Replace `exe` by a shell script (renamed over it, as a package manager does).
fn replace_with_script(exe: &Path, body: &str) {
    let script = exe.with_extension("new");
    std::fs::write(&script, format!("#!/bin/sh\n{body}\n")).unwrap();
    Command::new("chmod")
        .arg("755")
        .arg(&script)
        .status()
        .unwrap();
    std::fs::rename(&script, exe).unwrap();
}

/// An upgrade to a binary that cannot start (here a script that exits 1): the old process
/// keeps serving and says why; once the binary is good again, the upgrade goes through.
#[test]
fn an_upgrade_to_a_broken_binary_keeps_the_old_process() {
    let a = origin("A");
    let log = std::fs::File::create(tmpdir("bad-upgrade-log").join("stderr.log")).unwrap();
    let CopyRun {
        dir,
        pid,
        exe,
        listen,
        mut child,
    } = run_copy("bad-upgrade", a.addr, log.into());
    let _kill = KillPid(pid.clone());
    let first = pid_of(&pid).unwrap();
    replace_with_script(&exe, "echo 'broken build' >&2\nexit 1");
    let (code, out) = cli(&["upgrade", "--pid-file", pid.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("exited before it served"), "{out}");
    assert!(
        child.try_wait().unwrap().is_none(),
        "the old process serves on"
    );
    assert_eq!(pid_of(&pid), Some(first));
    assert_eq!(
        common::client::one(listen, &common::client::get("/")).text(),
        "A"
    );
    // the real binary back: the upgrade goes through
    let good = dir.join("good");
    std::fs::copy(bin(), &good).unwrap();
    std::fs::rename(&good, &exe).unwrap();
    let (code, out) = cli(&["upgrade", "--pid-file", pid.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    wait_until(Duration::from_secs(10), "the old process exits", || {
        child.try_wait().unwrap().is_some()
    });
    assert_ne!(pid_of(&pid), Some(first));
    assert_eq!(
        common::client::one(listen, &common::client::get("/")).text(),
        "A"
    );
}

/// `GET /` with `cookie` (if any): (origin, Set-Cookie value if one was set).
fn get_with(listen: SocketAddr, cookie: Option<&str>) -> (String, Option<String>) {
    let req = match cookie {
        Some(c) => format!("GET / HTTP/1.1\r\nHost: a\r\nCookie: ES={c}\r\n\r\n"),
        None => "GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_string(),
    };
    let r = common::client::one(listen, req.as_bytes());
    assert_eq!(r.status, 200, "{}", r.head);
    let set = r
        .header("set-cookie")
        .and_then(|v| v.strip_prefix("ES="))
        .map(|v| v.split(';').next().unwrap().to_string());
    (r.text(), set)
}

/// Upgrade through the CLI and wait until the old process has gone.
fn upgrade(pid: &Path) {
    let before = pid_of(pid).unwrap();
    let (code, out) = cli(&["upgrade", "--pid-file", pid.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    wait_until(Duration::from_secs(10), "the old process exits", || {
        // (the test's own child stays a zombie until reaped: its pid file entry changed)
        !alive(before)
            || std::fs::read_to_string(format!("/proc/{before}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    });
}

fn reload(pid: &Path) {
    let (code, out) = cli(&["reload", "--pid-file", pid.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
}

/// Persistence cookies (no persistence_key: the key is handed over) name the same server
/// after a reload that moved it within its pool and after an upgrade; source-IP clients keep
/// their servers after a reload that adds a server, and after an upgrade.
#[test]
fn persistence_survives_reload_and_upgrade() {
    let (a, b, c, d) = (origin("A"), origin("B"), origin("C"), origin("D"));
    let dir = tmpdir("persist");
    let pid = dir.join("edgeshard.pid");
    let (cfg, listen, _admin) = plain(
        &[a.addr, b.addr, c.addr],
        "[virtual_service.persistence]\nmode = \"active-cookie\"\ncookie = \"ES\"\ntimeout = \"1h\"",
        &dir,
    );
    let p = Proxy::start(&cfg, listen);
    let _kill = KillPid(pid.clone());
    let mut cookies: HashMap<String, String> = HashMap::new();
    for _ in 0..60 {
        if let (name, Some(c)) = get_with(listen, None) {
            cookies.entry(name).or_insert(c);
        }
    }
    assert_eq!(cookies.len(), 3, "{cookies:?}");
    let sticks = |cookies: &HashMap<String, String>, names: &[&str]| {
        for n in names {
            for _ in 0..5 {
                assert_eq!(get_with(listen, Some(&cookies[*n])).0, *n, "cookie of {n}");
            }
        }
    };
    // A (first in the pool) goes: B and C move up a place; their cookies still hold
    std::fs::write(
        &p.config,
        cfg.replace(
            &format!(
                "[[virtual_service.real_server]]\naddress = \"{}\"\n",
                a.addr
            ),
            "",
        ),
    )
    .unwrap();
    reload(&pid);
    sticks(&cookies, &["B", "C"]);
    let (other, _) = get_with(listen, Some(&cookies["A"]));
    assert_ne!(other, "A", "a removed server's cookie goes elsewhere");
    upgrade(&pid);
    sticks(&cookies, &["B", "C"]);
    drop(p);

    // source IP
    let dir = tmpdir("persist-ip");
    let pid = dir.join("edgeshard.pid");
    let (cfg, listen, _admin) = plain(
        &[a.addr, b.addr],
        "[virtual_service.persistence]\nmode = \"source-ip\"\ntimeout = \"20m\"",
        &dir,
    );
    let p = Proxy::start(&cfg, listen);
    let _kill = KillPid(pid.clone());
    let from = |i: u8| -> String {
        let mut c = common::client::Client::connect_from([127, 0, 0, i].into(), listen);
        c.request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").text()
    };
    let clients: Vec<u8> = (10..50).collect();
    let chosen: Vec<String> = clients.iter().map(|&i| from(i)).collect();
    assert!(chosen.iter().any(|s| s == "A") && chosen.iter().any(|s| s == "B"));
    // D joins (the hash alone would move some clients to it): nobody moves
    std::fs::write(
        &p.config,
        format!(
            "{cfg}[[virtual_service.real_server]]\naddress = \"{}\"\n",
            d.addr
        ),
    )
    .unwrap();
    reload(&pid);
    let after: Vec<String> = clients.iter().map(|&i| from(i)).collect();
    assert_eq!(chosen, after, "after the reload");
    upgrade(&pid);
    let after: Vec<String> = clients.iter().map(|&i| from(i)).collect();
    assert_eq!(chosen, after, "after the upgrade");
    assert_eq!(d.nr_requests(), 0);
    // new clients do reach D (so the hash alone would have moved some of the old ones)
    let fresh: Vec<String> = (100..140).map(from).collect();
    assert!(fresh.iter().any(|s| s == "D"), "{fresh:?}");
}

/// Across an upgrade: a TLS session resumes (the ticket keys are handed over), and a real
/// server that was down is still down in the new process from its first request (health is
/// handed over, not re-learnt: the new process sends it nothing).
#[test]
fn an_upgrade_keeps_tls_sessions_and_health() {
    // B hangs on its health check: each check takes the whole timeout to fail, so a new
    // process that re-learnt health would show it "checking" for that long
    let a = origin("A");
    let b = Origin::start(Arc::new(|s: &Seen, w: &mut TcpStream| {
        if s.request_line.contains("/healthz") {
            thread::sleep(Duration::from_secs(3));
        }
        let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nB");
        Next::KeepAlive
    }));
    let ca = Ca::new("upgrade CA");
    let dir = tmpdir("upgrade-tls");
    let pid = dir.join("edgeshard.pid");
    let cert = ca.leaf(&["www.example.com"], false).write(&dir, "site");
    let s = Setup {
        web: local(free_port()),
        secure: local(free_port()),
        admin: local(free_port()),
        pid_file: pid.clone(),
        cert,
        dir,
    };
    let checked = "[virtual_service.health_check]\nurl = \"/healthz\"\ninterval = \"30s\"\ntimeout = \"1s\"\n";
    // every service checks its servers
    let cfg = config(&s, &[(a.addr, 1000), (b.addr, 1000)], &[])
        .split("\n[[virtual_service]]\n")
        .map(|part| {
            part.replacen(
                "[[virtual_service.real_server]]",
                &format!("{checked}[[virtual_service.real_server]]"),
                1,
            )
        })
        .collect::<Vec<_>>()
        .join("\n[[virtual_service]]\n");
    let p = Proxy::start(&cfg, s.web);
    let _kill = KillPid(pid.clone());
    wait_until(Duration::from_secs(10), "B down", || {
        status(s.admin)["virtual_services"][0]["real_servers"][1]["health"] == "down"
    });
    let cfg_resume = tls_client(&ca, true);
    let first = common::tlsio::connect(s.secure, &cfg_resume, "www.example.com").unwrap();
    assert_eq!(
        first.conn.handshake_kind(),
        Some(rustls::HandshakeKind::Full)
    );
    let (r, _first) =
        common::tlsio::request(first, b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n");
    assert_eq!(r.status, 200);
    // a reload (the TLS configuration is built again) keeps sessions resumable
    reload(&pid);
    let after_reload = common::tlsio::connect(s.secure, &cfg_resume, "www.example.com").unwrap();
    assert_eq!(
        after_reload.conn.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed),
        "a session from before the reload resumes"
    );
    let (r, _s) = common::tlsio::request(
        after_reload,
        b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    upgrade(&pid);
    // the first thing the new process is asked: B was down, B is down
    let st = status(s.admin);
    assert_eq!(
        st["virtual_services"][0]["real_servers"][1]["health"], "down",
        "{st}"
    );
    assert_eq!(
        st["virtual_services"][0]["real_servers"][0]["health"], "up",
        "{st}"
    );
    let again = common::tlsio::connect(s.secure, &cfg_resume, "www.example.com").unwrap();
    assert_eq!(
        again.conn.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed),
        "a session from before the upgrade resumes"
    );
    let (r, _again) =
        common::tlsio::request(again, b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "A");
    drop(p);
}

/// A reload that removes a listener: the port closes (connections queued on it were served
/// first); a keep-alive connection of it has its next request answered, then closes; the
/// other services go on.
#[test]
fn a_reload_removes_a_listener() {
    let a = origin("A");
    let ca = Ca::new("remove CA");
    let dir = tmpdir("remove-listener");
    let pid = dir.join("edgeshard.pid");
    let cert = ca.leaf(&["www.example.com"], false).write(&dir, "site");
    let extra = local(free_port());
    let s = Setup {
        web: local(free_port()),
        secure: local(free_port()),
        admin: local(free_port()),
        pid_file: pid.clone(),
        cert,
        dir,
    };
    let p = Proxy::start(&config(&s, &[(a.addr, 1000)], &[extra]), s.web);
    let _kill = KillPid(pid.clone());
    let mut idle = common::client::Client::connect(extra);
    assert_eq!(
        idle.request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").text(),
        "A"
    );
    std::fs::write(&p.config, config(&s, &[(a.addr, 1000)], &[])).unwrap();
    reload(&pid);
    wait_until(
        Duration::from_secs(5),
        "the removed listener closes",
        || TcpStream::connect(extra).is_err(),
    );
    // a connection of the removed service: the request it sends next is still answered
    // (under the configuration it came in with), then it closes
    assert_eq!(
        idle.request_checked(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
        Some(200)
    );
    assert!(idle.is_closed());
    assert_eq!(
        common::client::one(s.web, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").text(),
        "A"
    );
}

/// An upgrade to fewer shards: the spare listening sockets (with whatever is queued on them)
/// are served by a remaining shard, so no new connection is refused or dropped.
#[test]
fn an_upgrade_to_fewer_shards_drops_no_connection() {
    let a = origin("A");
    let Started {
        p,
        pid,
        cfg,
        listen,
        admin,
        _kill,
    } = started("shrink", &[a.addr], "");
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let threads: Vec<_> = (0..4)
        .map(|_| client(listen, None, false, "/", stop.clone(), tally.clone()))
        .collect();
    thread::sleep(Duration::from_millis(300));
    std::fs::write(&p.config, cfg.replace("shards = 2", "shards = 1")).unwrap();
    upgrade(&pid);
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    let t = tally.lock().unwrap();
    // (this once lost one or two new connections a run: an old shard could end while its
    // accept loop had not yet seen the close, and a connection it then accepted was left
    // with a task that never ran; the drain now waits for the accept loops to return)
    assert!(t.failures.is_empty(), "{:?}\n{}", t.failures, p.log());
    assert!(t.ok["A"] > 100, "{:?}", t.ok);
    // one shard now, and every request still answered
    let st = status(admin);
    assert_eq!(st["shards"].as_array().unwrap().len(), 1, "{st}");
    for _ in 0..20 {
        assert_eq!(
            common::client::one(listen, &common::client::get("/")).text(),
            "A"
        );
    }
    // back to two shards and down again, twice: still one listening socket per shard
    for _ in 0..2 {
        std::fs::write(&p.config, &cfg).unwrap();
        upgrade(&pid);
        std::fs::write(&p.config, cfg.replace("shards = 2", "shards = 1")).unwrap();
        upgrade(&pid);
    }
    std::fs::write(&p.config, &cfg).unwrap();
    upgrade(&pid);
    assert_eq!(listening_sockets(listen.port()), 2);
    assert_eq!(
        common::client::one(listen, &common::client::get("/")).text(),
        "A"
    );
}

/// Listening TCP sockets on `port` (from /proc/net/tcp).
fn listening_sockets(port: u16) -> usize {
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&format!(":{port:04X}")) && f[3] == "0A"
        })
        .count()
}

/// SIGTERM while an upgrade waits for a new process that hangs: the wait ends, the new
/// process is killed, and the appliance drains and exits at once (not after the upgrade's
/// 30 s).
#[test]
fn sigterm_during_a_hanging_upgrade_stops_at_once() {
    let a = origin("A");
    let CopyRun {
        pid,
        exe,
        mut child,
        ..
    } = run_copy("hang-upgrade", a.addr, std::process::Stdio::null());
    let _kill = KillPid(pid.clone());
    replace_with_script(&exe, "exec sleep 60");
    unsafe { libc::kill(child.id() as i32, libc::SIGUSR2) };
    // the hand-over has begun (the new process runs) before SIGTERM comes
    wait_until(Duration::from_secs(5), "the new process started", || {
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read_to_string(e.path().join("cmdline"))
                .is_ok_and(|c| c.starts_with("sleep\x0060"))
                && std::fs::read_to_string(e.path().join("stat"))
                    .is_ok_and(|st| st.split_whitespace().nth(3) == Some(&child.id().to_string()))
        })
    });
    let asked = std::time::Instant::now();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    wait_until(Duration::from_secs(8), "the appliance exits", || {
        child.try_wait().unwrap().is_some()
    });
    assert!(asked.elapsed() < Duration::from_secs(8));
}

/// A second `run` of the same configuration does not silently join the first one's
/// listening sockets (SO_REUSEPORT would let it): it exits 1 naming the address, and the
/// first keeps its pid file.
#[test]
fn a_second_instance_on_the_same_addresses_is_refused() {
    let a = origin("A");
    let Started { p, pid, _kill, .. } = started("twice", &[a.addr], "");
    let first = pid_of(&pid).unwrap();
    let out = Command::new(bin())
        .args(["run", "--config"])
        .arg(&p.config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("address already in use"), "{err}");
    assert_eq!(pid_of(&pid), Some(first));
}

/// Keep-alive connections follow the new configuration: after two services swap listen
/// addresses, the next request on a connection opened before goes to the service now on its
/// address (its last request under the old one, then it closes); an address an access list
/// newly refuses is cut at once.
#[test]
fn keep_alive_connections_follow_swaps_and_access_lists() {
    let (a, b) = (origin("A"), origin("B"));
    let dir = tmpdir("swap");
    let pid = dir.join("edgeshard.pid");
    let (one_port, two_port) = (local(free_port()), local(free_port()));
    let two = |first: SocketAddr, second: SocketAddr, acl: &str| {
        format!(
            "[runtime]\nshards = 2\noversubscribe = true\npid_file = \"{}\"\n\n[[virtual_service]]\nname = \"a\"\nlisten = \"{first}\"\n{acl}[[virtual_service.real_server]]\naddress = \"{}\"\n\n[[virtual_service]]\nname = \"b\"\nlisten = \"{second}\"\n[[virtual_service.real_server]]\naddress = \"{}\"\n",
            pid.display(),
            a.addr,
            b.addr
        )
    };
    let p = Proxy::start(&two(one_port, two_port, ""), one_port);
    let _kill = KillPid(pid.clone());
    let get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut kept = common::client::Client::connect(one_port);
    assert_eq!(kept.request(get).text(), "A");
    std::fs::write(&p.config, two(two_port, one_port, "")).unwrap();
    reload(&pid);
    assert_eq!(common::client::one(one_port, get).text(), "B");
    // the old connection: at most one more answer from A, never A afterwards
    let next = kept.request_checked(get);
    assert!(next == Some(200) || next.is_none());
    assert!(
        kept.is_closed(),
        "a connection of the service that left closes"
    );
    // an access list added by reload cuts an open connection at its next request
    let mut open = common::client::Client::connect(one_port);
    assert_eq!(open.request(get).text(), "B");
    std::fs::write(&p.config, two(one_port, two_port, "")).unwrap();
    reload(&pid);
    let mut open = common::client::Client::connect(one_port);
    assert_eq!(open.request(get).text(), "A");
    std::fs::write(
        &p.config,
        two(
            one_port,
            two_port,
            "[virtual_service.access]\ndeny = [\"127.0.0.0/8\"]\n",
        ),
    )
    .unwrap();
    reload(&pid);
    assert_eq!(open.request_checked(get), None, "refused at once");
}

/// A reload that removes a pool's health check brings a server the check had taken out
/// back (nothing checks it any more: it is up, as at a start without a check).
#[test]
fn removing_a_health_check_brings_its_down_servers_back() {
    let a = origin("A");
    let dir = tmpdir("uncheck");
    let pid = dir.join("edgeshard.pid");
    let dead = local(free_port()); // nothing listens yet
    let checked = "[virtual_service.health_check]\nurl = \"/\"\ninterval = \"200ms\"\n";
    let (cfg, listen, admin) = plain(&[a.addr, dead], checked, &dir);
    let p = Proxy::start(&cfg, listen);
    let _kill = KillPid(pid.clone());
    wait_until(Duration::from_secs(5), "the dead one down", || {
        server_status(admin, 1) == "down"
    });
    let _back = Origin::start_on(
        dead,
        Arc::new(|_s: &Seen, w: &mut TcpStream| {
            let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nD");
            Next::KeepAlive
        }),
    );
    std::fs::write(&p.config, cfg.replace(checked, "")).unwrap();
    reload(&pid);
    assert_eq!(server_status(admin, 1), "up");
    let names: Vec<String> = (0..8)
        .map(|_| common::client::one(listen, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").text())
        .collect();
    assert!(names.iter().any(|n| n == "D"), "{names:?}");
}

/// Renaming a service and changing a real server's address on every reload, many more times
/// than the room made at start: the places of what left are reused, no reload is refused,
/// and the reused places start from zero.
#[test]
fn churn_by_reloads_never_runs_out_of_room() {
    let a = origin("A");
    let Started {
        p,
        pid,
        cfg,
        listen,
        admin,
        _kill,
    } = started("churn", &[a.addr], "");
    for i in 0..300u32 {
        let name = format!("web{}", i % 40);
        // a second real server whose address changes every time (nothing listens there:
        // requests retry on A)
        let extra = format!(
            "[[virtual_service.real_server]]\naddress = \"127.0.0.2:{}\"\n",
            20000 + i
        );
        let text = format!("{cfg}{extra}").replace("name = \"web\"", &format!("name = \"{name}\""));
        std::fs::write(&p.config, text).unwrap();
        let (code, out) = cli(&["reload", "--pid-file", pid.to_str().unwrap()]);
        assert_eq!(code, 0, "reload {i}: {out}");
    }
    assert_eq!(
        common::client::one(listen, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").text(),
        "A"
    );
    // the service's counters: only this service's one request (counted once the answer is
    // out: waited for)
    wait_until(Duration::from_secs(5), "the one request counted", || {
        status(admin)["virtual_services"][0]["requests_total"] == 1
    });
    let st = status(admin);
    let vs = &st["virtual_services"][0];
    assert_eq!(vs["real_servers"].as_array().unwrap().len(), 2, "{st}");
    assert_eq!(vs["requests_total"], 1, "{st}");
}

/// `edgeshard reload` against a pid file naming a process that is not edgeshard signals
/// nothing.
#[test]
fn a_stale_pid_file_signals_nothing() {
    let dir = tmpdir("stale-pid");
    let pid = dir.join("edgeshard.pid");
    let mut victim = Command::new("sleep").arg("30").spawn().unwrap();
    std::fs::write(&pid, format!("{}\n", victim.id())).unwrap();
    let (code, out) = cli(&["reload", "--pid-file", pid.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not edgeshard"), "{out}");
    assert!(
        victim.try_wait().unwrap().is_none(),
        "the unrelated process lives"
    );
    let _ = victim.kill();
    let _ = victim.wait();
}

/// SIGHUP or SIGUSR2 during start-up (before it serves) never kills the appliance: it is
/// handled once serving (a reload; an upgrade).
#[test]
fn signals_at_start_up_do_not_kill() {
    let a = origin("A");
    for sig in [libc::SIGHUP, libc::SIGUSR2] {
        let dir = tmpdir("early");
        let pid = dir.join("edgeshard.pid");
        let (cfg, listen, _admin) = plain(&[a.addr], "", &dir);
        let config = dir.join("c.toml");
        std::fs::write(&config, &cfg).unwrap();
        let _kill = KillPid(pid.clone());
        // the test failpoint holds start-up for 500 ms after the signals are taken over
        let mut child = Command::new(bin())
            .args(["run", "--config"])
            .arg(&config)
            .env("EDGESHARD_FAILPOINT", "slow start")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
            .spawn()
            .unwrap();
        let blocked = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|t| {
                    let l = t.lines().find(|l| l.starts_with("SigBlk:"))?;
                    u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok()
                })
                .is_some_and(|m| m & (1 << (libc::SIGHUP - 1)) != 0)
        };
        wait_until(Duration::from_secs(5), "signals taken over", || {
            blocked(child.id())
        });
        assert!(TcpStream::connect(listen).is_err(), "not serving yet");
        unsafe { libc::kill(child.id() as i32, sig) };
        wait_until(Duration::from_secs(10), "serving", || {
            TcpStream::connect(listen).is_ok()
        });
        match sig {
            libc::SIGHUP => {
                assert!(child.try_wait().unwrap().is_none(), "SIGHUP killed it");
                // the reload ran once serving: its outcome beside the pid file
                let status = dir.join("edgeshard.pid.status");
                let done = || {
                    std::fs::read_to_string(&status).is_ok_and(|t| {
                        serde_json::from_str::<serde_json::Value>(&t)
                            .is_ok_and(|v| v["reload"]["ok"] == true)
                    })
                };
                let deadline = Instant::now() + Duration::from_secs(10);
                while !done() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                assert!(
                    done(),
                    "the reload is not done: outcome {:?}, alive {:?}, log:\n{}",
                    std::fs::read_to_string(&status),
                    child.try_wait(),
                    std::fs::read_to_string(dir.join("stderr")).unwrap_or_default()
                );
            }
            _ => {
                // the upgrade ran once serving: the new process took over, the first exited 0
                wait_until(Duration::from_secs(10), "handed over", || {
                    pid_of(&pid).is_some_and(|p| p != child.id() as i32)
                });
                assert_eq!(child.wait().unwrap().code(), Some(0));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Per-client limits (which steer connections to shards by client address) added by a
/// reload, then kept over an upgrade: the limit holds appliance-wide, as at a fresh start.
#[test]
fn client_limits_added_by_reload_hold_across_an_upgrade() {
    let a = origin("A");
    let Started {
        p,
        pid,
        cfg,
        listen,
        admin: _,
        _kill,
    } = started("limits-reload", &[a.addr], "");
    let limited = cfg.replacen(
        "[[virtual_service.real_server]]",
        "[virtual_service.client_limits]\nmax_connections = 2\naction = \"429\"\n[[virtual_service.real_server]]",
        1,
    );
    std::fs::write(&p.config, &limited).unwrap();
    reload(&pid);
    let check = |round: &str| {
        let from: std::net::IpAddr = [127, 0, 0, 77].into();
        let mut held: Vec<common::client::Client> = (0..2)
            .map(|_| common::client::Client::connect_from(from, listen))
            .collect();
        for c in held.iter_mut() {
            assert_eq!(
                c.request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").status,
                200,
                "{round}"
            );
        }
        for _ in 0..4 {
            let mut c = common::client::Client::connect_from(from, listen);
            c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
            assert_eq!(
                c.read(false).unwrap().status,
                429,
                "{round}: a third connection"
            );
        }
    };
    check("after the reload");
    upgrade(&pid);
    check("after the upgrade");
}
