//! The admin listener (shard 0 only): `GET /status` as JSON from this shard's view of the
//! mesh, and operator enable/disable of real servers (`POST /real_server/disable?address=…`),
//! applied here and told to every other shard.

use crate::config::{Persistence, ServerId};
use crate::http::Buf;
use crate::io::{fill, respond_and_close, until};
use crate::metrics::Merged;
use crate::shard::mesh::MeshMsg;
use crate::shard::Shard;
use glommio::net::{TcpListener, TcpStream};
use serde_json::json;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Admin connections served at once; beyond, new ones are closed at once (the admin port
/// must not become a way to exhaust the shard that also serves traffic).
const MAX_ADMIN_CONNECTIONS: usize = 64;
/// Admin connections from one address at once: one client cannot hold the whole listener.
const MAX_ADMIN_PER_ADDRESS: u32 = 16;
/// A request head must arrive within this.
const ADMIN_HEAD_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    let open = Rc::new(Cell::new(0usize));
    let per_address: Rc<RefCell<HashMap<IpAddr, u32>>> = Default::default();
    let access = shard.config.admin.as_ref().and_then(|a| a.access.clone());
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            shard.closed().await;
            None
        })
        .await;
        match accepted {
            None => return,
            Some(Ok(stream)) => {
                let peer = match stream.peer_addr() {
                    Ok(p) => p,
                    Err(_) => continue,
                };
                if access.as_ref().is_some_and(|a| !a.permits(peer.ip())) {
                    shard.diag(
                        "admin: client address not allowed",
                        || tracing::warn!(client = %peer, "admin: client address not allowed"),
                    );
                    continue;
                }
                let mine = per_address.borrow().get(&peer.ip()).copied().unwrap_or(0);
                if open.get() >= MAX_ADMIN_CONNECTIONS || mine >= MAX_ADMIN_PER_ADDRESS {
                    shard.diag(
                        "admin: too many connections",
                        || tracing::warn!(client = %peer, "admin: too many connections, closed"),
                    );
                    continue;
                }
                let slot = Slot::take(&open, &per_address, peer.ip());
                let shard = shard.clone();
                crate::shard::spawn_connection(
                    peer,
                    Box::pin(async move {
                        serve(shard, stream).await;
                        drop(slot);
                    }),
                );
            }
            Some(Err(_)) => glommio::timer::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// One admin connection's place in the caps; given back when dropped (a panicking request
/// included).
struct Slot {
    open: Rc<Cell<usize>>,
    per_address: Rc<RefCell<HashMap<IpAddr, u32>>>,
    ip: IpAddr,
}

impl Slot {
    fn take(
        open: &Rc<Cell<usize>>,
        per_address: &Rc<RefCell<HashMap<IpAddr, u32>>>,
        ip: IpAddr,
    ) -> Slot {
        open.set(open.get() + 1);
        *per_address.borrow_mut().entry(ip).or_default() += 1;
        Slot {
            open: open.clone(),
            per_address: per_address.clone(),
            ip,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.set(self.open.get() - 1);
        let mut map = self.per_address.borrow_mut();
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// A complete response; a HEAD request gets the head alone (same Content-Length).
fn response(head_only: bool, status: &str, ctype: &str, body: &str) -> Vec<u8> {
    let mut resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        resp.extend_from_slice(body.as_bytes());
    }
    resp
}

/// Value of `key` in a query string (no percent-decoding: addresses and names need none).
fn param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        kv.split_once('=')
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
    })
}

