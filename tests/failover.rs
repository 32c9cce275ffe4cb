//! An active/standby pair on real keepalived (VRRP), in network namespaces made by the test:
//! a client, two appliances and the real servers on one bridge. The client drives load at the
//! VIP with cookie persistence; the master's edgeshard dies (then, separately, the master's
//! link goes down); the test measures the gap, the failed requests, and checks that every
//! client reaches the same real server after the failover, and that with nopreempt nothing
//! moves when the old master returns. Needs root (CI has it) and keepalived (tests/run
//! installs it); without root it says so and skips.

mod common;

use common::netns::{is_root, Lab};
use common::origin::Origin;
use common::{bin, tmpdir, wait_until};
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const VIP: &str = "10.213.0.100";
const KEY: &str = "f00dfeedf00dfeedf00dfeedf00dfeedf00dfeedf00dfeedf00dfeedf00dfeed";

/// The pair's world: a switch (bridge) joining a client, the real servers and two appliances.
fn lab() -> Lab {
    let mut lab = Lab::new("es");
    lab.add("sw");
    lab.ip("sw", &["link", "add", "br0", "type", "bridge"]);
    lab.ip("sw", &["link", "set", "br0", "up"]);
    for (name, addr) in [
        ("cl", "10.213.0.2/24"),
        ("srv", "10.213.0.3/24"),
        ("lb1", "10.213.0.11/24"),
        ("lb2", "10.213.0.12/24"),
    ] {
        lab.add(name);
        let port = format!("p{name}");
        lab.link("sw", &port, None, name, "eth0", Some(addr));
        lab.ip("sw", &["link", "set", &port, "master", "br0"]);
    }
    lab
}

fn keepalived_conf(name: &str, priority: u32) -> String {
    format!(
        "global_defs {{\n  router_id {name}\n  vrrp_version 3\n  enable_script_security\n  script_user root\n}}\n\
         vrrp_script chk_edgeshard {{\n  script \"{} ctl health --appliance --admin http://127.0.0.1:9900\"\n  interval 1\n  timeout 1\n  fall 1\n  rise 2\n}}\n\
         vrrp_instance VI_1 {{\n  state BACKUP\n  nopreempt\n  interface eth0\n  virtual_router_id 51\n  priority {priority}\n  advert_int 0.5\n\
           virtual_ipaddress {{\n    {VIP}/24\n  }}\n  track_script {{\n    chk_edgeshard\n  }}\n}}\n",
        bin()
    )
}

fn edgeshard_conf(servers: &[SocketAddr]) -> String {
    let mut s = format!(
        "[runtime]\nshards = 1\ndrain_timeout = \"1s\"\npersistence_key = \"{KEY}\"\n[admin]\nlisten = \"127.0.0.1:9900\"\n\
         [[virtual_service]]\nname = \"web\"\nlisten = \"0.0.0.0:80\"\nconnect_timeout = \"1s\"\n\
         [virtual_service.persistence]\nmode = \"active-cookie\"\ncookie = \"S\"\n\
         [virtual_service.health_check]\nurl = \"/\"\ninterval = \"1s\"\n"
    );
    for a in servers {
        s.push_str(&format!(
            "[[virtual_service.real_server]]\naddress = \"{a}\"\n"
        ));
    }
    s
}

/// One request on a fresh connection with `cookie`; the body and the new cookie, or None.
fn get(cookie: &str) -> Option<(String, String)> {
    let addr: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(800))).ok()?;
    s.write_all(format!("GET / HTTP/1.1\r\nHost: vip\r\nCookie: {cookie}\r\n\r\n").as_bytes())
        .ok()?;
    let r = common::client::read_response(&mut BufReader::new(s), false).ok()?;
    if r.status != 200 {
        return None;
    }
    let c = r.header("set-cookie")?.split(';').next()?.to_string();
    Some((r.text(), c))
}

