//! Test harness: the real edgeshard binary on loopback, origin servers written for the tests
//! that record exactly what they receive, a raw HTTP/1.1 client, and waits with deadlines.
#![allow(dead_code)]

pub mod client;
pub mod netns;
pub mod origin;
pub mod pki;
pub mod tlsio;

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port free right now on 127.0.0.1, for a listener the test starts later.
///
/// Taken below the kernel's ephemeral range: a port from `bind(0)`, once released, is handed
/// out again as the source port of any outgoing connection (a health check, another test's
/// client), which then holds it or even connects to itself (TCP simultaneous open) so that
/// "is it listening yet?" answers yes. Ports below the range are never given implicitly; a
/// counter keeps this process from handing one out twice, and the bind check skips those
/// held by others (including TIME_WAIT left by an earlier run).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    const FIRST: u32 = 10_000;
    if low < FIRST + 2_000 {
        // no room below the ephemeral range on this machine: the kernel's choice it is
        return TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
    }
    let span = low - FIRST;
    // test binaries run one after another: each starts elsewhere in the span
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (start + n) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below {low}");
}

/// Poll `cond` every 5ms until it holds; panic with `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "edgeshard-test-{}-{}-{}",
        tag,
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_edgeshard")
}

/// `edgeshard check` on `toml` written to a file: (accepted, stderr and stdout, the file).
pub fn check_config(toml: &str) -> (bool, String, PathBuf) {
    let dir = tmpdir("check");
    let path = dir.join("c.toml");
    std::fs::write(&path, toml).unwrap();
    let out = std::process::Command::new(bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.success(), text, path)
}

/// A running edgeshard process; killed on drop.
pub struct Proxy {
    pub child: Child,
    pub dir: PathBuf,
    pub config: PathBuf,
}

impl Proxy {
    /// Write `toml` to a file and `edgeshard run` it; returns once `ready_addr` accepts.
    pub fn start(toml: &str, ready_addr: SocketAddr) -> Proxy {
        Proxy::start_with_env(toml, ready_addr, &[])
    }

