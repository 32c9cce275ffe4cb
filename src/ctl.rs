//! `edgeshard ctl`: the runtime API from a shell (a small blocking HTTP/1.1 client: this runs
//! in the operator's terminal, never in a shard), and `edgeshard token new`.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

/// Exit codes scripts can trust.
pub const EXIT_OK: u8 = 0;
/// The appliance answered with an error (refused, not found, timed out waiting...).
pub const EXIT_REFUSED: u8 = 1;
/// Bad arguments, or no answer at all.
pub const EXIT_USAGE: u8 = 2;

/// A fresh random token (256 bits, hex) and its SHA-256, for `[[admin.token]]`.
pub fn token_new(name: &str, role: &str) -> Result<String, String> {
    let mut raw = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
        .map_err(|_| "no randomness available".to_string())?;
    let token = hex(&raw);
    let hash = hex(&crate::access::sha256(token.as_bytes()));
    Ok(format!(
        "token (give it to the client; it is not stored anywhere):\n{token}\n\n\
         config (only the hash lives there):\n[[admin.token]]\nname = \"{name}\"\nrole = \"{role}\"\nsha256 = \"{hash}\"\n"
    ))
}

fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(DIGITS[(x >> 4) as usize] as char);
        s.push(DIGITS[(x & 15) as usize] as char);
    }
    s
}

/// Where and how to reach the runtime API.
pub struct Target {
    /// host:port of the admin listener.
    pub authority: String,
    pub token: Option<String>,
    /// For an https:// admin URL: the client config trusting `--ca`, and the name to verify.
    tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
}

impl Target {
    /// `admin`: `http://HOST:PORT` (or `HOST:PORT`); the token from `token_file`, else from
    /// the EDGESHARD_TOKEN environment variable.
    /// `ca`: PEM trust anchors for an https:// admin listener's certificate.
    pub fn new(
        admin: &str,
        token_file: Option<&std::path::Path>,
        ca: Option<&std::path::Path>,
    ) -> Result<Target, String> {
        let https = admin.starts_with("https://");
        let authority = admin
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string();
        let tls = if https {
            let ca =
                ca.ok_or("an https:// admin URL needs --ca FILE (the certificate's issuer)")?;
            let roots = crate::config::tls::load_roots(ca)?;
            let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
            let host = match authority.rsplit_once(':') {
                Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
                None => authority.as_str(),
            };
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|_| format!("{host:?} is not a name to verify"))?;
            Some((Arc::new(c), name))
        } else {
            None
        };
        let token = match token_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| format!("{}: {e}", f.display()))?
                    .trim()
                    .to_string(),
            ),
            None => std::env::var("EDGESHARD_TOKEN")
                .ok()
                .map(|t| t.trim().to_string()),
        };
        // a token goes into a header line: nothing that could end it
        if token
            .as_ref()
            .is_some_and(|t| t.bytes().any(|b| b.is_ascii_control()))
        {
            return Err("the token holds control characters".into());
        }
        Ok(Target {
            authority,
            token,
            tls,
        })
    }

    /// One request; returns the status and the body parsed as JSON (or a string).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<(u16, Value), String> {
        // every address the name has, in order (localhost may be ::1 first)
        let addrs: Vec<_> = self
            .authority
            .to_socket_addrs()
            .map_err(|e| format!("{}: {e}", self.authority))?
            .collect();
        let mut last = format!("{}: no address", self.authority);
        let mut s = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
                Ok(c) => {
                    s = Some(c);
                    break;
                }
                Err(e) => last = format!("cannot reach {}: {e}", self.authority),
            }
        }
        let mut s = s.ok_or(last)?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: edgeshard-ctl\r\n",
            self.authority
        );
        if let Some(t) = &self.token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if method != "GET" {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(&body);
        let mut raw = Vec::new();
        match &self.tls {
            None => {
                s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
                s.read_to_end(&mut raw)
                    .map_err(|e| format!("reading the answer: {e}"))?;
            }
            Some((cfg, name)) => {
                let conn = rustls::ClientConnection::new(cfg.clone(), name.clone())
                    .map_err(|e| e.to_string())?;
                let mut t = rustls::StreamOwned::new(conn, s);
                t.write_all(req.as_bytes())
                    .map_err(|e| format!("TLS to {}: {e}", self.authority))?;
                // the server closes after its answer; a missing close_notify is not an error here
                match t.read_to_end(&mut raw) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
                    Err(e) => return Err(format!("reading the answer: {e}")),
                }
            }
        }
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP answer")?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or("no HTTP status")?;
        let v = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_string()));
        Ok((status, v))
    }
}

/// A readable table of every real server from /api/v1/services.
pub fn servers_table(v: &Value) -> String {
    let mut rows = vec![[
        "POOL".to_string(),
        "ADDRESS".into(),
        "STATE".into(),
        "HEALTH".into(),
        "WEIGHT".into(),
        "ACTIVE".into(),
        "REQUESTS".into(),
    ]];
    let mut pool = |name: String, p: &Value| {
        for r in p["real_servers"].as_array().into_iter().flatten() {
            let s = |k: &str| match &r[k] {
                Value::String(x) => x.clone(),
                Value::Null => "-".into(),
                x => x.to_string(),
            };
            rows.push([
                name.clone(),
                s("address"),
                s("state"),
                s("health"),
                s("weight"),
                s("active_connections"),
                s("requests_total"),
            ]);
        }
    };
    for vs in v["virtual_services"].as_array().into_iter().flatten() {
        let name = vs["name"].as_str().unwrap_or("?").to_string();
        pool(name.clone(), vs);
        for sub in vs["sub_services"].as_array().into_iter().flatten() {
            pool(
                format!("{name}/{}", sub["name"].as_str().unwrap_or("?")),
                sub,
            );
        }
    }
    let widths: Vec<usize> = (0..7)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            let cells: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            cells.join("  ").trim_end().to_string() + "\n"
        })
        .collect()
}
