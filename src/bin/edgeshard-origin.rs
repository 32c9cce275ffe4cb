//! A sample real server for the demo and the bench: HTTP/1.1 keep-alive, answers every
//! request with a small text body naming itself (or `?size=N` bytes), reads and discards
//! Content-Length request bodies. std threads only: it is not part of the proxy.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;

fn serve(stream: TcpStream, name: String) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("/").to_string();
        let mut content_length = 0usize;
        let mut close = false;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                if k == "content-length" {
                    content_length = v.parse().unwrap_or(0);
                } else if k == "connection" && v.eq_ignore_ascii_case("close") {
                    close = true;
                }
            }
        }
        std::io::copy(
            &mut (&mut reader).take(content_length as u64),
            &mut std::io::sink(),
        )?;
        let body = match path.split_once("size=") {
            Some((_, n)) => vec![b'x'; n.split('&').next().unwrap_or("0").parse().unwrap_or(0)],
            None => format!("hello from real server {name}: {method} {path}\n").into_bytes(),
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Real-Server: {name}\r\n{}\r\n",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        let mut resp = head.into_bytes();
        if method != "HEAD" {
            resp.extend_from_slice(&body);
        }
        out.write_all(&resp)?;
        if close {
            return Ok(());
        }
    }
}

fn main() {
    let addrs: Vec<String> = std::env::args().skip(1).collect();
    if addrs.is_empty() {
        eprintln!("usage: edgeshard-origin ADDR [ADDR...]   e.g. 127.0.0.1:9001 127.0.0.1:9002");
        std::process::exit(2);
    }
    let mut handles = Vec::new();
    for addr in addrs {
        let listener = match TcpListener::bind(&addr) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("edgeshard-origin: cannot listen on {addr}: {e}");
                std::process::exit(1);
            }
        };
        eprintln!("edgeshard-origin: real server listening on {addr}");
        handles.push(thread::spawn(move || {
            for s in listener.incoming().flatten() {
                let name = addr.clone();
                thread::spawn(move || {
                    let _ = serve(s, name);
                });
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
}
