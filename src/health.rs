//! Health checks: each real server is probed by one shard (server id modulo shard count), so
//! once per appliance per interval; results and state changes reach every shard through the
//! mesh. HTTP/HTTPS GET with expected status ranges, or a TCP connect.

use crate::config::{CheckType, HealthCheck, ServerId};
use crate::io::{timeout, until};
use crate::shard::mesh::MeshMsg;
use crate::shard::{CheckResult, Shard, State};
use crate::upstream::{connect, ConnectError};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Start the check loops of the servers this shard is responsible for that have none
/// running (at start, and after a reload for servers it added or gave a check).
pub fn start(shard: &Rc<Shard>) {
    for rs in shard.config.live_servers() {
        let pool = &shard.config.pools[rs.pool];
        if pool.health_check.is_none() || rs.id.0 % shard.nr_shards != shard.id {
            continue;
        }
        if !std::mem::replace(&mut shard.checking.borrow_mut()[rs.id.0], true) {
            crate::runtime::supervise(
                shard.id,
                "health check",
                check_loop(shard.state.clone(), rs.id),
            );
        }
    }
}

/// Pure state machine: `rise` successes bring a down server up, `fall` failures take an up
/// server down; a server not yet checked is decided by its first result.
#[derive(Debug, Clone, Copy)]
pub struct HealthState {
    pub up: bool,
    /// No result yet (initial_state = "checking").
    checking: bool,
    successes: u32,
    failures: u32,
}

impl HealthState {
    /// `up`: the initial state is "up" (traffic before the first check).
    pub fn new(up: bool) -> HealthState {
        HealthState {
            up,
            checking: !up,
            successes: 0,
            failures: 0,
        }
    }

    /// Another shard took the server out (passive failures): it needs `rise` successes.
    pub fn force_down(&mut self) {
        self.up = false;
        self.checking = false;
        self.successes = 0;
    }

    /// Record one result; returns true when the state changed.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> bool {
        if std::mem::take(&mut self.checking) {
            self.up = ok;
            self.successes = ok as u32;
            self.failures = !ok as u32;
            return true;
        }
        if ok {
            self.successes += 1;
            self.failures = 0;
        } else {
            self.failures += 1;
            self.successes = 0;
        }
        let was = self.up;
        if self.up && self.failures >= fall {
            self.up = false;
        } else if !self.up && self.successes >= rise {
            self.up = true;
        }
        was != self.up
    }
}

async fn check_loop(lasting: Rc<State>, id: ServerId) {
    let mut machine: Option<HealthState> = None;
    loop {
        // Every round reads the current configuration: a reload may change the check, or
        // remove it or the server (then the loop ends).
        let shard = lasting.current();
        let rs = shard.config.servers[id.0].clone();
        let hc = match shard.config.pools.get(rs.pool).map(|p| &p.health_check) {
            Some(Some(hc)) if !rs.retired => hc.clone(),
            _ => {
                lasting.checking.borrow_mut()[id.0] = false;
                return;
            }
        };
        // up to start with if configured so, or if already known up (a hand-over)
        let known_up = shard.load.health(id) == crate::balance::Health::Up;
        let state = machine.get_or_insert_with(|| HealthState::new(hc.initial_up || known_up));
        let started = Instant::now();
        let (ok, detail) = probe(&shard, id, &hc).await;
        let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        if shard.is_closing() {
            return;
        }
        if state.up && shard.load.health(id) == crate::balance::Health::Down {
            // Taken out by passive health (here or on another shard): back after `rise`.
            state.force_down();
        }
        if state.record(ok, hc.rise, hc.fall) {
            if state.up {
                tracing::info!(real_server = %rs.name, "real server is up: {detail}");
            } else {
                tracing::warn!(real_server = %rs.name, "real server is down: {detail}");
                shard.pools.drop_server(id);
            }
        }
        let at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        shard.load.set_up(id, state.up);
        if let Some(slot) = shard.checks.borrow_mut().get_mut(id.0) {
            *slot = Some(CheckResult {
                ok,
                at_unix_ms,
                detail: detail.clone(),
                latency_ms,
            });
        }
        let up = state.up;
        shard
            .tell_peers(|| MeshMsg::Health {
                server: id.0,
                up,
                ok,
                at_unix_ms,
                detail: detail.clone(),
                latency_ms,
            })
            .await;
        let wait = hc.interval.saturating_sub(started.elapsed());
        let stop = futures_lite::future::or(
            async {
                glommio::timer::sleep(wait).await;
                false
            },
            async {
                shard.closed().await;
                true
            },
        )
        .await;
        if stop {
            return;
        }
    }
}

