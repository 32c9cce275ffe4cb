//! OCSP stapling: for each certificate of a service with `ocsp_stapling = true`, a status
//! from the responder its AIA extension names (or from `ocsp_response_file`), verified
//! (signature by the issuer or its delegated responder, the certificate's serial, validity)
//! and handed to every shard's TLS resolver through a lock-free swap. Fetching runs on one
//! thread of its own, never on a shard; a responder that fails leaves the last good status
//! stapled until it expires; a revoked certificate is never stapled.

use arc_swap::ArcSwapOption;
use der::{Decode, Encode};
use ring::signature;
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use x509_cert::Certificate;
use x509_ocsp::{
    BasicOcspResponse, CertId, CertStatus, OcspRequest, OcspResponse, OcspResponseStatus, Request,
    ResponderId, TbsRequest, Version,
};

/// Refreshes that stapled a fresh status, and those that failed (for /metrics).
pub static REFRESH_OK: AtomicU64 = AtomicU64::new(0);
pub static REFRESH_ERROR: AtomicU64 = AtomicU64::new(0);

/// A failed refresh is tried again after this long (the last good status stays stapled).
const RETRY: Duration = Duration::from_secs(60);
/// A status is refreshed halfway to its nextUpdate, at most this long after it was fetched.
const MAX_AGE: Duration = Duration::from_secs(12 * 3600);
/// Clock skew tolerated on thisUpdate.
const SKEW: Duration = Duration::from_secs(300);
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_RESPONSE: usize = 64 * 1024;
/// How long a status without nextUpdate stays stapled.
const NO_NEXT_UPDATE: Duration = Duration::from_secs(24 * 3600);

/// One certificate whose status is stapled.
pub struct Entry {
    name: String,
    plain: Arc<CertifiedKey>,
    leaf: Certificate,
    issuer: Certificate,
    url: Option<String>,
    file: Option<PathBuf>,
    /// What the shards' resolvers serve: the certificate with its current status.
    pub stapled: Arc<ArcSwapOption<CertifiedKey>>,
    due: Mutex<SystemTime>,
    /// The stapled status's nextUpdate (after it, it is withdrawn).
    expires: Mutex<Option<SystemTime>>,
}

impl Entry {
    /// Staple a verified status; returns when to refresh it (halfway to its nextUpdate).
    fn install(
        &self,
        der: Vec<u8>,
        this: SystemTime,
        next: Option<SystemTime>,
        now: SystemTime,
    ) -> Duration {
        let mut ck = CertifiedKey::new(self.plain.cert.clone(), self.plain.key.clone());
        ck.ocsp = Some(der);
        self.stapled.store(Some(Arc::new(ck)));
        if let Ok(mut x) = self.expires.lock() {
            // a status with no nextUpdate is not served for ever: a day at most
            *x = Some(next.unwrap_or(this + NO_NEXT_UPDATE));
        }
        let half = next
            .and_then(|n| n.duration_since(this).ok())
            .map_or(MAX_AGE, |d| (d / 2).min(MAX_AGE))
            .max(Duration::from_secs(10))
            .min(test_refresh().unwrap_or(MAX_AGE));
        if let Ok(mut d) = self.due.lock() {
            *d = now + half;
        }
        half
    }
}

/// Tests only: refresh (and retry) at least this often (`EDGESHARD_OCSP_REFRESH_SECS`).
fn test_refresh() -> Option<Duration> {
    std::env::var("EDGESHARD_OCSP_REFRESH_SECS")
        .ok()?
        .parse()
        .ok()
        .map(Duration::from_secs)
}

fn registry() -> &'static Mutex<HashMap<Vec<u8>, Arc<Entry>>> {
    static R: OnceLock<Mutex<HashMap<Vec<u8>, Arc<Entry>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

fn parse(der: &CertificateDer<'_>) -> Result<Certificate, String> {
    Certificate::from_der(der.as_ref()).map_err(|e| format!("unreadable certificate: {e}"))
}

/// The responder URL in a certificate's Authority Information Access extension.
fn responder_url(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    for ext in cert.extensions() {
        if let x509_parser::extensions::ParsedExtension::AuthorityInfoAccess(aia) =
            ext.parsed_extension()
        {
            for d in &aia.accessdescs {
                // id-ad-ocsp
                if d.access_method.to_id_string() == "1.3.6.1.5.5.7.48.1" {
                    if let x509_parser::extensions::GeneralName::URI(u) = &d.access_location {
                        return Some(u.to_string());
                    }
                }
            }
        }
    }
    None
}

