//! Per-client-address limits (LoadMaster's per-client limits): concurrent connections, new
//! connections per second and requests per second, counted on the shard that owns the client
//! (source-IP steering keeps all of one address's connections on one shard). Pure state with
//! the time passed in; bounded in memory.

use crate::config::ClientLimits;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;

/// Which limit refused something (metrics label and security-log reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    ServiceConnections,
    ApplianceConnections,
    ClientConnections,
    ClientConnectionRate,
    ClientRequestRate,
}

impl Limit {
    pub const ALL: [Limit; 5] = [
        Limit::ServiceConnections,
        Limit::ApplianceConnections,
        Limit::ClientConnections,
        Limit::ClientConnectionRate,
        Limit::ClientRequestRate,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Limit::ServiceConnections => "service_connections",
            Limit::ApplianceConnections => "appliance_connections",
            Limit::ClientConnections => "client_connections",
            Limit::ClientConnectionRate => "client_connection_rate",
            Limit::ClientRequestRate => "client_request_rate",
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Limit::ServiceConnections => "too many connections to the virtual service",
            Limit::ApplianceConnections => "too many connections to the appliance",
            Limit::ClientConnections => "too many concurrent connections from this address",
            Limit::ClientConnectionRate => "too many new connections per second from this address",
            Limit::ClientRequestRate => "too many requests per second from this address",
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Client {
    conns: u32,
    conn_second: u64,
    conns_this_second: u32,
    req_second: u64,
    reqs_this_second: u32,
    /// Second of the last security-log record for this address.
    logged: Option<u64>,
}

/// One virtual service's clients on one shard.
pub struct ClientTable {
    clients: HashMap<IpAddr, Client>,
    /// Addresses that had nothing open when queued, oldest first: eviction candidates. An
    /// address may be queued more than once or have opened a connection since; both are
    /// skipped when it comes up, so each new address costs O(1) amortised, never a scan.
    idle: VecDeque<IpAddr>,
    max_entries: usize,
}

/// A security record for one client at most this often.
pub const LOG_INTERVAL_SECS: u64 = 10;

impl ClientTable {
    pub fn new(max_entries: usize) -> ClientTable {
        ClientTable {
            clients: HashMap::new(),
            idle: VecDeque::new(),
            max_entries: max_entries.max(16),
        }
    }

    fn entry(&mut self, ip: IpAddr) -> &mut Client {
        if !self.clients.contains_key(&ip) {
            if self.clients.len() >= self.max_entries {
                self.evict_one();
            }
            self.idle.push_back(ip);
        }
        self.clients.entry(ip).or_default()
    }

    /// Forget the longest-idle address with nothing open (its rate windows restart). When
    /// every address has a connection open, none is forgotten: those are bounded by the
    /// connection limits themselves.
    fn evict_one(&mut self) {
        while let Some(ip) = self.idle.pop_front() {
            if self.clients.get(&ip).is_some_and(|c| c.conns == 0) {
                self.clients.remove(&ip);
                return;
            }
        }
    }

    /// Queue an address that has just closed its last connection; the queue's stale
    /// entries are dropped when it outgrows the table (amortised O(1) per push).
    fn queue_idle(&mut self, ip: IpAddr) {
        self.idle.push_back(ip);
        if self.idle.len() > 4 * self.max_entries {
            let clients = &self.clients;
            let mut seen = HashSet::new();
            self.idle
                .retain(|ip| clients.get(ip).is_some_and(|c| c.conns == 0) && seen.insert(*ip));
        }
    }

    /// Count a new connection from `ip` at second `now`, unless a limit refuses it.
    pub fn connect(&mut self, ip: IpAddr, now: u64, l: &ClientLimits) -> Result<(), Limit> {
        let c = self.entry(ip);
        if l.max_connections > 0 && c.conns >= l.max_connections {
            return Err(Limit::ClientConnections);
        }
        if c.conn_second != now {
            c.conn_second = now;
            c.conns_this_second = 0;
        }
        if l.connections_per_second > 0 && c.conns_this_second >= l.connections_per_second {
            return Err(Limit::ClientConnectionRate);
        }
        c.conns_this_second += 1;
        c.conns += 1;
        Ok(())
    }

    pub fn disconnect(&mut self, ip: IpAddr) {
        if let Some(c) = self.clients.get_mut(&ip) {
            c.conns = c.conns.saturating_sub(1);
            if c.conns == 0 {
                self.queue_idle(ip);
            }
        }
    }

    /// Count a request from `ip` at second `now`, unless the request rate refuses it.
    pub fn request(&mut self, ip: IpAddr, now: u64, l: &ClientLimits) -> Result<(), Limit> {
        if l.requests_per_second == 0 {
            return Ok(());
        }
        let c = self.entry(ip);
        if c.req_second != now {
            c.req_second = now;
            c.reqs_this_second = 0;
        }
        if c.reqs_this_second >= l.requests_per_second {
            return Err(Limit::ClientRequestRate);
        }
        c.reqs_this_second += 1;
        Ok(())
    }

    /// Should a refusal for `ip` go to the security log now (once per interval)?
    pub fn should_log(&mut self, ip: IpAddr, now: u64) -> bool {
        let c = self.entry(ip);
        match c.logged {
            Some(t) if now < t + LOG_INTERVAL_SECS => false,
            _ => {
                c.logged = Some(now);
                true
            }
        }
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LimitAction;

    fn limits(c: u32, cps: u32, rps: u32) -> ClientLimits {
        ClientLimits {
            max_connections: c,
            connections_per_second: cps,
            requests_per_second: rps,
            action: LimitAction::Drop,
        }
    }

    #[test]
    fn concurrent_and_rate_limits() {
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let mut t = ClientTable::new(100);
        let l = limits(2, 3, 2);
        assert!(t.connect(ip, 10, &l).is_ok());
        assert!(t.connect(ip, 10, &l).is_ok());
        assert_eq!(t.connect(ip, 10, &l), Err(Limit::ClientConnections));
        t.disconnect(ip);
        assert!(
            t.connect(ip, 10, &l).is_ok(),
            "third new connection this second"
        );
        t.disconnect(ip);
        assert_eq!(t.connect(ip, 10, &l), Err(Limit::ClientConnectionRate));
        assert!(t.connect(ip, 11, &l).is_ok(), "a new second");
        assert!(t.request(ip, 11, &l).is_ok());
        assert!(t.request(ip, 11, &l).is_ok());
        assert_eq!(t.request(ip, 11, &l), Err(Limit::ClientRequestRate));
        assert!(t.request(ip, 12, &l).is_ok());
    }

    #[test]
    fn logs_once_per_interval_and_stays_bounded() {
        let mut t = ClientTable::new(16);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        assert!(t.should_log(ip, 100));
        assert!(!t.should_log(ip, 105));
        assert!(t.should_log(ip, 110));
        for i in 0..1000u32 {
            let a = IpAddr::from(i.to_be_bytes());
            let _ = t.request(a, 1, &limits(0, 0, 5));
        }
        assert!(t.len() <= 16, "{}", t.len());
    }

    #[test]
    fn eviction_keeps_busy_addresses_and_forgets_the_oldest_idle() {
        let l = limits(10, 0, 0);
        let mut t = ClientTable::new(16);
        let ip = |i: u32| IpAddr::from(i.to_be_bytes());
        // 8 addresses hold a connection; 8 more came and went.
        for i in 0..8 {
            t.connect(ip(i), 1, &l).unwrap();
        }
        for i in 8..16 {
            t.connect(ip(i), 1, &l).unwrap();
            t.disconnect(ip(i));
        }
        // 10,000 new addresses: each evicts one idle address, never a busy one.
        for i in 100..10_100 {
            t.connect(ip(i), 1, &l).unwrap();
            t.disconnect(ip(i));
            assert!(t.len() <= 16);
        }
        for i in 0..8 {
            assert_eq!(t.clients[&ip(i)].conns, 1, "busy address {i} kept");
        }
        assert!(
            t.idle.len() <= 4 * 16 + 1,
            "queue bounded: {}",
            t.idle.len()
        );
        // With every entry busy, a new address is still admitted (table grows by it).
        let mut full = ClientTable::new(16);
        for i in 0..20 {
            full.connect(ip(i), 1, &l).unwrap();
        }
        assert_eq!(full.len(), 20);
    }
}
