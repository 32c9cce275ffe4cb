//! Several active appliances behind equal-cost multipath routing, in network namespaces the
//! test makes: a router hashes connections (L4) over two appliances that both hold the VIP.
//! Whichever appliance a connection lands on, a client address reaches the same real server
//! (source-IP persistence by rendezvous hashing) and a cookie is honoured (shared key); when
//! one appliance is withdrawn, only its connections move, and to the same real servers.
//! Needs root (CI has it); without root it says so and skips.

mod common;

use common::netns::{is_root, Lab};
use common::origin::{Next, Origin, Seen};
use common::{bin, tmpdir, wait_until};
use std::collections::{HashMap, HashSet};
use std::io::{BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

const VIP: &str = "10.216.0.100";
const KEY: &str = "0badc0de0badc0de0badc0de0badc0de0badc0de0badc0de0badc0de0badc0de";

fn config(servers: &[SocketAddr]) -> String {
    let mut s = format!(
        "[runtime]\nshards = 1\ndrain_timeout = \"1s\"\npersistence_key = \"{KEY}\"\n\
         [admin]\nlisten = \"127.0.0.1:9900\"\n"
    );
    for (name, port, persistence) in [
        ("sip", 80, "mode = \"source-ip\""),
        ("ck", 81, "mode = \"active-cookie\"\ncookie = \"S\""),
    ] {
        s.push_str(&format!(
            "[[virtual_service]]\nname = \"{name}\"\nlisten = \"0.0.0.0:{port}\"\n\
             [virtual_service.persistence]\n{persistence}\n"
        ));
        for a in servers {
            s.push_str(&format!(
                "[[virtual_service.real_server]]\naddress = \"{a}\"\n"
            ));
        }
    }
    s
}

/// One request on a fresh connection from `src` to the VIP: (real server, set cookie).
fn get(src: IpAddr, port: u16, cookie: Option<&str>) -> (String, Option<String>) {
    use socket2::{Domain, Socket, Type};
    let sk = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    sk.bind(&SocketAddr::new(src, 0).into()).unwrap();
    let vip: SocketAddr = format!("{VIP}:{port}").parse().unwrap();
    sk.connect_timeout(&vip.into(), Duration::from_secs(2))
        .unwrap();
    let mut s: TcpStream = sk.into();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let cookie = cookie
        .map(|c| format!("Cookie: {c}\r\n"))
        .unwrap_or_default();
    s.write_all(format!("GET / HTTP/1.1\r\nHost: vip\r\n{cookie}\r\n").as_bytes())
        .unwrap();
    let r = common::client::read_response(&mut BufReader::new(s), false).unwrap();
    assert_eq!(r.status, 200);
    let set = r
        .header("set-cookie")
        .map(|c| c.split(';').next().unwrap().to_string());
    (r.text(), set)
}

/// Requests each appliance has served (from its own /metrics, inside its namespace).
fn served(lab: &Lab, lb: &str) -> f64 {
    lab.in_ns(lb, || {
        let m = common::admin_get("127.0.0.1:9900".parse().unwrap(), "/metrics").text();
        m.lines()
            .filter(|l| l.starts_with("edgeshard_requests_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    })
    .join()
    .unwrap()
}

#[test]
fn ecmp_appliances_agree_on_persistence_and_a_withdrawal_moves_only_its_flows() {
    if !is_root() {
        eprintln!("skipped: needs root for network namespaces (CI runs as root)");
        return;
    }
    let dir = tmpdir("ecmp");
    let mut lab = Lab::new("ec");
    for n in ["cl", "rt", "lb1", "lb2", "srv", "sw"] {
        lab.add(n);
    }
    // front: client - router - two appliances
    lab.link(
        "cl",
        "eth0",
        Some("10.214.1.2/24"),
        "rt",
        "c0",
        Some("10.214.1.1/24"),
    );
    lab.link(
        "rt",
        "l1",
        Some("10.214.2.1/24"),
        "lb1",
        "f0",
        Some("10.214.2.2/24"),
    );
    lab.link(
        "rt",
        "l2",
        Some("10.214.3.1/24"),
        "lb2",
        "f0",
        Some("10.214.3.2/24"),
    );
    lab.ip("cl", &["route", "add", "default", "via", "10.214.1.1"]);
    let clients: Vec<IpAddr> = (10..40u8).map(|i| IpAddr::from([10, 214, 1, i])).collect();
    for c in &clients {
        lab.ip("cl", &["addr", "add", &format!("{c}/24"), "dev", "eth0"]);
    }
    for (lb, gw) in [("lb1", "10.214.2.1"), ("lb2", "10.214.3.1")] {
        lab.ip(lb, &["addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
        lab.ip(lb, &["route", "add", "10.214.1.0/24", "via", gw]);
    }
    let rt = lab.ns("rt");
    for kv in [
        "net.ipv4.ip_forward=1",
        "net.ipv4.fib_multipath_hash_policy=1",
    ] {
        common::netns::sh(&["ip", "netns", "exec", &rt, "sysctl", "-qw", kv]);
    }
    let vip32 = format!("{VIP}/32");
    lab.ip(
        "rt",
        &[
            "route",
            "add",
            &vip32,
            "nexthop",
            "via",
            "10.214.2.2",
            "nexthop",
            "via",
            "10.214.3.2",
        ],
    );
    // back: the appliances and the real servers on a bridge
    lab.ip("sw", &["link", "add", "br0", "type", "bridge"]);
    lab.ip("sw", &["link", "set", "br0", "up"]);
    for (name, addr) in [
        ("srv", "10.215.0.3/24"),
        ("lb1", "10.215.0.11/24"),
        ("lb2", "10.215.0.12/24"),
    ] {
        let port = format!("p{name}");
        lab.link("sw", &port, None, name, "b0", Some(addr));
        lab.ip("sw", &["link", "set", &port, "master", "br0"]);
    }
    let origins: Vec<Origin> = lab
        .in_ns("srv", || {
            ["a", "b", "c", "d"]
                .into_iter()
                .map(|name: &'static str| {
                    Origin::start_on(
                        "10.215.0.3:0".parse().unwrap(),
                        std::sync::Arc::new(move |_s: &Seen, w: &mut TcpStream| {
                            let _ = write!(w, "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n{name}");
                            Next::KeepAlive
                        }),
                    )
                })
                .collect()
        })
        .join()
        .unwrap();
    let servers: Vec<SocketAddr> = origins.iter().map(|o| o.addr).collect();
    let conf = dir.join("edgeshard.toml");
    std::fs::write(&conf, config(&servers)).unwrap();
    let conf = conf.display().to_string();
    for lb in ["lb1", "lb2"] {
        lab.spawn(
            lb,
            &[bin(), "run", "--config", &conf],
            &dir.join(format!("{lb}.log")),
        );
    }
    wait_until(Duration::from_secs(20), "both appliances ready", || {
        ["lb1.log", "lb2.log"].iter().all(|f| {
            std::fs::read_to_string(dir.join(f)).is_ok_and(|l| l.contains("edgeshard ready"))
        })
    });
    // every client address, 6 connections each (different source ports: different hashes)
    let round = |clients: Vec<IpAddr>| {
        lab.in_ns("cl", move || {
            let mut chosen: HashMap<IpAddr, HashSet<String>> = HashMap::new();
            for c in &clients {
                for _ in 0..6 {
                    chosen.entry(*c).or_default().insert(get(*c, 80, None).0);
                }
            }
            chosen
        })
        .join()
        .unwrap()
    };
    let before = round(clients.clone());
    let (s1, s2) = (served(&lab, "lb1"), served(&lab, "lb2"));
    eprintln!("connections per appliance: lb1 {s1}, lb2 {s2}");
    assert!(
        s1 > 20.0 && s2 > 20.0,
        "ECMP spread the connections: {s1} / {s2}"
    );
    for (c, servers) in &before {
        assert_eq!(
            servers.len(),
            1,
            "{c} reached {servers:?} through the two appliances"
        );
    }
    let spread: HashSet<&String> = before.values().flat_map(|s| s.iter()).collect();
    assert!(
        spread.len() >= 3,
        "client addresses spread over the servers: {spread:?}"
    );
    // cookies from one appliance are honoured by the other
    let cookies_ok = {
        let clients = clients.clone();
        lab.in_ns("cl", move || {
            clients.iter().take(8).all(|c| {
                let (first, cookie) = get(*c, 81, None);
                let cookie = cookie.unwrap();
                (0..5).all(|_| get(*c, 81, Some(&cookie)).0 == first)
            })
        })
        .join()
        .unwrap()
    };
    assert!(
        cookies_ok,
        "a cookie led to another real server on the other appliance"
    );
    // withdraw lb2: its connections move to lb1, each client to the same real server
    lab.ip("rt", &["route", "replace", &vip32, "via", "10.214.2.2"]);
    let lb2_before = common::steady(Duration::from_secs(5), "lb2's count", || {
        served(&lab, "lb2")
    });
    let after = round(clients.clone());
    assert_eq!(
        served(&lab, "lb2"),
        lb2_before,
        "nothing reaches the withdrawn appliance"
    );
    for (c, servers) in &after {
        assert_eq!(servers, &before[c], "{c} moved to another real server");
    }
}
