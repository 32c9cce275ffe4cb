//! TLS on the test side: a blocking TLS client for HTTP requests through the proxy, and a TLS
//! origin (re-encryption target) that counts its handshakes and resumptions.

use super::client::Response;
use rustls::pki_types::ServerName;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connect and complete the handshake.
pub fn connect(
    addr: SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
    sni: &str,
) -> Result<TlsStream, rustls::Error> {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn =
        rustls::ClientConnection::new(cfg.clone(), ServerName::try_from(sni.to_string()).unwrap())
            .unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        match s.conn.complete_io(&mut s.sock) {
            Ok(_) => {}
            Err(e) => {
                return Err(
                    match e
                        .into_inner()
                        .and_then(|i| i.downcast::<rustls::Error>().ok())
                    {
                        Some(r) => *r,
                        None => rustls::Error::General("handshake I/O failed".into()),
                    },
                )
            }
        }
    }
    Ok(s)
}

/// Send `req` and read one response over an established TLS stream.
pub fn request(s: TlsStream, req: &[u8]) -> (Response, TlsStream) {
    let mut s = s;
    s.write_all(req).unwrap();
    s.flush().unwrap();
    let mut r = BufReader::new(s);
    let resp = read_response_tls(&mut r);
    (resp, r.into_inner())
}

fn read_response_tls(r: &mut BufReader<TlsStream>) -> Response {
    // Same parsing as the plain client, over a TLS reader.
    let mut head = String::new();
    loop {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        assert!(!l.is_empty(), "EOF in response head after {head:?}");
        head.push_str(&l);
        if l == "\r\n" {
            break;
        }
    }
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = head
        .split("\r\n")
        .skip(1)
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        })
        .collect();
    let len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
    Response {
        status,
        head,
        headers,
        body,
    }
}

/// A TLS origin: answers `200` with its name, keeps connections alive unless `close_each`.
pub struct TlsOrigin {
    pub addr: SocketAddr,
    pub handshakes: Arc<AtomicUsize>,
    pub resumed: Arc<AtomicUsize>,
    pub requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl TlsOrigin {
    pub fn start(
        cfg: Arc<rustls::ServerConfig>,
        name: &'static str,
        close_each: bool,
    ) -> TlsOrigin {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        l.set_nonblocking(true).unwrap();
        let (handshakes, resumed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (h2, r2, q2, s2) = (
            handshakes.clone(),
            resumed.clone(),
            requests.clone(),
            stop.clone(),
        );
        thread::spawn(move || {
            while !s2.load(Ordering::SeqCst) {
                let Ok((tcp, _)) = l.accept() else {
                    thread::sleep(Duration::from_millis(2));
                    continue;
                };
                tcp.set_nonblocking(false).unwrap();
                let (cfg, h, r, q) = (cfg.clone(), h2.clone(), r2.clone(), q2.clone());
                thread::spawn(move || {
                    let conn = rustls::ServerConnection::new(cfg).unwrap();
                    let mut s = rustls::StreamOwned::new(conn, tcp);
                    while s.conn.is_handshaking() {
                        if s.conn.complete_io(&mut s.sock).is_err() {
                            return;
                        }
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    if s.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                        r.fetch_add(1, Ordering::SeqCst);
                    }
                    let mut rd = BufReader::new(s);
                    loop {
                        let mut line = String::new();
                        if rd.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let mut head = line.clone();
                        loop {
                            let mut l = String::new();
                            if rd.read_line(&mut l).unwrap_or(0) == 0 {
                                return;
                            }
                            head.push_str(&l);
                            if l == "\r\n" {
                                break;
                            }
                        }
                        q.lock().unwrap().push(head);
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{}\r\n{}",
                            name.len(),
                            if close_each {
                                "Connection: close\r\n"
                            } else {
                                ""
                            },
                            name
                        );
                        let w = rd.get_mut();
                        if w.write_all(resp.as_bytes()).is_err() || w.flush().is_err() {
                            return;
                        }
                        if close_each {
                            w.conn.send_close_notify();
                            let _ = w.flush();
                            return;
                        }
                    }
                });
            }
        });
        TlsOrigin {
            addr,
            handshakes,
            resumed,
            requests,
            stop,
        }
    }
}

impl Drop for TlsOrigin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
