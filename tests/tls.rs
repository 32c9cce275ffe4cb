//! TLS termination and re-encryption through the real binary, with certificates generated
//! here: SNI selection, protocol floor, keep-alive, upstream reuse and resumption, resumption
//! across shards, verification failures, bad input on the TLS port, the HTTPS redirect.

mod common;

use common::client::{one, Client};
use common::origin::Origin;
use common::pki::{any_cert_client, client_config, write_pem, Ca};
use common::tlsio::{connect, request, TlsOrigin};
use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

const GET: &[u8] = b"GET /tls HTTP/1.1\r\nHost: ws-ext.example\r\n\r\n";

/// A TLS virtual service in front of `servers`, with `certs` (name, cert, key) in order.
fn tls_config(
    listen: SocketAddr,
    servers: &[SocketAddr],
    certs: &[(std::path::PathBuf, std::path::PathBuf)],
    extra: &str,
    top: &str,
) -> String {
    let list: Vec<String> = certs
        .iter()
        .map(|(c, k)| {
            format!(
                "{{ cert = \"{}\", key = \"{}\" }}",
                c.display(),
                k.display()
            )
        })
        .collect();
    let mut s = format!(
        "{top}\n[runtime]\nshards = 2\noversubscribe = true\n[[virtual_service]]\nname = \"tls\"\nlisten = \"{listen}\"\n{extra}\n[virtual_service.tls]\ncertificates = [{}]\n",
        list.join(", ")
    );
    for a in servers {
        s.push_str(&format!(
            "[[virtual_service.real_server]]\naddress = \"{a}\"\n"
        ));
    }
    s
}

struct Setup {
    ca: Ca,
    dir: std::path::PathBuf,
    certs: Vec<(std::path::PathBuf, std::path::PathBuf)>,
}

fn setup() -> Setup {
    let ca = Ca::new("Test Public CA");
    let dir = tmpdir("tls");
    let a = ca
        .leaf(&["ws-ext.example", "meet.example"], false)
        .write(&dir, "a");
    let b = ca.leaf(&["*.dialin.example"], false).write(&dir, "b");
    Setup {
        ca,
        dir,
        certs: vec![a, b],
    }
}

fn presented(addr: SocketAddr, sni: Option<&str>) -> Vec<u8> {
    let cfg = any_cert_client(sni.is_some());
    let s = connect(addr, &cfg, sni.unwrap_or("ignored.example")).unwrap();
    s.conn.peer_certificates().unwrap()[0].as_ref().to_vec()
}

#[test]
fn sni_selects_the_certificate_and_no_sni_gets_the_first() {
    let st = setup();
    let o = Origin::ok("ok");
    let listen = local(free_port());
    let _p = Proxy::start(&tls_config(listen, &[o.addr], &st.certs, "", ""), listen);
    let der = |i: usize| {
        let pem = std::fs::read(&st.certs[i].0).unwrap();
        let cert = rustls_pemfile::certs(&mut pem.as_slice())
            .next()
            .unwrap()
            .unwrap();
        cert.as_ref().to_vec()
    };
    assert_eq!(presented(listen, Some("meet.example")), der(0));
    assert_eq!(presented(listen, Some("MEET.example")), der(0));
    assert_eq!(
        presented(listen, Some("x.dialin.example")),
        der(1),
        "wildcard"
    );
    assert_eq!(
        presented(listen, Some("a.b.dialin.example")),
        der(0),
        "a wildcard covers one label"
    );
    assert_eq!(
        presented(listen, None),
        der(0),
        "no SNI: the first certificate"
    );
    assert_eq!(presented(listen, Some("unknown.example")), der(0));
}