    /// `start`, with these environment variables set for the proxy (test hooks).
    pub fn start_with_env(toml: &str, ready_addr: SocketAddr, env: &[(&str, &str)]) -> Proxy {
        let dir = tmpdir("proxy");
        let config = dir.join("edgeshard.toml");
        std::fs::write(&config, with_test_engine(toml)).unwrap();
        let log = std::fs::File::create(dir.join("stderr.log")).unwrap();
        let child = Command::new(bin())
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn edgeshard");
        let mut p = Proxy { child, dir, config };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!("edgeshard exited early ({status}): {}", p.log());
            }
            if TcpStream::connect(ready_addr).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                panic!("edgeshard did not listen on {ready_addr}: {}", p.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Every shard reports bound before "ready" is logged; wait for it too.
        wait_until(Duration::from_secs(10), "edgeshard ready", || {
            p.log().contains("edgeshard ready")
        });
        p
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.join("stderr.log")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Wait for exit within `limit`; returns the exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A config with one virtual service in front of `servers`; `extra_vs` goes into the service
/// table, `extra_top` before it. Two shards (the CI machine has two cores).
/// `tests/run` runs the data-path tests a second time with `EDGESHARD_TEST_IO_ENGINE` set:
/// each configuration a `Proxy` starts then asks for that `runtime.io_engine` (unless it sets
/// one itself, or splices, which only epoll does).
pub fn with_test_engine(toml: &str) -> String {
    let Ok(engine) = std::env::var("EDGESHARD_TEST_IO_ENGINE") else {
        return toml.to_string();
    };
    if toml.contains("io_engine") || toml.contains("splice_response = true") {
        return toml.to_string();
    }
    let line = format!("io_engine = \"{engine}\"\n");
    match toml.find("[runtime]\n") {
        Some(i) if i == 0 || toml.as_bytes()[i - 1] == b'\n' => {
            let at = i + "[runtime]\n".len();
            format!("{}{line}{}", &toml[..at], &toml[at..])
        }
        _ => format!("[runtime]\n{line}{toml}"),
    }
}

pub fn simple_config(
    listen: SocketAddr,
    servers: &[SocketAddr],
    extra_vs: &str,
    extra_top: &str,
) -> String {
    let mut s = format!("{extra_top}\n[runtime]\nshards = 2\noversubscribe = true\ndrain_timeout = \"5s\"\n\n[[virtual_service]]\nname = \"web\"\nlisten = \"{listen}\"\n{extra_vs}\n");
    for a in servers {
        s.push_str(&format!(
            "[[virtual_service.real_server]]\naddress = \"{a}\"\n"
        ));
    }
    s
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A proxy (two shards) in front of `servers` with an admin listener: (proxy, listen, admin).
pub fn proxy_with_admin(servers: &[SocketAddr], extra_vs: &str) -> (Proxy, SocketAddr, SocketAddr) {
    proxy_with_admin_table(servers, extra_vs, "")
}

/// `proxy_with_admin` with the test operator token configured.
pub fn proxy_with_operator(
    servers: &[SocketAddr],
    extra_vs: &str,
) -> (Proxy, SocketAddr, SocketAddr) {
    proxy_with_admin_table(servers, extra_vs, &operator_token_config())
}

/// A proxy whose `[admin]` table holds `admin_extra` after its listen line.
fn proxy_with_admin_table(
    servers: &[SocketAddr],
    extra_vs: &str,
    admin_extra: &str,
) -> (Proxy, SocketAddr, SocketAddr) {
    let listen = local(free_port());
    let admin = local(free_port());
    let cfg = simple_config(
        listen,
        servers,
        extra_vs,
        &format!("[admin]\nlisten = \"{admin}\"\n{admin_extra}"),
    );
    (Proxy::start(&cfg, listen), listen, admin)
}

/// GET `path` on the admin listener (Host: its own address, as a browser on it sends), with
/// the test operator token (ignored where no token is configured).
pub fn admin_get(admin: SocketAddr, path: &str) -> client::Response {
    admin_call(admin, "GET", path, Some(OPERATOR_TOKEN), None)
}

/// One admin call: `token` as a bearer token, `body` as JSON.
pub fn admin_call(
    admin: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> client::Response {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {admin}\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if method != "GET" && method != "HEAD" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    client::one(admin, req.as_bytes())
}

/// An operator token for tests, and the config lines holding its hash (a `[admin]` table
/// must come before them).
pub const OPERATOR_TOKEN: &str = "test-operator-token-0123456789abcdef";
pub fn operator_token_config() -> String {
    let hash: String = edgeshard::access::sha256(OPERATOR_TOKEN.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("[[admin.token]]\nname = \"ops\"\nrole = \"operator\"\nsha256 = \"{hash}\"\n")
}

/// GET /status on the admin listener, parsed.
pub fn status(admin: SocketAddr) -> serde_json::Value {
    let r = admin_get(admin, "/status");
    serde_json::from_slice(&r.body).expect("status is JSON")
}

/// The `status` of real server `i` of the first virtual service.
pub fn server_status(admin: SocketAddr, i: usize) -> String {
    status(admin)["virtual_services"][0]["real_servers"][i]["status"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// GET /metrics on the admin listener: every sample by its name and labels.
pub fn metrics(admin: SocketAddr) -> std::collections::HashMap<String, f64> {
    let r = admin_get(admin, "/metrics");
    assert_eq!(r.status, 200);
    r.text()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// A JSON-lines log's complete records. A last line without its newline is a write still under
/// way (the writer thread appends whole batches, but a read may catch one half done): left for
/// the next read. Every complete line must parse (the logs promise that).
pub fn json_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON log line {l:?}: {e}")))
        .collect()
}

/// Wait until `f` gives the same value twice, 300 ms apart (a count that may still move:
/// counters bumped after an answer, a request still unread in a socket), within `deadline`.
pub fn steady<T: PartialEq + std::fmt::Debug>(
    deadline: Duration,
    what: &str,
    f: impl Fn() -> T,
) -> T {
    let end = Instant::now() + deadline;
    let mut last = f();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = f();
        if now == last {
            return now;
        }
        assert!(Instant::now() < end, "{what} never settled: last {now:?}");
        last = now;
    }
}
