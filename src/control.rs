//! Live operations, on the main thread (never a shard): SIGHUP reloads the configuration,
//! SIGUSR2 upgrades the binary; the pid file, and the outcome file next to it that
//! `edgeshard reload|upgrade` wait on; the counters /metrics and /status show; systemd's
//! notification socket.

use crate::config::{Config, RuntimeServers};
use crate::log::LogWriter;
use crate::shard::Running;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a new process may take to report ready before the upgrade is given up.
pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(30);

// Written by the main thread, read by the admin shard for /metrics and /status.
static GENERATION: AtomicU64 = AtomicU64::new(1);
static RELOADS_OK: AtomicU64 = AtomicU64::new(0);
static RELOADS_ERROR: AtomicU64 = AtomicU64::new(0);
/// Unix time (ms) of the last reload, and whether it worked (1) or not (0).
static LAST_RELOAD_MS: AtomicU64 = AtomicU64::new(0);
static LAST_RELOAD_OK: AtomicU64 = AtomicU64::new(1);
static UPGRADES: AtomicU64 = AtomicU64::new(0);
/// The last reload's error (for the runtime API's answer).
static LAST_ERROR: Mutex<String> = Mutex::new(String::new());
/// Real servers added or removed through the runtime API (see `Config::apply_runtime`).
static RUNTIME: Mutex<RuntimeServers> = Mutex::new(RuntimeServers {
    added: Vec::new(),
    removed: Vec::new(),
});

pub fn runtime_servers() -> RuntimeServers {
    RUNTIME.lock().map(|r| r.clone()).unwrap_or_default()
}

pub fn set_runtime_servers(r: RuntimeServers) {
    if let Ok(mut g) = RUNTIME.lock() {
        *g = r;
    }
}

/// The error of the last reload, if it failed.
pub fn last_reload_error() -> Option<String> {
    let e = LAST_ERROR.lock().map(|e| e.clone()).unwrap_or_default();
    (!e.is_empty()).then_some(e)
}

/// Ask the main thread for a reload (SIGHUP to this process: the same path as an operator's)
/// and wait for its outcome. For the runtime API, on a shard: it awaits, never blocks.
pub async fn reload_from_shard(limit: Duration) -> Result<u64, String> {
    let done = |c: &Counters| c.reloads_ok + c.reloads_error;
    let before = done(&counters());
    // SAFETY: kill to our own PID; every thread blocks SIGHUP and the main thread sigwaits it.
    unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
    let deadline = Instant::now() + limit;
    loop {
        let c = counters();
        if done(&c) > before {
            let c = counters(); // read after the count: the result it counts
            return match c.last_reload_ok {
                true => Ok(c.generation),
                false => Err(last_reload_error().unwrap_or_else(|| "reload failed".into())),
            };
        }
        if Instant::now() > deadline {
            return Err(format!("no reload outcome within {limit:?}"));
        }
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
}

/// The counters, as /metrics shows them and as an upgrade carries them over.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Counters {
    pub generation: u64,
    pub reloads_ok: u64,
    pub reloads_error: u64,
    pub last_reload_unix_ms: u64,
    pub last_reload_ok: bool,
    pub upgrades: u64,
    /// Operations so far (reloads and upgrades): what `edgeshard reload|upgrade` waits on.
    pub seq: u64,
}

