//! Origin servers for the tests: each accepted connection is served on its own thread; every
//! request is recorded (head text, decoded body, connection number) before the test's handler
//! answers it by writing whatever bytes it likes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Seen {
    pub conn: usize,
    pub request_line: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The exact head bytes as received.
    pub raw_head: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn headers_named(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .count()
    }
}

/// What the handler wants after answering.
pub enum Next {
    KeepAlive,
    Close,
    /// Echo every byte back until EOF (a WebSocket-ish tunnel after a 101).
    Echo,
}

pub type Handler = Arc<dyn Fn(&Seen, &mut TcpStream) -> Next + Send + Sync>;

pub struct Origin {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub connections: Arc<AtomicUsize>,
    pub open: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    /// False once the listener is closed after `stop`.
    running: Arc<AtomicBool>,
    /// Every open accepted connection, to reset them all when the origin "crashes".
    streams: Arc<Mutex<Vec<(usize, TcpStream)>>>,
    /// Requests whose handler has returned (an answer was written).
    pub answered: Arc<AtomicUsize>,
}

impl Origin {
    pub fn start(handler: Handler) -> Origin {
        Origin::start_on("127.0.0.1:0".parse().unwrap(), handler)
    }

    /// Start on a given address (to restart an origin where it was).
    pub fn start_on(addr: SocketAddr, handler: Handler) -> Origin {
        let listener = TcpListener::bind(addr).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let running = Arc::new(AtomicBool::new(true));
        let r2 = running.clone();
        let streams = Arc::new(Mutex::new(Vec::new()));
        let answered = Arc::new(AtomicUsize::new(0));
        let (s2, c2, o2, st2, str2, a2) = (
            seen.clone(),
            connections.clone(),
            open.clone(),
            stop.clone(),
            streams.clone(),
            answered.clone(),
        );
        listener.set_nonblocking(true).unwrap();
        thread::spawn(move || {
            while !st2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        // handlers write responses in pieces: no Nagle stalls
                        stream.set_nodelay(true).unwrap();
                        let id = c2.fetch_add(1, Ordering::SeqCst);
                        if let Ok(c) = stream.try_clone() {
                            str2.lock().unwrap().push((id, c));
                        }
                        let (seen, handler, open, answered, streams) = (
                            s2.clone(),
                            handler.clone(),
                            o2.clone(),
                            a2.clone(),
                            str2.clone(),
                        );
                        open.fetch_add(1, Ordering::SeqCst);
                        thread::spawn(move || {
                            let _ = serve(stream, id, seen, handler, answered);
                            // our clone must not keep the connection open after the handler
                            // closed it
                            streams.lock().unwrap().retain(|(i, _)| *i != id);
                            open.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
            drop(listener);
            r2.store(false, Ordering::SeqCst);
        });
        Origin {
            addr,
            seen,
            connections,
            open,
            stop,
            running,
            streams,
            answered,
        }
    }

    /// Die as a crashed process does: the listener closes and every connection is reset at
    /// once (SO_LINGER 0). Returns how many requests were in flight (received, unanswered).
    pub fn crash(&self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        let streams = std::mem::take(&mut *self.streams.lock().unwrap());
        let in_flight = self.nr_requests() - self.answered.load(Ordering::SeqCst);
        for (_, s) in &streams {
            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        drop(streams);
        while self.running.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(1));
        }
        in_flight
    }

    /// An origin answering 200 with its `name` as the body to everything.
    pub fn named(name: &'static str) -> Origin {
        Origin::ok(name)
    }

    /// An origin answering 200 with `body` to everything.
    pub fn ok(body: &'static str) -> Origin {
        Origin::start(Arc::new(move |_s: &Seen, w: &mut TcpStream| {
            let _ = write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{}",
                body.len(),
                body
            );
            Next::KeepAlive
        }))
    }

    /// An origin answering 200 with `name`, except that its /healthcheck.html answers 503
    /// while `healthy` is false; on `addr` when given (to restart one where it was).
    pub fn health_checked(
        name: &'static str,
        healthy: Arc<AtomicBool>,
        addr: Option<SocketAddr>,
    ) -> Origin {
        let handler: Handler = Arc::new(move |s: &Seen, w: &mut TcpStream| {
            if s.request_line.contains("/healthcheck.html") && !healthy.load(Ordering::SeqCst) {
                let _ =
                    w.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
            } else {
                let _ = write!(
                    w,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{}",
                    name.len(),
                    name
                );
            }
            Next::KeepAlive
        });
        match addr {
            Some(a) => Origin::start_on(a, handler),
            None => Origin::start(handler),
        }
    }

    /// Stop accepting and close the listening socket; returns once it is closed.
    pub fn shut(&self) {
        self.stop.store(true, Ordering::SeqCst);
        while self.running.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn nr_requests(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn read_chunked(r: &mut BufReader<TcpStream>) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line)?;
        let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
            .map_err(|_| std::io::Error::other("bad chunk size"))?;
        if size == 0 {
            loop {
                let mut t = String::new();
                r.read_line(&mut t)?;
                if t == "\r\n" || t.is_empty() {
                    return Ok(body);
                }
            }
        }
        let mut chunk = vec![0; size + 2];
        r.read_exact(&mut chunk)?;
        body.extend_from_slice(&chunk[..size]);
    }
}

fn serve(
    stream: TcpStream,
    conn: usize,
    seen: Arc<Mutex<Vec<Seen>>>,
    handler: Handler,
    answered: Arc<AtomicUsize>,
) -> std::io::Result<()> {
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    loop {
        let mut raw_head = Vec::new();
        let mut request_line = String::new();
        if r.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        raw_head.extend_from_slice(request_line.as_bytes());
        let mut headers = Vec::new();
        loop {
            let mut l = String::new();
            if r.read_line(&mut l)? == 0 {
                return Ok(());
            }
            raw_head.extend_from_slice(l.as_bytes());
            let t = l.trim_end_matches(['\r', '\n']);
            if t.is_empty() {
                break;
            }
            if let Some((k, v)) = t.split_once(':') {
                headers.push((k.to_string(), v.trim().to_string()));
            }
        }
        let mut s = Seen {
            conn,
            request_line: request_line.trim_end().to_string(),
            headers,
            body: Vec::new(),
            raw_head,
        };
        if s.header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().ends_with("chunked"))
        {
            s.body = read_chunked(&mut r)?;
        } else if let Some(n) = s
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
        {
            let mut b = vec![0; n];
            r.read_exact(&mut b)?;
            s.body = b;
        }
        seen.lock().unwrap().push(s.clone());
        let next = handler(&s, &mut w);
        answered.fetch_add(1, Ordering::SeqCst);
        match next {
            Next::KeepAlive => {}
            Next::Close => return Ok(()),
            Next::Echo => {
                let mut buf = [0u8; 4096];
                // first whatever the reader already buffered
                let pending = r.buffer().to_vec();
                r.consume(pending.len());
                w.write_all(&pending)?;
                loop {
                    let n = r.get_mut().read(&mut buf)?;
                    if n == 0 {
                        return Ok(());
                    }
                    w.write_all(&buf[..n])?;
                }
            }
        }
    }
}