/// Register a certificate for stapling (at config load, on the main thread); returns where
/// its stapled form will appear. The same certificate across reloads keeps its entry and
/// status. `file`: the operator fetches the status; else the AIA responder is asked.
pub fn register(
    name: &str,
    plain: &Arc<CertifiedKey>,
    file: Option<PathBuf>,
) -> Result<Arc<ArcSwapOption<CertifiedKey>>, String> {
    let chain = &plain.cert;
    let leaf_der = chain.first().ok_or("an empty certificate chain")?;
    let issuer_der = chain.get(1).ok_or(
        "OCSP stapling needs the issuer: put the intermediate (or CA) certificate after the leaf in the cert file",
    )?;
    let url = responder_url(leaf_der);
    if url.is_none() && file.is_none() {
        return Err("the certificate names no OCSP responder (Authority Information Access): set ocsp_response_file".into());
    }
    if let Some(u) = &url {
        if file.is_none() && !u.starts_with("http://") {
            return Err(format!("OCSP responder {u}: only http:// responders are supported (OCSP is signed; set ocsp_response_file for another scheme)"));
        }
    }
    // the whole chain (a re-issued intermediate is another entry, with its own chain) and
    // the file
    let mut key: Vec<u8> = chain
        .iter()
        .flat_map(|c| c.as_ref().iter().copied())
        .collect();
    key.push(0);
    key.extend_from_slice(
        file.as_ref()
            .map_or(&b""[..], |f| f.as_os_str().as_encoded_bytes()),
    );
    let mut reg = registry().lock().map_err(|_| "OCSP registry poisoned")?;
    if let Some(e) = reg.get(&key) {
        if e.file.is_some() {
            // a reload reads the operator's file again: a bad one refuses the reload
            let now = SystemTime::now();
            let der = fetch(e)?;
            let (this, next) = verify(&der, &e.leaf, &e.issuer, now)?;
            e.install(der, this, next, now);
        }
        return Ok(e.stapled.clone());
    }
    let entry = Arc::new(Entry {
        name: name.to_string(),
        plain: plain.clone(),
        leaf: parse(leaf_der)?,
        issuer: parse(issuer_der)?,
        url,
        file,
        stapled: Arc::new(ArcSwapOption::empty()),
        due: Mutex::new(UNIX_EPOCH),
        expires: Mutex::new(None),
    });
    if entry.file.is_some() {
        // the operator's file is checked now: a bad one refuses the configuration
        let now = SystemTime::now();
        let der = fetch(&entry)?;
        let (this, next) = verify(&der, &entry.leaf, &entry.issuer, now)?;
        entry.install(der, this, next, now);
    }
    reg.insert(key, entry.clone());
    Ok(entry.stapled.clone())
}

/// Start fetching (once the process serves; `check` never fetches).
pub fn start() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let _ = std::thread::Builder::new()
            .name("ocsp".into())
            .spawn(refresher);
    });
}