pub fn counters() -> Counters {
    Counters {
        generation: GENERATION.load(Ordering::Relaxed),
        reloads_ok: RELOADS_OK.load(Ordering::SeqCst),
        reloads_error: RELOADS_ERROR.load(Ordering::SeqCst),
        last_reload_unix_ms: LAST_RELOAD_MS.load(Ordering::Relaxed),
        last_reload_ok: LAST_RELOAD_OK.load(Ordering::Relaxed) == 1,
        upgrades: UPGRADES.load(Ordering::Relaxed),
        seq: 0,
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The outcome of the last operation, as `edgeshard reload|upgrade` reads it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub seq: u64,
    /// "start", "reload" or "upgrade".
    pub op: String,
    pub ok: bool,
    pub error: Option<String>,
    pub generation: u64,
    pub pid: u32,
    pub at_unix_ms: u64,
}

/// Where the outcome of operations is written: beside the pid file.
pub fn outcome_path(pid_file: &Path) -> PathBuf {
    let mut p = pid_file.as_os_str().to_owned();
    p.push(".status");
    PathBuf::from(p)
}

/// The last outcome of `op` ("start", "reload", "upgrade"): the file keeps each op's last,
/// so that a reload's outcome never hides an upgrade's.
pub fn read_outcome(pid_file: &Path, op: &str) -> Option<Outcome> {
    read_outcomes(pid_file).remove(op)
}

fn read_outcomes(pid_file: &Path) -> std::collections::BTreeMap<String, Outcome> {
    std::fs::read_to_string(outcome_path(pid_file))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

/// Is `pid` an edgeshard process (not an unrelated one that reused a stale pid file's PID)?
pub fn is_edgeshard(pid: i32) -> bool {
    let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
        return false;
    };
    let name = exe
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ours = std::env::current_exe()
        .ok()
        .and_then(|e| e.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    // (a binary replaced by an upgrade shows as "edgeshard (deleted)")
    let name = name.trim_end_matches(" (deleted)");
    name.contains("edgeshard") || name == ours
}

/// Signals waiting for the main thread (blocked, not yet taken).
pub fn pending(sig: i32) -> bool {
    // SAFETY: sigpending fills a set we own; sigismember reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigpending(&mut set) == 0 && libc::sigismember(&set, sig) == 1
    }
}

/// Write `text` to `path` whole or not at all (a reader never sees half of it).
fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Tell systemd (Type=notify), if it is listening: READY=1, RELOADING=1, MAINPID=…
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let bytes = path.as_encoded_bytes();
    let _ = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), Path::new(&path))
    };
}

/// The serving process's side of live operations.
pub struct Control {
    pub config_path: PathBuf,
    pub pid_file: Option<PathBuf>,
    /// `--pid-file` as given (handed to a successor; else it reads its configuration's).
    cli_pid_file: Option<PathBuf>,
    /// This binary's path as it was at start (the file there may be a newer version now).
    exe: PathBuf,
    log: Arc<LogWriter>,
    seq: u64,
}

impl Control {
    pub fn new(
        config_path: PathBuf,
        pid_file: Option<PathBuf>,
        cli_pid_file: Option<PathBuf>,
        log: Arc<LogWriter>,
        carried: Option<&Counters>,
    ) -> Control {
        if let Some(c) = carried {
            GENERATION.store(c.generation.max(1), Ordering::Relaxed);
            RELOADS_OK.store(c.reloads_ok, Ordering::Relaxed);
            RELOADS_ERROR.store(c.reloads_error, Ordering::Relaxed);
            LAST_RELOAD_MS.store(c.last_reload_unix_ms, Ordering::Relaxed);
            LAST_RELOAD_OK.store(c.last_reload_ok as u64, Ordering::Relaxed);
            UPGRADES.store(c.upgrades, Ordering::Relaxed);
        }
        Control {
            config_path,
            pid_file,
            cli_pid_file,
            exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe")),
            log,
            seq: carried.map_or(0, |c| c.seq),
        }
    }

    /// This process serves: write the pid file and the outcome of `op` ("start", or
    /// "upgrade" in a new process), and tell systemd.
    pub fn serving(&mut self, op: &str, generation: u64) {
        GENERATION.store(generation, Ordering::SeqCst);
        if let Some(p) = &self.pid_file {
            if let Err(e) = write_atomic(p, &format!("{}\n", std::process::id())) {
                tracing::error!(pid_file = %p.display(), "cannot write the pid file: {e}");
            }
        }
        if op == "upgrade" {
            UPGRADES.fetch_add(1, Ordering::Relaxed);
            // the file loaded fine: an earlier refused reload is no longer what serves
            LAST_RELOAD_OK.store(1, Ordering::SeqCst);
            if let Ok(mut e) = LAST_ERROR.lock() {
                e.clear();
            }
        }
        self.outcome(op, Ok(()));
        sd_notify(&format!("READY=1\nMAINPID={}", std::process::id()));
    }

    /// At exit: the pid file goes, unless it names another process (the one that took over).
    pub fn exiting(&self) {
        if let Some(p) = &self.pid_file {
            let ours = std::fs::read_to_string(p)
                .is_ok_and(|t| t.trim() == std::process::id().to_string());
            if ours {
                let _ = std::fs::remove_file(p);
            }
        }
    }

