//! The runtime API's changes (operator state ready / drain / maint, weights), each applied on
//! every shard before the answer, written to the security log with who did it, and kept in
//! `[admin] state_file` so that a restart keeps them; and /healthz.

use super::Request;
use crate::balance::AdminState;
use crate::config::{Config, ServerId};
use crate::shard::mesh::AdminChange;
use crate::shard::Shard;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Longest `wait` a change may ask for (the call also ends when its client goes away).
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// Write a security-log record (and a diagnostic line) for an API event.
pub fn audit(
    shard: &Shard,
    client: SocketAddr,
    event: &'static str,
    reason: &str,
    status: Option<u16>,
    path: &str,
) {
    tracing::info!(client = %client, event, "admin: {reason}");
    // the admin listener has no service of its own: records name it "admin"
    shard.log.security(&crate::log::SecurityRecord {
        client,
        service: "admin",
        event,
        reason,
        status,
        host: None,
        path: Some(path.as_bytes()),
    });
}

/// One runtime change kept in the state file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StateEntry {
    /// "service" or "service/sub-service".
    pub pool: String,
    pub address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<AdminState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    servers: Vec<StateEntry>,
    /// Real servers the API added or removed.
    #[serde(default)]
    runtime: crate::config::RuntimeServers,
}

/// The real servers the API added or removed, as the state file keeps them (none if there is
/// no file yet).
pub fn load_runtime_servers(path: &Path) -> Result<crate::config::RuntimeServers, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str::<StateFile>(&text)
            .map(|f| f.runtime)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The real server of `pool` at `address` (as written in the config, or resolved).
fn find(config: &Config, pool: &str, address: &str) -> Option<ServerId> {
    let p = config.pools.iter().find(|p| p.name == pool)?;
    p.servers.iter().copied().find(|&id| {
        let rs = &config.servers[id.0];
        rs.name == address || rs.address.to_string() == address
    })
}

/// Read the state file (before the shards start): the changes to apply on every shard.
/// Entries naming servers no longer in the config are skipped with a warning; a missing file
/// is no change.
pub fn load_state_file(path: &Path, config: &Config) -> Result<Vec<AdminChange>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let file: StateFile =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut changes = Vec::new();
    for e in file.servers {
        let Some(id) = find(config, &e.pool, &e.address) else {
            tracing::warn!(pool = %e.pool, address = %e.address, "state file: no such real server any more; skipped");
            continue;
        };
        if let Some(s) = e.state {
            changes.push(AdminChange::State(id, s));
        }
        if let Some(w) = e.weight.filter(|w| (1..=65535).contains(w)) {
            changes.push(AdminChange::Weight(id, w));
        }
    }
    Ok(changes)
}

/// What differs from the config now, as the state file keeps it.
fn runtime_entries(shard: &Shard) -> Vec<StateEntry> {
    let cfg = &shard.config;
    cfg.live_servers()
        .filter_map(|rs| {
            let state = shard.load.admin_state(rs.id);
            let weight = shard.load.weight(rs.id);
            let e = StateEntry {
                pool: cfg.pools[rs.pool].name.clone(),
                address: rs.name.clone(),
                state: (state != AdminState::Ready).then_some(state),
                weight: (weight != rs.weight).then_some(weight),
            };
            (e.state.is_some() || e.weight.is_some()).then_some(e)
        })
        .collect()
}

/// Write the state file atomically (a temporary file renamed over it), off the shard.
async fn save(shard: &Shard) -> Result<(), String> {
    let Some(path) = shard
        .config
        .admin
        .as_ref()
        .and_then(|a| a.state_file.clone())
    else {
        return Ok(());
    };
    let file = StateFile {
        version: 1,
        servers: runtime_entries(shard),
        runtime: crate::control::runtime_servers(),
    };
    let text = serde_json::to_string_pretty(&file).map_err(|e| e.to_string())?;
    glommio::executor()
        .spawn_blocking(move || write_atomic(&path, text.as_bytes()))
        .await
}

fn write_atomic(path: &PathBuf, data: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| format!("{}: {e}", path.display()))
}

