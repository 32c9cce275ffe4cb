//! The load generator: closed loop (N connections as fast as they go) or open loop (a fixed
//! request rate, latency measured from each request's intended send time, so a stall is not
//! hidden by coordinated omission); keep-alive or a new connection per request; plain or TLS.

use crate::origin::{parse_cores, pin};
use clap::Args as ClapArgs;
use hdrhistogram::Histogram;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(ClapArgs, Clone)]
pub struct Args {
    /// http://host:port/path or https://host:port/path
    #[arg(long)]
    url: String,
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// How long to run, in seconds (fractions allowed).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Stop after this many requests instead (0: run for --duration).
    #[arg(long, default_value_t = 0)]
    requests: u64,
    /// Open loop: this many requests per second in total (0: closed loop).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// A new connection (and TLS handshake) per request.
    #[arg(long)]
    new_connection: bool,
    /// Offer the session tickets the server gave (resumed handshakes). Off by default: a
    /// "new TLS connection" then costs the server a full handshake, as its name says.
    #[arg(long)]
    resume: bool,
    /// A reused keep-alive connection closed by the server before any byte of the response
    /// (as at a reload or an upgrade): resend once on a new connection, as HTTP clients do
    /// for idempotent requests, and count it as retried, not as an error.
    #[arg(long)]
    retry_reused: bool,
    /// Request body size (POST with Content-Length when > 0).
    #[arg(long, default_value_t = 0)]
    body_size: usize,
    /// Host header (default: the URL's host).
    #[arg(long)]
    host: Option<String>,
    /// SNI for TLS (default: the URL's host).
    #[arg(long)]
    sni: Option<String>,
    /// CPUs the load threads run on, e.g. "1".
    #[arg(long)]
    cores: Option<String>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<String>,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

#[derive(Default, Clone, Copy, Debug)]
struct Errors {
    connect: u64,
    tls: u64,
    write: u64,
    read: u64,
    status: u64,
}

impl Errors {
    fn add(&mut self, o: &Errors) {
        self.connect += o.connect;
        self.tls += o.tls;
        self.write += o.write;
        self.read += o.read;
        self.status += o.status;
    }
    fn total(&self) -> u64 {
        self.connect + self.tls + self.write + self.read + self.status
    }
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Conn {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(b),
            Conn::Tls(s) => s.read(b),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(b),
            Conn::Tls(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

struct Target {
    addr: SocketAddr,
    tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
    request: Vec<u8>,
}

fn target(a: &Args) -> Target {
    let (tls, rest) = if let Some(r) = a.url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = a.url.strip_prefix("http://") {
        (false, r)
    } else {
        panic!("--url must start with http:// or https://");
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = authority
        .to_socket_addrs()
        .expect("resolvable address")
        .next()
        .expect("an address");
    let host_name = authority
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(authority)
        .to_string();
    let host = a.host.clone().unwrap_or_else(|| authority.to_string());
    let mut request = if a.body_size > 0 {
        format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n",
            a.body_size
        )
        .into_bytes()
    } else {
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes()
    };
    request.extend(std::iter::repeat_n(b'b', a.body_size));
    let tls = tls.then(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
            .with_no_client_auth();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        if !a.resume {
            c.resumption = rustls::client::Resumption::disabled();
        }
        let sni = a.sni.clone().unwrap_or(host_name);
        (
            Arc::new(c),
            rustls::pki_types::ServerName::try_from(sni).expect("valid SNI"),
        )
    });
    Target { addr, tls, request }
}

fn connect(t: &Target, errors: &mut Errors) -> Option<Conn> {
    let s = match TcpStream::connect(t.addr) {
        Ok(s) => s,
        Err(_) => {
            errors.connect += 1;
            return None;
        }
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    match &t.tls {
        None => Some(Conn::Plain(s)),
        Some((cfg, name)) => {
            let c = rustls::ClientConnection::new(cfg.clone(), name.clone()).ok()?;
            let mut st = rustls::StreamOwned::new(c, s);
            while st.conn.is_handshaking() {
                if st.conn.complete_io(&mut st.sock).is_err() {
                    errors.tls += 1;
                    return None;
                }
            }
            Some(Conn::Tls(Box::new(st)))
        }
    }
}

/// The server closed (or reset) before any byte of a response.
const NOTHING: std::io::ErrorKind = std::io::ErrorKind::NotConnected;

/// Read one response into `buf` (reused); Ok(true) if 2xx/3xx, Ok(false) otherwise;
/// Err of kind NOTHING if the connection ended before any byte of it.
fn read_response(c: &mut Conn, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    buf.clear();
    let mut tmp = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = match c.read(&mut tmp) {
            Err(_) if buf.is_empty() => return Err(NOTHING.into()),
            r => r?,
        };
        if n == 0 && buf.is_empty() {
            return Err(NOTHING.into());
        }
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status: u16 = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut have = buf.len() - head_end;
    if let Some(cl) = head
        .split("\r\n")
        .find_map(|l| l.strip_prefix("content-length:"))
    {
        let want: usize = cl.trim().parse().unwrap_or(0);
        while have < want {
            let n = c.read(&mut tmp)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            have += n;
        }
    } else if head.contains("transfer-encoding: chunked") {
        let mut body: Vec<u8> = buf[head_end..].to_vec();
        while !body.windows(5).any(|w| w == b"0\r\n\r\n") {
            let n = c.read(&mut tmp)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            body.extend_from_slice(&tmp[..n]);
        }
    }
    Ok((200..400).contains(&status))
}

struct Outcome {
    hist: Histogram<u64>,
    errors: Errors,
    done: u64,
    retried: u64,
}

#[allow(clippy::too_many_arguments)]
fn worker(
    t: Arc<Target>,
    a: Args,
    idx: usize,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    budget: u64,
    start: Instant,
    end: Instant,
) -> Outcome {
    pin(&parse_cores(&a.cores), idx);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let mut errors = Errors::default();
    let mut done = 0;
    let mut buf = Vec::with_capacity(16 * 1024);
    let interval = (a.rate > 0.0).then(|| Duration::from_secs_f64(a.connections as f64 / a.rate));
    // stagger the open-loop schedules of the connections
    let mut next = interval.map(|i| start + i.mul_f64(idx as f64 / a.connections as f64));
    let mut conn: Option<Conn> = None;
    let mut retried = 0;
    // the current request is being resent after a reused connection ended before answering
    let mut again = false;
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        if !again && budget > 0 && count.fetch_add(1, Ordering::Relaxed) >= budget {
            break;
        }
        let intended = match (next, interval) {
            _ if again => Instant::now(),
            (Some(n), Some(i)) => {
                let now = Instant::now();
                if n > now {
                    std::thread::sleep(n - now);
                }
                next = Some(n + i);
                n
            }
            _ => Instant::now(),
        };
        let reused = conn.is_some();
        if conn.is_none() {
            conn = connect(&t, &mut errors);
            if conn.is_none() {
                again = false;
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let sent = c.write_all(&t.request).and_then(|_| c.flush());
        let read = match sent {
            Ok(()) => read_response(c, &mut buf),
            Err(_) => Err(NOTHING.into()),
        };
        if a.retry_reused && reused && !again {
            if let Err(e) = &read {
                if e.kind() == NOTHING {
                    retried += 1;
                    again = true;
                    conn = None;
                    continue;
                }
            }
        }
        again = false;
        match read {
            Err(_) if sent.is_err() => {
                errors.write += 1;
                conn = None;
                continue;
            }
            Ok(ok) => {
                if !ok {
                    errors.status += 1;
                }
                let _ = hist.record(intended.elapsed().as_micros().max(1) as u64);
                done += 1;
                if budget == 0 {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => {
                errors.read += 1;
                conn = None;
                continue;
            }
        }
        if a.new_connection {
            conn = None;
        }
    }
    Outcome {
        hist,
        errors,
        done,
        retried,
    }
}

pub fn run(a: Args) {
    let t = Arc::new(target(&a));
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = if a.requests > 0 {
        start + Duration::from_secs(3600)
    } else {
        start + Duration::from_secs_f64(a.duration)
    };
    let handles: Vec<_> = (0..a.connections)
        .map(|i| {
            let (t, a2, stop, count) = (t.clone(), a.clone(), stop.clone(), count.clone());
            let budget = a.requests;
            std::thread::spawn(move || worker(t, a2, i, stop, count, budget, start, end))
        })
        .collect();
    // progress line, once a second
    let mut last = 0;
    while handles.iter().any(|h| !h.is_finished()) {
        std::thread::sleep(Duration::from_millis(200));
        let el = start.elapsed().as_secs_f64();
        if !a.quiet && el.fract() < 0.2 {
            let n = count.load(Ordering::Relaxed).min(if a.requests > 0 {
                a.requests
            } else {
                u64::MAX
            });
            eprint!(
                "\r{el:5.1}s {n:>10} requests {:>9.0} req/s   ",
                (n - last.min(n)) as f64
            );
            last = n;
        }
    }
    if !a.quiet {
        eprintln!();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let mut errors = Errors::default();
    let mut done = 0;
    let mut retried = 0;
    for h in handles {
        if let Ok(o) = h.join() {
            let _ = hist.add(&o.hist);
            errors.add(&o.errors);
            done += o.done;
            retried += o.retried;
        }
    }
    let q = |p: f64| hist.value_at_quantile(p) as f64 / 1000.0;
    let rps = done as f64 / elapsed;
    println!(
        "requests    {done} in {elapsed:.2}s = {rps:.0} req/s ({} mode, {} connections{})",
        if a.rate > 0.0 {
            "open-loop"
        } else {
            "closed-loop"
        },
        a.connections,
        if a.new_connection {
            ", new connection per request"
        } else {
            ", keep-alive"
        }
    );
    println!(
        "latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        hist.max() as f64 / 1000.0
    );
    println!(
        "errors      {} (connect {}, tls {}, write {}, read {}, status {})",
        errors.total(),
        errors.connect,
        errors.tls,
        errors.write,
        errors.read,
        errors.status
    );
    if a.retry_reused {
        println!(
            "retried     {retried} (a reused connection closed before answering, resent once)"
        );
    }
    if let Some(path) = &a.json {
        let v = serde_json::json!({
            "url": a.url, "connections": a.connections, "rate": a.rate, "new_connection": a.new_connection,
            "requests": done, "seconds": elapsed, "rps": rps,
            "latency_ms": { "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p99_9": q(0.999), "max": hist.max() as f64 / 1000.0 },
            "errors": { "connect": errors.connect, "tls": errors.tls, "write": errors.write, "read": errors.read, "status": errors.status },
            "retried": retried,
            "histogram_us": (1..=100).map(|i| hist.value_at_quantile(i as f64 / 100.0)).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&v).unwrap_or_default())
            .expect("write --json");
    }
}