    fn outcome(&mut self, op: &str, r: Result<(), &str>) {
        self.seq += 1;
        let Some(p) = &self.pid_file else {
            return;
        };
        let o = Outcome {
            seq: self.seq,
            op: op.into(),
            ok: r.is_ok(),
            error: r.err().map(str::to_string),
            generation: GENERATION.load(Ordering::Relaxed),
            pid: std::process::id(),
            at_unix_ms: unix_ms(),
        };
        // a fresh start forgets what an earlier process left there
        let mut all = match op {
            "start" => Default::default(),
            _ => read_outcomes(p),
        };
        all.insert(op.to_string(), o);
        let text = serde_json::to_string(&all).unwrap_or_default();
        if let Err(e) = write_atomic(&outcome_path(p), &text) {
            tracing::error!(file = %outcome_path(p).display(), "cannot write the outcome file: {e}");
        }
    }

    /// An operation this process cannot do: its outcome says why (`edgeshard reload|upgrade`
    /// answer at once instead of waiting).
    pub fn refuse(&mut self, op: &str, why: &str) {
        tracing::warn!("{op} refused: {why}");
        self.outcome(op, Err(why));
    }

    /// SIGHUP: read and validate the file again; switch every shard to it, or keep serving
    /// the current configuration and say why not.
    pub fn reload(&mut self, running: &mut Running) {
        sd_notify("RELOADING=1");
        let started = Instant::now();
        let r = Config::load(&self.config_path)
            .map_err(|e| e.to_string())
            .and_then(|mut c| {
                for note in c.apply_runtime(&runtime_servers()) {
                    tracing::warn!("{note}");
                }
                c.follow(running.config(), running.busy())
                    .map_err(|e| format!("{}: {e}", self.config_path.display()))?;
                let warnings = c.warnings();
                let generation = running.reload(c)?;
                Ok((generation, warnings))
            });
        LAST_RELOAD_MS.store(unix_ms(), Ordering::Relaxed);
        match r {
            Ok((generation, warnings)) => {
                GENERATION.store(generation, Ordering::SeqCst);
                LAST_RELOAD_OK.store(1, Ordering::SeqCst);
                if let Ok(mut e) = LAST_ERROR.lock() {
                    e.clear();
                }
                // counted last: a waiter that sees the count sees the result
                RELOADS_OK.fetch_add(1, Ordering::SeqCst);
                let took = format!("{:?}", started.elapsed());
                tracing::info!(generation, took, "configuration reloaded");
                for w in warnings {
                    tracing::warn!("{w}");
                }
                self.log.lifecycle("config_reload", generation, "ok", &took);
                self.outcome("reload", Ok(()));
            }
            Err(e) => {
                let generation = running.generation();
                LAST_RELOAD_OK.store(0, Ordering::SeqCst);
                if let Ok(mut last) = LAST_ERROR.lock() {
                    *last = e.clone();
                }
                RELOADS_ERROR.fetch_add(1, Ordering::SeqCst);
                tracing::error!(
                    generation,
                    "reload refused, still serving generation {generation}: {e}"
                );
                self.log.lifecycle("config_reload", generation, "error", &e);
                self.outcome("reload", Err(&e));
            }
        }
        sd_notify("READY=1");
    }

    /// SIGUSR2: start this binary again, hand it the sockets and state, and wait until it
    /// serves. Ok: the caller drains and exits. Err: this process keeps serving.
    pub fn upgrade(&mut self, running: &Running) -> Result<u32, String> {
        let r = self.start_successor(running);
        let generation = running.generation();
        match &r {
            Ok(pid) => {
                tracing::info!(
                    generation,
                    new_pid = pid,
                    "upgrade: the new process serves; this one stops accepting and drains"
                );
                self.log
                    .lifecycle("upgrade", generation, "ok", &format!("new pid {pid}"));
                // the new process writes the pid file and the outcome
            }
            Err(e) => {
                tracing::error!(generation, "upgrade failed, still serving: {e}");
                self.log.lifecycle("upgrade", generation, "error", e);
                self.outcome("upgrade", Err(e));
            }
        }
        r
    }

