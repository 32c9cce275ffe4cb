//! rustls configurations, built once per shard from the loaded config: termination with SNI
//! certificate selection and session tickets any shard can decrypt, and re-encryption to real
//! servers with verification (and session resumption) per shard.

use crate::config::{tls::ServerCert, Reencrypt, Tls};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::{ClientHello, NoServerSessionStorage, ProducesTickets, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::cell::RefCell;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

const ALPN_HTTP11: &[u8] = b"http/1.1";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    // ring's suites are all AEAD (AES-GCM, ChaCha20-Poly1305); rustls has no CBC or RC4.
    let mut p = rustls::crypto::ring::default_provider();
    // AES-128-GCM first, as BoringSSL and Go order it: its SHA-256 key schedule runs on the
    // CPU's SHA extensions, where SHA-384 has none (15 % of a full handshake's CPU here).
    p.cipher_suites.sort_by_key(|s| {
        use rustls::CipherSuite as C;
        let v13 = matches!(s, rustls::SupportedCipherSuite::Tls13(_));
        let rank = match s.suite() {
            C::TLS13_AES_128_GCM_SHA256
            | C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
            C::TLS13_AES_256_GCM_SHA384
            | C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            | C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
            _ => 2,
        };
        (!v13, rank)
    });
    Arc::new(p)
}

/// Session-ticket keys shared by every shard without a lock: master secrets fixed at
/// start-up (random, or from `[runtime] ticket_key_file`, newest last); each ticket period's
/// AES-256-GCM key is derived from a master (HKDF) and cached per thread. The newest master
/// encrypts; every master decrypts (a ticket names its master by a 4-byte id), so appliances
/// sharing the file resume each other's sessions and a rotation keeps recent tickets valid.
/// Tickets of the current and the previous period decrypt: a ticket lives one to two periods.
#[derive(Debug)]
pub struct TicketKeys {
    id: u64,
    /// Newest last; each with its id (the first 4 bytes of its SHA-256).
    masters: Vec<([u8; 4], [u8; 32])>,
    period_secs: u64,
    rng: SystemRandom,
}

thread_local! {
    /// The last derived key: (keys id, master index, period, key).
    static TICKET_KEY: RefCell<Option<(u64, usize, u64, LessSafeKey)>> = const { RefCell::new(None) };
}

impl TicketKeys {
    /// `masters`: from a key file, newest last; None: one random master (this process only).
    pub fn new(period_secs: u64, masters: Option<&[[u8; 32]]>) -> Result<Arc<TicketKeys>, String> {
        let rng = SystemRandom::new();
        let masters: Vec<[u8; 32]> = match masters {
            Some(m) if !m.is_empty() => m.to_vec(),
            _ => {
                let mut master = [0u8; 32];
                rng.fill(&mut master)
                    .map_err(|_| "no randomness for session-ticket keys".to_string())?;
                vec![master]
            }
        };
        let mut id = [0u8; 8];
        rng.fill(&mut id).map_err(|_| "no randomness".to_string())?;
        Ok(Arc::new(TicketKeys {
            id: u64::from_le_bytes(id),
            masters: masters
                .into_iter()
                .map(|m| {
                    let h = crate::access::sha256(&m);
                    ([h[0], h[1], h[2], h[3]], m)
                })
                .collect(),
            period_secs: period_secs.max(60),
            rng,
        }))
    }

    /// The master secrets, newest last (handed to the process that replaces this one).
    pub fn masters(&self) -> Vec<[u8; 32]> {
        self.masters.iter().map(|(_, m)| *m).collect()
    }

    fn period_now(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            / self.period_secs
    }

