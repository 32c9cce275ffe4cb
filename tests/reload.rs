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
use std::time::Duration;

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
    let a_after = a.nr_requests();
    settle();
    assert_eq!(a.nr_requests(), a_after, "nothing new reaches a removed server");

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
    assert_eq!(m["edgeshard_config_generation"], 6.0);
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
