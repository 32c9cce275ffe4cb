//! What the admin listener shows: /status as JSON from this shard's view of the mesh, and
//! the self-contained status page (no external assets) that draws itself from it.

use crate::balance::{AdminState, Health};
use crate::config::{Persistence, ServerId};
use crate::metrics::Merged;
use crate::shard::Shard;
use serde_json::json;

/// The status page: refreshes itself from /status; asks for a token when /status wants one.
pub const STATUS_PAGE: &str = include_str!("page.html");

/// One word for the page: the operator state when it is not ready, else the health.
fn server_state(shard: &Shard, id: ServerId) -> &'static str {
    match (shard.load.admin_state(id), shard.load.health(id)) {
        (AdminState::Maint, _) => "maint",
        (AdminState::Drain, _) => "drain",
        (_, Health::Up) => "up",
        (_, Health::Down) => "down",
        (_, Health::Checking) => "checking",
    }
}

/// Appliance-wide status: per virtual service (and sub-service) its real servers with health,
/// last check, and the active connection count summed over shards with the per-shard split.
pub fn status_json(shard: &Shard, merged: &Merged) -> String {
    let cfg = &shard.config;
    let runtime = crate::control::runtime_servers();
    let pool_json = |p: usize| {
        let pool = &cfg.pools[p];
        let servers: Vec<_> = pool
            .servers
            .iter()
            .map(|&id| {
                let rs = shard.server(id);
                let check = shard.checks.borrow()[id.0].clone();
                json!({
                    "address": rs.name,
                    "resolved": rs.address.to_string(),
                    "status": server_state(shard, id),
                    "state": shard.load.admin_state(id).name(),
                    "health": match shard.load.health(id) {
                        Health::Up => "up",
                        Health::Down => "down",
                        Health::Checking => "checking",
                    },
                    "weight": shard.load.weight(id),
                    "config_weight": rs.weight,
                    // where each value comes from: the config, or the runtime API (kept in
                    // the state file, and kept over a config reload)
                    "state_source": if shard.load.admin_state(id) == AdminState::Ready { "config" } else { "runtime" },
                    "weight_source": if shard.load.weight(id) == rs.weight { "config" } else { "runtime" },
                    // added through the runtime API (kept in the state file), or in the config
                    "source": if runtime.is_added(&pool.name, &rs.name) { "runtime" } else { "config" },
                    "connection_limit": rs.connection_limit,
                    "active_connections": shard.load.global(id),
                    "active_connections_per_shard": shard.load.per_shard(id),
                    "requests_total": merged.servers.get(id.0).map(|s| s.requests).unwrap_or(0),
                    "responses": merged.servers.get(id.0).map(|s| json!({ "1xx": s.responses[0], "2xx": s.responses[1], "3xx": s.responses[2], "4xx": s.responses[3], "5xx": s.responses[4] })),
                    "connect_errors": merged.servers.get(id.0).map(|s| s.connect_errors).unwrap_or(0),
                    "retries": merged.servers.get(id.0).map(|s| s.retries).unwrap_or(0),
                    "passive_downs": merged.servers.get(id.0).map(|s| s.passive_downs).unwrap_or(0),
                    "bytes_in": merged.servers.get(id.0).map(|s| s.bytes_in).unwrap_or(0),
                    "bytes_out": merged.servers.get(id.0).map(|s| s.bytes_out).unwrap_or(0),
                    "state_since_seconds": shard.load.changed_at(id).unwrap_or(shard.started).elapsed().as_secs(),
                    "last_check": check.map(|c| json!({ "ok": c.ok, "at_unix_ms": c.at_unix_ms, "detail": c.detail, "latency_ms": (c.latency_ms * 10.0).round() / 10.0 })),
                })
            })
            .collect();
        let persistence = match &pool.persistence {
            Persistence::None => json!("none"),
            Persistence::ActiveCookie { cookie, timeout } => {
                json!({ "mode": "active-cookie", "cookie": cookie, "timeout_seconds": timeout.as_secs() })
            }
            Persistence::SourceIp { timeout, .. } => {
                json!({ "mode": "source-ip", "timeout_seconds": timeout.as_secs() })
            }
        };
        let up = pool.servers.iter().any(|&id| shard.load.usable(id));
        (
            up,
            json!({
                "scheduling": pool.scheduling.name(),
                "persistence": persistence,
                "health_check": pool.health_check.as_ref().map(|h| json!({
                    "type": h.kind.name(), "url": h.url, "interval_ms": h.interval.as_millis() as u64,
                })),
                "real_servers": servers,
            }),
        )
    };
    let services: Vec<_> = cfg
        .services
        .iter()
        .map(|vs| {
            let (own_up, own) = pool_json(vs.pool);
            let mut any_up = own_up;
            let subs: Vec<_> = vs
                .sub_services
                .iter()
                .map(|sub| {
                    let (up, mut j) = pool_json(sub.pool);
                    any_up |= up;
                    j["name"] = json!(sub.name);
                    j["hosts"] = json!(sub.hosts);
                    j["paths"] = json!(sub.paths);
                    j["status"] = json!(if up { "up" } else { "down" });
                    j
                })
                .collect();
            let mut v = own;
            v["name"] = json!(vs.name);
            v["listen"] = json!(vs.listen.to_string());
            v["tls"] = json!(vs.tls.is_some());
            v["redirect"] = json!(vs.redirect.is_some());
            v["status"] = json!(if any_up || vs.redirect.is_some() {
                "up"
            } else {
                "down"
            });
            v["sub_services"] = json!(subs);
            if let Some(m) = merged.services.get(vs.slot) {
                v["requests_total"] = json!(m.requests);
                v["connections_active"] = json!(m.connections_active);
                v["responses"] = json!({ "1xx": m.responses[0], "2xx": m.responses[1], "3xx": m.responses[2], "4xx": m.responses[3], "5xx": m.responses[4] });
                v["queued_requests"] = json!(m.queued);
                v["bytes_in"] = json!(m.bytes_in);
                v["bytes_out"] = json!(m.bytes_out);
                v["mode"] = json!(match vs.mode { crate::config::Mode::Http => "http", crate::config::Mode::Tcp => "tcp" });
            }
            v
        })
        .collect();
    let mut accepted = shard.accepted_per_shard();
    let mut cpu = vec![None; accepted.len()];
    for snap in &merged.per_shard {
        if let Some(a) = accepted.get_mut(snap.shard) {
            *a = snap.accepted;
            cpu[snap.shard] = Some(snap.cpu_seconds);
        }
    }
    let shards: Vec<_> = accepted
        .iter()
        .enumerate()
        .map(|(i, a)| json!({ "id": i, "core": cfg.runtime.cores[i], "accepted_connections": a, "busy_seconds": cpu[i] }))
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": shard.started.elapsed().as_secs(),
        "shards": shards,
        "config": config_json(shard.generation),
        "virtual_services": services,
    })
    .to_string()
}

/// The configuration generation serving, and how the last reload went.
fn config_json(generation: u64) -> serde_json::Value {
    let c = crate::control::counters();
    json!({
        "generation": generation,
        "pid": std::process::id(),
        "reloads": { "ok": c.reloads_ok, "error": c.reloads_error },
        "last_reload": (c.last_reload_unix_ms > 0).then(|| json!({
            "at_unix_ms": c.last_reload_unix_ms,
            "result": if c.last_reload_ok { "ok" } else { "error" },
        })),
        "upgrades": c.upgrades,
    })
}