#[test]
fn https_keep_alive_reaches_the_origin_with_forwarded_proto() {
    let st = setup();
    let o = Origin::ok("hello over tls");
    let listen = local(free_port());
    let _p = Proxy::start(&tls_config(listen, &[o.addr], &st.certs, "", ""), listen);
    // rustls clients prefer AES-256-GCM; the appliance's own order picks AES-128-GCM.
    let cfg = client_config(&st.ca);
    let mut s = connect(listen, &cfg, "ws-ext.example").unwrap();
    assert_eq!(s.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(
        s.conn.negotiated_cipher_suite().map(|c| c.suite()),
        Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
    );
    for _ in 0..3 {
        let (r, back) = request(s, GET);
        s = back;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"hello over tls");
    }
    let seen = o.requests();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].header("x-forwarded-proto"), Some("https"));
    assert_eq!(o.connections.load(Ordering::SeqCst), 1);
    let _ = st.dir;
}

/// A ClientHello offering only `version` (record and body) and `suites`, no extensions.
fn client_hello(version: [u8; 2], suites: &[u16]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&version);
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // null compression
    let mut hs = vec![1u8];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, version[0], version[1]];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

/// Send raw bytes to the TLS port; returns what came back before the server closed.
fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

#[test]
fn old_protocols_weak_ciphers_and_plaintext_are_refused() {
    let st = setup();
    let o = Origin::ok("ok");
    let listen = local(free_port());
    let p = Proxy::start(&tls_config(listen, &[o.addr], &st.certs, "", ""), listen);
    // TLS 1.1 only (with a cipher suite rustls would otherwise accept in TLS 1.2)
    let back = raw_exchange(listen, &client_hello([3, 2], &[0xc02b, 0xc02f, 0x002f]));
    assert!(
        back.first() != Some(&0x16),
        "no ServerHello for TLS 1.1: {back:?}"
    );
    // TLS 1.2 with only CBC / RC4 suites
    let back = raw_exchange(
        listen,
        &client_hello([3, 3], &[0x002f, 0x0035, 0x0005, 0x000a]),
    );
    assert!(
        back.first() != Some(&0x16),
        "no ServerHello for weak ciphers: {back:?}"
    );
    // plaintext HTTP on the TLS port: no HTTP answer, just a TLS alert or close
    let back = raw_exchange(listen, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert!(!back.starts_with(b"HTTP/"), "{back:?}");
    wait_until(
        Duration::from_secs(5),
        "handshake failures logged with the client address",
        || {
            p.log().matches("TLS handshake failed").count() >= 3
                && p.log().contains("client=127.0.0.1:")
        },
    );
    assert_eq!(o.nr_requests(), 0);
    // and the service still works
    let cfg = client_config(&st.ca);
    let (r, _) = request(connect(listen, &cfg, "ws-ext.example").unwrap(), GET);
    assert_eq!(r.status, 200);
}

#[test]
fn sessions_resume_whichever_shard_the_connection_lands_on() {
    let st = setup();
    let o = Origin::ok("ok");
    let listen = local(free_port());
    let admin = local(free_port());
    let _p = Proxy::start(
        &tls_config(
            listen,
            &[o.addr],
            &st.certs,
            "",
            &format!("[admin]\nlisten = \"{admin}\"\n"),
        ),
        listen,
    );
    let cfg = client_config(&st.ca);
    let (r, _) = request(connect(listen, &cfg, "ws-ext.example").unwrap(), GET);
    assert_eq!(r.status, 200);
    // 16 more connections: the kernel spreads them over both shards
    for i in 0..16 {
        let s = connect(listen, &cfg, "ws-ext.example").unwrap();
        assert_eq!(
            s.conn.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed),
            "connection {i} was not resumed"
        );
        let (r, _) = request(s, GET);
        assert_eq!(r.status, 200);
    }
    let status: serde_json::Value =
        serde_json::from_slice(&admin_get(admin, "/status").body).unwrap();
    let per_shard: Vec<u64> = status["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["accepted_connections"].as_u64().unwrap())
        .collect();
    assert!(
        per_shard.iter().all(|&n| n > 0),
        "both shards accepted (and resumed) connections: {per_shard:?}"
    );
    // the server's side says the same: 17 handshakes, 16 of them resumed
    let m = metrics(admin);
    assert_eq!(m["edgeshard_tls_handshakes_total{service=\"tls\"}"], 17.0);
    assert_eq!(
        m["edgeshard_tls_resumed_handshakes_total{service=\"tls\"}"],
        16.0
    );
}

/// Two appliances sharing `[runtime] ticket_key_file` resume each other's sessions (a client
/// keeps its session across a failover); one with its own random keys does not.
#[test]
fn a_shared_ticket_key_file_resumes_sessions_across_appliances() {
    use std::os::unix::fs::PermissionsExt;
    let st = setup();
    let o = Origin::ok("ok");
    let keys = st.dir.join("tickets.keys");
    std::fs::write(
        &keys,
        format!(
            "# older\n{}\n# newest\n{}\n",
            "11".repeat(32),
            "22".repeat(32)
        ),
    )
    .unwrap();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).unwrap();
    let top = format!("[runtime]\nticket_key_file = \"{}\"\n", keys.display());
    let shared =
        |listen| tls_config(listen, &[o.addr], &st.certs, "", "").replace("[runtime]\n", &top);
    let (la, lb, lc) = (local(free_port()), local(free_port()), local(free_port()));
    let _a = Proxy::start(&shared(la), la);
    let _b = Proxy::start(&shared(lb), lb);
    let _c = Proxy::start(&tls_config(lc, &[o.addr], &st.certs, "", ""), lc);
    let cfg = client_config(&st.ca);
    let (r, _) = request(connect(la, &cfg, "ws-ext.example").unwrap(), GET);
    assert_eq!(r.status, 200);
    // the session from A resumes on B (the client's cache is keyed by the server name)
    let s = connect(lb, &cfg, "ws-ext.example").unwrap();
    assert_eq!(
        s.conn.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    assert_eq!(request(s, GET).0.status, 200);
    // and not on C, whose keys are its own: a full handshake that still works
    let s = connect(lc, &cfg, "ws-ext.example").unwrap();
    assert_eq!(s.conn.handshake_kind(), Some(rustls::HandshakeKind::Full));
    assert_eq!(request(s, GET).0.status, 200);
    // a key file others may read is refused, naming the field
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, text, _) = check_config(&shared(local(free_port())));
    assert!(
        !ok && text.contains("runtime.ticket_key_file") && text.contains("chmod 600"),
        "{text}"
    );
}