    /// Run `f` with master `m`'s key of `period` (None only if key derivation failed).
    fn with_key<T>(&self, m: usize, period: u64, f: impl FnOnce(&LessSafeKey) -> T) -> Option<T> {
        let master = &self.masters.get(m)?.1;
        TICKET_KEY.with(|cell| {
            let mut slot = cell.borrow_mut();
            let fresh =
                !matches!(&*slot, Some((id, i, p, _)) if *id == self.id && *i == m && *p == period);
            if fresh {
                let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"edgeshard ticket").extract(master);
                let info = period.to_be_bytes();
                let info = [&info[..]];
                let key = prk
                    .expand(&info, &AES_256_GCM)
                    .map(|o| LessSafeKey::new(UnboundKey::from(o)));
                *slot = Some((self.id, m, period, key.ok()?));
            }
            slot.as_ref().map(|(_, _, _, k)| f(k))
        })
    }
}

/// Read a ticket key file: one master per line as 64 hex digits, newest last; blank lines
/// and `#` comments ignored; at most 8 kept (the newest).
pub fn read_ticket_keys(text: &str) -> Result<Vec<[u8; 32]>, String> {
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let b = line.as_bytes();
        if b.len() != 64 || !b.iter().all(u8::is_ascii_hexdigit) {
            return Err(format!("line {}: expected 64 hex digits", i + 1));
        }
        let mut k = [0u8; 32];
        for (j, pair) in b.chunks(2).enumerate() {
            k[j] = u8::from_str_radix(std::str::from_utf8(pair).map_err(|e| e.to_string())?, 16)
                .map_err(|e| e.to_string())?;
        }
        keys.push(k);
    }
    if keys.is_empty() {
        return Err("no key in the file".into());
    }
    let skip = keys.len().saturating_sub(8);
    Ok(keys.split_off(skip))
}

impl ProducesTickets for TicketKeys {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.period_secs.min(u32::MAX as u64) as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let period = self.period_now();
        let m = self.masters.len() - 1;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(4 + 8 + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&self.masters[m].0);
        out.extend_from_slice(&period.to_be_bytes());
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        self.with_key(m, period, |k| {
            k.seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&period.to_be_bytes()),
                &mut body,
            )
        })?
        .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < 4 + 8 + NONCE_LEN + 16 {
            return None;
        }
        let m = self
            .masters
            .iter()
            .rposition(|(id, _)| cipher[..4] == id[..])?;
        let cipher = &cipher[4..];
        let period = u64::from_be_bytes(cipher[..8].try_into().ok()?);
        let now = self.period_now();
        if period != now && period.checked_add(1) != Some(now) {
            return None;
        }
        let nonce: [u8; NONCE_LEN] = cipher[8..8 + NONCE_LEN].try_into().ok()?;
        let mut body = cipher[8 + NONCE_LEN..].to_vec();
        let len = self
            .with_key(m, period, |k| {
                k.open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(&period.to_be_bytes()),
                    &mut body,
                )
                .map(|p| p.len())
            })?
            .ok()?;
        body.truncate(len);
        Some(body)
    }
}

/// Picks the certificate for a client hello's SNI: exact DNS name, then wildcard, else the
/// first certificate.
#[derive(Debug)]
pub struct SniResolver {
    certs: Vec<ServerCert>,
}

impl SniResolver {
    pub fn new(certs: Vec<ServerCert>) -> SniResolver {
        SniResolver { certs }
    }

    pub fn select(&self, sni: Option<&str>) -> Option<&ServerCert> {
        if let Some(name) = sni {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some(c) = self.certs.iter().find(|c| c.names.contains(&name)) {
                return Some(c);
            }
            // a wildcard covers exactly one label
            if let Some((_, parent)) = name.split_once('.') {
                let wild = format!("*.{parent}");
                if let Some(c) = self.certs.iter().find(|c| c.names.contains(&wild)) {
                    return Some(c);
                }
            }
        }
        self.certs.first()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let c = self.select(hello.server_name())?;
        // the stapled form when there is a current status (a lock-free load)
        match c.stapled.as_ref().and_then(|s| s.load_full()) {
            Some(k) => Some(k),
            None => Some(c.key.clone()),
        }
    }
}

