//! The PROXY protocol (HAProxy's spec, versions 1 and 2): read at the start of a connection
//! from a trusted load balancer in front (`accept_proxy`), and a version 2 header written to
//! real servers (`send_proxy`) so that a layer-4 real server still learns who the client is.
//! Pure code: bytes in, a verdict out.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Longest header read: a v1 line is at most 107 bytes; v2 addresses with a few TLVs fit.
pub const MAX_HEADER: usize = 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum Header {
    Incomplete,
    /// `len` bytes of header; `source`/`dest`: the connection it stands for (None: LOCAL or
    /// UNKNOWN, the sender's own connection, e.g. a health check).
    Complete {
        len: usize,
        source: Option<SocketAddr>,
        dest: Option<SocketAddr>,
    },
    Invalid(&'static str),
}

/// Read the PROXY header at the start of `b`.
pub fn parse(b: &[u8]) -> Header {
    let sig = b.len().min(12);
    if b[..sig] == V2_SIG[..sig] {
        return if b.len() < 16 {
            Header::Incomplete
        } else {
            v2(b)
        };
    }
    let pre = b.len().min(6);
    if b[..pre] == b"PROXY "[..pre] {
        return if b.len() < 6 {
            Header::Incomplete
        } else {
            v1(b)
        };
    }
    Header::Invalid("no PROXY protocol header")
}

fn v1(b: &[u8]) -> Header {
    let Some(end) = b.windows(2).take(107).position(|w| w == b"\r\n") else {
        return if b.len() >= 107 {
            Header::Invalid("PROXY v1 line too long")
        } else {
            Header::Incomplete
        };
    };
    let Ok(line) = std::str::from_utf8(&b[6..end]) else {
        return Header::Invalid("PROXY v1 line is not text");
    };
    let len = end + 2;
    let mut f = line.split(' ');
    let (v6, fam) = match f.next() {
        Some("UNKNOWN") => {
            return Header::Complete {
                len,
                source: None,
                dest: None,
            }
        }
        Some("TCP4") => (false, 4),
        Some("TCP6") => (true, 6),
        _ => return Header::Invalid("PROXY v1: unknown protocol"),
    };
    let parts: Vec<&str> = f.collect();
    let [src, dst, sport, dport] = parts[..] else {
        return Header::Invalid("PROXY v1: expected 4 fields");
    };
    let ip = |s: &str| -> Option<IpAddr> {
        let ip: IpAddr = s.parse().ok()?;
        (ip.is_ipv6() == v6).then_some(ip)
    };
    // ports: decimal, no sign, no leading zero (the spec's grammar)
    let port = |s: &str| -> Option<u16> {
        if s.is_empty()
            || (s.len() > 1 && s.starts_with('0'))
            || !s.bytes().all(|c| c.is_ascii_digit())
        {
            return None;
        }
        s.parse().ok()
    };
    match (ip(src), ip(dst), port(sport), port(dport)) {
        (Some(s), Some(d), Some(sp), Some(dp)) => Header::Complete {
            len,
            source: Some(SocketAddr::new(s, sp)),
            dest: Some(SocketAddr::new(d, dp)),
        },
        _ => Header::Invalid(if fam == 4 {
            "PROXY v1: bad TCP4 address or port"
        } else {
            "PROXY v1: bad TCP6 address or port"
        }),
    }
}

fn v2(b: &[u8]) -> Header {
    let ver_cmd = b[12];
    if ver_cmd >> 4 != 2 {
        return Header::Invalid("PROXY v2: bad version");
    }
    let fam = b[13];
    let body = u16::from_be_bytes([b[14], b[15]]) as usize;
    let len = 16 + body;
    if len > MAX_HEADER {
        return Header::Invalid("PROXY v2 header too long");
    }
    if b.len() < len {
        return Header::Incomplete;
    }
    let a = &b[16..len];
    match ver_cmd & 0xf {
        0 => {
            // LOCAL: the sender's own connection; addresses, if any, are ignored
            return Header::Complete {
                len,
                source: None,
                dest: None,
            };
        }
        1 => {}
        _ => return Header::Invalid("PROXY v2: bad command"),
    }
    match fam {
        // TCP over IPv4, TCP over IPv6
        0x11 if a.len() >= 12 => {
            let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]));
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Header::Complete {
                len,
                source: Some(SocketAddr::new(ip(0), port(8))),
                dest: Some(SocketAddr::new(ip(4), port(10))),
            }
        }
        0x21 if a.len() >= 36 => {
            let ip = |o: usize| {
                let mut x = [0u8; 16];
                x.copy_from_slice(&a[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(x))
            };
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Header::Complete {
                len,
                source: Some(SocketAddr::new(ip(0), port(32))),
                dest: Some(SocketAddr::new(ip(16), port(34))),
            }
        }
        0x11 | 0x21 => Header::Invalid("PROXY v2: addresses too short"),
        // UNSPEC or another family (UDP, unix): we only serve TCP; treat as the sender's own
        0x00 => Header::Complete {
            len,
            source: None,
            dest: None,
        },
        _ => Header::Invalid("PROXY v2: not a TCP connection"),
    }
}

