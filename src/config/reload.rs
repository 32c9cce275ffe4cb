//! A reloaded configuration follows the running one: what stays keeps its slot (a service and
//! a pool by name, a real server by pool and address), so every shard's state for it (health,
//! operator state, connection counts of requests in flight, counters, persistence) carries
//! over untouched; a removed real server stays behind as a retired entry so that its id still
//! names it until its last request ends. What a running process cannot change in place is
//! refused here, naming the field, before anything changes.

use super::{Config, RealServer, ServerId, Slots};
use std::collections::{HashMap, HashSet};

impl Config {
    /// Renumber `self` (just loaded) to follow `prev` (serving). Err: why it cannot be
    /// applied by a reload (the running configuration stays).
    pub fn follow(&mut self, prev: &Config, busy: &Busy) -> Result<(), String> {
        self.fixed_fields(prev)?;
        let mut slots = prev.slots;
        // services, by name; a new one takes a fresh slot, else one that no service of the
        // running configuration has and no shard still uses (a connection of a removed one)
        let mut taken: HashSet<usize> = prev.services.iter().map(|v| v.slot).collect();
        for vs in &mut self.services {
            vs.slot = match prev.services.iter().find(|p| p.name == vs.name) {
                Some(p) => p.slot,
                None => {
                    let reuse = || {
                        (0..slots.services)
                            .find(|s| !taken.contains(s) && !busy.services.contains(s))
                    };
                    let s = match slots.used_services < slots.services {
                        true => take(&mut slots.used_services, slots.services, "virtual services")?,
                        false => reuse().ok_or_else(|| full("virtual services", slots.services))?,
                    };
                    taken.insert(s);
                    s
                }
            };
        }
        let mut taken: HashSet<usize> = prev.pools.iter().map(|p| p.slot).collect();
        for p in &mut self.pools {
            p.slot = match prev.pools.iter().find(|o| o.name == p.name) {
                Some(o) => o.slot,
                None => {
                    let s = match slots.used_pools < slots.pools {
                        true => take(&mut slots.used_pools, slots.pools, "pools")?,
                        false => (0..slots.pools)
                            .find(|s| !taken.contains(s))
                            .ok_or_else(|| full("pools", slots.pools))?,
                    };
                    taken.insert(s);
                    s
                }
            };
        }
        // real servers, by pool and address; retired ones are found again if they return; a
        // new one takes the place of a retired one no shard still uses, else a fresh one
        let known: HashMap<&str, ServerId> = prev
            .servers
            .iter()
            .map(|rs| (rs.key.as_str(), rs.id))
            .collect();
        let mut free: Vec<ServerId> = prev
            .servers
            .iter()
            .filter(|rs| rs.retired && !busy.servers.contains(&rs.id.0))
            .filter(|rs| !self.servers.iter().any(|n| n.key == rs.key))
            .map(|rs| rs.id)
            .rev()
            .collect();
        let mut next = prev.servers.len();
        let mut assign = Vec::with_capacity(self.servers.len());
        for rs in &self.servers {
            assign.push(match known.get(rs.key.as_str()) {
                Some(&id) => id,
                None => match free.pop() {
                    Some(id) => id,
                    None => {
                        next += 1;
                        ServerId(next - 1)
                    }
                },
            });
        }
        if next > slots.servers {
            return Err(format!(
                "this reload would need room for {next} real servers and this process made room for {} at start (real servers removed by a reload are reused once no connection uses them): apply it with `edgeshard upgrade` (a new process, no connection lost)",
                slots.servers
            ));
        }
        let mut servers: Vec<Option<RealServer>> = vec![None; next];
        for (rs, &id) in self.servers.drain(..).zip(&assign) {
            servers[id.0] = Some(RealServer { id, ..rs });
        }
        for old in &prev.servers {
            if servers[old.id.0].is_none() {
                servers[old.id.0] = Some(RealServer {
                    retired: true,
                    ..old.clone()
                });
            }
        }
        self.servers = servers.into_iter().flatten().collect();
        for p in &mut self.pools {
            for id in &mut p.servers {
                *id = assign[id.0];
            }
        }
        self.slots = slots;
        Ok(())
    }

