//! The admin /status endpoint: appliance-wide active connection counts summed over shards
//! through the mesh, with the per-shard split.

mod common;

use common::client::{get, one, Client};
use common::origin::{Next, Origin, Seen};
use common::*;
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn status(admin: std::net::SocketAddr) -> serde_json::Value {
    let r = admin_get(admin, "/status");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    serde_json::from_slice(&r.body).expect("status is JSON")
}

#[test]
fn status_sums_active_connections_across_shards() {
    let hold = Arc::new(AtomicBool::new(true));
    let h2 = hold.clone();
    let o = Origin::start(Arc::new(move |_s: &Seen, w: &mut TcpStream| {
        wait_until(Duration::from_secs(60), "release", || {
            !h2.load(Ordering::SeqCst)
        });
        let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        Next::KeepAlive
    }));
    let listen = local(free_port());
    let admin = local(free_port());
    let cfg = simple_config(
        listen,
        &[o.addr],
        "",
        &format!("[admin]\nlisten = \"{admin}\"\n"),
    );
    let _p = Proxy::start(&cfg, listen);

    // Idle at first.
    let s = status(admin);
    let rs = &s["virtual_services"][0]["real_servers"][0];
    assert_eq!(rs["address"], o.addr.to_string());
    assert_eq!(rs["status"], "up");
    assert_eq!(rs["active_connections"], 0);
    assert_eq!(s["shards"].as_array().unwrap().len(), 2);

    // 16 long-lived requests from different source ports: the kernel spreads them over both
    // shards (all on one shard has probability 2^-15).
    const N: usize = 16;
    let mut clients: Vec<Client> = (0..N).map(|_| Client::connect(listen)).collect();
    for c in clients.iter_mut() {
        c.send(&get("/hold"));
    }
    wait_until(Duration::from_secs(10), "origin holds all requests", || {
        o.nr_requests() == N
    });
    let mut last = serde_json::Value::Null;
    wait_until(
        Duration::from_secs(5),
        "status shows every held connection",
        || {
            last = status(admin);
            last["virtual_services"][0]["real_servers"][0]["active_connections"] == N
        },
    );
    let per_shard: Vec<u64> = last["virtual_services"][0]["real_servers"][0]
        ["active_connections_per_shard"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(per_shard.len(), 2);
    assert_eq!(per_shard.iter().sum::<u64>(), N as u64);
    assert!(
        per_shard.iter().all(|&n| n > 0),
        "both shards carry load: {per_shard:?}"
    );
    // busy time per shard too (the shard thread's CPU time)
    assert!(last["shards"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["busy_seconds"].as_f64().is_some_and(|b| b > 0.0)));
    // accepted counts per shard come over the mesh too
    let accepted: u64 = last["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["accepted_connections"].as_u64().unwrap())
        .sum();
    assert!(accepted >= N as u64);

    hold.store(false, Ordering::SeqCst);
    for c in clients.iter_mut() {
        assert_eq!(c.read(false).unwrap().status, 200);
    }
    wait_until(Duration::from_secs(5), "counts return to zero", || {
        status(admin)["virtual_services"][0]["real_servers"][0]["active_connections"] == 0
    });
}

#[test]
fn admin_answers_404_for_unknown_paths() {
    let o = Origin::ok("ok");
    let listen = local(free_port());
    let admin = local(free_port());
    let cfg = simple_config(
        listen,
        &[o.addr],
        "",
        &format!("[admin]\nlisten = \"{admin}\"\n"),
    );
    let _p = Proxy::start(&cfg, listen);
    assert_eq!(admin_get(admin, "/nope").status, 404);
}

#[test]
fn a_service_can_be_served_by_chosen_cores_only() {
    let o = Origin::ok("ok");
    let only = local(free_port());
    let both = local(free_port());
    let admin = local(free_port());
    let cfg = format!(
        "[admin]\nlisten = \"{admin}\"\n[runtime]\ncores = [0, 1]\n\
         [[runtime.shard]]\ncore = 0\nservices = [\"both\"]\n\
         [[runtime.shard]]\ncore = 1\nservices = [\"only\", \"both\"]\nring_depth = 128\nbacklog = 64\n\
         [[virtual_service]]\nname = \"only\"\nlisten = \"{only}\"\n[[virtual_service.real_server]]\naddress = \"{a}\"\n\
         [[virtual_service]]\nname = \"both\"\nlisten = \"{both}\"\n[[virtual_service.real_server]]\naddress = \"{a}\"\n",
        a = o.addr
    );
    let _p = Proxy::start(&cfg, only);
    let accepted = || -> Vec<u64> {
        status(admin)["shards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["accepted_connections"].as_u64().unwrap())
            .collect()
    };
    let before = accepted();
    for _ in 0..12 {
        assert_eq!(one(only, &get("/")).status, 200);
    }
    let after = accepted();
    assert_eq!(
        after[0], before[0],
        "shard 0 (core 0) does not serve \"only\""
    );
    // (at least: the start-up probe's connection may be counted late)
    assert!(after[1] >= before[1] + 12, "{before:?} -> {after:?}");
    // the other service is served by both shards as usual
    assert_eq!(one(both, &get("/")).status, 200);
}
