//! OCSP stapling against a real responder (`openssl ocsp` on loopback, a CA and leaves made in
//! the test whose AIA names it), checked with `openssl s_client -status`: a good status is
//! stapled, kept while the responder is down, a revoked one never stapled; an operator's
//! response file; configurations that cannot staple are refused.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (tests/run installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and leaves `good` (serial 1001) and `revoked` (serial 1002) whose AIA names the
/// responder on `port`; the responder's index says which is which.
fn pki(dir: &Path, port: u16) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "5",
            "-subj",
            "/CN=Test OCSP CA",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        format!("subjectAltName=DNS:web.example\nauthorityInfoAccess=OCSP;URI:http://127.0.0.1:{port}/\n"),
    )
    .unwrap();
    for (name, serial) in [("good", "0x1001"), ("revoked", "0x1002")] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                "/CN=web.example",
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-set_serial",
                serial,
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
                "-out",
                &format!("{name}.pem"),
            ],
        );
        let chain = std::fs::read_to_string(dir.join(format!("{name}.pem"))).unwrap()
            + &std::fs::read_to_string(dir.join("ca.pem")).unwrap();
        std::fs::write(dir.join(format!("{name}-chain.pem")), chain).unwrap();
    }
    std::fs::write(
        dir.join("index.txt"),
        "V\t301231235959Z\t\t1001\tunknown\t/CN=web.example\nR\t301231235959Z\t260101000000Z\t1002\tunknown\t/CN=web.example\n",
    )
    .unwrap();
}

struct Responder(Child);

impl Drop for Responder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn responder(dir: &Path, port: u16) -> Responder {
    let child = Command::new("openssl")
        .args([
            "ocsp",
            "-index",
            "index.txt",
            "-port",
            &port.to_string(),
            "-rsigner",
            "ca.pem",
            "-rkey",
            "ca.key",
            "-CA",
            "ca.pem",
            "-ndays",
            "1",
        ])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // probed with a real query: openssl's single-threaded responder spins on a connection
    // that closes without one
    let url = format!("http://127.0.0.1:{port}/");
    wait_until(
        Duration::from_secs(10),
        "the OCSP responder answering",
        || {
            Command::new("openssl")
                .args([
                    "ocsp", "-issuer", "ca.pem", "-cert", "good.pem", "-url", &url,
                ])
                .args(["-noverify", "-timeout", "2"])
                .current_dir(dir)
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("good.pem: good"))
        },
    );
    Responder(child)
}

/// What `openssl s_client -status` says about the staple.
fn staple(listen: std::net::SocketAddr) -> String {
    let mut c = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &listen.to_string(),
            "-servername",
            "web.example",
            "-status",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop(c.stdin.take());
    let out = c.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if text.contains("OCSP response: no response sent") {
        return "none".into();
    }
    match text.split("Cert Status: ").nth(1) {
        Some(s) => s.lines().next().unwrap_or("").trim().to_string(),
        None => format!("unreadable: {text}"),
    }
}

fn service(
    dir: &Path,
    cert: &str,
    extra: &str,
) -> (String, std::net::SocketAddr, std::net::SocketAddr) {
    let (listen, admin) = (local(free_port()), local(free_port()));
    let cfg = simple_config(
        listen,
        &[local(free_port())],
        &format!(
            "[virtual_service.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\"{extra} }}]\nocsp_stapling = true\n",
            dir.join(format!("{cert}-chain.pem")).display(),
            dir.join(format!("{cert}.key")).display()
        ),
        &format!("[admin]\nlisten = \"{admin}\"\n"),
    );
    (cfg, listen, admin)
}

fn start(cfg: &str, admin: std::net::SocketAddr) -> Proxy {
    // refreshes every second, so that a responder going away is noticed in the test's time
    Proxy::start_with_env(cfg, admin, &[("EDGESHARD_OCSP_REFRESH_SECS", "1")])
}

