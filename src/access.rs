//! Who may do what: IP access lists (CIDR blocks, deny wins, an empty allow list allows
//! everyone) and API token checks (hashes compared in constant time). Pure: no I/O.

use ipnet::IpNet;
use std::net::IpAddr;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
}

impl Access {
    /// May `ip` connect? An IPv4-mapped IPv6 peer (a dual-stack listener) is judged as IPv4.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip))
    }
}

/// Parse one entry: a CIDR block, or a bare address (a /32 or /128). Host bits set below the
/// prefix are refused: "10.0.0.1/8" is more likely a typo than a wish.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    let net: IpNet = s
        .parse()
        .map_err(|_| format!("{s:?}: expected an address or CIDR block like 10.0.0.0/8"))?;
    if net.trunc() != net {
        return Err(format!(
            "{s:?}: host bits set below the prefix (did you mean {}?)",
            net.trunc()
        ));
    }
    Ok(net)
}

/// SHA-256 of `data` (API tokens are kept and compared only as hashes).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The configured token whose hash matches `presented`'s, compared in constant time against
/// every token (the time says nothing about which one, or how much of it, matched).
pub fn find_token<'t>(
    tokens: &'t [crate::config::Token],
    presented: &[u8],
) -> Option<&'t crate::config::Token> {
    use subtle::ConstantTimeEq;
    let h = sha256(presented);
    let mut found = None;
    for t in tokens {
        if bool::from(t.sha256.ct_eq(&h)) {
            found = Some(t);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(allow: &[&str], deny: &[&str]) -> Access {
        Access {
            allow: allow.iter().map(|s| parse_cidr(s).unwrap()).collect(),
            deny: deny.iter().map(|s| parse_cidr(s).unwrap()).collect(),
        }
    }

    #[test]
    fn deny_wins_and_empty_allow_allows_all() {
        let a = acl(&[], &["192.0.2.0/24"]);
        assert!(a.permits("198.51.100.1".parse().unwrap()));
        assert!(!a.permits("192.0.2.7".parse().unwrap()));
        let b = acl(&["10.0.0.0/8", "2001:db8::/32"], &["10.1.0.0/16"]);
        assert!(b.permits("10.2.3.4".parse().unwrap()));
        assert!(!b.permits("10.1.3.4".parse().unwrap()));
        assert!(!b.permits("11.0.0.1".parse().unwrap()));
        assert!(b.permits("2001:db8::1".parse().unwrap()));
        assert!(!b.permits("2001:db9::1".parse().unwrap()));
    }

    #[test]
    fn mapped_ipv6_is_judged_as_ipv4() {
        let a = acl(&["127.0.0.0/8"], &[]);
        assert!(a.permits("::ffff:127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn parse_refuses_junk_and_host_bits() {
        assert!(parse_cidr("10.0.0.1/8").is_err());
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("example.com").is_err());
        assert_eq!(parse_cidr("::1").unwrap().to_string(), "::1/128");
    }
}