    fn start_successor(&self, running: &Running) -> Result<u32, String> {
        let export = running.export()?;
        let (ours, theirs) =
            UnixStream::pair().map_err(|e| format!("cannot make the hand-over socket: {e}"))?;
        // the new process inherits its end (the only descriptor without close-on-exec)
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_SETFD, 0) };
        let mut cmd = std::process::Command::new(&self.exe);
        cmd.arg("run").arg("--config").arg(&self.config_path);
        // the command line's pid file; else the new configuration's [runtime] pid_file
        if let Some(p) = &self.cli_pid_file {
            cmd.arg("--pid-file").arg(p);
        }
        cmd.env(crate::upgrade::ENV_FD, theirs.as_raw_fd().to_string());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.exe.display()))?;
        drop(theirs);
        // Why it failed: it exited (its status says how), or it hangs (then it is killed).
        let fail = |child: &mut std::process::Child, why: String| {
            std::thread::sleep(Duration::from_millis(50)); // an exiting child finishes
            match child.try_wait() {
                Ok(Some(status)) => format!(
                    "the new process (pid {}) exited before it served: {status}",
                    child.id()
                ),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    format!("{why} (new process pid {} killed)", child.id())
                }
            }
        };
        let (cookie_key, ticket_keys) = crate::upgrade::Handover::secrets(&running.secrets);
        let mut counters = counters();
        counters.seq = self.seq;
        let all = running.sockets.all();
        let doc = crate::upgrade::Handover {
            cookie_key,
            ticket_keys,
            servers: export.servers,
            source: export.source,
            runtime: runtime_servers(),
            sockets: all.iter().map(|(a, s, _)| (*a, *s)).collect(),
            control: counters,
        };
        let fds: Vec<_> = all.iter().map(|(_, _, fd)| fd.as_raw_fd()).collect();
        if let Err(e) = crate::upgrade::send(&ours, &doc, &fds) {
            return Err(fail(&mut child, format!("hand-over failed: {e}")));
        }
        // Waited for in slices: a SIGTERM meanwhile ends the wait (and the upgrade) at once.
        let _ = ours.set_read_timeout(Some(Duration::from_millis(100)));
        let deadline = Instant::now() + UPGRADE_TIMEOUT;
        let mut reader = BufReader::new(&ours);
        let mut line = String::new();
        let read = loop {
            match reader.read_line(&mut line) {
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if pending(libc::SIGTERM) || pending(libc::SIGINT) {
                        return Err(fail(&mut child, "stopped: shutting down".into()));
                    }
                    if Instant::now() > deadline {
                        break Err(std::io::Error::other("no answer"));
                    }
                }
                r => break r,
            }
        };
        match (read, line.trim()) {
            (Ok(_), "ready") => Ok(child.id()),
            (Ok(_), other) if !other.is_empty() => {
                let _ = child.wait();
                Err(format!("the new process failed: {other}"))
            }
            (Ok(_), _) => Err(fail(&mut child, "it closed the hand-over".into())),
            (Err(_), _) => Err(fail(
                &mut child,
                format!("the new process did not report ready within {UPGRADE_TIMEOUT:?}"),
            )),
        }
    }
}

/// In a process started by an upgrade: the hand-over socket (None: an ordinary start).
pub fn successor_socket() -> Option<UnixStream> {
    let fd: i32 = std::env::var(crate::upgrade::ENV_FD).ok()?.parse().ok()?;
    std::env::remove_var(crate::upgrade::ENV_FD);
    // SAFETY: the old process passed us this descriptor, open, for us alone.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // close-on-exec from here on: a later upgrade must not leak it to the next process
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    let sock = UnixStream::from(owned);
    // an old process that never sends must not leave this one hanging at start
    let _ = sock.set_read_timeout(Some(UPGRADE_TIMEOUT));
    Some(sock)
}

/// Tell the old process how the start went.
pub fn report(sock: &UnixStream, r: Result<(), &str>) {
    let line = match r {
        Ok(()) => "ready\n".to_string(),
        Err(e) => format!("error: {}\n", e.replace('\n', " ")),
    };
    let _ = (&*sock).write_all(line.as_bytes());
}
