//! The server name in a TLS ClientHello, read without terminating TLS (pass-through
//! services route by it and forward the exact bytes). Pure and bounded: the hello may come
//! split over TCP segments and over several TLS records, but never beyond `MAX_HELLO`.

/// Largest ClientHello (handshake message, header included) we wait for. Real ones are a few
/// hundred bytes to ~2 KiB (post-quantum key shares); TLS allows more, no browser sends it.
pub const MAX_HELLO: usize = 16 * 1024;

/// Bytes to read at most before a verdict: the records carrying `MAX_HELLO` bytes.
pub const MAX_READ: usize = MAX_HELLO + 5 * (MAX_HELLO / 512 + 2);

#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// Not enough bytes yet: read more (the caller bounds how much and how long).
    Incomplete,
    /// A whole ClientHello: its host_name, if it sent one.
    Complete { sni: Option<Box<str>> },
    /// Not a TLS ClientHello, or a malformed one.
    Invalid(&'static str),
}

const HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;

/// Read the ClientHello at the start of `input` (the bytes the client sent so far).
pub fn parse(input: &[u8]) -> Hello {
    // The handshake message may span records: gather its bytes. A hello in one record (all
    // of them in practice) is read in place; only a split one is copied.
    let mut joined: Vec<u8> = Vec::new();
    let mut first: Option<&[u8]> = None;
    let mut at = 0;
    loop {
        let rest = &input[at..];
        if rest.len() < 5 {
            return Hello::Incomplete;
        }
        if rest[0] != HANDSHAKE {
            return Hello::Invalid("not a TLS handshake record");
        }
        if rest[1] != 3 {
            return Hello::Invalid("not a TLS record version");
        }
        let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
        if len == 0 || len > 16 * 1024 + 256 {
            return Hello::Invalid("bad TLS record length");
        }
        if rest.len() < 5 + len {
            return Hello::Incomplete;
        }
        let fragment = &rest[5..5 + len];
        at += 5 + len;
        let msg: &[u8] = match first {
            None if joined.is_empty() => {
                first = Some(fragment);
                fragment
            }
            _ => {
                if let Some(f) = first.take() {
                    joined.extend_from_slice(f);
                }
                joined.extend_from_slice(fragment);
                &joined
            }
        };
        if msg.len() < 4 {
            if msg[0] != CLIENT_HELLO {
                return Hello::Invalid("not a ClientHello");
            }
            continue;
        }
        if msg[0] != CLIENT_HELLO {
            return Hello::Invalid("not a ClientHello");
        }
        let body_len = u32::from_be_bytes([0, msg[1], msg[2], msg[3]]) as usize;
        if body_len + 4 > MAX_HELLO {
            return Hello::Invalid("ClientHello too large");
        }
        if msg.len() < 4 + body_len {
            if at > MAX_READ {
                return Hello::Invalid("ClientHello too large");
            }
            continue;
        }
        return match client_hello(&msg[4..4 + body_len]) {
            Ok(sni) => Hello::Complete { sni },
            Err(e) => Hello::Invalid(e),
        };
    }
}

/// A cursor that refuses to read past its end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.0.len() < n {
            return Err("truncated ClientHello");
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<usize, &'static str> {
        Ok(self.take(1)?[0] as usize)
    }
    fn u16(&mut self) -> Result<usize, &'static str> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]) as usize)
    }
    /// A vector with a one- or two-byte length prefix.
    fn vec8(&mut self) -> Result<&'a [u8], &'static str> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Result<&'a [u8], &'static str> {
        let n = self.u16()?;
        self.take(n)
    }
}

fn client_hello(body: &[u8]) -> Result<Option<Box<str>>, &'static str> {
    let mut r = Reader(body);
    let version = r.take(2)?;
    if version[0] != 3 {
        return Err("bad ClientHello version");
    }
    r.take(32)?; // random
    if r.vec8()?.len() > 32 {
        return Err("bad session id");
    }
    let suites = r.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err("bad cipher suites");
    }
    if r.vec8()?.is_empty() {
        return Err("no compression methods");
    }
    if r.0.is_empty() {
        return Ok(None); // no extensions at all (old clients): no SNI
    }
    let mut exts = Reader(r.vec16()?);
    if !r.0.is_empty() {
        return Err("bytes after the extensions");
    }
    let mut sni = None;
    let mut seen_sni = false;
    while !exts.0.is_empty() {
        let kind = exts.u16()? as u16;
        let data = exts.vec16()?;
        if kind != EXT_SERVER_NAME {
            continue;
        }
        if seen_sni {
            return Err("two server_name extensions");
        }
        seen_sni = true;
        let mut d = Reader(data);
        let mut list = Reader(d.vec16()?);
        if !d.0.is_empty() {
            return Err("bad server_name extension");
        }
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let name = list.vec16()?;
            // host_name (0) is the only type defined; others are skipped, as RFC 6066 allows
            if name_type == 0 && sni.is_none() {
                sni = Some(host_name(name)?);
            }
        }
    }
    Ok(sni)
}