fn reencrypt_config(
    listen: SocketAddr,
    origin: SocketAddr,
    ca: &std::path::Path,
    server_name: &str,
) -> String {
    format!(
        "[runtime]\nshards = 1\n[[virtual_service]]\nlisten = \"{listen}\"\n[virtual_service.reencrypt]\nca = \"{}\"\nserver_name = \"{server_name}\"\n[[virtual_service.real_server]]\naddress = \"{origin}\"\n",
        ca.display()
    )
}

#[test]
fn reencryption_verifies_reuses_and_resumes_upstream_sessions() {
    let internal = Ca::new("Internal CA");
    let dir = tmpdir("reenc");
    let ca_path = write_pem(&dir, "internal-ca.pem", &internal.pem());
    let fe = internal.leaf(&["fe.contoso.local"], false);
    // keep-alive upstream: one handshake for many requests
    let origin = TlsOrigin::start(fe.server_config(), "front-end", false);
    let listen = local(free_port());
    let _p = Proxy::start(
        &reencrypt_config(listen, origin.addr, &ca_path, "fe.contoso.local"),
        listen,
    );
    let mut c = Client::connect(listen);
    for _ in 0..5 {
        let r = c.request(b"GET /x HTTP/1.1\r\nHost: ws-ext.example\r\n\r\n");
        assert_eq!((r.status, r.text()), (200, "front-end".to_string()));
    }
    assert_eq!(
        origin.handshakes.load(Ordering::SeqCst),
        1,
        "pooled upstream TLS connection reused"
    );
    assert!(origin.requests.lock().unwrap()[0].contains("X-Forwarded-Proto: http"));

    // an origin that closes after every response: each request reconnects, resuming
    let closing = TlsOrigin::start(fe.server_config(), "front-end", true);
    let listen2 = local(free_port());
    let _p2 = Proxy::start(
        &reencrypt_config(listen2, closing.addr, &ca_path, "fe.contoso.local"),
        listen2,
    );
    let mut c = Client::connect(listen2);
    for _ in 0..4 {
        assert_eq!(c.request(b"GET /y HTTP/1.1\r\nHost: a\r\n\r\n").status, 200);
    }
    assert_eq!(closing.handshakes.load(Ordering::SeqCst), 4);
    assert_eq!(
        closing.resumed.load(Ordering::SeqCst),
        3,
        "upstream sessions are resumed"
    );
}

