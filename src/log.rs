//! The three ESP logs (user access, security, connection). Never blocks a shard: each shard
//! formats records into its own buffer and hands full buffers to the log writer thread through
//! a bounded channel with `try_send`; when the writer (the disk) cannot keep up, batches are
//! dropped and their records counted. The writer thread owns the files, appends, and reopens
//! them on SIGUSR1 (logrotate).

use crate::config::{LogConfig, LogFormat, LogTarget};
use std::cell::{Cell, RefCell};
use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Access = 0,
    Security = 1,
    Connection = 2,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Access, Kind::Security, Kind::Connection];
    pub fn name(self) -> &'static str {
        match self {
            Kind::Access => "user_access",
            Kind::Security => "security",
            Kind::Connection => "connection",
        }
    }
}

/// A shard flushes a log buffer at this size (and every FLUSH_EVERY).
const FLUSH_AT: usize = 32 * 1024;
/// Beyond this a shard's buffer takes no more records until flushed.
const MAX_BUFFER: usize = 256 * 1024;
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Batches in flight to the writer thread.
const CHANNEL_BATCHES: usize = 64;

/// The process-wide writer: one thread, started before the shards.
pub struct LogWriter {
    tx: SyncSender<(Kind, Vec<u8>)>,
    reopen: Arc<AtomicBool>,
    /// Batches handed to the writer, and written by it: at exit, the last ones are waited for.
    sent: AtomicU64,
    written: Arc<AtomicU64>,
    configured: [bool; 3],
    format: LogFormat,
}

impl LogWriter {
    pub fn start(cfg: &LogConfig) -> Arc<LogWriter> {
        let (tx, rx) = sync_channel(CHANNEL_BATCHES);
        let reopen = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let targets = [
            cfg.user_access.clone(),
            cfg.security.clone(),
            cfg.connection.clone(),
        ];
        let configured = [
            targets[0].is_some(),
            targets[1].is_some(),
            targets[2].is_some(),
        ];
        if configured.iter().any(|&c| c) {
            let (r, w) = (reopen.clone(), written.clone());
            let _ = std::thread::Builder::new()
                .name("log-writer".into())
                .spawn(move || writer(rx, targets, r, w));
        }
        Arc::new(LogWriter {
            tx,
            reopen,
            sent: AtomicU64::new(0),
            written,
            configured,
            format: cfg.format,
        })
    }

    /// Ask the writer to reopen its files (SIGUSR1).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::SeqCst);
    }

    /// Hand a batch to the writer without waiting; false if it could not take it.
    fn send(&self, kind: Kind, batch: Vec<u8>) -> bool {
        match self.tx.try_send((kind, batch)) {
            Ok(()) => {
                self.sent.fetch_add(1, Ordering::SeqCst);
                true
            }
            Err(_) => false,
        }
    }

    /// At exit (every shard flushed): wait, at most `limit`, until the writer has written
    /// every batch handed to it, so that the last records of a drain are not lost.
    pub fn finish(&self, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        while self.written.load(Ordering::SeqCst) < self.sent.load(Ordering::SeqCst)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// A reload or an upgrade (from the main thread): one record in the security and the
    /// connection logs, so that what changed the appliance's behaviour is in the same
    /// timeline as the traffic.
    pub fn lifecycle(&self, event: &str, generation: u64, result: &str, detail: &str) {
        for kind in [Kind::Security, Kind::Connection] {
            if !self.configured[kind as usize] {
                continue;
            }
            let mut out = Vec::with_capacity(160);
            Fields::new(&mut out, self.format == LogFormat::Json, kind.name())
                .str("event", event.as_bytes())
                .num("generation", generation)
                .num("pid", std::process::id())
                .str("result", result.as_bytes())
                .str("detail", detail.as_bytes())
                .end();
            out.push(b'\n');
            let _ = self.send(kind, out);
        }
    }
}

fn open(t: &LogTarget) -> Option<Box<dyn Write>> {
    match t {
        LogTarget::Stdout => Some(Box::new(std::io::stdout())),
        LogTarget::File(p) => match OpenOptions::new().create(true).append(true).open(p) {
            Ok(f) => Some(Box::new(f) as Box<dyn Write>),
            Err(e) => {
                tracing::error!(file = %p.display(), "cannot open log file: {e}");
                None
            }
        },
    }
}