/// A DNS host name as SNI carries it: letters, digits, '-', '.', '_'; no trailing dot; lower
/// case (names match in any case).
fn host_name(b: &[u8]) -> Result<Box<str>, &'static str> {
    // a fully qualified name's trailing dot names the same host (as routing reads Host)
    let b = b.strip_suffix(b".").unwrap_or(b);
    if b.is_empty() || b.len() > 253 {
        return Err("bad server name length");
    }
    if !b
        .iter()
        .all(|&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.' || c == b'_')
        || b[0] == b'.'
        || b[b.len() - 1] == b'.'
    {
        return Err("server name is not a host name");
    }
    Ok(std::str::from_utf8(b)
        .map_err(|_| "server name is not a host name")?
        .to_ascii_lowercase()
        .into_boxed_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello record as a client would send it, with `sni` (if any) and `pad` bytes
    /// of padding extension.
    pub(crate) fn hello(sni: Option<&str>, pad: usize) -> Vec<u8> {
        let mut exts = Vec::new();
        if let Some(name) = sni {
            let n = name.as_bytes();
            let mut list = vec![0u8];
            list.extend_from_slice(&(n.len() as u16).to_be_bytes());
            list.extend_from_slice(n);
            let mut data = (list.len() as u16).to_be_bytes().to_vec();
            data.extend_from_slice(&list);
            exts.extend_from_slice(&0u16.to_be_bytes());
            exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
            exts.extend_from_slice(&data);
        }
        if pad > 0 {
            exts.extend_from_slice(&21u16.to_be_bytes());
            exts.extend_from_slice(&(pad as u16).to_be_bytes());
            exts.extend(std::iter::repeat_n(0, pad));
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut msg = vec![CLIENT_HELLO];
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(&body);
        records(&msg, 16384)
    }

    /// `msg` cut into handshake records of at most `max` bytes.
    pub(crate) fn records(msg: &[u8], max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in msg.chunks(max) {
            out.extend_from_slice(&[HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    fn unwrap_records(r: &[u8]) -> Vec<u8> {
        let mut msg = Vec::new();
        let mut at = 0;
        while at < r.len() {
            let len = u16::from_be_bytes([r[at + 3], r[at + 4]]) as usize;
            msg.extend_from_slice(&r[at + 5..at + 5 + len]);
            at += 5 + len;
        }
        msg
    }

    #[test]
    fn reads_the_name_at_every_split() {
        let h = hello(Some("Meet.MyCloud.example"), 0);
        for cut in 0..h.len() {
            assert_eq!(parse(&h[..cut]), Hello::Incomplete, "cut at {cut}");
        }
        assert_eq!(
            parse(&h),
            Hello::Complete {
                sni: Some("meet.mycloud.example".into())
            }
        );
        // the bytes of the next flight after it do not matter
        let mut more = h.clone();
        more.extend_from_slice(b"\x14\x03\x03\x00\x01\x01");
        assert!(matches!(parse(&more), Hello::Complete { .. }));
    }

    #[test]
    fn a_hello_over_several_records() {
        // tiny records cost 5 bytes each: a small hello in them, a large one in larger ones
        for (max, pad) in [
            (1, 0),
            (2, 0),
            (3, 40),
            (4, 40),
            (5, 300),
            (100, 3000),
            (1000, 3000),
        ] {
            let msg = unwrap_records(&hello(Some("sip.example.com"), pad));
            let many = records(&msg, max);
            assert_eq!(
                parse(&many),
                Hello::Complete {
                    sni: Some("sip.example.com".into())
                },
                "records of {max}"
            );
            assert_eq!(parse(&many[..many.len() - 1]), Hello::Incomplete);
        }
    }

    #[test]
    fn no_sni_and_refusals() {
        assert_eq!(parse(&hello(None, 0)), Hello::Complete { sni: None });
        assert_eq!(parse(&hello(None, 100)), Hello::Complete { sni: None });
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\n\r\n"),
            Hello::Invalid(_)
        ));
        assert!(matches!(parse(&hello(Some("a b"), 0)), Hello::Invalid(_)));
        assert!(matches!(parse(&hello(Some("x.."), 0)), Hello::Invalid(_)));
        assert_eq!(
            parse(&hello(Some("www.Example."), 0)),
            Hello::Complete {
                sni: Some("www.example".into())
            }
        );
        // too large: refused without waiting for the rest
        let big = hello(Some("a.example"), MAX_HELLO);
        assert!(matches!(parse(&big[..6000]), Hello::Incomplete));
        assert_eq!(parse(&big), Hello::Invalid("ClientHello too large"));
        // a declared length larger than the allowance is refused from the first record
        let msg = unwrap_records(&big);
        let split = records(&msg, 1000);
        assert_eq!(
            parse(&split[..1005]),
            Hello::Invalid("ClientHello too large")
        );
        // a byte that no host name has
        let mut h = hello(Some("a.example"), 0);
        let n = h.len();
        h[n - 10] = 0xff;
        assert!(matches!(parse(&h), Hello::Invalid(_)));
    }

    /// Every byte changed, every prefix: a verdict and no panic.
    #[test]
    fn mangled_hellos_never_panic() {
        let h = hello(Some("lyncdiscover.example.com"), 40);
        // a hello in 1-byte records beyond the read bound is refused, not waited for
        let big = records(&unwrap_records(&hello(Some("a.example"), 4000)), 1);
        assert_eq!(parse(&big), Hello::Invalid("ClientHello too large"));
        let msg = unwrap_records(&h);
        let split = records(&msg, 7);
        for base in [&h, &split] {
            for i in 0..base.len() {
                for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                    let mut m = base.clone();
                    m[i] = v;
                    for end in [m.len(), i + 1] {
                        let _ = parse(&m[..end]);
                    }
                }
            }
        }
        let mut seed = 0x9e3779b97f4a7c15u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 300) as usize;
            let mut m = h[..5.min(h.len())].to_vec();
            m.extend((0..len).map(|i| (seed >> (i % 56)) as u8));
            let _ = parse(&m);
        }
    }
}