#[test]
fn reencryption_failures_give_502_with_the_reason_logged() {
    let internal = Ca::new("Internal CA");
    let rogue = Ca::new("Rogue CA");
    let dir = tmpdir("reencfail");
    let ca_path = write_pem(&dir, "internal-ca.pem", &internal.pem());
    let cases = [
        (
            "unknown CA",
            rogue.leaf(&["fe.contoso.local"], false),
            "UnknownIssuer",
        ),
        (
            "wrong name",
            internal.leaf(&["other.contoso.local"], false),
            "not valid for name",
        ),
        (
            "expired",
            internal.leaf(&["fe.contoso.local"], true),
            "expired",
        ),
    ];
    for (what, leaf, reason) in cases {
        let origin = TlsOrigin::start(leaf.server_config(), "x", false);
        let listen = local(free_port());
        let p = Proxy::start(
            &reencrypt_config(listen, origin.addr, &ca_path, "fe.contoso.local"),
            listen,
        );
        let r = one(listen, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(r.status, 502, "{what}");
        let ok =
            || p.log().contains("re-encryption to real server failed") && p.log().contains(reason);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !ok() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(ok(), "{what}: log lacks {reason}: {}", p.log());
        assert!(
            origin.requests.lock().unwrap().is_empty(),
            "{what}: nothing sent to an unverified server"
        );
    }
}

#[test]
fn insecure_skip_verify_is_explicit_and_warned() {
    let rogue = Ca::new("Rogue CA");
    let origin = TlsOrigin::start(
        rogue.leaf(&["whatever"], false).server_config(),
        "unverified",
        false,
    );
    let listen = local(free_port());
    let cfg = format!(
        "[runtime]\nshards = 1\n[[virtual_service]]\nlisten = \"{listen}\"\n[virtual_service.reencrypt]\ninsecure_skip_verify = true\n[[virtual_service.real_server]]\naddress = \"{}\"\n",
        origin.addr
    );
    let p = Proxy::start(&cfg, listen);
    assert_eq!(
        one(listen, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").text(),
        "unverified"
    );
    // logged after "ready", by the thread that writes stderr
    wait_until(Duration::from_secs(5), "the NOT verified warning", || {
        p.log().contains("NOT verified")
    });
}

#[test]
fn plain_http_service_redirects_to_https() {
    let listen = local(free_port());
    let cfg = format!(
        "[runtime]\nshards = 1\n[[virtual_service]]\nname = \"http-redirect\"\nlisten = \"{listen}\"\n[virtual_service.redirect]\n"
    );
    let _p = Proxy::start(&cfg, listen);
    let mut c = Client::connect(listen);
    let r = c.request(b"GET /abs/path?q=1 HTTP/1.1\r\nHost: meet.example:80\r\n\r\n");
    assert_eq!(r.status, 301);
    assert_eq!(
        r.header("location"),
        Some("https://meet.example/abs/path?q=1")
    );
    // keep-alive holds for body-less requests
    let r = c.request(b"GET / HTTP/1.1\r\nHost: dialin.example\r\n\r\n");
    assert_eq!(r.header("location"), Some("https://dialin.example/"));
    let r = one(listen, b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(r.status, 400, "no Host, nowhere to redirect");
}

fn check_fails(toml: &str, words: &[&str]) {
    let (ok, err, _) = check_config(toml);
    assert!(!ok, "accepted: {toml}");
    for w in words {
        assert!(err.contains(w), "expected {w:?} in {err}");
    }
}

#[test]
fn bad_certificate_files_are_named_by_check() {
    let st = setup();
    let (a_cert, a_key) = &st.certs[0];
    let (_, b_key) = &st.certs[1];
    let vs = |cert: &std::path::Path, key: &std::path::Path| {
        format!(
            "[[virtual_service]]\nlisten = \"127.0.0.1:1443\"\n[virtual_service.tls]\ncertificates = [ {{ cert = \"{}\", key = \"{}\" }} ]\n",
            cert.display(),
            key.display()
        )
    };
    let missing = st.dir.join("missing.pem");
    check_fails(
        &vs(&missing, a_key),
        &["missing.pem", "cannot read", "tls.certificates[0].cert"],
    );
    check_fails(
        &vs(a_cert, b_key),
        &["b.key", "does not match", "tls.certificates[0].key"],
    );
    let garbage = write_pem(&st.dir, "garbage.pem", "not a certificate\n");
    check_fails(&vs(&garbage, a_key), &["garbage.pem", "no PEM certificate"]);
    let no_names = st.ca.leaf(&[], false).write(&st.dir, "nonames");
    check_fails(
        &vs(&no_names.0, &no_names.1),
        &["nonames.pem", "covers no DNS name"],
    );
    let bad_key = write_pem(
        &st.dir,
        "bad.key",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    );
    check_fails(&vs(a_cert, &bad_key), &["bad.key"]);
    check_fails(
        "[[virtual_service]]\nlisten = \"127.0.0.1:1444\"\n[virtual_service.reencrypt]\nserver_name = \"fe\"\n",
        &["reencrypt.ca", "insecure_skip_verify"],
    );
}

#[test]
fn rsa_certificates_work_too() {
    // RSA keys come from openssl (rcgen's ring backend cannot generate them).
    let dir = tmpdir("rsa");
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=rsa.example",
            "-addext",
            "subjectAltName=DNS:rsa.example",
        ])
        .arg("-keyout")
        .arg(dir.join("rsa.key"))
        .arg("-out")
        .arg(dir.join("rsa.pem"))
        .output()
        .expect("openssl (installed by .ci/run)");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let o = Origin::ok("rsa");
    let listen = local(free_port());
    let certs = vec![(dir.join("rsa.pem"), dir.join("rsa.key"))];
    let _p = Proxy::start(&tls_config(listen, &[o.addr], &certs, "", ""), listen);
    let (r, _) = request(
        connect(listen, &any_cert_client(true), "rsa.example").unwrap(),
        GET,
    );
    assert_eq!(r.body, b"rsa");
}

/// `headers.hsts` is sent to HTTPS clients, replacing the real server's own.
#[test]
fn hsts_is_sent_over_https() {
    let st = setup();
    let o = Origin::ok("ok");
    let listen = local(free_port());
    let _p = Proxy::start(
        &tls_config(
            listen,
            &[o.addr],
            &st.certs,
            "[virtual_service.headers]\nhsts = \"max-age=31536000; includeSubDomains\"\nresponse = [ { set = \"X-TLS\", value = \"${tls_version} ${sni}\" } ]\n",
            "",
        ),
        listen,
    );
    let (r, _) = request(
        connect(listen, &client_config(&st.ca), "ws-ext.example").unwrap(),
        GET,
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("strict-transport-security"),
        Some("max-age=31536000; includeSubDomains")
    );
    assert_eq!(r.header("x-tls"), Some("TLSv1.3 ws-ext.example"));
}