async fn serve(shard: Rc<Shard>, mut stream: TcpStream) {
    let mut buf = Buf::new(8192);
    let deadline = Instant::now() + ADMIN_HEAD_TIMEOUT;
    let (method, path) = loop {
        let mut hdrs = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut hdrs);
        match req.parse(buf.filled()) {
            Ok(httparse::Status::Complete(_)) => {
                break (
                    req.method.unwrap_or("").to_string(),
                    req.path.unwrap_or("/").to_string(),
                );
            }
            Ok(httparse::Status::Partial) if !buf.is_full() => {}
            _ => {
                return respond_and_close(&mut stream, crate::http::canned::error_response(400))
                    .await
            }
        }
        match until(deadline, fill(&mut stream, &mut buf)).await {
            Ok(n) if n > 0 => {}
            _ => return,
        }
    };
    let (route, query) = path.split_once('?').unwrap_or((path.as_str(), ""));
    let head = method == "HEAD";
    let response = |status: &str, ctype: &str, body: &str| response(head, status, ctype, body);
    let resp = match (method.as_str(), route) {
        ("GET" | "HEAD", "/status") => {
            let merged = shard.gather_metrics().await;
            response("200 OK", "application/json", &status_json(&shard, &merged))
        }
        ("GET" | "HEAD", "/metrics") => {
            let merged = shard.gather_metrics().await;
            let cfg = &shard.config;
            let text = crate::metrics::prometheus(
                cfg,
                &merged,
                |i| shard.load.usable(ServerId(i)) as u8,
                |i| shard.load.global(ServerId(i)),
            );
            response("200 OK", "text/plain; version=0.0.4; charset=utf-8", &text)
        }
        ("GET" | "HEAD", "/") => response("200 OK", "text/html; charset=utf-8", STATUS_PAGE),
        ("POST", "/real_server/enable") | ("POST", "/real_server/disable") => {
            let enable = route.ends_with("enable");
            match set_enabled(&shard, query, enable).await {
                Ok(body) => response("200 OK", "application/json", &body),
                Err(msg) => response(
                    "404 Not Found",
                    "application/json",
                    &json!({ "error": msg }).to_string(),
                ),
            }
        }
        (_, "/" | "/status" | "/metrics" | "/real_server/enable" | "/real_server/disable") => {
            return respond_and_close(&mut stream, crate::http::canned::error_response(405)).await
        }
        _ => return respond_and_close(&mut stream, crate::http::canned::error_response(404)).await,
    };
    respond_and_close(&mut stream, &resp).await;
}

/// Enable or disable every real server with `address` (optionally only in `service`).
async fn set_enabled(shard: &Shard, query: &str, enable: bool) -> Result<String, String> {
    let address = param(query, "address").ok_or("missing ?address=HOST:PORT")?;
    let service = param(query, "service");
    let cfg = &shard.config;
    let matched: Vec<ServerId> = cfg
        .servers
        .iter()
        .filter(|rs| rs.name == address || rs.address.to_string() == address)
        .filter(|rs| service.is_none_or(|s| cfg.services[cfg.pools[rs.pool].service].name == s))
        .map(|rs| rs.id)
        .collect();
    if matched.is_empty() {
        return Err(format!("no real server {address}"));
    }
    for &id in &matched {
        shard.load.set_enabled(id, enable);
        shard
            .tell_peers(|| MeshMsg::Enabled {
                server: id.0,
                enabled: enable,
            })
            .await;
        tracing::info!(real_server = %address, enabled = enable, "operator changed real server state");
    }
    Ok(json!({ "address": address, "enabled": enable, "real_servers": matched.len() }).to_string())
}

fn server_state(shard: &Shard, id: ServerId) -> &'static str {
    if !shard.load.is_enabled(id) {
        return "disabled";
    }
    match shard.load.health(id) {
        crate::balance::Health::Up => "up",
        crate::balance::Health::Down => "down",
        crate::balance::Health::Checking => "checking",
    }
}

/// Appliance-wide status: per virtual service (and sub-service) its real servers with health,
/// last check, and the active connection count summed over shards with the per-shard split.
pub fn status_json(shard: &Shard, merged: &Merged) -> String {
    let cfg = &shard.config;
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
                    "enabled": shard.load.is_enabled(id),
                    "weight": rs.weight,
                    "connection_limit": rs.connection_limit,
                    "active_connections": shard.load.global(id),
                    "active_connections_per_shard": shard.load.per_shard(id),
                    "requests_total": merged.servers.get(id.0).map(|s| s.requests).unwrap_or(0),
                    "last_check": check.map(|c| json!({ "ok": c.ok, "at_unix_ms": c.at_unix_ms, "detail": c.detail })),
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
                "scheduling": format!("{:?}", pool.scheduling),
                "persistence": persistence,
                "health_check": pool.health_check.as_ref().map(|h| json!({
                    "type": format!("{:?}", h.kind), "url": h.url, "interval_ms": h.interval.as_millis() as u64,
                })),
                "real_servers": servers,
            }),
        )
    };
    let services: Vec<_> = cfg
        .services
        .iter()
        .enumerate()
        .map(|(vi, vs)| {
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
            if let Some(m) = merged.services.get(vi) {
                v["requests_total"] = json!(m.requests);
                v["connections_active"] = json!(m.connections_active);
                v["responses"] = json!({ "1xx": m.responses[0], "2xx": m.responses[1], "3xx": m.responses[2], "4xx": m.responses[3], "5xx": m.responses[4] });
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
        "virtual_services": services,
    })
    .to_string()
}

