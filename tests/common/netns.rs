//! Test hosts in network namespaces the test makes itself (root only): namespaces joined by
//! veth pairs or a bridge, processes started inside them, threads that enter one (a network
//! namespace is per thread), all removed on drop.

use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Run a command; panic with its stderr if it fails.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

pub struct Lab {
    prefix: String,
    names: Vec<String>,
    pub children: Vec<Child>,
    links: usize,
}

impl Lab {
    /// Namespaces of this lab are named `<tag><pid>...`, so parallel tests do not meet.
    pub fn new(tag: &str) -> Lab {
        Lab {
            prefix: format!("{tag}{}", std::process::id() % 100_000),
            names: Vec::new(),
            children: Vec::new(),
            links: 0,
        }
    }

    pub fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// A namespace with its loopback up.
    pub fn add(&mut self, name: &str) {
        let ns = self.ns(name);
        sh(&["ip", "netns", "add", &ns]);
        self.names.push(ns.clone());
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
    }

    /// `ip -n <name> args...`
    pub fn ip(&self, name: &str, args: &[&str]) {
        let ns = self.ns(name);
        let mut all = vec!["ip", "-n", ns.as_str()];
        all.extend_from_slice(args);
        sh(&all);
    }

    /// A veth pair: `a_if` in `a`, `b_if` in `b`, both up, with optional addresses (CIDR).
    pub fn link(
        &mut self,
        a: &str,
        a_if: &str,
        a_addr: Option<&str>,
        b: &str,
        b_if: &str,
        b_addr: Option<&str>,
    ) {
        self.links += 1;
        // made in `a` under a temporary name, the peer moved into `b`
        let tmp = format!("vt{}x{}", std::process::id() % 10_000, self.links);
        self.ip(
            a,
            &[
                "link",
                "add",
                &tmp,
                "type",
                "veth",
                "peer",
                "name",
                b_if,
                "netns",
                &self.ns(b),
            ],
        );
        self.ip(a, &["link", "set", &tmp, "name", a_if]);
        for (ns, dev, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
            if let Some(addr) = addr {
                self.ip(ns, &["addr", "add", addr, "dev", dev]);
            }
            self.ip(ns, &["link", "set", dev, "up"]);
        }
    }

    /// Start `args` inside namespace `name`, output to `log`; returns its index in `children`.
    pub fn spawn(&mut self, name: &str, args: &[&str], log: &std::path::Path) -> usize {
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

    /// Run `f` on a thread inside namespace `name`.
    pub fn in_ns<T: Send + 'static>(
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

    /// Does `dev` in `name` carry `addr`?
    pub fn has_addr(&self, name: &str, dev: &str, addr: &str) -> bool {
        let out = Command::new("ip")
            .args(["-n", &self.ns(name), "-4", "addr", "show", "dev", dev])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains(&format!("{addr}/"))
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
        for n in self.names.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}
