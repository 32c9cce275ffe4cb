//! Per-shard pools of idle keep-alive connections to real servers, and connecting with a
//! deadline. A pooled connection is checked before reuse: readable means closed or dirty.

use crate::config::ServerId;
use crate::http::Buf;
use crate::net::Socket;
use futures_rustls::client::TlsStream;
use futures_rustls::TlsConnector;
use rustls_pki_types::ServerName;
use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A connection to a real server: plain, or re-encrypted.
pub type UpStream = crate::net::Stream<TlsStream<Socket>>;

/// The socket under a real server's stream (a real server is never an in-process link).
fn socket(stream: &UpStream) -> Option<&Socket> {
    match stream {
        UpStream::Plain(s) => Some(s),
        UpStream::Tls(s) => Some(s.get_ref().0),
        UpStream::Link(_) => None,
    }
}

/// Why connecting to a real server failed.
#[derive(Debug)]
pub enum ConnectError {
    TimedOut,
    /// Connected, but the TLS handshake did not finish in time.
    TlsTimedOut,
    Refused(io::Error),
    /// The TLS handshake failed: certificate verification and the like.
    Tls(io::Error),
}

/// Size of each upstream connection's read buffer.
pub const UPSTREAM_BUF: usize = 16 * 1024;

pub struct UpstreamConn {
    pub stream: UpStream,
    pub buf: Buf,
    pub server: ServerId,
    /// Came from the pool (a failure before any response byte may be retried once).
    pub reused: bool,
    idle_since: Instant,
}

/// Connect (and with `tls`, handshake) within `dur`.
pub async fn connect(
    server: ServerId,
    addr: SocketAddr,
    dur: Duration,
    tls: Option<(&TlsConnector, &ServerName<'static>)>,
) -> Result<UpstreamConn, ConnectError> {
    let deadline = Instant::now() + dur;
    let tcp = crate::net::connect(addr, dur).await.map_err(|e| {
        if e.kind() == io::ErrorKind::TimedOut {
            ConnectError::TimedOut
        } else {
            ConnectError::Refused(e)
        }
    })?;
    let stream = match tls {
        None => UpStream::Plain(tcp),
        Some((connector, name)) => {
            match crate::io::until(deadline, connector.connect(name.clone(), tcp)).await {
                Ok(s) => UpStream::Tls(Box::new(s)),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return Err(ConnectError::TlsTimedOut)
                }
                Err(e) => return Err(ConnectError::Tls(e)),
            }
        }
    };
    Ok(UpstreamConn {
        stream,
        buf: Buf::new(UPSTREAM_BUF),
        server,
        reused: false,
        idle_since: Instant::now(),
    })
}

/// Below this idle time a pooled connection with no readiness edge since its last read is
/// taken as clean without a syscall; older ones are always peeked at.
const TRUST_QUIET: Duration = Duration::from_secs(1);

/// Is an idle socket still clean? Any readable byte (or EOF) means the server closed it or
/// sent something unsolicited; either way it must not carry another request. Below
/// `TRUST_QUIET` of idling the engine's view is trusted; older ones are always asked.
fn is_clean(stream: &UpStream, idle: Duration) -> bool {
    socket(stream).is_some_and(|sock| sock.is_clean(idle >= TRUST_QUIET))
}

pub struct Pools {
    idle: RefCell<Vec<Vec<UpstreamConn>>>,
}

impl Pools {
    pub fn new(nr_servers: usize) -> Pools {
        Pools {
            idle: RefCell::new((0..nr_servers).map(|_| Vec::new()).collect()),
        }
    }

    /// Most recently used clean connection to `server` that has not idled past `max_idle`.
    pub fn checkout(&self, server: ServerId, max_idle: Duration) -> Option<UpstreamConn> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(server.0)?;
        while let Some(mut c) = list.pop() {
            let idle = c.idle_since.elapsed();
            if idle <= max_idle && is_clean(&c.stream, idle) {
                c.reused = true;
                return Some(c);
            }
        }
        None
    }

    /// Return a connection whose last response ended cleanly; dropped if the pool is full.
    pub fn checkin(&self, mut conn: UpstreamConn, max: usize) {
        if !conn.buf.is_empty() {
            return; // bytes beyond the response: the connection is out of step
        }
        let mut idle = self.idle.borrow_mut();
        if let Some(list) = idle.get_mut(conn.server.0) {
            if list.len() < max {
                conn.idle_since = Instant::now();
                list.push(conn);
            }
        }
    }

    /// Drop the idle connections to one server (it went down).
    pub fn drop_server(&self, server: ServerId) {
        if let Some(l) = self.idle.borrow_mut().get_mut(server.0) {
            l.clear();
        }
    }

    /// Drop every idle connection (shutdown).
    pub fn clear(&self) {
        for l in self.idle.borrow_mut().iter_mut() {
            l.clear();
        }
    }
}