/// A version 2 PROXY header for a connection from `source` to `dest` (mixed families are
/// written as IPv6, the IPv4 one mapped).
pub fn write_v2(out: &mut Vec<u8>, source: SocketAddr, dest: SocketAddr) {
    out.extend_from_slice(V2_SIG);
    out.push(0x21); // version 2, PROXY
    let v6 = |a: IpAddr| match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    match (source.ip(), dest.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&dest.port().to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v2_round_trips_at_every_split() {
        for (s, d) in [
            ("192.0.2.7:51000", "10.0.0.1:443"),
            ("[2001:db8::7]:51000", "[2001:db8::1]:5061"),
        ] {
            let mut h = Vec::new();
            write_v2(&mut h, sa(s), sa(d));
            let whole = h.len();
            h.extend_from_slice(b"\x16\x03\x01 the TLS bytes that follow");
            for cut in 0..whole {
                assert_eq!(parse(&h[..cut]), Header::Incomplete, "cut {cut}");
            }
            assert_eq!(
                parse(&h),
                Header::Complete {
                    len: whole,
                    source: Some(sa(s)),
                    dest: Some(sa(d))
                }
            );
        }
        // mixed families: written as IPv6
        let mut h = Vec::new();
        write_v2(&mut h, sa("192.0.2.7:1"), sa("[2001:db8::1]:2"));
        match parse(&h) {
            Header::Complete { source, .. } => {
                assert_eq!(source.unwrap().to_string(), "[::ffff:192.0.2.7]:1")
            }
            x => panic!("{x:?}"),
        }
    }

    #[test]
    fn v1_lines() {
        let line = b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 443\r\nGET / HTTP/1.1\r\n";
        let end = line.iter().position(|&c| c == b'\n').unwrap() + 1;
        for cut in 0..end {
            assert_eq!(parse(&line[..cut]), Header::Incomplete, "cut {cut}");
        }
        assert_eq!(
            parse(line),
            Header::Complete {
                len: end,
                source: Some(sa("192.0.2.7:51000")),
                dest: Some(sa("10.0.0.1:443"))
            }
        );
        assert!(matches!(
            parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 1 2\r\n"),
            Header::Complete {
                source: Some(_),
                ..
            }
        ));
        assert!(matches!(
            parse(b"PROXY UNKNOWN\r\n"),
            Header::Complete {
                source: None,
                len: 15,
                ..
            }
        ));
        for bad in [
            &b"PROXY TCP4 192.0.2.7 10.0.0.1 51000\r\n"[..],
            b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 051000 443\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 70000 443\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 -1 443\r\n",
            b"PROXY UDP4 192.0.2.7 10.0.0.1 1 2\r\n",
            b"GET / HTTP/1.1\r\n",
            b"\x16\x03\x01\x02\x00",
        ] {
            assert!(matches!(parse(bad), Header::Invalid(_)), "{bad:?}");
        }
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert!(matches!(parse(&long), Header::Invalid(_)));
    }

    #[test]
    fn v2_refusals_and_local() {
        let mut h = Vec::new();
        write_v2(&mut h, sa("192.0.2.7:1"), sa("10.0.0.1:2"));
        let mut local = h.clone();
        local[12] = 0x20;
        assert!(matches!(
            parse(&local),
            Header::Complete { source: None, .. }
        ));
        let mut bad = h.clone();
        bad[12] = 0x11;
        assert!(matches!(parse(&bad), Header::Invalid(_)));
        let mut udp = h.clone();
        udp[13] = 0x12;
        assert!(matches!(parse(&udp), Header::Invalid(_)));
        let mut short = h.clone();
        short[15] = 4;
        assert!(matches!(parse(&short), Header::Invalid(_)));
        let mut huge = h.clone();
        huge[14] = 0xff;
        assert!(matches!(parse(&huge), Header::Invalid(_)));
        // TLVs after the addresses are skipped
        let mut tlv = h.clone();
        tlv[15] += 7;
        tlv.extend_from_slice(&[0x04, 0, 4, 1, 2, 3, 4]);
        assert!(matches!(parse(&tlv), Header::Complete { len, .. } if len == h.len() + 7));
    }

    #[test]
    fn mangled_headers_never_panic() {
        let mut h = Vec::new();
        write_v2(&mut h, sa("[2001:db8::7]:51000"), sa("[2001:db8::1]:5061"));
        let v1 = b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 5061\r\n".to_vec();
        for base in [h, v1] {
            for i in 0..base.len() {
                for v in [0u8, b' ', b'\r', b'\n', 0x7f, 0xff] {
                    let mut m = base.clone();
                    m[i] = v;
                    for end in [m.len(), i + 1] {
                        let _ = parse(&m[..end]);
                    }
                }
            }
        }
    }
}
