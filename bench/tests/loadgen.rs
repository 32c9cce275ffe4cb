//! The load generator's own correctness against a local origin that counts what it serves:
//! request counts, latency histogram bounds, open-loop rate control, new-connection mode.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A counting origin: answers every request after `delay`, counts requests and connections.
fn origin(delay: Duration) -> (String, Arc<AtomicU64>, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (reqs, conns) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (r2, c2) = (reqs.clone(), conns.clone());
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            c2.fetch_add(1, Ordering::SeqCst);
            let r3 = r2.clone();
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                let mut line = String::new();
                loop {
                    line.clear();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        std::thread::sleep(delay);
                        r3.fetch_add(1, Ordering::SeqCst);
                        if w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, reqs, conns)
}

fn load(args: &[&str]) -> serde_json::Value {
    let dir = std::env::temp_dir().join(format!(
        "loadgen-{}-{}",
        std::process::id(),
        args.join("").len()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("out.json");
    let out = Command::new(env!("CARGO_BIN_EXE_edgeshard-bench"))
        .arg("load")
        .args(args)
        .args(["--quiet", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

#[test]
fn request_budget_is_exact_and_counted_by_the_origin() {
    let (addr, reqs, conns) = origin(Duration::ZERO);
    let v = load(&[
        "--url",
        &format!("http://{addr}/"),
        "--connections",
        "4",
        "--requests",
        "1000",
    ]);
    assert_eq!(v["requests"], 1000);
    assert_eq!(reqs.load(Ordering::SeqCst), 1000);
    assert_eq!(
        conns.load(Ordering::SeqCst),
        4,
        "keep-alive: one connection each"
    );
    assert_eq!(v["errors"]["read"], 0);
}

#[test]
fn latency_reflects_the_origin_delay() {
    let (addr, _, _) = origin(Duration::from_millis(20));
    let v = load(&[
        "--url",
        &format!("http://{addr}/"),
        "--connections",
        "2",
        "--requests",
        "40",
    ]);
    let p50 = v["latency_ms"]["p50"].as_f64().unwrap();
    assert!(
        (20.0..60.0).contains(&p50),
        "p50 {p50} ms for a 20 ms origin"
    );
    assert!(v["latency_ms"]["max"].as_f64().unwrap() >= p50);
}

#[test]
fn open_loop_holds_the_rate_and_counts_waiting_time() {
    let (addr, reqs, _) = origin(Duration::ZERO);
    let v = load(&[
        "--url",
        &format!("http://{addr}/"),
        "--connections",
        "4",
        "--rate",
        "400",
        "--duration",
        "2",
    ]);
    let n = reqs.load(Ordering::SeqCst) as f64;
    assert!(
        (700.0..=820.0).contains(&n),
        "{n} requests at 400/s for 2 s"
    );
    // a slow origin under open loop: latency includes the time requests waited their turn
    let (slow, _, _) = origin(Duration::from_millis(50));
    let v2 = load(&[
        "--url",
        &format!("http://{slow}/"),
        "--connections",
        "1",
        "--rate",
        "40",
        "--duration",
        "1",
    ]);
    let p99 = v2["latency_ms"]["p99"].as_f64().unwrap();
    assert!(
        p99 > 100.0,
        "coordinated omission hidden: p99 {p99} ms with 50 ms service at 40/s on one connection"
    );
    let _ = v;
}

#[test]
fn new_connection_mode_opens_one_per_request() {
    let (addr, reqs, conns) = origin(Duration::ZERO);
    let v = load(&[
        "--url",
        &format!("http://{addr}/"),
        "--connections",
        "2",
        "--requests",
        "50",
        "--new-connection",
    ]);
    assert_eq!(v["requests"], 50);
    assert_eq!(reqs.load(Ordering::SeqCst), 50);
    assert_eq!(conns.load(Ordering::SeqCst), 50);
}
