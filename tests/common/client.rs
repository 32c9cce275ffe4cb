//! A raw HTTP/1.1 client for the tests: sends exact bytes, reads exact responses.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub struct Client {
    pub r: BufReader<TcpStream>,
    pub w: TcpStream,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        Client {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        }
    }

    /// Connect from a chosen loopback source address (127.0.0.0/8 is all ours).
    pub fn connect_from(src: std::net::IpAddr, addr: SocketAddr) -> Client {
        use socket2::{Domain, Socket, Type};
        let sk = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        sk.bind(&SocketAddr::new(src, 0).into()).unwrap();
        sk.connect(&addr.into()).unwrap();
        let s: TcpStream = sk.into();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        Client {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).unwrap();
    }

    /// Read one response (a response to HEAD has no body).
    pub fn read(&mut self, head_request: bool) -> std::io::Result<Response> {
        read_response(&mut self.r, head_request)
    }

    pub fn request(&mut self, bytes: &[u8]) -> Response {
        self.send(bytes);
        self.read(bytes.starts_with(b"HEAD ")).unwrap()
    }

    /// Send a request and return its status, or None if the connection was closed.
    pub fn request_checked(&mut self, bytes: &[u8]) -> Option<u16> {
        if self.w.write_all(bytes).is_err() {
            return None;
        }
        self.read(false).ok().map(|r| r.status)
    }

    /// True once the server has closed (EOF) within the read timeout.
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.r.read(&mut b), Ok(0) | Err(_))
    }
}

pub fn read_response(
    r: &mut BufReader<TcpStream>,
    head_request: bool,
) -> std::io::Result<Response> {
    let mut head = String::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("EOF after {head:?}"),
            ));
        }
        head.push_str(&l);
        if l == "\r\n" {
            break;
        }
    }
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        })
        .collect();
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if head_request || status < 200 || status == 204 || status == 304 {
    } else if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut l = String::new();
            r.read_line(&mut l)?;
            let n = usize::from_str_radix(l.trim(), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk {l:?}")))?;
            if n == 0 {
                let mut t = String::new();
                r.read_line(&mut t)?;
                break;
            }
            let mut c = vec![0; n + 2];
            r.read_exact(&mut c)?;
            body.extend_from_slice(&c[..n]);
        }
    } else if let Some(n) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body = vec![0; n];
        r.read_exact(&mut body)?;
    } else {
        r.read_to_end(&mut body)?;
    }
    Ok(Response {
        status,
        head,
        headers,
        body,
    })
}

/// One request on a fresh connection.
pub fn one(addr: SocketAddr, bytes: &[u8]) -> Response {
    let mut c = Client::connect(addr);
    c.request(bytes)
}

pub fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: test.example\r\n\r\n").into_bytes()
}