/// The termination config of one virtual service.
pub fn server_config(tls: &Tls, tickets: Arc<TicketKeys>) -> Result<Arc<ServerConfig>, String> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver::new(tls.certs.clone())));
    cfg.alpn_protocols = tls.alpn.clone();
    // The appliance's order, not the client's (as HAProxy and nginx do by default).
    cfg.ignore_client_order = true;
    cfg.ticketer = tickets;
    // Stateless tickets only: a per-shard session cache would miss on the other shards.
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    cfg.send_tls13_tickets = 2;
    Ok(Arc::new(cfg))
}

/// Accepts any certificate: only with `insecure_skip_verify = true`, warned at start-up.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The re-encryption config of one virtual service, per shard (its session cache is then
/// only ever touched by one thread).
pub fn client_config(r: &Reencrypt) -> Result<Arc<ClientConfig>, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let mut cfg = match (&r.roots, r.insecure_skip_verify) {
        (_, true) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
            .with_no_client_auth(),
        (Some(roots), false) => builder
            .with_root_certificates(roots.clone())
            .with_no_client_auth(),
        (None, false) => return Err("re-encryption without a CA".into()),
    };
    cfg.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(cfg))
}

/// The connector of `tls` health checks on services that do not re-encrypt: any certificate,
/// no ALPN.
pub fn probe_connector() -> &'static futures_rustls::TlsConnector {
    static PROBE: std::sync::OnceLock<futures_rustls::TlsConnector> = std::sync::OnceLock::new();
    PROBE.get_or_init(|| {
        let cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("the provider supports TLS 1.2 and 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
            .with_no_client_auth();
        futures_rustls::TlsConnector::from(Arc::new(cfg))
    })
}

/// The SNI of a `tls` health check: `host` (a name or address, a port dropped).
pub fn probe_name(host: &str) -> ServerName<'static> {
    let h = match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => host,
    };
    let h = h.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(h.to_string())
        .unwrap_or_else(|_| ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()))
}

/// The name a real server is verified against: the configured one, else its host.
pub fn upstream_name(r: &Reencrypt, real_server: &str) -> Result<ServerName<'static>, String> {
    let host = match &r.server_name {
        Some(n) => n.as_str(),
        None => match real_server.rsplit_once(':') {
            Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
            None => real_server,
        },
    };
    ServerName::try_from(host.to_string())
        .map_err(|_| format!("{host:?} is not a valid server name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_round_trip_and_reject_tampering() {
        let t = TicketKeys::new(3600, None).unwrap();
        let c = t.encrypt(b"session state").unwrap();
        assert_eq!(t.decrypt(&c).unwrap(), b"session state");
        let mut bad = c.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(t.decrypt(&bad).is_none());
        assert!(t.decrypt(&c[..10]).is_none());
        // another appliance's keys cannot read it
        let other = TicketKeys::new(3600, None).unwrap();
        assert!(other.decrypt(&c).is_none());
        // appliances sharing a key file read each other's; after a rotation (a newer key
        // appended) the older tickets still decrypt and new ones use the newest key
        let file = read_ticket_keys(&format!("# pair keys\n{}\n", "ab".repeat(32))).unwrap();
        let (a, b) = (
            TicketKeys::new(3600, Some(&file)).unwrap(),
            TicketKeys::new(3600, Some(&file)).unwrap(),
        );
        let ca = a.encrypt(b"s").unwrap();
        assert_eq!(b.decrypt(&ca).unwrap(), b"s");
        let rotated =
            read_ticket_keys(&format!("{}\n{}\n", "ab".repeat(32), "cd".repeat(32))).unwrap();
        let r = TicketKeys::new(3600, Some(&rotated)).unwrap();
        assert_eq!(r.decrypt(&ca).unwrap(), b"s");
        assert!(
            b.decrypt(&r.encrypt(b"n").unwrap()).is_none(),
            "the newest encrypts"
        );
        assert!(read_ticket_keys("zz").is_err() && read_ticket_keys("# none").is_err());
        // decryptable from another thread (another shard)
        let t2 = t.clone();
        let c2 = c.clone();
        assert_eq!(
            std::thread::spawn(move || t2.decrypt(&c2))
                .join()
                .unwrap()
                .unwrap(),
            b"session state"
        );
    }
}
