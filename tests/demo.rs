//! The README's first command works: `edgeshard demo` serves curl-able responses.

mod common;

use common::client::one;
use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn demo_serves_through_both_sample_real_servers() {
    let mut child = Command::new(bin())
        .arg("demo")
        // from any directory: the demo's config is built in
        .current_dir(tmpdir("demo-cwd"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = local(8080);
    wait_until(Duration::from_secs(20), "demo listening on :8080", || {
        std::net::TcpStream::connect(addr).is_ok()
    });
    let a = one(addr, b"GET /hello HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let b = one(addr, b"GET /hello HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!((a.status, b.status), (200, 200));
    assert!(a.text().starts_with("hello from real server 127.0.0.1:900"));
    let servers = [
        a.header("x-real-server").unwrap(),
        b.header("x-real-server").unwrap(),
    ];
    assert!(servers.contains(&"127.0.0.1:9001") || servers.contains(&"127.0.0.1:9002"));
}