/// The refresher thread: each entry when it is due.
fn refresher() {
    loop {
        let entries: Vec<Arc<Entry>> = match registry().lock() {
            Ok(mut r) => {
                // certificates no configuration uses any more (a reload replaced them)
                r.retain(|_, e| Arc::strong_count(&e.stapled) > 1);
                r.values().cloned().collect()
            }
            Err(_) => return,
        };
        let now = SystemTime::now();
        for e in &entries {
            let due = e.due.lock().map(|d| *d).unwrap_or(now);
            if due <= now {
                refresh(e, now);
            }
            // an expired status is withdrawn, never served
            if let Ok(mut x) = e.expires.lock() {
                if x.is_some_and(|t| t <= now) {
                    *x = None;
                    e.stapled.store(None);
                    tracing::warn!(certificate = %e.name, "OCSP status expired without a fresh one: stapling stopped");
                }
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn refresh(e: &Entry, now: SystemTime) {
    let r = fetch(e).and_then(|der| verify(&der, &e.leaf, &e.issuer, now).map(|v| (der, v)));
    match r {
        Ok((der, (this, next))) => {
            let half = e.install(der, this, next, now);
            REFRESH_OK.fetch_add(1, Ordering::Relaxed);
            tracing::info!(certificate = %e.name, next_refresh = ?half, "OCSP status stapled");
        }
        Err(why) => {
            REFRESH_ERROR.fetch_add(1, Ordering::Relaxed);
            if why.contains("revoked") {
                // never staple a revocation; the certificate needs replacing
                e.stapled.store(None);
                if let Ok(mut x) = e.expires.lock() {
                    *x = None;
                }
                tracing::error!(certificate = %e.name, "OCSP: {why}");
            } else {
                tracing::warn!(certificate = %e.name, "OCSP refresh failed (the last good status, if any, stays stapled until it expires): {why}");
            }
            if let Ok(mut d) = e.due.lock() {
                *d = now + test_refresh().unwrap_or(RETRY).min(RETRY);
            }
        }
    }
}

/// The DER OCSP response for the entry: from its file, or from its responder.
fn fetch(e: &Entry) -> Result<Vec<u8>, String> {
    if let Some(f) = &e.file {
        return std::fs::read(f).map_err(|x| format!("{}: {x}", f.display()));
    }
    let url = e.url.as_deref().ok_or("no responder")?;
    let body = request_der(&e.leaf, &e.issuer)?;
    http_post(url, &body)
}

/// An OCSP request for the leaf, its CertID hashed with SHA-1 (what responders expect).
pub fn request_der(leaf: &Certificate, issuer: &Certificate) -> Result<Vec<u8>, String> {
    let req = OcspRequest {
        tbs_request: TbsRequest {
            version: Version::V1,
            requestor_name: None,
            request_list: vec![Request {
                req_cert: cert_id(leaf, issuer)?,
                single_request_extensions: None,
            }],
            request_extensions: None,
        },
        optional_signature: None,
    };
    req.to_der().map_err(|e| e.to_string())
}

fn sha1(b: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, b)
        .as_ref()
        .to_vec()
}

fn cert_id(leaf: &Certificate, issuer: &Certificate) -> Result<CertId, String> {
    let name = issuer
        .tbs_certificate
        .subject
        .to_der()
        .map_err(|e| e.to_string())?;
    let key = issuer
        .tbs_certificate
        .subject_public_key_info
        .subject_public_key
        .raw_bytes();
    Ok(CertId {
        hash_algorithm: x509_cert::spki::AlgorithmIdentifierOwned {
            oid: der::oid::ObjectIdentifier::new_unwrap("1.3.14.3.2.26"),
            parameters: Some(der::asn1::Null.into()),
        },
        issuer_name_hash: der::asn1::OctetString::new(sha1(&name)).map_err(|e| e.to_string())?,
        issuer_key_hash: der::asn1::OctetString::new(sha1(key)).map_err(|e| e.to_string())?,
        serial_number: leaf.tbs_certificate.serial_number.clone(),
    })
}

/// POST the request to an http:// responder; the response body.
fn http_post(url: &str, body: &[u8]) -> Result<Vec<u8>, String> {
    let rest = url.strip_prefix("http://").ok_or("not an http:// URL")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let hostport = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("{authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority}: no address"))?;
    let mut s =
        TcpStream::connect_timeout(&addr, FETCH_TIMEOUT).map_err(|e| format!("{url}: {e}"))?;
    let _ = s.set_read_timeout(Some(FETCH_TIMEOUT));
    let _ = s.set_write_timeout(Some(FETCH_TIMEOUT));
    let head = format!(
        "POST {path} HTTP/1.0\r\nHost: {authority}\r\nContent-Type: application/ocsp-request\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())
        .and_then(|_| s.write_all(body))
        .map_err(|e| format!("{url}: {e}"))?;
    // one deadline for the whole answer: a responder trickling bytes must not hold the
    // thread (and every other certificate's refresh) for long
    let deadline = std::time::Instant::now() + FETCH_TIMEOUT;
    let mut resp = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(format!("{url}: no whole answer within {FETCH_TIMEOUT:?}"));
        }
        let _ = s.set_read_timeout(Some(left));
        let n = s.read(&mut chunk).map_err(|e| format!("{url}: {e}"))?;
        resp.extend_from_slice(&chunk[..n]);
        if resp.len() > MAX_RESPONSE + 4096 {
            return Err(format!("{url}: response too large"));
        }
        let mut hdrs = [httparse::EMPTY_HEADER; 32];
        let mut r = httparse::Response::new(&mut hdrs);
        let head = match r.parse(&resp) {
            Ok(httparse::Status::Complete(h)) => Some(h),
            Ok(httparse::Status::Partial) => None,
            Err(_) => return Err(format!("{url}: not an HTTP response")),
        };
        if let Some(h) = head {
            if r.code != Some(200) {
                return Err(format!("{url}: HTTP status {}", r.code.unwrap_or(0)));
            }
            let length = r
                .headers
                .iter()
                .find(|x| x.name.eq_ignore_ascii_case("content-length"))
                .and_then(|x| {
                    std::str::from_utf8(x.value)
                        .ok()?
                        .trim()
                        .parse::<usize>()
                        .ok()
                });
            match length {
                Some(l) if l > MAX_RESPONSE => return Err(format!("{url}: response too large")),
                // whole by its length: no need to wait for the responder to close
                Some(l) if resp.len() >= h + l => return Ok(resp[h..h + l].to_vec()),
                None if n == 0 => return Ok(resp[h..].to_vec()),
                _ => {}
            }
        }
        if n == 0 {
            return Err(format!("{url}: the answer was cut short"));
        }
    }
}

/// The raw bytes of the first element inside the DER SEQUENCE `outer` (what a signature
/// covers: re-encoding the decoded value is not guaranteed to give the same bytes).
fn first_element(outer: &[u8]) -> Option<&[u8]> {
    fn tlv_len(b: &[u8]) -> Option<(usize, usize)> {
        // (header length, content length)
        let l0 = *b.get(1)? as usize;
        if l0 < 0x80 {
            return Some((2, l0));
        }
        let n = l0 & 0x7f;
        if n == 0 || n > 4 || b.len() < 2 + n {
            return None;
        }
        let len = b[2..2 + n]
            .iter()
            .fold(0usize, |a, &x| (a << 8) | x as usize);
        Some((2 + n, len))
    }
    let (h, _) = tlv_len(outer)?;
    let inner = outer.get(h..)?;
    let (ih, il) = tlv_len(inner)?;
    inner.get(..ih + il)
}

/// Check a signature by the key in `spki` over `data`.
fn verify_sig(
    alg: &der::oid::ObjectIdentifier,
    spki: &x509_cert::spki::SubjectPublicKeyInfoOwned,
    data: &[u8],
    sig: &[u8],
) -> Result<(), String> {
    let key = spki.subject_public_key.raw_bytes();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<der::oid::ObjectIdentifier>().ok())
        .map(|o| o.to_string());
    let p384 = curve.as_deref() == Some("1.3.132.0.34");
    let algo: &dyn signature::VerificationAlgorithm = match alg.to_string().as_str() {
        "1.2.840.113549.1.1.11" => &signature::RSA_PKCS1_2048_8192_SHA256,
        "1.2.840.113549.1.1.12" => &signature::RSA_PKCS1_2048_8192_SHA384,
        "1.2.840.113549.1.1.13" => &signature::RSA_PKCS1_2048_8192_SHA512,
        "1.2.840.113549.1.1.5" => &signature::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
        "1.2.840.10045.4.3.2" if p384 => &signature::ECDSA_P384_SHA256_ASN1,
        "1.2.840.10045.4.3.2" => &signature::ECDSA_P256_SHA256_ASN1,
        "1.2.840.10045.4.3.3" if p384 => &signature::ECDSA_P384_SHA384_ASN1,
        "1.2.840.10045.4.3.3" => &signature::ECDSA_P256_SHA384_ASN1,
        "1.3.101.112" => &signature::ED25519,
        other => return Err(format!("unsupported signature algorithm {other}")),
    };
    signature::UnparsedPublicKey::new(algo, key)
        .verify(data, sig)
        .map_err(|_| "bad signature".to_string())
}

