//! Per-client-address limits (LoadMaster's per-client limits): concurrent connections, new
//! connections per second and requests per second, counted on the shard that owns the client
//! (source-IP steering keeps all of one address's connections on one shard). Pure state with
//! the time passed in; bounded in memory.

use crate::config::ClientLimits;
use std::collections::HashMap;
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
    max_entries: usize,
}

/// A security record for one client at most this often.
pub const LOG_INTERVAL_SECS: u64 = 10;

impl ClientTable {
    pub fn new(max_entries: usize) -> ClientTable {
        ClientTable {
            clients: HashMap::new(),
            max_entries: max_entries.max(16),
        }
    }

    fn entry(&mut self, ip: IpAddr) -> &mut Client {
        if !self.clients.contains_key(&ip) && self.clients.len() >= self.max_entries {
            // Forget addresses with nothing open; rate windows restart for them.
            self.clients.retain(|_, c| c.conns > 0);
        }
        self.clients.entry(ip).or_default()
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
}