#[test]
fn a_keepalived_pair_fails_over_with_persistence_intact() {
    if !is_root()
        || Command::new("keepalived")
            .arg("--version")
            .output()
            .is_err()
    {
        eprintln!("skipped: needs root and keepalived (tests/run installs it; CI runs as root)");
        return;
    }
    let dir = tmpdir("failover");
    let mut lab = lab();
    // three real servers in their namespace
    let origins: Vec<Origin> = lab
        .in_ns("srv", || {
            ["a", "b", "c"]
                .into_iter()
                .map(|n| {
                    let name: &'static str = n;
                    Origin::start_on(
                        "10.213.0.3:0".parse().unwrap(),
                        std::sync::Arc::new(move |_s: &common::origin::Seen, w: &mut TcpStream| {
                            let _ = write!(w, "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n{name}");
                            common::origin::Next::KeepAlive
                        }),
                    )
                })
                .collect()
        })
        .join()
        .unwrap();
    let servers: Vec<SocketAddr> = origins.iter().map(|o| o.addr).collect();
    let conf = dir.join("edgeshard.toml");
    std::fs::write(&conf, edgeshard_conf(&servers)).unwrap();
    let conf = conf.display().to_string();
    let mut es = Vec::new();
    for (lb, prio) in [("lb1", 110), ("lb2", 100)] {
        let i = lab.spawn(
            lb,
            &[bin(), "run", "--config", &conf],
            &dir.join(format!("{lb}-edgeshard.log")),
        );
        es.push(i);
        let kconf = dir.join(format!("{lb}-keepalived.conf"));
        std::fs::write(&kconf, keepalived_conf(lb, prio)).unwrap();
        let pid = |what: &str| dir.join(format!("{lb}-{what}.pid")).display().to_string();
        lab.spawn(
            lb,
            &[
                "keepalived",
                "-n",
                "-l",
                "-D",
                "-G",
                "-P",
                "-f",
                &kconf.display().to_string(),
                "-p",
                &pid("keepalived"),
                "-r",
                &pid("vrrp"),
                "-c",
                &pid("checkers"),
            ],
            &dir.join(format!("{lb}-keepalived.log")),
        );
    }
    let log = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    // both start BACKUP with nopreempt: the first to pass its check takes the VIP (usually
    // lb1, the higher priority); the test follows whichever it is
    wait_until(
        Duration::from_secs(20),
        "one appliance holds the VIP",
        || lab.has_addr("lb1", "eth0", VIP) || lab.has_addr("lb2", "eth0", VIP),
    );
    let (m, sb, mi) = if lab.has_addr("lb1", "eth0", VIP) {
        ("lb1", "lb2", 0)
    } else {
        ("lb2", "lb1", 1)
    };
    // clients with cookies, each pinned to its real server through the master
    let clients: Vec<(String, String)> = lab
        .in_ns("cl", || {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut pinned = Vec::new();
            while pinned.len() < 12 && Instant::now() < deadline {
                if let Some((body, cookie)) = get("none=0") {
                    pinned.push((body, cookie));
                }
            }
            pinned
        })
        .join()
        .unwrap();
    assert_eq!(
        clients.len(),
        12,
        "clients pinned through {m}: {}",
        log(&format!("{m}-edgeshard.log"))
    );
    // steady load from the clients at the VIP, recording each request's outcome and time
    let stop = Arc::new(AtomicBool::new(false));
    // (when the request started, ok, same real server as before)
    let record: Arc<Mutex<Vec<(Instant, bool, bool)>>> = Default::default();
    let load = {
        let (stop, record, clients) = (stop.clone(), record.clone(), clients.clone());
        lab.in_ns("cl", move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                let (body, cookie) = &clients[i % clients.len()];
                let started = Instant::now();
                let r = get(cookie);
                let ok = r.is_some();
                let same = r.as_ref().is_some_and(|(b, _)| b == body);
                record.lock().unwrap().push((started, ok, same));
                i += 1;
                thread::sleep(Duration::from_millis(10));
            }
        })
    };
    thread::sleep(Duration::from_millis(500));
    // 1. the master's edgeshard dies
    let _ = lab.children[es[mi]].kill();
    let killed = Instant::now();
    wait_until(Duration::from_secs(15), "the standby takes the VIP", || {
        lab.has_addr(sb, "eth0", VIP)
    });
    // served again: an answer to a request that started after the VIP moved
    let moved_at = Instant::now();
    let served_since = |t0: Instant| {
        record
            .lock()
            .unwrap()
            .iter()
            .any(|(t, ok, _)| *t >= t0 && *ok)
    };
    wait_until(
        Duration::from_secs(15),
        "requests served through the standby",
        || served_since(moved_at),
    );
    thread::sleep(Duration::from_millis(500));
    // 2. the old master returns: with nopreempt nothing moves
    let i = lab.spawn(
        m,
        &[bin(), "run", "--config", &conf],
        &dir.join("returned-edgeshard.log"),
    );
    es[mi] = i;
    wait_until(
        Duration::from_secs(10),
        "the old master's edgeshard healthy again",
        || log("returned-edgeshard.log").contains("edgeshard ready"),
    );
    thread::sleep(Duration::from_secs(3)); // several VRRP adverts: a preemption would show
    assert!(
        lab.has_addr(sb, "eth0", VIP) && !lab.has_addr(m, "eth0", VIP),
        "nopreempt: the VIP stays on {sb}"
    );
    // 3. the new master's link goes down: the old one takes over
    lab.ip(sb, &["link", "set", "eth0", "down"]);
    let link_down = Instant::now();
    wait_until(
        Duration::from_secs(15),
        "the old master takes the VIP back",
        || lab.has_addr(m, "eth0", VIP),
    );
    let moved2_at = Instant::now();
    wait_until(
        Duration::from_secs(15),
        "requests served through the old master again",
        || served_since(moved2_at),
    );
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    load.join().unwrap();
    let rec = record.lock().unwrap();
    // Each event's gap: from the event to the first success after its last failure (a
    // request that began up to 1.2 s before an event, its timeouts, may fail with it).
    let slack = Duration::from_millis(1200);
    let gap_after = |event: Instant, until: Instant| {
        let in_window = |t: &Instant| *t + slack >= event && *t <= until;
        let last_fail = rec
            .iter()
            .filter(|(t, ok, _)| !ok && in_window(t))
            .map(|(t, _, _)| *t)
            .max()
            .unwrap_or(event);
        let back = rec
            .iter()
            .filter(|(t, ok, _)| *ok && *t > last_fail)
            .map(|(t, _, _)| *t)
            .min()
            .expect("served again");
        back.saturating_duration_since(event)
    };
    // a request that began within `slack` before the link went down belongs to that event
    let gap = gap_after(killed, link_down - slack);
    let gap2 = gap_after(link_down, Instant::now());
    let failed = rec.iter().filter(|(_, ok, _)| !ok).count();
    // failures later than 3 s after their event, to explain a failed assertion below
    let offsets: Vec<String> = rec
        .iter()
        .filter(|(t, ok, _)| {
            let within = |e: Instant| *t + slack >= e && *t <= e + Duration::from_secs(3);
            !ok && !within(killed) && !within(link_down)
        })
        .map(|(t, _, _)| {
            if *t + slack >= link_down {
                format!(
                    "L+{:.2}",
                    t.saturating_duration_since(link_down).as_secs_f64()
                )
            } else {
                format!("K+{:.2}", t.saturating_duration_since(killed).as_secs_f64())
            }
        })
        .collect();
    if !offsets.is_empty() {
        eprintln!("late failures (K: since the kill, L: since the link went down): {offsets:?}");
    }
    let moved = rec.iter().filter(|(_, ok, same)| *ok && !same).count();
    eprintln!(
        "failover: edgeshard killed -> served again in {gap:?}; link down -> {gap2:?}; \
         {} requests, {failed} failed (all in the two gaps), {moved} reached another real server",
        rec.len()
    );
    assert_eq!(moved, 0, "persistence intact across failovers");
    // the goal: under 3 s either way (VRRPv3, adverts every 0.5 s)
    assert!(gap < Duration::from_secs(3), "failover took {gap:?}");
    assert!(gap2 < Duration::from_secs(3), "link failover took {gap2:?}");
    // no failure away from the two events
    for (t, ok, _) in rec.iter() {
        if !ok {
            let near = |e: Instant, g: Duration| *t + slack >= e && *t <= e + g;
            assert!(
                near(killed, gap) || near(link_down, gap2),
                "a request failed outside the failovers"
            );
        }
    }
}
