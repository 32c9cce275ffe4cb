//! `edgeshard demo`: sample real servers on loopback (plain std threads, not the data path)
//! so a newcomer can curl a working proxy at once. Each answers with its own name.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
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
        let (mut content_length, mut close, mut xff) = (0u64, false, String::new());
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
                match k.as_str() {
                    "content-length" => content_length = v.parse().unwrap_or(0),
                    "connection" => close = v.eq_ignore_ascii_case("close"),
                    "x-forwarded-for" => xff = v.to_string(),
                    _ => {}
                }
            }
        }
        std::io::copy(
            &mut (&mut reader).take(content_length),
            &mut std::io::sink(),
        )?;
        let body = format!("hello from real server {name}: {method} {path} (for {xff})\n");
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Real-Server: {name}\r\n{}\r\n",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        out.write_all(head.as_bytes())?;
        if method != "HEAD" {
            out.write_all(body.as_bytes())?;
        }
        if close {
            return Ok(());
        }
    }
}

/// Start one sample real server per address, each on its own accept thread.
pub fn start_real_servers(addrs: &[SocketAddr]) -> std::io::Result<()> {
    for &addr in addrs {
        let listener = TcpListener::bind(addr)?;
        thread::spawn(move || {
            for s in listener.incoming().flatten() {
                thread::spawn(move || {
                    let _ = serve(s, addr.to_string());
                });
            }
        });
    }
    Ok(())
}