/// The status page: self-contained (no external assets), refreshing itself from /status.
const STATUS_PAGE: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edgeshard status</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em;margin:0 0 .3em} h2{font-size:1.1em;margin:1.2em 0 .3em}
table{border-collapse:collapse;margin:.3em 0 1em;min-width:40em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left} th{background:#f3f3f3}
.up{color:#fff;background:#2a7d2a;padding:0 .4em;border-radius:3px}
.down{color:#fff;background:#b3261e;padding:0 .4em;border-radius:3px}
.disabled{color:#fff;background:#777;padding:0 .4em;border-radius:3px}
.checking{color:#222;background:#e8c547;padding:0 .4em;border-radius:3px}
#meta{color:#666}
</style></head><body>
<h1>edgeshard</h1><div id="meta">loading…</div><div id="services"></div>
<script>
"use strict";
let last = null;
function esc(s){return String(s).replace(/[&<>"]/g,c=>({"&":"&amp;","<":"&lt;",">":"&gt;","\"":"&quot;"}[c]));}
function badge(s){return '<span class="'+esc(s)+'">'+esc(s.charAt(0).toUpperCase()+s.slice(1))+'</span>';}
function rate(now,prev,dt){return prev===undefined||dt<=0?"–":((now-prev)/dt).toFixed(1);}
function pool(p,prev,dt){
  let h='<table><tr><th>Real server</th><th>Status</th><th>Active connections</th><th>Requests</th><th>Req/s</th><th>Last check</th></tr>';
  for(const [i,r] of p.real_servers.entries()){
    const pr=prev&&prev.real_servers&&prev.real_servers[i];
    const chk=r.last_check?(r.last_check.ok?"ok":"failed")+": "+r.last_check.detail:"–";
    h+='<tr class="rs"><td>'+esc(r.address)+'</td><td>'+badge(r.status)+'</td><td>'+r.active_connections+'</td><td>'+r.requests_total+'</td><td>'+rate(r.requests_total,pr&&pr.requests_total,dt)+'</td><td>'+esc(chk)+'</td></tr>';
  }
  return h+'</table>';
}
function render(s,prev,dt){
  document.getElementById("meta").textContent="version "+s.version+" · up "+s.uptime_seconds+" s · "+s.shards.length+" shards · accepted per shard: "+s.shards.map(x=>x.accepted_connections).join(" / ")+" · busy seconds per shard: "+s.shards.map(x=>x.busy_seconds==null?"–":x.busy_seconds.toFixed(1)).join(" / ");
  let h="";
  for(const [i,v] of s.virtual_services.entries()){
    const pv=prev&&prev.virtual_services[i];
    h+='<h2 class="vs">'+esc(v.name)+' '+badge(v.status)+' <small>'+esc(v.listen)+(v.tls?" (TLS)":"")+' · '+(v.connections_active||0)+' connections · '+rate(v.requests_total,pv&&pv.requests_total,dt)+' req/s</small></h2>';
    h+=pool(v,pv,dt);
    for(const [j,sub] of (v.sub_services||[]).entries()){
      h+='<h3>'+esc(v.name)+' / '+esc(sub.name)+' '+badge(sub.status)+' <small>'+esc(sub.hosts.join(", "))+'</small></h3>';
      h+=pool(sub,pv&&pv.sub_services&&pv.sub_services[j],dt);
    }
  }
  document.getElementById("services").innerHTML=h;
}
async function tick(){
  try{
    const r=await fetch("/status",{cache:"no-store"});
    const s=await r.json(); const now=Date.now();
    render(s,last&&last.s,last?(now-last.t)/1000:0); last={s:s,t:now};
  }catch(e){document.getElementById("meta").textContent="cannot reach /status: "+e;}
}
tick(); setInterval(tick,2000);
</script></body></html>
"##;
