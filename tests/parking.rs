//! Idle keep-alive connections park without a task: they are counted as parked, answered
//! when they speak again, closed at their idle timeout (and logged so), and closed at
//! shutdown.

mod common;

use common::client::{get, Client};
use common::origin::{Next, Origin, Seen};
use common::*;
use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

fn parked(admin: std::net::SocketAddr) -> u64 {
    let r = admin_get(admin, "/metrics");
    r.text()
        .lines()
        .filter(|l| l.starts_with("edgeshard_shard_parked_connections{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// A proxy in front of `o` with an admin listener: (proxy, service address, admin address).
fn with_admin(o: &Origin) -> (Proxy, std::net::SocketAddr, std::net::SocketAddr) {
    let listen = local(free_port());
    let admin = local(free_port());
    let p = Proxy::start(
        &simple_config(
            listen,
            &[o.addr],
            "",
            &format!("[admin]\nlisten = \"{admin}\"\n"),
        ),
        listen,
    );
    (p, listen, admin)
}

#[test]
fn idle_connections_park_and_are_served_again() {
    let o = Origin::named("a");
    let (_p, listen, admin) = with_admin(&o);
    assert_eq!(parked(admin), 0);
    let mut clients: Vec<Client> = (0..40).map(|_| Client::connect(listen)).collect();
    for c in clients.iter_mut() {
        assert_eq!(c.request(&get("/first")).status, 200);
    }
    // Every one of them is now idle: parked, on whichever shard took it.
    wait_until(Duration::from_secs(5), "40 parked connections", || {
        parked(admin) == 40
    });
    // Each speaks again on the same connection and is answered from its parked state.
    for (i, c) in clients.iter_mut().enumerate() {
        let r = c.request(&get(&format!("/again/{i}")));
        assert_eq!(r.status, 200, "connection {i}");
        assert_eq!(r.text(), "a");
    }
    let seen = o.requests();
    assert_eq!(
        seen.iter()
            .filter(|s| s.request_line.starts_with("GET /again/"))
            .count(),
        40
    );
    wait_until(Duration::from_secs(5), "parked again", || {
        parked(admin) == 40
    });
    // A client that leaves is forgotten; the others stay parked.
    clients.truncate(10);
    wait_until(Duration::from_secs(5), "10 left parked", || {
        parked(admin) == 10
    });
    for c in clients.iter_mut() {
        assert_eq!(c.request(&get("/last")).status, 200);
    }
}

#[test]
fn a_parked_connection_is_closed_at_its_idle_timeout_and_logged() {
    let o = Origin::ok("ok");
    let listen = local(free_port());
    let admin = local(free_port());
    let dir = tmpdir("parking-log");
    let log = dir.join("connection.log");
    let p = Proxy::start(
        &simple_config(
            listen,
            &[o.addr],
            "idle_timeout = \"400ms\"",
            &format!(
                "[admin]\nlisten = \"{admin}\"\n[log]\nconnection = \"{}\"\nformat = \"json\"\n",
                log.display()
            ),
        ),
        listen,
    );
    let mut c = Client::connect(listen);
    assert_eq!(c.request(&get("/")).status, 200);
    let started = std::time::Instant::now();
    assert!(c.is_closed(), "the proxy closes the idle connection");
    let waited = started.elapsed();
    assert!(
        // the timer started as the answer went out, a little before the client read it
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
    assert_eq!(parked(admin), 0);
    wait_until(Duration::from_secs(5), "the close record", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("\"close\"") && l.contains("idle_timeout"))
    });
    drop(p);
}

#[test]
fn shutdown_closes_parked_connections_and_exits() {
    let o = Origin::ok("ok");
    let (mut p, listen, admin) = with_admin(&o);
    let mut clients: Vec<Client> = (0..8).map(|_| Client::connect(listen)).collect();
    for c in clients.iter_mut() {
        assert_eq!(c.request(&get("/")).status, 200);
    }
    wait_until(Duration::from_secs(5), "8 parked", || parked(admin) == 8);
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(5)), Some(0));
    for c in clients.iter_mut() {
        assert!(c.is_closed());
    }
}

#[test]
fn the_idle_timeout_counts_from_when_the_connection_went_idle() {
    // A request that takes longer than the idle timeout, then a pause shorter than it: the
    // connection must still be there (the idle time starts when the response is done).
    let o = Origin::start(Arc::new(|s: &Seen, w: &mut TcpStream| {
        if s.request_line.starts_with("GET /slow") {
            std::thread::sleep(Duration::from_millis(900));
        }
        let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        Next::KeepAlive
    }));
    let listen = local(free_port());
    let _p = Proxy::start(
        &simple_config(listen, &[o.addr], "idle_timeout = \"600ms\"", ""),
        listen,
    );
    let mut c = Client::connect(listen);
    assert_eq!(c.request(&get("/slow")).status, 200);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        c.request(&get("/again")).status,
        200,
        "closed before its idle timeout"
    );
    let started = std::time::Instant::now();
    assert!(c.is_closed());
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "closed early"
    );
}