/// One probe: (healthy, what was seen).
async fn probe(shard: &Shard, id: ServerId, hc: &HealthCheck) -> (bool, String) {
    let rs = shard.server(id);
    let addr = SocketAddr::new(rs.address.ip(), hc.port.unwrap_or(rs.address.port()));
    let deadline = Instant::now() + hc.timeout;
    // a tls check without re-encryption settings: an unverified handshake (it tells that the
    // real server's TLS stack answers; nothing is trusted or sent through it)
    let probe_name;
    let tls = match hc.kind {
        CheckType::Https => shard.upstream_tls(id),
        CheckType::Tls => match shard.upstream_tls(id) {
            Some(t) => Some(t),
            None => {
                probe_name = crate::tls::probe_name(hc.host.as_deref().unwrap_or(&rs.name));
                Some((crate::tls::probe_connector(), &probe_name))
            }
        },
        _ => None,
    };
    let mut conn = match connect(id, addr, hc.timeout, tls).await {
        Ok(c) => c,
        Err(ConnectError::TimedOut) => return (false, "connect timed out".into()),
        Err(ConnectError::TlsTimedOut) => return (false, "TLS handshake timed out".into()),
        Err(ConnectError::Refused(e)) => return (false, format!("connect failed: {e}")),
        Err(ConnectError::Tls(e)) => return (false, format!("TLS handshake failed: {e}")),
    };
    match (hc.kind, &conn.stream) {
        (CheckType::Tcp, _) => return (true, "TCP connect succeeded".into()),
        (CheckType::Tls, crate::upstream::UpStream::Tls(s)) => {
            let version = s
                .get_ref()
                .1
                .protocol_version()
                .and_then(|v| v.as_str())
                .unwrap_or("TLS");
            return (true, format!("TLS handshake succeeded ({version})"));
        }
        _ => {}
    }
    let host = hc
        .host
        .clone()
        .unwrap_or_else(|| match rs.name.rsplit_once(':') {
            Some((h, _)) => h.to_string(),
            None => rs.name.clone(),
        });
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: edgeshard-health-check\r\nConnection: close\r\n\r\n",
        hc.url
    );
    if until(deadline, conn.stream.write_all(req.as_bytes()))
        .await
        .is_err()
    {
        return (false, "sending the check request failed".into());
    }
    // The status line is all we need.
    let mut head = [0u8; 512];
    let mut n = 0;
    while n < head.len() && !head[..n].contains(&b'\n') {
        match until(deadline, conn.stream.read(&mut head[n..])).await {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                return (false, "no answer in time".into())
            }
            Err(e) => return (false, format!("reading the answer failed: {e}")),
        }
    }
    let line = String::from_utf8_lossy(&head[..n]);
    let line = line.lines().next().unwrap_or("");
    let status = line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse::<u16>().ok());
    let _ = timeout(Duration::from_millis(100), conn.stream.close()).await;
    match status {
        Some(s) if hc.expect.iter().any(|&(lo, hi)| (lo..=hi).contains(&s)) => {
            (true, format!("HTTP {s}"))
        }
        Some(s) => (false, format!("HTTP {s} not expected")),
        None => (false, "no HTTP status line".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::HealthState;

    #[test]
    fn rise_and_fall() {
        let mut h = HealthState::new(true);
        assert!(h.up);
        assert!(!h.record(false, 2, 3));
        assert!(!h.record(false, 2, 3));
        assert!(h.record(false, 2, 3), "third failure takes it down");
        assert!(!h.up);
        assert!(!h.record(true, 2, 3));
        assert!(!h.record(false, 2, 3), "a failure resets the rise count");
        assert!(!h.record(true, 2, 3));
        assert!(h.record(true, 2, 3), "two successes in a row bring it up");
        assert!(h.up);
        assert!(
            !h.record(false, 2, 3),
            "a single failure does not take it down"
        );
    }

    #[test]
    fn checking_is_decided_by_the_first_result() {
        let mut h = HealthState::new(false);
        assert!(!h.up);
        assert!(h.record(true, 2, 3), "first good check: up at once");
        assert!(h.up);
        let mut d = HealthState::new(false);
        assert!(d.record(false, 2, 3), "first bad check: down");
        assert!(!d.up);
        assert!(!d.record(true, 2, 3));
        assert!(d.record(true, 2, 3), "then rise as usual");
    }

    #[test]
    fn forced_down_needs_rise() {
        let mut h = HealthState::new(true);
        h.force_down();
        assert!(!h.record(true, 2, 3));
        assert!(h.record(true, 2, 3));
        assert!(h.up);
    }
}