/// The writer thread: blocking file writes happen here, never on a shard. It polls the channel
/// (a receiver blocked in `recv` would make senders take the channel's wake-up lock).
fn writer(
    rx: Receiver<(Kind, Vec<u8>)>,
    targets: [Option<LogTarget>; 3],
    reopen: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
) {
    let mut files: [Option<Box<dyn Write>>; 3] = [None, None, None];
    let mut opened = [false; 3];
    loop {
        if reopen.swap(false, Ordering::SeqCst) {
            for (i, f) in files.iter_mut().enumerate() {
                if let Some(w) = f.as_mut() {
                    let _ = w.flush();
                }
                *f = None;
                opened[i] = false;
            }
            tracing::info!("log files reopened");
        }
        match rx.try_recv() {
            Ok((kind, batch)) => {
                let i = kind as usize;
                if !opened[i] {
                    files[i] = targets[i].as_ref().and_then(open);
                    opened[i] = true;
                }
                if let Some(w) = files[i].as_mut() {
                    if w.write_all(&batch).and_then(|_| w.flush()).is_err() {
                        files[i] = None; // reopened on the next batch
                        opened[i] = false;
                    }
                }
                written.fetch_add(1, Ordering::SeqCst);
            }
            Err(TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(10)),
            Err(TryRecvError::Disconnected) => return,
        }
    }
}

/// A shard's side of the logs.
pub struct ShardLog {
    writer: Arc<LogWriter>,
    buffers: [RefCell<Vec<u8>>; 3],
    records: [Cell<u64>; 3],
    dropped: [Cell<u64>; 3],
}

impl ShardLog {
    pub fn new(writer: Arc<LogWriter>) -> ShardLog {
        ShardLog {
            writer,
            buffers: Default::default(),
            records: Default::default(),
            dropped: Default::default(),
        }
    }

    pub fn enabled(&self, kind: Kind) -> bool {
        self.writer.configured[kind as usize]
    }

    pub fn dropped(&self, kind: Kind) -> u64 {
        self.dropped[kind as usize].get()
    }

    pub fn json(&self) -> bool {
        self.writer.format == LogFormat::Json
    }

    /// Append one record made by `f` (which writes one line without the newline).
    fn push(&self, kind: Kind, f: impl FnOnce(&mut Vec<u8>, bool)) {
        let i = kind as usize;
        if !self.writer.configured[i] {
            return;
        }
        let full = {
            let mut buf = self.buffers[i].borrow_mut();
            if buf.len() >= MAX_BUFFER {
                self.dropped[i].set(self.dropped[i].get() + 1);
                return;
            }
            f(&mut buf, self.json());
            buf.push(b'\n');
            self.records[i].set(self.records[i].get() + 1);
            buf.len() >= FLUSH_AT
        };
        if full {
            self.flush(kind);
        }
    }

    /// Hand the buffered records of `kind` to the writer, or drop and count them.
    pub fn flush(&self, kind: Kind) {
        let i = kind as usize;
        let batch = std::mem::take(&mut *self.buffers[i].borrow_mut());
        let n = self.records[i].replace(0);
        if batch.is_empty() {
            return;
        }
        if !self.writer.send(kind, batch) {
            self.dropped[i].set(self.dropped[i].get() + n);
        }
    }

    pub fn flush_all(&self) {
        for k in Kind::ALL {
            self.flush(k);
        }
    }

    pub fn access(&self, r: &AccessRecord<'_>) {
        self.push(Kind::Access, |out, json| r.write(out, json));
    }

    pub fn security(&self, r: &SecurityRecord<'_>) {
        self.push(Kind::Security, |out, json| r.write(out, json));
    }

    pub fn connection(&self, r: &ConnectionRecord<'_>) {
        self.push(Kind::Connection, |out, json| r.write(out, json));
    }
}