/// GET /healthz: 200 when every shard answers and every virtual service has a real server up
/// (keepalived's and the routing daemon's check), else 503 with the reasons. With
/// `appliance_only` (`?scope=appliance`), the real servers are left out: the check a pair
/// sharing its real servers wants, so that an outage of one service's servers does not take
/// the VIP, and every other service with it, off both appliances.
pub async fn healthz(shard: &Shard, appliance_only: bool) -> (bool, Value) {
    let merged = shard.gather_metrics().await;
    let mut problems = Vec::new();
    if merged.per_shard.len() < shard.nr_shards {
        problems.push(format!(
            "{} of {} shards answered",
            merged.per_shard.len(),
            shard.nr_shards
        ));
    }
    let cfg = &shard.config;
    let services = cfg
        .services
        .iter()
        .filter(|vs| vs.redirect.is_none() && !appliance_only);
    for vs in services {
        let pools = std::iter::once(vs.pool).chain(vs.sub_services.iter().map(|s| s.pool));
        let up = pools
            .flat_map(|p| cfg.pools[p].servers.iter())
            .any(|&id| shard.load.usable(id));
        if !up {
            problems.push(format!(
                "virtual service {:?} has no real server up",
                vs.name
            ));
        }
    }
    let ok = problems.is_empty();
    (
        ok,
        json!({ "status": if ok { "ok" } else { "fail" }, "problems": problems }),
    )
}

/// A change: POST .../real_servers/{address}/state, PUT .../weight, or the legacy
/// /real_server/enable|disable. Returns the status and the JSON answer.
pub async fn change(shard: &Shard, req: &Request, who: &str) -> (u16, Value) {
    let err = |status: u16, msg: String| (status, json!({ "error": msg }));
    if let Some(action) = req.path.strip_prefix("/real_server/") {
        return legacy(shard, req, who, action == "enable").await;
    }
    // /api/v1/services/{service}[/{sub}]/real_servers/{address}/{state|weight}
    let path = percent_decode(&req.path);
    let rest = path.strip_prefix("/api/v1/services/").unwrap_or("");
    if let Some(pool) = rest.strip_suffix("/real_servers") {
        return match req.method.as_str() {
            "POST" => add(shard, req, who, pool).await,
            m => err(
                405,
                format!("{m} .../real_servers is not a call (POST adds one)"),
            ),
        };
    }
    if req.method == "DELETE" {
        return match rest.split_once("/real_servers/") {
            Some((pool, address)) => remove(shard, req, who, pool, address).await,
            None => err(
                404,
                "expected DELETE /api/v1/services/{service}/real_servers/{address}".into(),
            ),
        };
    }
    let Some((pool, tail)) = rest.split_once("/real_servers/") else {
        return err(
            404,
            "expected /api/v1/services/{service}/real_servers/{address}/state or /weight".into(),
        );
    };
    let Some((address, what)) = tail.rsplit_once('/') else {
        return err(
            404,
            "expected .../real_servers/{address}/state or /weight".into(),
        );
    };
    let Some(id) = find(&shard.config, pool, address) else {
        return err(404, format!("no real server {address} in {pool}"));
    };
    let body: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => return err(400, format!("the body is not JSON: {e}")),
    };
    let (change, before, after) = match (req.method.as_str(), what) {
        ("POST", "state") => {
            let state = match serde_json::from_value::<AdminState>(body["state"].clone()) {
                Ok(s) => s,
                Err(_) => {
                    return err(
                        400,
                        "\"state\" must be \"ready\", \"drain\" or \"maint\"".into(),
                    )
                }
            };
            let before = shard.load.admin_state(id).name();
            (
                AdminChange::State(id, state),
                before.to_string(),
                state.name().to_string(),
            )
        }
        ("PUT", "weight") => {
            let w = match body["weight"].as_u64() {
                Some(w) if (1..=65535).contains(&w) => w as u32,
                _ => return err(400, "\"weight\" must be a number from 1 to 65535".into()),
            };
            let before = shard.load.weight(id);
            (
                AdminChange::Weight(id, w),
                before.to_string(),
                w.to_string(),
            )
        }
        _ => return err(405, format!("{} .../{what} is not a call", req.method)),
    };
    let wait = match body.get("wait") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) => match crate::config::parse_duration(d) {
            Ok(d) if d <= MAX_WAIT => Some(d),
            Ok(_) => return err(400, "\"wait\" is at most 1h".into()),
            Err(m) => return err(400, format!("\"wait\": {m}")),
        },
        Some(_) => return err(400, "\"wait\" is a duration like \"5m\"".into()),
    };
    if !shard.apply_everywhere(change).await {
        return err(
            503,
            "a shard did not acknowledge the change within 1s".into(),
        );
    }
    let what_changed = format!("{who}: {pool} {address} {what} {before} -> {after}");
    audit(
        shard,
        req.peer,
        "api_change",
        &what_changed,
        Some(200),
        &req.path,
    );
    if let Err(e) = save(shard).await {
        tracing::error!("admin: state file not written: {e}");
        return err(
            500,
            format!(
                "applied on every shard, but not kept for a restart: state file not written: {e}"
            ),
        );
    }
    if let Some(limit) = wait {
        let deadline = Instant::now() + limit;
        while shard.load.global(id) > 0 && Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(20)).await;
        }
        if shard.load.global(id) > 0 {
            return (
                504,
                json!({ "error": "connections still active at the wait's end", "active_connections": shard.load.global(id) }),
            );
        }
    }
    (200, server_json(shard, id))
}