fn unix(t: &x509_ocsp::OcspGeneralizedTime) -> SystemTime {
    UNIX_EPOCH + t.0.to_unix_duration()
}

/// Verify a DER OCSP response for `leaf`: a successful basic response, signed by the issuer
/// or by a responder certificate the issuer signed for OCSP, saying "good" for this serial,
/// current. Returns (thisUpdate, nextUpdate).
pub fn verify(
    der: &[u8],
    leaf: &Certificate,
    issuer: &Certificate,
    now: SystemTime,
) -> Result<(SystemTime, Option<SystemTime>), String> {
    let resp = OcspResponse::from_der(der).map_err(|e| format!("not an OCSP response: {e}"))?;
    if resp.response_status != OcspResponseStatus::Successful {
        return Err(format!("responder answered {:?}", resp.response_status));
    }
    let bytes = resp.response_bytes.ok_or("no response bytes")?;
    if bytes.response_type.to_string() != "1.3.6.1.5.5.7.48.1.1" {
        return Err("not a basic OCSP response".into());
    }
    let raw = bytes.response.as_bytes();
    let basic = BasicOcspResponse::from_der(raw).map_err(|e| format!("bad basic response: {e}"))?;
    let tbs = first_element(raw).ok_or("bad basic response encoding")?;
    // who signed: the issuer itself, or a delegated responder certificate it issued
    let issuer_key_hash = sha1(
        issuer
            .tbs_certificate
            .subject_public_key_info
            .subject_public_key
            .raw_bytes(),
    );
    let names_issuer = match &basic.tbs_response_data.responder_id {
        ResponderId::ByName(n) => *n == issuer.tbs_certificate.subject,
        ResponderId::ByKey(k) => k.as_bytes() == issuer_key_hash.as_slice(),
    };
    let signer_spki = if names_issuer {
        issuer.tbs_certificate.subject_public_key_info.clone()
    } else {
        let delegated = basic
            .certs
            .as_ref()
            .and_then(|cs| {
                cs.iter()
                    .find(|c| match &basic.tbs_response_data.responder_id {
                        ResponderId::ByName(n) => c.tbs_certificate.subject == *n,
                        ResponderId::ByKey(k) => {
                            sha1(
                                c.tbs_certificate
                                    .subject_public_key_info
                                    .subject_public_key
                                    .raw_bytes(),
                            ) == k.as_bytes()
                        }
                    })
            })
            .ok_or("signed by a responder that is neither the issuer nor a certificate it sent")?;
        if delegated.tbs_certificate.issuer != issuer.tbs_certificate.subject {
            return Err(
                "the responder certificate is not issued by the certificate's issuer".into(),
            );
        }
        let dder = delegated.to_der().map_err(|e| e.to_string())?;
        let dtbs = first_element(&dder).ok_or("bad responder certificate")?;
        verify_sig(
            &delegated.signature_algorithm.oid,
            &issuer.tbs_certificate.subject_public_key_info,
            dtbs,
            delegated.signature.raw_bytes(),
        )
        .map_err(|e| format!("responder certificate: {e}"))?;
        let ocsp_signing = delegated
            .tbs_certificate
            .extensions
            .iter()
            .flatten()
            .filter(|x| x.extn_id.to_string() == "2.5.29.37")
            .any(|x| {
                x509_cert::ext::pkix::ExtendedKeyUsage::from_der(x.extn_value.as_bytes())
                    .is_ok_and(|eku| eku.0.iter().any(|o| o.to_string() == "1.3.6.1.5.5.7.3.9"))
            });
        if !ocsp_signing {
            return Err("the responder certificate is not for OCSP signing".into());
        }
        let validity = &delegated.tbs_certificate.validity;
        if validity.not_before.to_system_time() > now + SKEW
            || validity.not_after.to_system_time() <= now
        {
            return Err("the responder certificate is not valid now".into());
        }
        delegated.tbs_certificate.subject_public_key_info.clone()
    };
    verify_sig(
        &basic.signature_algorithm.oid,
        &signer_spki,
        tbs,
        basic.signature.raw_bytes(),
    )?;
    let want = cert_id(leaf, issuer)?;
    let single = basic
        .tbs_response_data
        .responses
        .iter()
        .find(|s| {
            s.cert_id.serial_number == want.serial_number
                && s.cert_id.issuer_key_hash == want.issuer_key_hash
        })
        .ok_or("the response is not about this certificate")?;
    match single.cert_status {
        CertStatus::Good(_) => {}
        CertStatus::Revoked(_) => return Err("the certificate is revoked".into()),
        CertStatus::Unknown(_) => return Err("the responder does not know the certificate".into()),
    }
    let this = unix(&single.this_update);
    if this > now + SKEW {
        return Err("the status is from the future (clock skew?)".into());
    }
    let next = single.next_update.as_ref().map(unix);
    if next.is_some_and(|n| n <= now) {
        return Err("the status has expired (nextUpdate passed)".into());
    }
    Ok((this, next))
}
