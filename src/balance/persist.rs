//! Persistence: the signed active cookie (no table: any shard, and any appliance with the same
//! key, honours it), and the per-shard source-IP table (bounded, expiring). Time is passed in.

use crate::config::ServerId;
use ring::hmac;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Signs and verifies persistence cookies. Value: `<server index>.<expiry unix s>.<mac>`, all
/// hex; the MAC covers the pool, the server's address, the index and the expiry, so a cookie
/// cannot be forged or moved to another server, and it expires by itself.
pub struct CookieSigner {
    key: hmac::Key,
}

impl CookieSigner {
    pub fn new(secret: &[u8; 32]) -> CookieSigner {
        CookieSigner {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    fn mac(&self, pool: &str, address: &str, index: usize, expiry: u64) -> [u8; 16] {
        let mut ctx = hmac::Context::with_key(&self.key);
        for part in [pool.as_bytes(), b"\0", address.as_bytes(), b"\0"] {
            ctx.update(part);
        }
        ctx.update(&(index as u64).to_be_bytes());
        ctx.update(&expiry.to_be_bytes());
        let tag = ctx.sign();
        let mut out = [0u8; 16];
        out.copy_from_slice(&tag.as_ref()[..16]);
        out
    }

    /// The cookie value naming server `index` (its `address`) of `pool` until `expiry`.
    pub fn issue(&self, pool: &str, address: &str, index: usize, expiry_unix: u64) -> String {
        let mut v = format!("{index:x}.{expiry_unix:x}.");
        for b in self.mac(pool, address, index, expiry_unix) {
            v.push_str(&format!("{b:02x}"));
        }
        v
    }

    /// The server index a cookie names, if it is authentic and not expired at `now_unix`.
    /// `address_of` maps an index to the server's address (None: no such server); `len`:
    /// the pool's size. A reload that removed a server before it in the pool moves a server's
    /// index: the MAC names its address, so the server is found at its new place.
    pub fn verify<'a>(
        &self,
        pool: &str,
        value: &str,
        now_unix: u64,
        address_of: impl Fn(usize) -> Option<&'a str>,
        len: usize,
    ) -> Option<usize> {
        let mut parts = value.split('.');
        let index = usize::from_str_radix(parts.next()?, 16).ok()?;
        let expiry = u64::from_str_radix(parts.next()?, 16).ok()?;
        let mac_hex = parts.next()?;
        if parts.next().is_some() || mac_hex.len() != 32 || expiry <= now_unix {
            return None;
        }
        let mut mac = [0u8; 16];
        for (i, b) in mac.iter_mut().enumerate() {
            *b = u8::from_str_radix(mac_hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        let matches = |at: usize| {
            let Some(address) = address_of(at) else {
                return false;
            };
            let expected = self.mac(pool, address, index, expiry);
            // compare without an early exit, so timing says nothing about the MAC
            let diff = expected
                .iter()
                .zip(mac.iter())
                .fold(0u8, |d, (a, b)| d | (a ^ b));
            diff == 0
        };
        if matches(index) {
            return Some(index);
        }
        // bounded: a forged cookie costs at most this many more MACs
        (0..len.min(MOVED_SEARCH)).find(|&at| at != index && matches(at))
    }
}

/// Places searched for a server that a reload moved within its pool.
const MOVED_SEARCH: usize = 256;

/// Client address → real server, for one pool on one shard. Bounded: when full, expired
/// entries go first, then the entry closest to expiry.
pub struct SourceTable {
    entries: HashMap<IpAddr, (ServerId, Instant)>,
    max: usize,
}

impl SourceTable {
    pub fn new(max: usize) -> SourceTable {
        SourceTable {
            entries: HashMap::new(),
            max: max.max(1),
        }
    }

    /// Every live entry: address, server, time left (handed to the process that replaces
    /// this one).
    pub fn live(&self, now: Instant) -> impl Iterator<Item = (IpAddr, ServerId, Duration)> + '_ {
        self.entries
            .iter()
            .filter(move |(_, (_, exp))| *exp > now)
            .map(move |(ip, (s, exp))| (*ip, *s, *exp - now))
    }

    pub fn get(&self, ip: IpAddr, now: Instant) -> Option<ServerId> {
        match self.entries.get(&ip) {
            Some(&(s, exp)) if exp > now => Some(s),
            _ => None,
        }
    }

    /// Persist (or refresh: the timeout slides with use) `ip` → `server`.
    pub fn put(&mut self, ip: IpAddr, server: ServerId, now: Instant, timeout: Duration) {
        if !self.entries.contains_key(&ip) && self.entries.len() >= self.max {
            self.entries.retain(|_, (_, exp)| *exp > now);
            if self.entries.len() >= self.max {
                if let Some(victim) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, exp))| *exp)
                    .map(|(k, _)| *k)
                {
                    self.entries.remove(&victim);
                }
            }
        }
        self.entries.insert(ip, (server, now + timeout));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_verify_expire_and_resist_forgery() {
        let s = CookieSigner::new(&[7; 32]);
        let addrs = ["10.0.0.1:4443", "10.0.0.2:4443"];
        let at = |i: usize| addrs.get(i).copied();
        let c = s.issue("web", addrs[1], 1, 1000);
        assert_eq!(s.verify("web", &c, 999, at, 3), Some(1));
        assert_eq!(s.verify("web", &c, 1000, at, 3), None, "expired");
        assert_eq!(s.verify("other", &c, 999, at, 3), None, "another pool");
        // pointing it at the other server breaks the MAC
        let forged = c.replacen('1', "0", 1);
        assert_eq!(s.verify("web", &forged, 999, at, 3), None);
        // extending the expiry breaks the MAC
        let parts: Vec<&str> = c.split('.').collect();
        let longer = format!("{}.{:x}.{}", parts[0], 5000, parts[2]);
        assert_eq!(s.verify("web", &longer, 999, at, 3), None);
        for junk in ["", "1", "1.2", "zz.1.00", "1.ff.00", &format!("{c}.x")] {
            assert_eq!(s.verify("web", junk, 0, at, 3), None, "{junk}");
        }
        // another appliance with the same key honours it; one with another key does not
        assert_eq!(
            CookieSigner::new(&[7; 32]).verify("web", &c, 999, at, 3),
            Some(1)
        );
        assert_eq!(
            CookieSigner::new(&[8; 32]).verify("web", &c, 999, at, 3),
            None
        );
        // a reload removed the server before it in the pool: found at its new place
        let moved = ["10.0.0.2:4443"];
        let at_moved = |i: usize| moved.get(i).copied();
        assert_eq!(s.verify("web", &c, 999, at_moved, 1), Some(0));
        let gone = ["10.0.0.1:4443"];
        assert_eq!(s.verify("web", &c, 999, |i| gone.get(i).copied(), 1), None);
    }

    #[test]
    fn source_table_expires_slides_and_stays_bounded() {
        let mut t = SourceTable::new(2);
        let t0 = Instant::now();
        let ip = |n: u8| IpAddr::from([10, 0, 0, n]);
        let ttl = Duration::from_secs(10);
        t.put(ip(1), ServerId(1), t0, ttl);
        assert_eq!(t.get(ip(1), t0 + Duration::from_secs(9)), Some(ServerId(1)));
        assert_eq!(t.get(ip(1), t0 + Duration::from_secs(10)), None);
        // sliding: use at 9s keeps it to 19s
        t.put(ip(1), ServerId(1), t0 + Duration::from_secs(9), ttl);
        assert_eq!(
            t.get(ip(1), t0 + Duration::from_secs(18)),
            Some(ServerId(1))
        );
        t.put(ip(2), ServerId(0), t0 + Duration::from_secs(1), ttl);
        t.put(ip(3), ServerId(0), t0 + Duration::from_secs(2), ttl);
        assert_eq!(t.len(), 2, "bounded");
        assert_eq!(
            t.get(ip(2), t0 + Duration::from_secs(3)),
            None,
            "the entry closest to expiry went"
        );
    }
}
