//! Start-up is all-or-nothing; SIGTERM/SIGINT stop accepting, let in-flight requests finish
//! and exit 0; a too-low locked-memory limit is named with what to raise.

mod common;

use common::client::{get, Client};
use common::origin::{Next, Origin, Seen};
use common::*;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[test]
fn sigterm_drains_in_flight_requests_then_exits_zero() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let hold = Arc::new(AtomicBool::new(true));
        let h2 = hold.clone();
        let o = Origin::start(Arc::new(move |_s: &Seen, w: &mut TcpStream| {
            wait_until(Duration::from_secs(30), "release", || {
                !h2.load(Ordering::SeqCst)
            });
            let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\ndrain");
            Next::KeepAlive
        }));
        let listen = local(free_port());
        let mut p = Proxy::start(&simple_config(listen, &[o.addr], "", ""), listen);
        let mut c = Client::connect(listen);
        c.send(&get("/in-flight"));
        wait_until(Duration::from_secs(5), "request at the origin", || {
            o.nr_requests() == 1
        });
        p.signal(sig);
        wait_until(Duration::from_secs(5), "proxy stops accepting", || {
            TcpStream::connect(listen).is_err()
        });
        assert!(
            p.child.try_wait().unwrap().is_none(),
            "must wait for the in-flight request"
        );
        hold.store(false, Ordering::SeqCst);
        let r = c.read(false).unwrap();
        assert_eq!(r.body, b"drain");
        assert_eq!(
            r.header("connection"),
            Some("close"),
            "draining ends keep-alive"
        );
        assert_eq!(p.wait_exit(Duration::from_secs(10)), Some(0), "{}", p.log());
    }
}

#[test]
fn idle_keep_alive_connections_do_not_hold_up_shutdown() {
    let o = Origin::ok("ok");
    let listen = local(free_port());
    let mut p = Proxy::start(&simple_config(listen, &[o.addr], "", ""), listen);
    let mut c = Client::connect(listen);
    assert_eq!(c.request(&get("/")).status, 200);
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(3)), Some(0));
    assert!(c.is_closed());
}

#[test]
fn a_listener_that_cannot_be_bound_stops_start_up() {
    // A socket without SO_REUSEPORT holds the port: no shard may bind it.
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap();
    let free = local(free_port());
    let dir = tmpdir("bind");
    let path = dir.join("c.toml");
    std::fs::write(
        &path,
        format!("[runtime]\nshards = 2\noversubscribe = true\n[[virtual_service]]\nlisten = \"{free}\"\n[[virtual_service]]\nlisten = \"{taken}\"\n"),
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&taken.to_string()) && err.contains("cannot listen"),
        "{err}"
    );
    assert!(
        TcpStream::connect(free).is_err(),
        "nothing keeps serving after a failed start"
    );
}

#[test]
fn too_low_locked_memory_limit_is_named() {
    let dir = tmpdir("memlock");
    let path = dir.join("c.toml");
    std::fs::write(
        &path,
        format!("[[virtual_service]]\nlisten = \"{}\"\n", local(free_port())),
    )
    .unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(["run", "--config"]).arg(&path);
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 64 * 1024,
                rlim_max: 64 * 1024,
            };
            libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("RLIMIT_MEMLOCK") && err.contains("ulimit -l"),
        "{err}"
    );
}