    /// Live real servers (not the retired entries a reload keeps).
    pub fn live_servers(&self) -> impl Iterator<Item = &RealServer> {
        self.servers.iter().filter(|rs| !rs.retired)
    }

    fn fixed_fields(&self, prev: &Config) -> Result<(), String> {
        let upgrade =
            "changes need `edgeshard upgrade` (a new process, no connection lost), not a reload";
        let (a, b) = (&self.runtime, &prev.runtime);
        if a.cores != b.cores {
            return Err(format!("runtime.shards / runtime.cores: {upgrade}"));
        }
        if a.io_engine != b.io_engine {
            return Err(format!("runtime.io_engine: {upgrade}"));
        }
        for (s, o) in a.shards.iter().zip(&b.shards) {
            if (
                s.ring_depth,
                s.io_memory,
                s.spin_before_park,
                s.poll_before_park,
            ) != (
                o.ring_depth,
                o.io_memory,
                o.spin_before_park,
                o.poll_before_park,
            ) {
                return Err(format!(
                    "runtime (ring_depth, io_memory, spin_before_park, poll_before_park): {upgrade}"
                ));
            }
        }
        if a.persistence_key != b.persistence_key {
            return Err(format!("runtime.persistence_key: {upgrade}"));
        }
        if a.ticket_keys != b.ticket_keys {
            return Err(format!("runtime.ticket_key_file: {upgrade}"));
        }
        if self.admin.as_ref().map(|a| a.listen) != prev.admin.as_ref().map(|a| a.listen) {
            return Err(format!("admin.listen: {upgrade}"));
        }
        let logs = |c: &Config| {
            (
                c.log.user_access.clone(),
                c.log.security.clone(),
                c.log.connection.clone(),
                c.log.format,
            )
        };
        if logs(self) != logs(prev) {
            return Err(format!("log: {upgrade}"));
        }
        // A listener that stays must be served by the same shards: its sockets are kept.
        for vs in &self.services {
            let Some(old) = prev.services.iter().find(|o| o.listen == vs.listen) else {
                continue;
            };
            let serving = |c: &Config, name: &str| {
                let v = c.services.iter().position(|s| s.name == name);
                c.runtime
                    .shards
                    .iter()
                    .map(|s| v.is_some_and(|v| s.services.contains(&v)))
                    .collect::<Vec<_>>()
            };
            // (its steering program and TLS are per configuration: they may change)
            if serving(self, &vs.name) != serving(prev, &old.name) {
                return Err(format!(
                    "virtual service {:?} on {}: the shards that serve it ([[runtime.shard]] services): {upgrade} (or move it to a new listen address)",
                    vs.name, vs.listen
                ));
            }
        }
        Ok(())
    }
}

/// Slots a shard still uses although the running configuration no longer has them
/// (connections of a removed service, requests on a removed real server), as the shards
/// reported at the last reload: not handed to anything new yet.
#[derive(Debug, Clone, Default)]
pub struct Busy {
    pub services: HashSet<usize>,
    pub servers: HashSet<usize>,
}

fn full(what: &str, room: usize) -> String {
    format!(
        "this reload would need more {what} than this process has room for ({room}, some still used by connections of removed ones): apply it with `edgeshard upgrade` (a new process, no connection lost)"
    )
}

fn take(used: &mut usize, room: usize, what: &str) -> Result<usize, String> {
    if *used >= room {
        return Err(format!(
            "this reload would add more {what} than this process made room for at start ({room}): apply it with `edgeshard upgrade` (a new process, no connection lost)"
        ));
    }
    *used += 1;
    Ok(*used - 1)
}