/// `%XX` escapes decoded (clients may encode `[`, `]` or `/` of an address or a sub-service).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |j: usize| b.get(j).and_then(|c| (*c as char).to_digit(16));
        match (b[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn server_json(shard: &Shard, id: ServerId) -> Value {
    let rs = shard.server(id);
    json!({
        "pool": shard.config.pools[rs.pool].name,
        "address": rs.name,
        "state": shard.load.admin_state(id).name(),
        "weight": shard.load.weight(id),
        "active_connections": shard.load.global(id),
    })
}

/// POST /real_server/disable|enable?address=HOST:PORT[&service=NAME]: maint / ready for every
/// real server at that address (kept for scripts written before /api/v1; needs a token too).
async fn legacy(shard: &Shard, req: &Request, who: &str, enable: bool) -> (u16, Value) {
    let Some(address) = req.param("address") else {
        return (400, json!({ "error": "missing ?address=HOST:PORT" }));
    };
    let service = req.param("service");
    let cfg = &shard.config;
    let matched: Vec<ServerId> = cfg
        .live_servers()
        .filter(|rs| rs.name == address || rs.address.to_string() == address)
        .filter(|rs| service.is_none_or(|s| cfg.services[cfg.pools[rs.pool].service].name == s))
        .map(|rs| rs.id)
        .collect();
    if matched.is_empty() {
        return (404, json!({ "error": format!("no real server {address}") }));
    }
    let state = if enable {
        AdminState::Ready
    } else {
        AdminState::Maint
    };
    for &id in &matched {
        if !shard.apply_everywhere(AdminChange::State(id, state)).await {
            return (
                503,
                json!({ "error": "a shard did not acknowledge the change within 1s" }),
            );
        }
    }
    audit(
        shard,
        req.peer,
        "api_change",
        &format!("{who}: {address} state -> {}", state.name()),
        Some(200),
        &req.path,
    );
    if let Err(e) = save(shard).await {
        tracing::error!("admin: state file not written: {e}");
        return (
            500,
            json!({ "error": format!("applied on every shard, but not kept for a restart: state file not written: {e}") }),
        );
    }
    (
        200,
        json!({ "address": address, "enabled": enable, "state": state.name(), "real_servers": matched.len() }),
    )
}

/// How long an API call waits for the reload it asked for.
const RELOAD_WAIT: Duration = Duration::from_secs(60);

/// POST /api/v1/reload: the same as SIGHUP; answers with the new generation or the error.
pub async fn reload(shard: &Shard, req: &Request, who: &str) -> (u16, Value) {
    let r = crate::control::reload_from_shard(RELOAD_WAIT).await;
    let (status, v, what) = match r {
        Ok(generation) => (
            200,
            json!({ "result": "ok", "generation": generation }),
            format!("{who}: reload: generation {generation}"),
        ),
        Err(e) => (
            422,
            json!({ "result": "error", "error": e }),
            format!("{who}: reload refused: {e}"),
        ),
    };
    audit(
        shard,
        req.peer,
        "api_change",
        &what,
        Some(status),
        &req.path,
    );
    (status, v)
}

/// Change the runtime API's real servers, keep the change in the state file and reload to
/// apply it on every shard; undone if the reload fails (the configuration file on disk may
/// have become invalid meanwhile: the error says so).
async fn apply_runtime(
    shard: &Shard,
    change: impl FnOnce(&mut crate::config::RuntimeServers),
) -> Result<u64, String> {
    let before = crate::control::runtime_servers();
    let mut after = before.clone();
    change(&mut after);
    crate::control::set_runtime_servers(after);
    save(shard).await?;
    match crate::control::reload_from_shard(RELOAD_WAIT).await {
        Ok(g) => {
            // the operator state of what is in the new configuration, as it is now
            save(&shard.state.current()).await?;
            Ok(g)
        }
        Err(e) => {
            crate::control::set_runtime_servers(before);
            let _ = save(shard).await;
            Err(e)
        }
    }
}

/// POST /api/v1/services/{pool}/real_servers {"address": "IP:port", "weight": 1000,
/// "connection_limit": 0}: a new real server on every shard. With a health check it gets
/// traffic once its first check passes (it starts "checking").
async fn add(shard: &Shard, req: &Request, who: &str, pool: &str) -> (u16, Value) {
    let err = |status: u16, msg: String| (status, json!({ "error": msg }));
    let Some(p) = shard.config.pools.iter().find(|p| p.name == pool) else {
        return err(404, format!("no service or sub-service {pool:?}"));
    };
    let body: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => return err(400, format!("the body is not JSON: {e}")),
    };
    let Some(address) = body["address"].as_str() else {
        return err(400, "\"address\" (IP:port) is required".into());
    };
    let Ok(sa) = address.parse::<SocketAddr>() else {
        return err(
            400,
            format!(
                "\"address\": {address:?} is not an IP:port (names are not resolved at run time)"
            ),
        );
    };
    let weight = match &body["weight"] {
        Value::Null => 1000,
        w => match w.as_u64() {
            Some(w) if (1..=65535).contains(&w) => w as u32,
            _ => return err(400, "\"weight\" must be a number from 1 to 65535".into()),
        },
    };
    let connection_limit = match &body["connection_limit"] {
        Value::Null => 0,
        l => match l.as_u64() {
            Some(l) if l <= u32::MAX as u64 => l as u32,
            _ => {
                return err(
                    400,
                    "\"connection_limit\" must be a number (0: none)".into(),
                )
            }
        },
    };
    if p.servers.iter().any(|id| shard.server(*id).address == sa) {
        return err(409, format!("{address} is already a real server of {pool}"));
    }
    let entry = crate::config::AddedServer {
        pool: pool.to_string(),
        address: sa.to_string(),
        weight,
        connection_limit,
    };
    let r = apply_runtime(shard, |rt| {
        let removed = |r: &crate::config::RemovedServer| {
            r.pool == entry.pool && (r.address == entry.address || r.address == address)
        };
        // one the configuration lists, removed by the API before, comes back as configured
        let was_removed = rt.removed.iter().any(removed);
        rt.removed.retain(|r| !removed(r));
        if !was_removed {
            rt.added.push(entry.clone());
        }
    })
    .await;
    match r {
        Ok(generation) => {
            let current = shard.state.current();
            let id = find(&current.config, pool, &sa.to_string());
            audit(
                shard,
                req.peer,
                "api_change",
                &format!("{who}: {pool} {sa} added (weight {weight}, connection_limit {connection_limit})"),
                Some(201),
                &req.path,
            );
            match id {
                Some(id) => {
                    let mut v = server_json(&current, id);
                    v["generation"] = json!(generation);
                    v["health"] = json!(match current.load.health(id) {
                        crate::balance::Health::Up => "up",
                        crate::balance::Health::Down => "down",
                        crate::balance::Health::Checking => "checking",
                    });
                    (201, v)
                }
                None => err(
                    500,
                    format!("{sa}: added, but the new configuration does not have it"),
                ),
            }
        }
        Err(e) => err(
            422,
            format!("not added: the reload that adds it failed: {e}"),
        ),
    }
}

/// DELETE /api/v1/services/{pool}/real_servers/{address}: only a server in maint with no
/// connection left (409 with the count otherwise), so that nothing in flight is cut.
async fn remove(
    shard: &Shard,
    req: &Request,
    who: &str,
    pool: &str,
    address: &str,
) -> (u16, Value) {
    let err = |status: u16, msg: String| (status, json!({ "error": msg }));
    let Some(id) = find(&shard.config, pool, address) else {
        return err(404, format!("no real server {address} in {pool}"));
    };
    let state = shard.load.admin_state(id);
    let active = shard.load.global(id);
    if state != AdminState::Maint || active > 0 {
        return (
            409,
            json!({
                "error": "a real server is removed once in maint with no connection left: set its state to maint (with \"wait\") first",
                "state": state.name(),
                "active_connections": active,
            }),
        );
    }
    let rs = shard.server(id).clone();
    let r = apply_runtime(shard, |rt| {
        let before = rt.added.len();
        rt.added.retain(|a| {
            !(a.pool == pool && (a.address == rs.name || a.address == rs.address.to_string()))
        });
        if rt.added.len() == before {
            rt.removed.push(crate::config::RemovedServer {
                pool: pool.to_string(),
                address: rs.name.clone(),
            });
        }
    })
    .await;
    match r {
        Ok(generation) => {
            audit(
                shard,
                req.peer,
                "api_change",
                &format!("{who}: {pool} {} removed", rs.name),
                Some(200),
                &req.path,
            );
            (
                200,
                json!({ "pool": pool, "address": rs.name, "removed": true, "generation": generation }),
            )
        }
        Err(e) => err(
            422,
            format!("not removed: the reload that removes it failed: {e}"),
        ),
    }
}
