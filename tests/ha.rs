//! Two appliances with the same config make the same choices with no messages between them:
//! source-IP persistence by rendezvous hashing, cookies signed with the shared key, and
//! `check` prints the same fingerprint. (The shared ticket key file is tested in `tls`.)

mod common;

use common::client::{one, Client};
use common::origin::Origin;
use common::*;

const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn appliance(servers: &[std::net::SocketAddr], persistence: &str) -> (Proxy, std::net::SocketAddr) {
    let listen = local(free_port());
    let cfg = simple_config(
        listen,
        servers,
        &format!("[virtual_service.persistence]\n{persistence}\n"),
        "",
    )
    .replace(
        "[runtime]\n",
        &format!("[runtime]\npersistence_key = \"{KEY}\"\n"),
    );
    (Proxy::start(&cfg, listen), listen)
}

#[test]
fn two_appliances_choose_the_same_real_server_for_a_client_address() {
    let origins: Vec<Origin> = ["a", "b", "c", "d"]
        .into_iter()
        .map(Origin::named)
        .collect();
    let addrs: Vec<_> = origins.iter().map(|o| o.addr).collect();
    let (_pa, la) = appliance(&addrs, "mode = \"source-ip\"");
    let (_pb, lb) = appliance(&addrs, "mode = \"source-ip\"");
    let via = |listen, n: u8| {
        let mut c = Client::connect_from(std::net::IpAddr::from([127, 0, 0, n]), listen);
        c.request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").text()
    };
    let mut seen = std::collections::HashSet::new();
    for n in 2..42 {
        let a = via(la, n);
        assert_eq!(via(lb, n), a, "127.0.0.{n}");
        assert_eq!(via(la, n), a, "127.0.0.{n} again");
        seen.insert(a);
    }
    assert!(
        seen.len() >= 3,
        "the clients spread over the servers: {seen:?}"
    );
}

#[test]
fn a_cookie_from_one_appliance_is_honoured_by_the_other() {
    let origins: Vec<Origin> = ["a", "b", "c"].into_iter().map(Origin::named).collect();
    let addrs: Vec<_> = origins.iter().map(|o| o.addr).collect();
    let p = "mode = \"active-cookie\"\ncookie = \"S\"";
    let (_pa, la) = appliance(&addrs, p);
    let (_pb, lb) = appliance(&addrs, p);
    for _ in 0..6 {
        let r = one(la, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let cookie = r
            .header("set-cookie")
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string();
        let again = one(
            lb,
            format!("GET / HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\n\r\n").as_bytes(),
        );
        assert_eq!(again.text(), r.text());
    }
}

#[test]
fn check_prints_a_fingerprint_that_appliances_compare() {
    let servers = [
        "127.0.0.1:9001".parse().unwrap(),
        "127.0.0.1:9002".parse().unwrap(),
    ];
    let fp = |extra: &str, port: u16| {
        let cfg = simple_config(local(port), &servers, extra, "").replace(
            "[runtime]\n",
            &format!("[runtime]\npersistence_key = \"{KEY}\"\n"),
        );
        let (ok, text, _) = check_config(&cfg);
        assert!(ok, "{text}");
        text.lines()
            .find_map(|l| l.strip_prefix("fingerprint: "))
            .unwrap()
            .to_string()
    };
    // the listener may differ between appliances; the choices' inputs may not
    assert_eq!(fp("", free_port()), fp("", free_port()));
    assert_ne!(
        fp("", 18000),
        fp("scheduling = \"least-connection\"\n", 18000)
    );
}
