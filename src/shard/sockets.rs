//! The listening sockets, as the main thread keeps them: one per (address, shard) for every
//! virtual service a shard serves, and the admin listener. Binding happens here, before
//! any shard is told, so a reload that cannot bind changes nothing; the main thread keeps
//! a duplicate of every socket so that a binary upgrade can hand the very same kernel
//! sockets to the new process (their accept queues included).

use crate::config::{Config, Steering};
use crate::net;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd};

/// The shard index the admin listener is kept under.
pub const ADMIN: usize = usize::MAX;

struct Entry {
    addr: SocketAddr,
    shard: usize,
    fd: OwnedFd,
    /// Handed to a shard already (else it waits to be, e.g. inherited in an upgrade).
    handed: bool,
}

#[derive(Default)]
pub struct Sockets {
    entries: Vec<Entry>,
}

/// What each shard is to start serving: per shard, (address, socket); and the admin listener.
pub struct Plan {
    pub per_shard: Vec<Vec<(SocketAddr, OwnedFd)>>,
    pub admin: Option<OwnedFd>,
}

fn dup(fd: &OwnedFd) -> Result<OwnedFd, String> {
    fd.as_fd()
        .try_clone_to_owned()
        .map_err(|e| format!("cannot duplicate a listening socket: {e}"))
}

impl Sockets {
    /// Sockets handed over by the process this one replaces: (address, its shard, socket).
    pub fn inherited(list: Vec<(SocketAddr, usize, OwnedFd)>) -> Sockets {
        Sockets {
            entries: list
                .into_iter()
                .map(|(addr, shard, fd)| Entry {
                    addr,
                    shard,
                    fd,
                    handed: false,
                })
                .collect(),
        }
    }

    /// Every socket with its address and shard, for handing over to a new process.
    pub fn all(&self) -> Vec<(SocketAddr, usize, &OwnedFd)> {
        self.entries
            .iter()
            .map(|e| (e.addr, e.shard, &e.fd))
            .collect()
    }

    /// Bind what `config` needs and no socket holds yet, and say which sockets each shard is
    /// to start serving. Sockets for addresses `config` no longer has are closed here (the
    /// shards close theirs once they have drained their accept queues). An error changes
    /// nothing.
    pub fn plan(&mut self, config: &Config) -> Result<Plan, String> {
        let nr_shards = config.runtime.shards.len();
        let serves = |addr: SocketAddr, shard: usize| {
            config.services.iter().enumerate().any(|(v, vs)| {
                vs.listen == addr
                    && config
                        .runtime
                        .shards
                        .get(shard)
                        .is_some_and(|s| s.services.contains(&v))
            })
        };
        // Inherited sockets (an upgrade) not handed yet: each to its shard if that shard
        // serves its address, else to a shard of that address that has none: the accept
        // queues of every one of them are served, and no socket is bound where one exists.
        let mut taken: Vec<(SocketAddr, usize)> = self
            .entries
            .iter()
            .filter(|e| e.handed)
            .map(|e| (e.addr, e.shard))
            .collect();
        // First every socket that can stay with its own shard; then the others (their shard
        // is gone, or it is a second socket of one shard) go to a shard of that address that
        // has none, else to any shard of it (a spare: its queue is still served).
        let waiting: Vec<usize> = (0..self.entries.len())
            .filter(|&i| !self.entries[i].handed && self.entries[i].shard != ADMIN)
            .collect();
        let mut moving = Vec::new();
        for &i in &waiting {
            let e = &self.entries[i];
            if serves(e.addr, e.shard) && !taken.contains(&(e.addr, e.shard)) {
                taken.push((e.addr, e.shard));
            } else {
                moving.push(i);
            }
        }
        for i in moving {
            let addr = self.entries[i].addr;
            let free = (0..nr_shards).find(|&s| serves(addr, s) && !taken.contains(&(addr, s)));
            if let Some(s) = free.or_else(|| (0..nr_shards).find(|&s| serves(addr, s))) {
                // from now on it is that shard's, for the next hand-over too
                self.entries[i].shard = s;
                taken.push((addr, s));
            }
        }
        let mut fresh: Vec<Entry> = Vec::new();
        for (v, vs) in config.services.iter().enumerate() {
            let serving = config.runtime.shards_serving(v);
            // the BPF program picks among the sockets of the shards that serve it
            let steer = match vs.shard_steering {
                Steering::SourceIp => Some(serving as u32),
                Steering::Kernel => None,
            };
            let held = self.entries.iter().find(|e| e.addr == vs.listen);
            if let Some(e) = held {
                // kept or inherited: its group's steering follows this configuration
                net::set_steering(e.fd.as_raw_fd(), vs.listen.is_ipv6(), steer).map_err(|err| {
                    format!("cannot set the shard steering of {}: {err}", vs.listen)
                })?;
            } else if !fresh.iter().any(|e| e.addr == vs.listen) && net::in_use_settled(vs.listen) {
                return Err(format!(
                    "cannot listen on {} for virtual service {:?}: address already in use (another edgeshard on the same configuration?)",
                    vs.listen, vs.name
                ));
            }
            for (i, settings) in config.runtime.shards.iter().enumerate() {
                if !settings.services.contains(&v)
                    || self.has(vs.listen, i)
                    || fresh.iter().any(|e| e.addr == vs.listen && e.shard == i)
                {
                    continue;
                }
                let sk = net::bind(vs.listen, settings.backlog, steer).map_err(|e| {
                    format!(
                        "shard {i}: cannot listen on {} for virtual service {:?}: {e}",
                        vs.listen, vs.name
                    )
                })?;
                // SAFETY: the fd of a bound, listening socket whose ownership moves here.
                let fd = unsafe { OwnedFd::from_raw_fd(sk.into_raw_fd()) };
                fresh.push(Entry {
                    addr: vs.listen,
                    shard: i,
                    fd,
                    handed: false,
                });
            }
        }
        if let Some(a) = &config.admin {
            if !self.has(a.listen, ADMIN) {
                if net::in_use_settled(a.listen) {
                    return Err(format!(
                        "cannot listen on {} for the admin endpoint: address already in use",
                        a.listen
                    ));
                }
                let sk = net::bind(a.listen, 128, None).map_err(|e| {
                    format!("cannot listen on {} for the admin endpoint: {e}", a.listen)
                })?;
                // SAFETY: as above.
                let fd = unsafe { OwnedFd::from_raw_fd(sk.into_raw_fd()) };
                fresh.push(Entry {
                    addr: a.listen,
                    shard: ADMIN,
                    fd,
                    handed: false,
                });
            }
        }
        self.entries.extend(fresh);
        // Keep what the config still serves (the shards close their copies of the rest).
        let admin = config.admin.as_ref().map(|a| a.listen);
        self.entries.retain(|e| {
            if e.shard == ADMIN {
                Some(e.addr) == admin
            } else {
                serves(e.addr, e.shard)
            }
        });
        let mut plan = Plan {
            per_shard: (0..nr_shards).map(|_| Vec::new()).collect(),
            admin: None,
        };
        for e in self.entries.iter_mut().filter(|e| !e.handed) {
            let fd = dup(&e.fd)?;
            e.handed = true;
            if e.shard == ADMIN {
                plan.admin = Some(fd);
            } else {
                plan.per_shard[e.shard].push((e.addr, fd));
            }
        }
        Ok(plan)
    }

    fn has(&self, addr: SocketAddr, shard: usize) -> bool {
        self.entries
            .iter()
            .any(|e| e.addr == addr && e.shard == shard)
    }
}