/// Real servers the runtime API added or removed: applied to every configuration loaded
/// (at start and at each reload), so that neither a reload nor a restart (through
/// `[admin] state_file`) undoes them. A server in the file and removed by the API stays
/// removed until the API adds it again.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RuntimeServers {
    #[serde(default)]
    pub added: Vec<AddedServer>,
    #[serde(default)]
    pub removed: Vec<RemovedServer>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AddedServer {
    /// "service" or "service/sub-service".
    pub pool: String,
    /// IP:port.
    pub address: String,
    pub weight: u32,
    #[serde(default)]
    pub connection_limit: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RemovedServer {
    pub pool: String,
    pub address: String,
}

impl RuntimeServers {
    pub fn is_added(&self, pool: &str, address: &str) -> bool {
        self.added
            .iter()
            .any(|a| a.pool == pool && a.address == address)
    }
}

impl Config {
    /// Apply the runtime API's additions and removals to a configuration just loaded (before
    /// `follow`). Returns what no longer applies (a pool gone, a server the file now lists),
    /// as warnings: the rest applies.
    pub fn apply_runtime(&mut self, r: &RuntimeServers) -> Vec<String> {
        let mut notes = Vec::new();
        for rm in &r.removed {
            let Some(p) = self.pools.iter_mut().find(|p| p.name == rm.pool) else {
                notes.push(format!(
                    "runtime removal of {} from {}: no such pool any more",
                    rm.address, rm.pool
                ));
                continue;
            };
            let servers = &self.servers;
            p.servers.retain(|id| {
                servers[id.0].name != rm.address && servers[id.0].address.to_string() != rm.address
            });
        }
        for add in &r.added {
            let Some(pool) = self.pools.iter().position(|p| p.name == add.pool) else {
                notes.push(format!(
                    "runtime real server {} of {}: no such pool any more",
                    add.address, add.pool
                ));
                continue;
            };
            let Ok(address) = add.address.parse::<std::net::SocketAddr>() else {
                notes.push(format!(
                    "runtime real server {:?}: not an IP:port",
                    add.address
                ));
                continue;
            };
            let dup = self.pools[pool]
                .servers
                .iter()
                .any(|id| self.servers[id.0].address == address);
            if dup {
                notes.push(format!(
                    "runtime real server {} of {}: the configuration lists it now",
                    add.address, add.pool
                ));
                continue;
            }
            let id = ServerId(self.servers.len());
            self.servers.push(RealServer {
                id,
                pool,
                address,
                name: add.address.clone(),
                weight: add.weight.clamp(1, 65535),
                connection_limit: add.connection_limit,
                key: format!("{} {}", add.pool, add.address),
                retired: false,
                send_proxy: self.services[self.pools[pool].service].send_proxy,
            });
            self.pools[pool].servers.push(id);
        }
        // a removed server is in no pool: drop it (and renumber) so that ids stay dense
        let live: Vec<bool> = {
            let mut v = vec![false; self.servers.len()];
            for p in &self.pools {
                for id in &p.servers {
                    v[id.0] = true;
                }
            }
            v
        };
        if live.iter().any(|l| !l) {
            let mut map = vec![None; self.servers.len()];
            let mut kept = Vec::new();
            for (i, rs) in std::mem::take(&mut self.servers).into_iter().enumerate() {
                if live[i] {
                    map[i] = Some(ServerId(kept.len()));
                    kept.push(RealServer {
                        id: ServerId(kept.len()),
                        ..rs
                    });
                }
            }
            self.servers = kept;
            for p in &mut self.pools {
                for id in &mut p.servers {
                    *id = map[id.0].expect("every pool member is live");
                }
            }
        }
        self.nr_servers = self.servers.len();
        let grown = Slots::for_size(self.services.len(), self.pools.len(), self.servers.len());
        self.slots.servers = self.slots.servers.max(grown.servers);
        notes
    }
}