/// One request, for the user-access log.
pub struct AccessRecord<'a> {
    pub client: SocketAddr,
    pub service: &'a str,
    pub sub_service: Option<&'a str>,
    pub host: &'a [u8],
    pub method: &'a [u8],
    pub path: &'a [u8],
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub real_server: Option<&'a str>,
    pub duration: Duration,
    pub tls: Option<&'a str>,
    /// "HTTP/1.1" (HTTP/1.0 included) or "HTTP/2": what the client spoke.
    pub protocol: &'a str,
}

/// A refused request or a failed handshake, for the security log.
pub struct SecurityRecord<'a> {
    pub client: SocketAddr,
    pub service: &'a str,
    /// esp_host, esp_directory, malformed, oversized, smuggling, tls_handshake, upstream_certificate…
    pub event: &'a str,
    pub reason: &'a str,
    pub status: Option<u16>,
    pub host: Option<&'a [u8]>,
    pub path: Option<&'a [u8]>,
}

/// The open or close of a client connection, for the connection log.
pub struct ConnectionRecord<'a> {
    pub event: &'a str,
    pub client: SocketAddr,
    pub service: &'a str,
    pub shard: usize,
    pub duration: Duration,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub requests: u64,
    /// Why it closed: client, idle_timeout, error, shutdown; tcp services: closed,
    /// idle_timeout, reset, connect_failed, refused, no_real_server.
    pub reason: Option<&'a str>,
    pub tls: Option<&'a str>,
    /// The server name the client asked for (TLS SNI).
    pub sni: Option<&'a str>,
    /// A tcp service's real server.
    pub real_server: Option<&'a str>,
}

/// RFC 3339 UTC time with milliseconds.
pub fn timestamp(out: &mut Vec<u8>, t: SystemTime) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // civil-from-days (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + if month <= 2 { 1 } else { 0 };
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    );
}

/// A JSON string literal. Valid UTF-8 is written as it is (`café` stays `café`); quotes,
/// backslashes and control characters are escaped; each invalid sequence becomes `\ufffd`
/// (as `String::from_utf8_lossy` would), so the record is always valid UTF-8 and JSON.
fn json_str(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    for chunk in s.utf8_chunks() {
        for &b in chunk.valid().as_bytes() {
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                0x00..=0x1f | 0x7f => {
                    let _ = write!(out, "\\u{b:04x}");
                }
                _ => out.push(b),
            }
        }
        if !chunk.invalid().is_empty() {
            out.extend_from_slice(b"\\ufffd");
        }
    }
    out.push(b'"');
}

/// A text-format value: bare when it is a plain token, else quoted like JSON.
fn text_val(out: &mut Vec<u8>, s: &[u8]) {
    if !s.is_empty()
        && s.iter()
            .all(|&b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'\\')
    {
        out.extend_from_slice(s);
    } else {
        json_str(out, s);
    }
}

/// Writes `key: value` pairs in either format.
struct Fields<'o> {
    out: &'o mut Vec<u8>,
    json: bool,
    first: bool,
}

