//! The admin listener (shard 0 only): `GET /status` as JSON from this shard's view of the
//! mesh. Read-only; it never touches the data path's state except to read counters.

use crate::http::Buf;
use crate::io::{fill, respond_and_close, until};
use crate::shard::Shard;
use glommio::net::{TcpListener, TcpStream};
use serde_json::json;
use std::rc::Rc;
use std::time::{Duration, Instant};

pub async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            shard.closed().await;
            None
        })
        .await;
        match accepted {
            None => return,
            Some(Ok(stream)) => {
                glommio::spawn_local(serve(shard.clone(), stream)).detach();
            }
            Some(Err(_)) => glommio::timer::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn serve(shard: Rc<Shard>, mut stream: TcpStream) {
    let mut buf = Buf::new(8192);
    let deadline = Instant::now() + Duration::from_secs(10);
    let path = loop {
        let mut hdrs = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut hdrs);
        match req.parse(buf.filled()) {
            Ok(httparse::Status::Complete(_)) => {
                if req.method != Some("GET") && req.method != Some("HEAD") {
                    return respond_and_close(
                        &mut stream,
                        crate::http::canned::error_response(405),
                    )
                    .await;
                }
                break req.path.unwrap_or("/").to_string();
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
    let route = path.split('?').next().unwrap_or("");
    let (ctype, body) = match route {
        "/status" => ("application/json", status_json(&shard)),
        _ => return respond_and_close(&mut stream, crate::http::canned::error_response(404)).await,
    };
    let mut resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    resp.extend_from_slice(body.as_bytes());
    respond_and_close(&mut stream, &resp).await;
}

/// Appliance-wide status: per virtual service, its real servers with the active connection
/// count summed over shards (own exact, peers from the mesh) and the per-shard counts.
pub fn status_json(shard: &Shard) -> String {
    let cfg = &shard.config;
    let services: Vec<_> = cfg
        .services
        .iter()
        .map(|vs| {
            let servers: Vec<_> = vs
                .real_servers
                .iter()
                .map(|rs| {
                    json!({
                        "address": rs.name,
                        "resolved": rs.address.to_string(),
                        "status": "up",
                        "weight": rs.weight,
                        "connection_limit": rs.connection_limit,
                        "active_connections": shard.load.global(rs.id),
                        "active_connections_per_shard": shard.load.per_shard(rs.id),
                    })
                })
                .collect();
            json!({
                "name": vs.name,
                "listen": vs.listen.to_string(),
                "scheduling": format!("{:?}", vs.scheduling),
                "status": if vs.real_servers.is_empty() { "down" } else { "up" },
                "real_servers": servers,
            })
        })
        .collect();
    let shards: Vec<_> = shard
        .accepted_per_shard()
        .iter()
        .enumerate()
        .map(|(i, a)| json!({ "id": i, "core": cfg.runtime.cores[i], "accepted_connections": a }))
        .collect();
    let v = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": shard.started.elapsed().as_secs(),
        "shards": shards,
        "virtual_services": services,
    });
    v.to_string()
}