fn refreshes(admin: std::net::SocketAddr, result: &str) -> f64 {
    metrics(admin)
        .get(&format!(
            "edgeshard_ocsp_refreshes_total{{result=\"{result}\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
}

#[test]
fn a_good_status_is_stapled_and_kept_while_the_responder_is_down() {
    let dir = tmpdir("ocsp-good");
    let port = free_port();
    pki(&dir, port);
    let r = responder(&dir, port);
    let (cfg, listen, admin) = service(&dir, "good", "");
    let _p = start(&cfg, admin);
    wait_until(Duration::from_secs(15), "a stapled good status", || {
        staple(listen) == "good"
    });
    assert!(refreshes(admin, "ok") >= 1.0);
    // the responder goes away: refreshes fail, the last good status stays stapled
    drop(r);
    let before = refreshes(admin, "error");
    wait_until(Duration::from_secs(15), "a failed refresh", || {
        refreshes(admin, "error") > before
    });
    assert_eq!(
        staple(listen),
        "good",
        "the last good status is still stapled"
    );
}

#[test]
fn a_revoked_certificate_is_never_stapled() {
    let dir = tmpdir("ocsp-revoked");
    let port = free_port();
    pki(&dir, port);
    let _r = responder(&dir, port);
    let (cfg, listen, admin) = service(&dir, "revoked", "");
    let p = start(&cfg, admin);
    wait_until(Duration::from_secs(15), "the revocation seen", || {
        p.log().contains("revoked")
    });
    assert!(refreshes(admin, "error") >= 1.0);
    assert_eq!(staple(listen), "none");
}

#[test]
fn an_operators_response_file_and_refusals() {
    let dir = tmpdir("ocsp-file");
    let port = free_port();
    pki(&dir, port);
    {
        let _r = responder(&dir, port);
        openssl(
            &dir,
            &[
                "ocsp",
                "-issuer",
                "ca.pem",
                "-cert",
                "good.pem",
                "-url",
                &format!("http://127.0.0.1:{port}/"),
                "-respout",
                "good.der",
                "-noverify",
            ],
        );
    }
    // no responder running: the file is what is stapled
    let extra = format!(
        ", ocsp_response_file = \"{}\"",
        dir.join("good.der").display()
    );
    let (cfg, listen, admin) = service(&dir, "good", &extra);
    let p = start(&cfg, admin);
    wait_until(Duration::from_secs(10), "the file's status stapled", || {
        staple(listen) == "good"
    });
    // a reload reads the file again: garbage there refuses the reload, the status stays
    let good = std::fs::read(dir.join("good.der")).unwrap();
    std::fs::write(dir.join("good.der"), b"garbage").unwrap();
    p.signal(libc::SIGHUP);
    wait_until(Duration::from_secs(10), "the reload refused", || {
        metrics(admin)
            .get("edgeshard_config_reloads_total{result=\"error\"}")
            .is_some_and(|v| *v >= 1.0)
    });
    assert_eq!(staple(listen), "good");
    std::fs::write(dir.join("good.der"), good).unwrap();
    // refused at load: a file that is not a response for this certificate, a chain with no
    // issuer to check it against
    std::fs::write(dir.join("junk.der"), b"not DER").unwrap();
    let bad: PathBuf = dir.join("junk.der");
    let (cfg, _, _) = service(
        &dir,
        "good",
        &format!(", ocsp_response_file = \"{}\"", bad.display()),
    );
    let (ok, out, _) = check_config(&cfg);
    assert!(!ok && out.contains("ocsp_response_file"), "{out}");
    let (cfg, _, _) = service(
        &dir,
        "revoked",
        &format!(
            ", ocsp_response_file = \"{}\"",
            dir.join("good.der").display()
        ),
    );
    let (ok, out, _) = check_config(&cfg);
    assert!(!ok && out.contains("not about this certificate"), "{out}");
    let cfg = cfg.replace("revoked-chain.pem", "revoked.pem");
    let (ok, out, _) = check_config(&cfg);
    assert!(!ok && out.contains("issuer"), "{out}");
}
