//! A reloaded configuration follows the running one: what stays keeps its slot (a service and
//! a pool by name, a real server by pool and address), so every shard's state for it (health,
//! operator state, connection counts of requests in flight, counters, persistence) carries
//! over untouched; a removed real server stays behind as a retired entry so that its id still
//! names it until its last request ends. What a running process cannot change in place is
//! refused here, naming the field, before anything changes.

use super::{Config, RealServer, ServerId};
use std::collections::HashMap;

impl Config {
    /// Renumber `self` (just loaded) to follow `prev` (serving). Err: why it cannot be
    /// applied by a reload (the running configuration stays).
    pub fn follow(&mut self, prev: &Config) -> Result<(), String> {
        self.fixed_fields(prev)?;
        let mut slots = prev.slots;
        // services, by name
        for vs in &mut self.services {
            vs.slot = match prev.services.iter().find(|p| p.name == vs.name) {
                Some(p) => p.slot,
                None => take(&mut slots.used_services, slots.services, "virtual services")?,
            };
        }
        for p in &mut self.pools {
            p.slot = match prev.pools.iter().find(|o| o.name == p.name) {
                Some(o) => o.slot,
                None => take(&mut slots.used_pools, slots.pools, "pools")?,
            };
        }
        // real servers, by pool and address; retired ones are found again if they return
        let known: HashMap<&str, ServerId> = prev
            .servers
            .iter()
            .map(|rs| (rs.key.as_str(), rs.id))
            .collect();
        let mut next = prev.servers.len();
        let mut assign = Vec::with_capacity(self.servers.len());
        for rs in &self.servers {
            assign.push(match known.get(rs.key.as_str()) {
                Some(&id) => id,
                None => {
                    next += 1;
                    ServerId(next - 1)
                }
            });
        }
        if next > slots.servers {
            return Err(format!(
                "this reload would need room for {next} real servers and this process made room for {} at start: apply it with `edgeshard upgrade` (a new process, no connection lost)",
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
            return Err(format!("runtime.cores: {upgrade}"));
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
        // A listener that stays must be served by the same shards in the same way: its
        // sockets (and their steering program) are kept as they are.
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
            if vs.shard_steering != old.shard_steering
                || serving(self, &vs.name) != serving(prev, &old.name)
                || vs.tls.is_some() != old.tls.is_some()
            {
                return Err(format!(
                    "virtual service {:?} on {}: its shards, shard_steering or TLS on/off: {upgrade} (or move it to a new listen address)",
                    vs.name, vs.listen
                ));
            }
        }
        Ok(())
    }
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
