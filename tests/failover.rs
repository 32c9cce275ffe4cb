//! An active/standby pair on real keepalived (VRRP), in network namespaces made by the test:
//! a client, two appliances and the real servers on one bridge. The client drives load at the
//! VIP with cookie persistence; the master's edgeshard dies (then, separately, the master's
//! link goes down); the test measures the gap, the failed requests, and checks that every
//! client reaches the same real server after the failover, and that with nopreempt nothing
//! moves when the old master returns. Needs root (CI has it) and keepalived (tests/run
//! installs it); without root it says so and skips.

mod common;

use common::origin::Origin;
use common::{bin, tmpdir, wait_until};
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const VIP: &str = "10.213.0.100";
const KEY: &str = "f00dfeedf00dfeedf00dfeedf00dfeedf00dfeedf00dfeedf00dfeedf00dfeed";

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The test's world: namespaces and the processes in them, all removed on drop.
struct Lab {
    prefix: String,
    children: Vec<Child>,
}

impl Lab {
    fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn new() -> Lab {
        let prefix = format!("es{}", std::process::id() % 100_000);
        let lab = Lab {
            prefix,
            children: Vec::new(),
        };
        let sw = lab.ns("sw");
        sh(&["ip", "netns", "add", &sw]);
        sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &sw, "link", "set", "br0", "up"]);
        for (name, addr) in [
            ("cl", "10.213.0.2"),
            ("srv", "10.213.0.3"),
            ("lb1", "10.213.0.11"),
            ("lb2", "10.213.0.12"),
        ] {
            let ns = lab.ns(name);
            sh(&["ip", "netns", "add", &ns]);
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            // the pair is made in the switch, one end moved into the host namespace as eth0
            let outer = format!("{}{name}", &lab.prefix[..lab.prefix.len().min(8)]);
            sh(&[
                "ip", "-n", &sw, "link", "add", &outer, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ]);
            sh(&["ip", "-n", &sw, "link", "set", &outer, "master", "br0"]);
            sh(&["ip", "-n", &sw, "link", "set", &outer, "up"]);
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ]);
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        }
        lab
    }

    /// Run `args` inside namespace `name`, output to `log`.
    fn spawn(&mut self, name: &str, args: &[&str], log: &std::path::Path) -> usize {
        let f = std::fs::File::create(log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(name)])
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        self.children.push(child);
        self.children.len() - 1
    }

    /// Run `f` on a thread inside namespace `name` (a network namespace is per thread).
    fn in_ns<T: Send + 'static>(
        &self,
        name: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.ns(name));
        thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            assert_eq!(
                unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                0,
                "setns {path}"
            );
            f()
        })
    }

    fn holds_vip(&self, name: &str) -> bool {
        let out = Command::new("ip")
            .args(["-n", &self.ns(name), "-4", "addr", "show", "dev", "eth0"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains(VIP)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // SIGTERM first: keepalived then stops its VRRP child and drops the VIP itself
        for c in &self.children {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for c in &mut self.children {
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in ["cl", "srv", "lb1", "lb2", "sw"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(n)])
                .status();
        }
    }
}

fn keepalived_conf(name: &str, priority: u32) -> String {
    format!(
        "global_defs {{\n  router_id {name}\n  enable_script_security\n  script_user root\n}}\n\
         vrrp_script chk_edgeshard {{\n  script \"{} ctl health --admin http://127.0.0.1:9900\"\n  interval 1\n  timeout 1\n  fall 1\n  rise 2\n}}\n\
         vrrp_instance VI_1 {{\n  state BACKUP\n  nopreempt\n  interface eth0\n  virtual_router_id 51\n  priority {priority}\n  advert_int 1\n\
           virtual_ipaddress {{\n    {VIP}/24\n  }}\n  track_script {{\n    chk_edgeshard\n  }}\n  garp_master_delay 0\n}}\n",
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

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
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
    let mut lab = Lab::new();
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
    wait_until(
        Duration::from_secs(20),
        "lb1 holds the VIP (higher priority)",
        || lab.holds_vip("lb1"),
    );
    // clients with cookies, each pinned to its real server through lb1
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
        "clients pinned through lb1: {}",
        log("lb1-edgeshard.log")
    );
    // steady load from the clients at the VIP, recording each request's outcome and time
    let stop = Arc::new(AtomicBool::new(false));
    let record: Arc<Mutex<Vec<(Instant, bool, bool)>>> = Default::default(); // (when, ok, same server)
    let load = {
        let (stop, record, clients) = (stop.clone(), record.clone(), clients.clone());
        lab.in_ns("cl", move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                let (body, cookie) = &clients[i % clients.len()];
                let r = get(cookie);
                let ok = r.is_some();
                let same = r.as_ref().is_some_and(|(b, _)| b == body);
                record.lock().unwrap().push((Instant::now(), ok, same));
                i += 1;
                thread::sleep(Duration::from_millis(10));
            }
        })
    };
    thread::sleep(Duration::from_millis(500));
    // 1. the master's edgeshard dies
    let killed = Instant::now();
    let _ = lab.children[es[0]].kill();
    wait_until(Duration::from_secs(15), "lb2 takes the VIP", || {
        lab.holds_vip("lb2")
    });
    let recovered = || {
        let rec = record.lock().unwrap();
        rec.iter()
            .filter(|(t, ok, _)| *t > killed && *ok)
            .map(|(t, _, _)| *t)
            .next()
    };
    wait_until(
        Duration::from_secs(15),
        "requests served through lb2",
        || recovered().is_some(),
    );
    let gap = recovered().unwrap() - killed;
    thread::sleep(Duration::from_millis(500));
    // 2. the old master returns: with nopreempt nothing moves
    let i = lab.spawn(
        "lb1",
        &[bin(), "run", "--config", &conf],
        &dir.join("lb1-edgeshard-2.log"),
    );
    es[0] = i;
    wait_until(
        Duration::from_secs(10),
        "lb1's edgeshard healthy again",
        || log("lb1-edgeshard-2.log").contains("edgeshard ready"),
    );
    thread::sleep(Duration::from_secs(3)); // several VRRP adverts: a preemption would show
    assert!(
        lab.holds_vip("lb2") && !lab.holds_vip("lb1"),
        "nopreempt: the VIP stays on lb2"
    );
    // 3. lb2's link goes down: lb1 takes over
    let link_down = Instant::now();
    sh(&["ip", "-n", &lab.ns("lb2"), "link", "set", "eth0", "down"]);
    wait_until(Duration::from_secs(15), "lb1 takes the VIP back", || {
        lab.holds_vip("lb1")
    });
    let recovered2 = || {
        let rec = record.lock().unwrap();
        rec.iter()
            .filter(|(t, ok, _)| *t > link_down && *ok)
            .map(|(t, _, _)| *t)
            .next()
    };
    wait_until(
        Duration::from_secs(15),
        "requests served through lb1 again",
        || recovered2().is_some(),
    );
    let gap2 = recovered2().unwrap() - link_down;
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    load.join().unwrap();
    let rec = record.lock().unwrap();
    let failed = rec.iter().filter(|(_, ok, _)| !ok).count();
    let moved = rec.iter().filter(|(_, ok, same)| *ok && !same).count();
    eprintln!(
        "failover: edgeshard killed -> served again in {gap:?}; link down -> {gap2:?}; \
         {} requests, {failed} failed (all in the two gaps), {moved} reached another real server",
        rec.len()
    );
    assert_eq!(moved, 0, "persistence intact across failovers");
    assert!(gap < Duration::from_secs(4), "failover took {gap:?}");
    assert!(gap2 < Duration::from_secs(6), "link failover took {gap2:?}");
    // every failure falls in one of the two gaps
    for (t, ok, _) in rec.iter() {
        if !ok {
            // a request that began in a gap may end up to 1.1 s (its timeouts) later
            let slack = Duration::from_millis(1500);
            let in_gap = (*t >= killed && *t <= killed + gap + slack)
                || (*t >= link_down && *t <= link_down + gap2 + slack);
            assert!(in_gap, "a request failed outside the failovers");
        }
    }
}
