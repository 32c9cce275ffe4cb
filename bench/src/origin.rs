//! The bench origin: answers every request with `--body-size` bytes, keep-alive, plain or TLS,
//! one thread per connection, pinned to `--cores`.

use clap::Args as ClapArgs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::Arc;

#[derive(ClapArgs)]
pub struct Args {
    #[arg(long)]
    listen: String,
    #[arg(long, default_value_t = 13)]
    body_size: usize,
    #[arg(long)]
    tls_cert: Option<String>,
    #[arg(long)]
    tls_key: Option<String>,
    /// CPUs the origin's threads run on, e.g. "1" or "1,2".
    #[arg(long)]
    cores: Option<String>,
}

pub fn parse_cores(s: &Option<String>) -> Vec<usize> {
    s.as_deref()
        .map(|c| c.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_default()
}

pub fn pin(cores: &[usize], i: usize) {
    if let Some(&c) = cores.get(i % cores.len().max(1)) {
        core_affinity::set_for_current(core_affinity::CoreId { id: c });
    }
}

fn tls_config(cert: &str, key: &str) -> Arc<rustls::ServerConfig> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut BufReader::new(
        std::fs::File::open(cert).expect("cert"),
    ))
    .collect::<Result<_, _>>()
    .expect("cert PEM");
    let key =
        rustls_pemfile::private_key(&mut BufReader::new(std::fs::File::open(key).expect("key")))
            .expect("key PEM")
            .expect("a key");
    let mut c = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("cert and key");
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(c)
}

fn serve<S: Read + Write>(s: S, response: &[u8]) -> std::io::Result<()> {
    let mut r = BufReader::with_capacity(16 * 1024, s);
    let mut line = String::new();
    loop {
        let mut content_length = 0usize;
        let mut chunked = false;
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                return Ok(());
            }
            if line == "\r\n" {
                break;
            }
            let l = line.to_ascii_lowercase();
            if let Some(v) = l.strip_prefix("content-length:") {
                content_length = v.trim().parse().unwrap_or(0);
            } else if l.starts_with("transfer-encoding:") && l.contains("chunked") {
                chunked = true;
            }
        }
        if chunked {
            loop {
                line.clear();
                r.read_line(&mut line)?;
                let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16)
                    .unwrap_or(0);
                let mut skip = vec![0u8; n + 2];
                r.read_exact(&mut skip)?;
                if n == 0 {
                    break;
                }
            }
        } else if content_length > 0 {
            std::io::copy(
                &mut (&mut r).take(content_length as u64),
                &mut std::io::sink(),
            )?;
        }
        r.get_mut().write_all(response)?;
        r.get_mut().flush()?;
    }
}

pub fn run(a: Args) {
    let listener =
        TcpListener::bind(&a.listen).unwrap_or_else(|e| panic!("listen {}: {e}", a.listen));
    let mut response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
        a.body_size
    )
    .into_bytes();
    response.extend(std::iter::repeat_n(b'x', a.body_size));
    let response: Arc<[u8]> = response.into();
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => Some(tls_config(c, k)),
        _ => None,
    };
    let cores = parse_cores(&a.cores);
    pin(&cores, 0);
    eprintln!(
        "edgeshard-bench origin on {} ({} byte bodies{})",
        a.listen,
        a.body_size,
        if tls.is_some() { ", TLS" } else { "" }
    );
    for (i, s) in listener.incoming().flatten().enumerate() {
        let (response, tls, cores) = (response.clone(), tls.clone(), cores.clone());
        std::thread::spawn(move || {
            pin(&cores, i);
            let _ = s.set_nodelay(true);
            let _ = match tls {
                None => serve(s, &response),
                Some(cfg) => match rustls::ServerConnection::new(cfg) {
                    Ok(conn) => serve(rustls::StreamOwned::new(conn, s), &response),
                    Err(_) => Ok(()),
                },
            };
        });
    }
}