impl<'o> Fields<'o> {
    fn new(out: &'o mut Vec<u8>, json: bool, log: &str) -> Fields<'o> {
        if json {
            out.extend_from_slice(b"{\"time\":\"");
            timestamp(out, SystemTime::now());
            let _ = write!(out, "\",\"log\":\"{log}\"");
        } else {
            timestamp(out, SystemTime::now());
            let _ = write!(out, " {log}");
        }
        Fields {
            out,
            json,
            first: false,
        }
    }

    fn key(&mut self, k: &str) {
        if self.json {
            if !self.first {
                self.out.push(b',');
            }
            let _ = write!(self.out, "\"{k}\":");
        } else {
            let _ = write!(self.out, " {k}=");
        }
        self.first = false;
    }

    fn str(&mut self, k: &str, v: &[u8]) -> &mut Self {
        self.key(k);
        if self.json {
            json_str(self.out, v);
        } else {
            text_val(self.out, v);
        }
        self
    }

    fn opt(&mut self, k: &str, v: Option<&[u8]>) -> &mut Self {
        match v {
            Some(v) => self.str(k, v),
            None => {
                if self.json {
                    self.key(k);
                    self.out.extend_from_slice(b"null");
                }
                self
            }
        }
    }

    fn num(&mut self, k: &str, v: impl std::fmt::Display) -> &mut Self {
        self.key(k);
        let _ = write!(self.out, "{v}");
        self
    }

    fn addr(&mut self, k: &str, a: SocketAddr) -> &mut Self {
        self.key(k);
        if self.json {
            let _ = write!(self.out, "\"{a}\"");
        } else {
            let _ = write!(self.out, "{a}");
        }
        self
    }

    fn end(&mut self) {
        if self.json {
            self.out.push(b'}');
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

impl AccessRecord<'_> {
    fn write(&self, out: &mut Vec<u8>, json: bool) {
        Fields::new(out, json, "user_access")
            .addr("client", self.client)
            .str("service", self.service.as_bytes())
            .opt("sub_service", self.sub_service.map(str::as_bytes))
            .str("host", self.host)
            .str("method", self.method)
            .str("path", self.path)
            .num("status", self.status)
            .num("bytes_in", self.bytes_in)
            .num("bytes_out", self.bytes_out)
            .opt("real_server", self.real_server.map(str::as_bytes))
            .num("duration_ms", ms(self.duration))
            .opt("tls", self.tls.map(str::as_bytes))
            .str("protocol", self.protocol.as_bytes())
            .end();
    }
}

impl SecurityRecord<'_> {
    fn write(&self, out: &mut Vec<u8>, json: bool) {
        let mut f = Fields::new(out, json, "security");
        f.addr("client", self.client)
            .str("service", self.service.as_bytes())
            .str("event", self.event.as_bytes())
            .str("reason", self.reason.as_bytes());
        match self.status {
            Some(s) => f.num("status", s),
            None => f.opt("status", None),
        };
        f.opt("host", self.host).opt("path", self.path).end();
    }
}

impl ConnectionRecord<'_> {
    fn write(&self, out: &mut Vec<u8>, json: bool) {
        Fields::new(out, json, "connection")
            .str("event", self.event.as_bytes())
            .addr("client", self.client)
            .str("service", self.service.as_bytes())
            .num("shard", self.shard)
            .num("duration_ms", ms(self.duration))
            .num("bytes_in", self.bytes_in)
            .num("bytes_out", self.bytes_out)
            .num("requests", self.requests)
            .opt("reason", self.reason.map(str::as_bytes))
            .opt("tls", self.tls.map(str::as_bytes))
            .opt("sni", self.sni.map(str::as_bytes))
            .opt("real_server", self.real_server.map(str::as_bytes))
            .end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        let mut out = Vec::new();
        timestamp(
            &mut out,
            UNIX_EPOCH + Duration::from_millis(1_764_086_400_123),
        );
        assert_eq!(String::from_utf8(out).unwrap(), "2025-11-25T16:00:00.123Z");
        let mut out = Vec::new();
        timestamp(&mut out, UNIX_EPOCH + Duration::from_secs(951_782_400)); // leap day 2000
        assert_eq!(String::from_utf8(out).unwrap(), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn records_are_valid_json_and_escaped() {
        let r = AccessRecord {
            client: "192.0.2.1:5555".parse().unwrap(),
            service: "web",
            sub_service: None,
            host: b"a\"b",
            method: b"GET",
            path: b"/x\x01\xff/caf\xc3\xa9",
            status: 200,
            bytes_in: 10,
            bytes_out: 20,
            real_server: Some("10.0.0.1:80"),
            duration: Duration::from_micros(1500),
            tls: Some("TLSv1.3"),
            protocol: "HTTP/1.1",
        };
        let mut out = Vec::new();
        r.write(&mut out, true);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["host"], "a\"b");
        assert_eq!(v["path"], "/x\u{1}\u{fffd}/café");
        assert!(
            std::str::from_utf8(&out).unwrap().contains("/café"),
            "valid UTF-8 is written as it is"
        );
        assert_eq!(v["status"], 200);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["sub_service"], serde_json::Value::Null);
        let mut text = Vec::new();
        r.write(&mut text, false);
        let t = String::from_utf8(text).expect("text records are UTF-8 too");
        assert!(
            t.contains(" user_access client=192.0.2.1:5555 service=web")
                && t.contains("status=200"),
            "{t}"
        );
    }
}
